"""Clients for sensor processes: ``Client`` (blocking) and ``AsyncClient`` (asyncio).

Both speak protocol v1 over a DEALER socket, time out every call, raise the typed errors of
``edged.errors``, and survive a daemon restart: ZeroMQ reconnects by itself, stale replies are
matched by request id and dropped, and the blocking client resets its socket after a timeout so
a request lost with the old daemon is never answered late.

Output arrays are read-only views on the received frames (no copy); ``.copy()`` one to modify it.
``generate`` (a prompt) and ``chat`` (messages, formatted by the model's chat template) stream
text as the model produces it: iterate the returned stream for the pieces, then read its
``completion``; closing a stream early cancels the generation in the daemon.

Large tensors (camera frames) need not travel through the socket: ``client.region(size)`` makes
a shared-memory region the daemon maps too (``edged.shm``), ``region.array(shape, dtype)`` a
view on it to fill, and ``infer`` sends any input that is such a view as a reference to it;
``outputs_to`` has outputs written into such views. ``edged.shm.FrameRing`` hands out frame
slots of one region in turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections.abc import AsyncIterator, Awaitable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, cast

import numpy as np
import zmq
import zmq.asyncio

from edged import protocol
from edged.errors import (
    ClientTimeout,
    ConfigError,
    EdgedError,
)
from edged.paths import default_infer_endpoint
from edged.reach import check_endpoint, why_unreachable
from edged.shm import Region, Regions, new_routing_id
from edged.zmqio import NOBLOCK, recv_frames, send_frames

if TYPE_CHECKING:
    from edged.vectors import CollectionClient

DEFAULT_TIMEOUT_S = 5.0
T = TypeVar("T")
Inputs = Mapping[str, Any]
#: chat messages: ``{"role": ..., "content": str or [{"type": "text", "text": str}, ...]}``
Messages = Sequence[Mapping[str, Any]]


@dataclass(frozen=True)
class Result:
    outputs: dict[str, np.ndarray[Any, Any]]
    model: str
    version: int
    #: the daemon's timings (queue_us, run_us, batch) and the client-measured round trip
    timing: dict[str, Any]
    trace: str | None = None

    def __getitem__(self, name: str) -> np.ndarray[Any, Any]:
        return self.outputs[name]


def _result(reply: protocol.Reply, started: float, regions: Regions) -> Result:
    fields = reply.fields  # decoded for this call alone: its timing map is ours to extend
    timing = fields.get("timing")
    timing = timing if isinstance(timing, dict) else {}
    timing["rtt_us"] = int((time.perf_counter() - started) * 1e6)
    return Result(
        outputs=regions.outputs(reply) if reply.refs else reply.tensors,
        model=str(fields.get("model")),
        version=int(fields.get("version", 0)),
        timing=timing,
        trace=fields.get("trace"),
    )


@dataclass
class Completion:
    """A finished (or cancelled) generation: what streamed, why it ended, what it cost."""

    text: str = ""
    #: "length" (max_tokens reached), "stop" (a stop sequence or end of text), "cancelled"
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: the daemon's queue_us, run_us, ttft_us and tokens_per_s
    timing: dict[str, Any] = field(default_factory=dict)
    model: str = ""
    version: int = 0
    #: with ``logprobs=True``, one ``{token, logprob, top_logprobs}`` per generated token, in
    #: order (PROTOCOL §5.4); filled as the stream comes
    logprobs: list[dict[str, Any]] = field(default_factory=list)


def _text_request(
    request_id: int, op: str, model: str, source: dict[str, Any], options: dict[str, Any]
) -> list[Any]:
    """Frames of a ``generate`` or ``chat`` request: ``source`` is its prompt or messages;
    unset ``options`` take the daemon's defaults."""
    given = {key: value for key, value in options.items() if value is not None}
    common = {key: given.pop(key, None) for key in ("version", "deadline_ms", "trace")}
    fields = {**source, **given}
    return protocol.encode_request(request_id, op, model=model, fields=fields, **common)


def _absorb(completion: Completion, pieces: list[str], reply: protocol.Reply) -> str | None:
    """Fold one stream message into ``completion``: its text, or ``None`` at the final one."""
    reply.raise_for_error()
    fields = reply.fields
    if fields.get("more"):
        text = str(fields.get("text", ""))
        pieces.append(text)
        logprobs = fields.get("logprobs")
        if isinstance(logprobs, list):
            completion.logprobs.extend(logprobs)
        return text
    usage = fields.get("usage", {})
    completion.text = "".join(pieces)
    completion.finish_reason = fields.get("finish_reason")
    completion.prompt_tokens = int(usage.get("prompt_tokens", 0))
    completion.completion_tokens = int(usage.get("completion_tokens", 0))
    completion.timing = dict(fields.get("timing", {}))
    completion.model = str(fields.get("model", ""))
    completion.version = int(fields.get("version", 0))
    return None


