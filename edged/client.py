"""Clients for sensor processes: ``Client`` (blocking) and ``AsyncClient`` (asyncio).

Both speak protocol v1 over a DEALER socket, time out every call, raise the typed errors of
``edged.errors``, and survive a daemon restart: ZeroMQ reconnects by itself, stale replies are
matched by request id and dropped, and the blocking client resets its socket after a timeout so
a request lost with the old daemon is never answered late.

Output arrays are read-only views on the received frames (no copy); ``.copy()`` one to modify it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq
import zmq.asyncio

from edged import protocol
from edged.errors import ClientTimeout, EdgedError
from edged.paths import default_infer_endpoint
from edged.zmqio import recv_frames, send_frames

DEFAULT_TIMEOUT_S = 5.0
Inputs = Mapping[str, Any]


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


def _result(reply: protocol.Reply, started: float) -> Result:
    timing = dict(reply.fields.get("timing", {}))
    timing["rtt_us"] = int((time.perf_counter() - started) * 1e6)
    return Result(
        outputs=reply.tensors,
        model=str(reply.fields.get("model")),
        version=int(reply.fields.get("version", 0)),
        timing=timing,
        trace=reply.fields.get("trace"),
    )


def _as_arrays(inputs: Inputs) -> dict[str, np.ndarray[Any, Any]]:
    return {name: np.asarray(value) for name, value in inputs.items()}


def _timeout_error(endpoint: str, timeout: float) -> ClientTimeout:
    return ClientTimeout(
        f"no reply from {endpoint} within {timeout:g} s: is edged running, and was the "
        f"message within its size limit?"
    )


class Client:
    """Blocking client; not thread-safe (use one per thread)."""

    def __init__(
        self,
        endpoint: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        context: zmq.Context[Any] | None = None,
    ) -> None:
        self.endpoint = endpoint or default_infer_endpoint()
        self.timeout = timeout
        self._context = context or zmq.Context.instance()
        self._socket: zmq.Socket[Any] | None = None
        self._rcvtimeo_ms = -1
        self._ids = itertools.count(1)

    def infer(
        self,
        model: str,
        inputs: Inputs,
        *,
        version: int | None = None,
        deadline_ms: float | None = None,
        trace: str | None = None,
        timeout: float | None = None,
    ) -> Result:
        started = time.perf_counter()
        request_id = next(self._ids)
        frames = protocol.encode_request(
            request_id,
            "infer",
            model=model,
            inputs=_as_arrays(inputs),
            version=version,
            deadline_ms=deadline_ms,
            trace=trace,
        )
        return _result(self._call(request_id, frames, timeout), started)

    def describe(self, model: str, timeout: float | None = None) -> dict[str, Any]:
        request_id = next(self._ids)
        frames = protocol.encode_request(request_id, "describe", model=model)
        return self._call(request_id, frames, timeout).fields

    def ping(self, timeout: float | None = None) -> dict[str, Any]:
        request_id = next(self._ids)
        return self._call(request_id, protocol.encode_request(request_id, "ping"), timeout).fields

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connect(self) -> zmq.Socket[Any]:
        if self._socket is None:
            sock = self._context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.endpoint)
            self._socket = sock
            self._rcvtimeo_ms = -1
        return self._socket

    def _call(self, request_id: int, frames: list[Any], timeout: float | None) -> protocol.Reply:
        timeout = self.timeout if timeout is None else timeout
        sock = self._connect()
        send_frames(sock, frames)
        deadline = time.monotonic() + timeout
        wait_ms = int(timeout * 1000)
        while True:
            # RCVTIMEO rather than poll(): one system call less per request; set only on change
            if wait_ms != self._rcvtimeo_ms:
                sock.setsockopt(zmq.RCVTIMEO, wait_ms)
                self._rcvtimeo_ms = wait_ms
            try:
                parts = recv_frames(sock)
            except zmq.Again:
                wait_ms = int((deadline - time.monotonic()) * 1000)
                if wait_ms > 0:  # woken early (the peer went away): wait out the rest
                    continue
                self.close()  # drop whatever is queued for a daemon that may be gone
                raise _timeout_error(self.endpoint, timeout) from None
            reply = protocol.decode_reply([part.buffer for part in parts])
            if reply.id == request_id:
                reply.raise_for_error()
                return reply
            wait_ms = max(0, int((deadline - time.monotonic()) * 1000))  # a stale reply: go on


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
        self._reader: asyncio.Task[None] | None = None

    async def infer(
        self,
        model: str,
        inputs: Inputs,
        *,
        version: int | None = None,
        deadline_ms: float | None = None,
        trace: str | None = None,
        timeout: float | None = None,
    ) -> Result:
        started = time.perf_counter()
        request_id = next(self._ids)
        frames = protocol.encode_request(
            request_id,
            "infer",
            model=model,
            inputs=_as_arrays(inputs),
            version=version,
            deadline_ms=deadline_ms,
            trace=trace,
        )
        return _result(await self._call(request_id, frames, timeout), started)

    async def describe(self, model: str, timeout: float | None = None) -> dict[str, Any]:
        request_id = next(self._ids)
        frames = protocol.encode_request(request_id, "describe", model=model)
        return (await self._call(request_id, frames, timeout)).fields

    async def ping(self, timeout: float | None = None) -> dict[str, Any]:
        request_id = next(self._ids)
        frames = protocol.encode_request(request_id, "ping")
        return (await self._call(request_id, frames, timeout)).fields

    async def close(self) -> None:
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
        if self._socket is None:
            self._socket = self._context.socket(zmq.DEALER)
            self._socket.setsockopt(zmq.LINGER, 0)
            self._socket.connect(self.endpoint)
            self._reader = asyncio.create_task(self._read(self._socket))
        future: asyncio.Future[protocol.Reply] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        try:
            await self._socket.send_multipart(frames, copy=False)
            reply = await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise _timeout_error(self.endpoint, timeout) from None
        finally:
            self._waiting.pop(request_id, None)
        reply.raise_for_error()
        return reply

    async def _read(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            parts = await sock.recv_multipart(copy=False)
            try:
                reply = protocol.decode_reply([part.buffer for part in parts])
            except EdgedError:  # a garbled reply cannot be matched to a request; its call times out
                continue
            future = self._waiting.get(reply.id) if reply.id is not None else None
            if future is not None and not future.done():
                future.set_result(reply)
