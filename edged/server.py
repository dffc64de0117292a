"""An endpoint: one ZeroMQ ROUTER socket bound on IPC (and TCP if configured), feeding a service.

The daemon runs two: the inference socket (the data path) and the control socket.

The socket is driven straight from the event loop's reader callback rather than through
zmq.asyncio futures: each wake-up drains every ready message without blocking, admits them, then
starts runs, which is where most of the round-trip time of a naive asyncio server goes. ZeroMQ's
FD is edge-triggered, so after any send the socket is re-checked for input that arrived meanwhile.

Replies are addressed by the ROUTER identity; a REQ-style empty delimiter frame, if the client
sent one, is echoed back, so REQ, DEALER and raw libzmq clients all work. The socket is
ROUTER_MANDATORY, so a send tells whether the peer is still there: a token stream stops as soon
as its client has gone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol, cast

import zmq

from edged import protocol
from edged.config import ServerConfig
from edged.logsetup import log_error_reply
from edged.protocol import Limits, Request, RequestRejected, RequestTypes
from edged.replies import ReplyTo
from edged.zmqio import NOBLOCK, recv_frames, send_frames

log = logging.getLogger(__name__)

#: messages handled per wake-up before yielding to other callbacks (fairness with timers, signals)
BURST = 256
#: how long close() may spend flushing final replies
LINGER_MS = 500


class Service(Protocol):
    """What an endpoint hands decoded requests to; ``ops`` are what it decodes them to."""

    @property
    def ops(self) -> RequestTypes: ...

    def handle(self, request: Request, reply: ReplyTo, peer: bytes) -> None: ...

    def pump(self) -> None: ...


#: as a plain int: pyzmq's flag enum costs more per test than the system call it follows
_POLLIN = int(zmq.POLLIN)


def _readable(sock: zmq.Socket[Any]) -> bool:
    return bool(cast(int, sock.get(zmq.EVENTS)) & _POLLIN)


class Endpoint:
    def __init__(
        self,
        context: zmq.Context[Any],
        endpoints: list[str],
        config: ServerConfig,
        service: Service,
        loop: asyncio.AbstractEventLoop,
        *,
        configure: Callable[[zmq.Socket[Any]], None] | None = None,
    ) -> None:
        self.endpoints = endpoints
        self._context = context
        self._config = config
        self._service = service
        self._ops = service.ops
        self._loop = loop
        self._configure = configure
        self._limits = Limits(max_message_bytes=config.max_message_bytes)
        self._socket: zmq.Socket[Any] | None = None
        self._fd = -1
        self._drain_scheduled = False
        self._draining_input = False

    def start(self) -> None:
        sock = self._context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, LINGER_MS)
        sock.setsockopt(zmq.MAXMSGSIZE, self._config.max_message_bytes)
        sock.setsockopt(zmq.SNDHWM, self._config.send_hwm)
        sock.setsockopt(zmq.RCVHWM, self._config.recv_hwm)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if self._configure is not None:
            self._configure(sock)
        try:
            for endpoint in self.endpoints:
                sock.bind(endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise OSError(f"cannot bind {endpoint}: {exc}") from None
        self._socket = sock
        self._fd = cast(int, sock.getsockopt(zmq.FD))
        self._loop.add_reader(self._fd, self._on_readable)
        self._on_readable()  # edge-triggered: pick up anything queued before the reader existed

    @property
    def socket(self) -> zmq.Socket[Any]:
        assert self._socket is not None, "endpoint not started"
        return self._socket

    def stop(self) -> None:
        sock, self._socket = self._socket, None
        if sock is None:
            return
        self._loop.remove_reader(self._fd)
        sock.close()

    def _on_readable(self) -> None:
        self._drain_scheduled = False
        sock = self._socket
        if sock is None:
            return
        self._draining_input = True
        try:
            self._drain(sock)
        finally:
            self._draining_input = False

    def _drain(self, sock: zmq.Socket[Any]) -> None:
        """Receive what is there, start runs, and return with the FD re-armed.

        A wake-up usually brings a message, so the first receive goes at once; after it, EVENTS
        says whether another is there, rather than a receive that finds nothing: that costs the
        same system calls plus an exception (``zmq.Again``). A send can swallow the edge of
        input that arrived meanwhile, and reading EVENTS re-arms the FD, so the last word is a
        read of EVENTS that finds nothing.
        """
        handled = 0
        received = self._receive(sock)
        while True:
            while received:
                handled += 1
                if handled >= BURST:  # burst used up: let timers and signals run first
                    self._service.pump()
                    self._drain_scheduled = True
                    self._loop.call_soon(self._on_readable)
                    return
                received = _readable(sock) and self._receive(sock)
            self._service.pump()  # start runs; inline runs send their replies right here
            if not _readable(sock):
                return
            received = self._receive(sock)

    def _receive(self, sock: zmq.Socket[Any]) -> bool:
        try:
            frames = recv_frames(sock, NOBLOCK)
        except zmq.Again:
            return False
        self._handle(frames)
        return True

    def _check_input(self) -> None:
        sock = self._socket
        if sock is not None and not self._drain_scheduled and _readable(sock):
            self._drain_scheduled = True
            self._loop.call_soon(self._on_readable)

    def _handle(self, frames: list[zmq.Frame]) -> None:
        envelope = [frames[0].bytes]
        body = frames[1:]
        if body and len(body[0]) == 0:  # REQ delimiter
            envelope.append(b"")
            body = body[1:]

        def send(frames: list[Any]) -> bool:
            return self._send(envelope, frames)

        try:
            request = protocol.decode_request([f.buffer for f in body], self._limits, self._ops)
        except RequestRejected as rejected:
            error = rejected.error
            log_error_reply(error.code, error.message, request_id=rejected.request_id)
            ReplyTo(send, rejected.request_id, None).fail(error)
            return
        self._service.handle(request, ReplyTo(send, request.id, request.trace), envelope[0])

    def _send(self, envelope: list[bytes], reply: list[Any]) -> bool:
        """Send without blocking; ``False`` when the reply was dropped: its peer has vanished
        (EHOSTUNREACH), or its queue is at the high-water mark because it stopped reading."""
        sock = self._socket
        if sock is None:  # stopped: the peer is gone with the socket
            return False
        try:
            send_frames(sock, envelope + reply, NOBLOCK)
        except zmq.ZMQError as exc:
            if exc.errno not in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                raise
            return False
        finally:
            if not self._draining_input:
                self._check_input()
        return True