def _embedding(reply: protocol.Reply) -> np.ndarray[Any, Any]:
    return reply.tensors["embedding"]


def _infer_request(
    request_id: int,
    model: str,
    inputs: Inputs,
    regions: Regions,
    outputs_to: Mapping[str, np.ndarray[Any, Any]] | None,
    **common: Any,
) -> list[Any]:
    """Frames of an infer request: inputs that are views on ``regions`` go as references."""
    locate = None
    if regions:
        regions.connected()  # a daemon that restarted gets the regions again, first
        locate = regions.locate
    fields = {"outputs": regions.targets(outputs_to)} if outputs_to else None
    return protocol.encode_request(
        request_id, "infer", model=model, inputs=inputs, fields=fields, locate=locate, **common
    )


@dataclass(frozen=True)
class CurveKeys:
    """CurveZMQ keys for the remote control socket: the daemon's public key and the client's
    pair (the client's public key must be in the daemon's ``control.authorized_keys``)."""

    server_public: bytes
    public: bytes
    secret: bytes

    @classmethod
    def load(cls, server_key: str, client_key: str) -> CurveKeys:
        """From ``edgectl keys curve`` files: the daemon's ``.key``, this client's
        ``.key_secret``; a missing or wrong file raises ConfigError."""
        import zmq.auth

        try:
            server_public, _ = zmq.auth.load_certificate(server_key)
            public, secret = zmq.auth.load_certificate(client_key)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read a key file: {exc}") from None
        if secret is None:
            raise ConfigError(
                f"{client_key} is a public key: the client's key is its secret one, "
                "NAME.key_secret (NAME.key is the public half that the daemon authorizes)"
            )
        return cls(server_public, public, secret)

    def apply(self, sock: zmq.Socket[Any]) -> None:
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.server_public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)


def _timeout_error(endpoint: str, timeout: float, curve: bool = False) -> ClientTimeout:
    """No reply within ``timeout``: a NoDaemon or SocketAccessDenied where an IPC endpoint tells
    why (the daemon stopped, or was replaced, while this client waited), else the likely causes."""
    unreachable = why_unreachable(endpoint)
    if unreachable is not None:
        return unreachable
    why = (
        "is edged running there, and does it accept this client key (and is that its server key)?"
        if curve
        else "is edged running, and was the message within its size limit?"
    )
    return ClientTimeout(f"no reply from {endpoint} within {timeout:g} s: {why}")


class Client:
    """Blocking client; not thread-safe (use one per thread)."""

    def __init__(
        self,
        endpoint: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        context: zmq.Context[Any] | None = None,
        curve: CurveKeys | None = None,
    ) -> None:
        self.endpoint = endpoint or default_infer_endpoint()
        self.timeout = timeout
        self.curve = curve
        self._context = context or zmq.Context.instance()
        self._socket: zmq.Socket[Any] | None = None
        self._rcvtimeo_ms = -1
        self._send_timeout: float | None = None
        self._ids = itertools.count(1)
        #: this client's ZMQ_ROUTING_ID, the same on every socket it opens: its regions' owner
        self.routing_id = new_routing_id()
        self._regions = Regions(self.endpoint, self.routing_id, timeout)

    def infer(
        self,
        model: str,
        inputs: Inputs,
        *,
        version: int | None = None,
        deadline_ms: float | None = None,
        trace: str | None = None,
        timeout: float | None = None,
        outputs_to: Mapping[str, np.ndarray[Any, Any]] | None = None,
    ) -> Result:
        """Run ``model``; inputs that are views on this client's regions go as references, and
        the outputs named in ``outputs_to`` are written into the region views given there (the
        result's arrays for them are views there too)."""
        started = time.perf_counter()
        request_id = next(self._ids)
        frames = _infer_request(
            request_id,
            model,
            inputs,
            self._regions,
            outputs_to,
            version=version,
            deadline_ms=deadline_ms,
            trace=trace,
        )
        return _result(self._call(request_id, frames, timeout), started, self._regions)

    def region(self, size: int, name: str = "") -> Region:
        """A shared-memory region of ``size`` bytes, registered with the daemon for this client
        (a blocking round trip on regions.sock; the daemon needs the IPC endpoint)."""
        return self._regions.create(size, name)

    def generate(
        self,
        model: str,
        prompt: str,
        *,
        max_tokens: int | None = None,
        stop: str | list[str] | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        version: int | None = None,
        deadline_ms: float | None = None,
        trace: str | None = None,
        timeout: float | None = None,
        **sampling: Any,
    ) -> TokenStream:
        """Start a generation; iterate the stream for text as it comes. ``timeout`` bounds the
        wait for each message, not the whole generation. ``sampling``: further settings by
        their header keys (``top_k``, ``min_p``, ``repeat_penalty``, ``presence_penalty``,
        ``frequency_penalty``, ``grammar``, ``json_schema``, ``logprobs``, ``top_logprobs``:
        PROTOCOL §4.2); with ``logprobs=True`` the completion's ``logprobs`` fill up."""
        return self._start(
            "generate",
            model,
            {"prompt": prompt},
            timeout,
            max_tokens=max_tokens,
            stop=stop,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            version=version,
            deadline_ms=deadline_ms,
            trace=trace,
            **sampling,
        )

    def chat(
        self, model: str, messages: Messages, *, timeout: float | None = None, **options: Any
    ) -> TokenStream:
        """As ``generate``, with its keyword options, for the assistant's reply to
        ``messages`` (roles ``system``, ``developer``, ``user``, ``assistant``, ``tool``),
        formatted by the model's chat template (PROTOCOL §4.3)."""
        return self._start("chat", model, {"messages": messages}, timeout, **options)

    def _start(
        self, op: str, model: str, source: dict[str, Any], timeout: float | None, **options: Any
    ) -> TokenStream:
        """Send a ``generate`` or ``chat`` request; its stream reads the replies."""
        request_id = next(self._ids)
        frames = _text_request(request_id, op, model, source, options)
        timeout = self.timeout if timeout is None else timeout
        self._send(frames, timeout)
        return TokenStream(self, request_id, timeout)

    def embed(
        self, model: str, texts: str | list[str], *, timeout: float | None = None
    ) -> np.ndarray[Any, Any]:
        """One embedding per text, pooled as the model is configured: float32[len(texts), dim]."""
        request_id = next(self._ids)
        frames = protocol.encode_request(request_id, "embed", model=model, fields={"input": texts})
        return _embedding(self._call(request_id, frames, timeout))

    def describe(self, model: str, timeout: float | None = None) -> dict[str, Any]:
        request_id = next(self._ids)
        frames = protocol.encode_request(request_id, "describe", model=model)
        return self._call(request_id, frames, timeout).fields

    def stream(
        self, op: str, *, timeout: float | None = None, **fields: Any
    ) -> Generator[dict[str, Any], None, None]:
        """A command whose replies stream (``logs`` with ``follow``): each reply's keys, until
        the final one. ``timeout`` bounds the wait for each reply (``math.inf``: forever).
        Leaving the loop early cancels the command in the daemon."""
        timeout = self.timeout if timeout is None else timeout
        request_id = next(self._ids)
        given = {key: value for key, value in fields.items() if value is not None}
        self._send(protocol.encode_request(request_id, op, fields=given), timeout)
        finished = False
        try:
            while not finished:
                reply = self._receive(request_id, timeout)
                reply.raise_for_error()
                finished = not reply.fields.get("more")
                yield reply.fields
        finally:
            if not finished and self._socket is not None:
                cancel = {"target": request_id}
                frames = protocol.encode_request(next(self._ids), "cancel", fields=cancel)
                with contextlib.suppress(zmq.Again):  # a full queue: the daemon is not reading
                    send_frames(self._socket, frames, NOBLOCK)

    def command(
        self,
        op: str,
        *,
        model: str | None = None,
        version: int | None = None,
        timeout: float | None = None,
        data: protocol.Buffer | None = None,
        probe_every: float | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """A control command (``swap``, ``rollback``, ``models``) on a client of the control
        socket; unset ``fields`` are left out, ``data`` (an ``upload``'s chunk) is sent as the
        frame after the header. Returns the reply's keys.

        ``probe_every`` (seconds), for a command whose reply may take long (an install): while
        waiting, ping the daemon that often on a fresh connection and give up at once when it
        does not answer, rather than at the end of ``timeout``."""
        request_id = next(self._ids)
        given = {key: value for key, value in fields.items() if value is not None}
        frames = protocol.encode_request(
            request_id, op, model=model, version=version, fields=given, data=data
        )
        return self._call(request_id, frames, timeout, probe_every).fields

    def exchange(
        self,
        op: str,
        *,
        inputs: Inputs | None = None,
        timeout: float | None = None,
        **fields: Any,
    ) -> protocol.Reply:
        """One request of ``op`` with ``inputs`` as tensor frames and ``fields`` (unset ones
        left out), and its reply, tensors included; an error reply raises."""
        request_id = next(self._ids)
        given = {key: value for key, value in fields.items() if value is not None}
        frames = protocol.encode_request(request_id, op, inputs=inputs, fields=given)
        return self._call(request_id, frames, timeout)

    def collection(self, name: str) -> CollectionClient:
        """The vector collection ``name``: upsert, search, delete, get, count."""
        from edged.vectors import CollectionClient

        return CollectionClient(self, name)

    def ping(self, timeout: float | None = None) -> dict[str, Any]:
        request_id = next(self._ids)
        return self._call(request_id, protocol.encode_request(request_id, "ping"), timeout).fields

    def close(self) -> None:
        """Close the socket and every region."""
        self._regions.close()
        self._reset()

    def _reset(self) -> None:
        """Drop the socket and what is queued on it (for a daemon that may be gone); the next
        call connects afresh, under a new routing id: the daemon may still hold the old
        connection, whose id a new one could not take. The regions follow the new id."""
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
        self.routing_id = new_routing_id()
        self._regions.rebind(self.routing_id)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connect(self) -> zmq.Socket[Any]:
        if self._socket is None:
            check_endpoint(self.endpoint)
            sock = self._context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.ROUTING_ID, self.routing_id)
            if self.curve is not None:
                self.curve.apply(sock)
            sock.connect(self.endpoint)
            self._socket = sock
            self._rcvtimeo_ms = -1
            self._send_timeout = None
        return self._socket

    def _call(
        self,
        request_id: int,
        frames: list[Any],
        timeout: float | None,
        probe_every: float | None = None,
    ) -> protocol.Reply:
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        self._send(frames, timeout)
        reply = self._receive(request_id, timeout, deadline, probe_every)
        reply.raise_for_error()
        return reply

    def _send(self, frames: list[Any], timeout: float) -> None:
        """Send within ``timeout``: a send blocks once the high-water mark of requests is queued
        for a daemon that does not read them (one that is gone)."""
        sock = self._connect()
        if timeout != self._send_timeout:  # set only on change, like RCVTIMEO
            sock.setsockopt(zmq.SNDTIMEO, _milliseconds(timeout))
            self._send_timeout = timeout
        try:
            send_frames(sock, frames)
        except zmq.Again:
            self._reset()  # drop the queue for a daemon that may be gone
            raise _timeout_error(self.endpoint, timeout, self.curve is not None) from None

    def _receive(
        self,
        request_id: int,
        timeout: float,
        deadline: float | None = None,
        probe_every: float | None = None,
    ) -> protocol.Reply:
        """The next reply to ``request_id`` by ``deadline`` (``timeout`` from now by default),
        dropping any other (stale) reply on the way; with ``probe_every``, giving up early on a
        daemon that stopped answering."""
        sock = self._connect()
        deadline = time.monotonic() + timeout if deadline is None else deadline
        while True:
            left = deadline - time.monotonic()
            # RCVTIMEO rather than poll(): one system call less per request; set only on change
            wait_ms = _milliseconds(left if probe_every is None else min(left, probe_every))
            if wait_ms != self._rcvtimeo_ms:
                sock.setsockopt(zmq.RCVTIMEO, wait_ms)
                self._rcvtimeo_ms = wait_ms
            try:
                parts = recv_frames(sock)
            except zmq.Again:
                if deadline - time.monotonic() <= 0:
                    self._reset()  # drop whatever is queued for a daemon that may be gone
                    raise _timeout_error(self.endpoint, timeout, self.curve is not None) from None
                if probe_every is not None:
                    self._check_alive()
                continue  # woken early (the peer went away, or time to probe): wait out the rest
            reply = protocol.decode_reply([part.buffer for part in parts])
            if reply.id == request_id:
                return reply

    def _check_alive(self) -> None:
        """Ping the daemon on a fresh connection (this one still waits for its reply); when no
        answer comes, close this one and raise why."""
        probe = Client(self.endpoint, self.timeout, self._context, self.curve)
        try:
            probe.ping()
        except ClientTimeout as exc:
            self._reset()
            raise type(exc)(
                f"the daemon stopped answering while this client waited: {exc}"
            ) from None
        finally:
            probe.close()


def _milliseconds(seconds: float) -> int:
    """A socket timeout option's value: -1 waits for ever. Rounded up, so that a wait just under
    a whole number of milliseconds sets the same value as the last one (no setsockopt)."""
    return -1 if math.isinf(seconds) else max(0, math.ceil(seconds * 1000))


class TokenStream:
    """The text of one ``generate`` or ``chat`` request as it streams; ``completion`` once it
    has ended.

    Iterate it to the end, or ``close()`` it (a ``with`` block does) to cancel the generation:
    the daemon then frees the model for the next request at once.
    """

    def __init__(self, client: Client, request_id: int, timeout: float) -> None:
        self.request_id = request_id
        self.completion = Completion()
        self._client = client
        self._timeout = timeout
        self._pieces: list[str] = []
        self._done = False

    def __iter__(self) -> Iterator[str]:
        while not self._done:
            try:
                text = _absorb(self.completion, self._pieces, self._next())
            except BaseException:
                self._done = True
                raise
            if text is None:
                self._done = True
                return
            yield text

    def text(self) -> Completion:
        """Wait for the end and return the completion."""
        for _ in self:
            pass
        return self.completion

    def cancel(self) -> None:
        """Ask the daemon to stop this generation; the stream then ends with what came so far
        and ``finish_reason`` "cancelled" (or normally, if it was already ending)."""
        if not self._done:
            frames = protocol.encode_request(
                next(self._client._ids), "cancel", fields={"target": self.request_id}
            )
            self._client._send(frames, self._timeout)  # its reply is dropped as stale

    def close(self) -> None:
        """Cancel the generation if it is still running and wait for its final message."""
        if not self._done:
            self.cancel()
            self.text()

    def _next(self) -> protocol.Reply:
        return self._client._receive(self.request_id, self._timeout)

    def __enter__(self) -> TokenStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """asyncio client: many requests may be in flight at once on one socket."""

    def __init__(
        self,
        endpoint: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        self.endpoint = endpoint or default_infer_endpoint()
        self.timeout = timeout
        self._context = context or zmq.asyncio.Context.instance()
        self._socket: zmq.asyncio.Socket | None = None
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[protocol.Reply]] = {}
        self._streams: dict[int, asyncio.Queue[protocol.Reply]] = {}
        self._reader: asyncio.Task[None] | None = None
        #: this client's ZMQ_ROUTING_ID: its regions' owner
        self.routing_id = new_routing_id()
        self._regions = Regions(self.endpoint, self.routing_id, timeout)

    async def infer(
        self,
        model: str,
        inputs: Inputs,
        *,
        version: int | None = None,
        deadline_ms: float | None = None,
        trace: str | None = None,
        timeout: float | None = None,
        outputs_to: Mapping[str, np.ndarray[Any, Any]] | None = None,
    ) -> Result:
        """As ``Client.infer``: region views go as references, ``outputs_to`` into regions."""
        started = time.perf_counter()
        request_id = next(self._ids)
        frames = _infer_request(
            request_id,
            model,
            inputs,
            self._regions,
            outputs_to,
            version=version,
            deadline_ms=deadline_ms,
            trace=trace,
        )
        return _result(await self._call(request_id, frames, timeout), started, self._regions)

    def region(self, size: int, name: str = "") -> Region:
        """As ``Client.region``: registering is a setup step, a blocking round trip of
        microseconds on a local socket (bounded by the client's timeout)."""
        return self._regions.create(size, name)

    def generate(
        self,
        model: str,
        prompt: str,
        *,
        max_tokens: int | None = None,
        stop: str | list[str] | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        version: int | None = None,
        deadline_ms: float | None = None,
        trace: str | None = None,
        timeout: float | None = None,
        completion: Completion | None = None,
        **sampling: Any,
    ) -> AsyncIterator[str]:
        """Text as the model produces it; pass ``completion`` to get the final figures (and the
        ``logprobs``, when asked). Leaving the loop early (break, an exception, cancellation)
        cancels the generation. ``sampling`` as ``Client.generate``'s."""
        return self._stream(
            "generate",
            model,
            {"prompt": prompt},
            timeout,
            completion,
            max_tokens=max_tokens,
            stop=stop,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            version=version,
            deadline_ms=deadline_ms,
            trace=trace,
            **sampling,
        )

    def chat(
        self,
        model: str,
        messages: Messages,
        *,
        timeout: float | None = None,
        completion: Completion | None = None,
        **options: Any,
    ) -> AsyncIterator[str]:
        """As ``generate``, with its keyword options, for the assistant's reply to
        ``messages`` (``Client.chat``)."""
        return self._stream("chat", model, {"messages": messages}, timeout, completion, **options)

    async def _stream(
        self,
        op: str,
        model: str,
        source: dict[str, Any],
        timeout: float | None,
        completion: Completion | None,
        **options: Any,
    ) -> AsyncIterator[str]:
        """A ``generate`` or ``chat`` request's text, sent when first iterated."""
        timeout = self.timeout if timeout is None else timeout
        completion = completion if completion is not None else Completion()
        request_id = next(self._ids)
        frames = _text_request(request_id, op, model, source, options)
        stream: asyncio.Queue[protocol.Reply] = asyncio.Queue()
        self._streams[request_id] = stream
        pieces: list[str] = []
        finished = False
        try:
            await self._send(frames, timeout)
            while True:
                reply = await self._within(stream.get(), timeout)
                text = _absorb(completion, pieces, reply)
                if text is None:
                    finished = True
                    return
                yield text
        finally:
            self._streams.pop(request_id, None)
            if not finished and self._socket is not None:
                cancel = protocol.encode_request(
                    next(self._ids), "cancel", fields={"target": request_id}
                )
                with contextlib.suppress(zmq.ZMQError):
                    self._socket.send_multipart(cancel, flags=zmq.NOBLOCK)

    async def embed(
        self, model: str, texts: str | list[str], *, timeout: float | None = None
    ) -> np.ndarray[Any, Any]:
        request_id = next(self._ids)
        frames = protocol.encode_request(request_id, "embed", model=model, fields={"input": texts})
        return _embedding(await self._call(request_id, frames, timeout))

    async def describe(self, model: str, timeout: float | None = None) -> dict[str, Any]:
        request_id = next(self._ids)
        frames = protocol.encode_request(request_id, "describe", model=model)
        return (await self._call(request_id, frames, timeout)).fields

    async def ping(self, timeout: float | None = None) -> dict[str, Any]:
        request_id = next(self._ids)
        frames = protocol.encode_request(request_id, "ping")
        return (await self._call(request_id, frames, timeout)).fields

    async def close(self) -> None:
        """Close the socket and every region."""
        self._regions.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(
        self, request_id: int, frames: list[Any], timeout: float | None
    ) -> protocol.Reply:
        timeout = self.timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        future: asyncio.Future[protocol.Reply] = loop.create_future()
        self._waiting[request_id] = future
        try:
            await self._send(frames, timeout)
            reply = await self._within(future, timeout, deadline - loop.time())
        finally:
            self._waiting.pop(request_id, None)
        reply.raise_for_error()
        return reply

    async def _send(self, frames: list[Any], timeout: float) -> None:
        """Send within ``timeout``: at once, unless the high-water mark of requests is queued
        for a daemon that does not read them (one that is gone)."""
        if self._socket is None:
            check_endpoint(self.endpoint)
            self._socket = self._context.socket(zmq.DEALER)
            self._socket.setsockopt(zmq.LINGER, 0)
            self._socket.setsockopt(zmq.ROUTING_ID, self.routing_id)
            self._socket.connect(self.endpoint)
            self._reader = asyncio.create_task(self._read(self._socket))
        sending = cast("asyncio.Future[Any]", self._socket.send_multipart(frames, copy=False))
        if sending.done():  # the usual case: no wait for a loop cycle
            sending.result()
        else:
            await self._within(sending, timeout)

    async def _within(self, step: Awaitable[T], timeout: float, wait: float | None = None) -> T:
        """``step``, given up after ``wait`` seconds (default ``timeout``, the one reported)."""
        try:
            return await asyncio.wait_for(step, timeout if wait is None else wait)
        except asyncio.TimeoutError:
            raise _timeout_error(self.endpoint, timeout) from None

    async def _read(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            parts = await sock.recv_multipart(copy=False)
            try:
                reply = protocol.decode_reply([part.buffer for part in parts])
            except EdgedError:  # a garbled reply cannot be matched to a request; its call times out
                continue
            if reply.id is None:
                continue
            stream = self._streams.get(reply.id)
            if stream is not None:
                stream.put_nowait(reply)
                continue
            future = self._waiting.get(reply.id)
            if future is not None and not future.done():
                future.set_result(reply)
