"""regions.sock: where clients hand the daemon their shared-memory regions.

ZeroMQ cannot pass file descriptors, so regions have a socket of their own beside infer.sock: a
Unix SOCK_SEQPACKET socket (message boundaries kept, and the end of a connection tells that its
client has gone), read from the event loop with non-blocking accept and recvmsg. One message is
one msgpack map; ``register`` carries its memfd in SCM_RIGHTS. A connection's regions are
released when it closes. docs/PROTOCOL.md §11 is the spec.
"""

from __future__ import annotations

import array
import asyncio
import logging
import os
import select
import socket
from pathlib import Path
from typing import Any

import msgpack

from edged.errors import BadRequest, EdgedError, InternalError
from edged.logsetup import log_error_reply
from edged.protocol import MAX_NAME_LEN, MAX_TOKEN_LEN
from edged.regions.table import MappedRegion, RegionTable

log = logging.getLogger(__name__)

#: the largest message read; a longer one is refused whole
MAX_MESSAGE = 4096
#: fds read from one message; the kernel closes any beyond (and says so: MSG_CTRUNC)
MAX_FDS = 8
#: a ZeroMQ routing id is 1 to 255 bytes
MAX_ROUTING_ID = 255
#: messages (or connections) handled per wake-up before other callbacks get the loop
BURST = 32
BACKLOG = 16
#: connections open at once: each holds a file descriptor of the daemon's
MAX_CONNECTIONS = 256
#: after an accept that failed for want of fds, the pause before the next try
ACCEPT_RETRY_S = 1.0
_INT_SIZE = array.array("i").itemsize
_HANGUP = select.POLLHUP | select.POLLRDHUP
REGISTER_KEYS = frozenset({"op", "routing_id", "name"})
UNREGISTER_KEYS = frozenset({"op", "region"})


class Connection:
    """One client's connection and the regions it registered."""

    __slots__ = ("regions", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.regions: dict[str, MappedRegion] = {}


class RegionListener:
    def __init__(self, path: Path, table: RegionTable, loop: asyncio.AbstractEventLoop) -> None:
        self.path = path
        self._table = table
        self._loop = loop
        self._sock: socket.socket | None = None
        self._connections: set[Connection] = set()

    def start(self) -> None:
        """Bind and listen; a socket file left by a daemon that is gone is replaced (the
        instance lock says no other daemon serves this directory)."""
        self.path.unlink(missing_ok=True)
        sock = socket.socket(
            socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
        )
        try:
            sock.bind(str(self.path))
            sock.listen(BACKLOG)
        except OSError as exc:
            sock.close()
            raise OSError(f"cannot bind {self.path}: {exc.strerror}") from None
        self._sock = sock
        self._loop.add_reader(sock.fileno(), self._accept)

    def stop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        self._loop.remove_reader(sock.fileno())
        sock.close()
        for connection in list(self._connections):
            self._close(connection)
        self.path.unlink(missing_ok=True)

    def _accept(self) -> None:
        assert self._sock is not None
        for _ in range(BURST):
            try:
                sock, _ = self._sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:  # out of fds: pause, or the loop would spin on the backlog
                log.warning("regions.sock: cannot accept a connection: %s", exc.strerror)
                self._loop.remove_reader(self._sock.fileno())
                self._loop.call_later(ACCEPT_RETRY_S, self._resume_accepting)
                return
            if len(self._connections) >= MAX_CONNECTIONS:  # each holds a descriptor too
                log.warning("regions.sock: %d connections open, refusing another", MAX_CONNECTIONS)
                sock.close()
                continue
            sock.setblocking(False)
            connection = Connection(sock)
            self._connections.add(connection)
            self._loop.add_reader(sock.fileno(), self._readable, connection)

    def _resume_accepting(self) -> None:
        if self._sock is not None:
            self._loop.add_reader(self._sock.fileno(), self._accept)

    def _readable(self, connection: Connection) -> None:
        for _ in range(BURST):
            try:
                data, ancillary, flags, _ = connection.sock.recvmsg(
                    MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS * _INT_SIZE), socket.MSG_CMSG_CLOEXEC
                )
            except BlockingIOError:
                return
            except OSError:  # the connection broke
                self._close(connection)
                return
            fds = _received_fds(ancillary)
            if not data and not fds and _hung_up(connection.sock):
                self._close(connection)
                return
            try:
                answer = self._answer(connection, data, flags, fds)
            finally:
                for fd in fds:  # a mapping keeps its memory without them
                    os.close(fd)
            if not self._send(connection, answer):
                return

    def _answer(
        self, connection: Connection, data: bytes, flags: int, fds: list[int]
    ) -> dict[str, Any]:
        """The reply to one message; a bad one is answered and the connection stays."""
        try:
            return self._handle(connection, data, flags, fds)
        except EdgedError as exc:
            error = exc
        except Exception:  # a bug: the traceback stays in the log
            log.exception("regions.sock: a message failed")
            error = InternalError("internal error; the daemon log has the details")
        log_error_reply(error.code, error.message)
        return {"ok": False, "code": error.code, "message": error.message}

    def _handle(
        self, connection: Connection, data: bytes, flags: int, fds: list[int]
    ) -> dict[str, Any]:
        if flags & socket.MSG_TRUNC:
            raise BadRequest(f"a message is at most {MAX_MESSAGE} bytes")
        if flags & socket.MSG_CTRUNC:
            raise BadRequest(f"a message carries at most {MAX_FDS} fds; all of them were closed")
        message = _unpack(data)
        op = message.get("op")
        if op == "register":
            return self._register(connection, message, fds)
        if op == "unregister":
            return self._unregister(connection, message, fds)
        raise BadRequest(f"unknown op {op!r}: regions.sock serves register and unregister")

    def _register(
        self, connection: Connection, message: dict[str, Any], fds: list[int]
    ) -> dict[str, Any]:
        _check_keys(message, REGISTER_KEYS, "register")
        if len(fds) != 1:
            raise BadRequest(f"register carries exactly one fd (SCM_RIGHTS), not {len(fds)}")
        owner = message.get("routing_id")
        if type(owner) is not bytes or not 0 < len(owner) <= MAX_ROUTING_ID:
            raise BadRequest(
                "'routing_id' must be 1 to 255 bytes (msgpack bin): the ZMQ_ROUTING_ID of the "
                "DEALER socket whose requests use the region"
            )
        name = message.get("name")
        name = "" if name is None else name
        if type(name) is not str or len(name) > MAX_NAME_LEN:
            raise BadRequest(f"'name' must be a string of at most {MAX_NAME_LEN} characters")
        region = self._table.register(connection.regions, owner, fds[0], name)
        log.debug("region %s (%r, %d bytes) registered", region.token, name, region.size)
        return {"ok": True, "region": region.token, "size": region.size}

    def _unregister(
        self, connection: Connection, message: dict[str, Any], fds: list[int]
    ) -> dict[str, Any]:
        _check_keys(message, UNREGISTER_KEYS, "unregister")
        if fds:
            raise BadRequest(f"unregister carries no fd; {len(fds)} came, and were closed")
        token = message.get("region")
        if type(token) is not str or not 0 < len(token) <= MAX_TOKEN_LEN:
            raise BadRequest("'region' must be a region's token, the string register gave")
        self._table.unregister(connection.regions, token)
        log.debug("region %s unregistered", token)
        return {"ok": True}

    def _send(self, connection: Connection, answer: dict[str, Any]) -> bool:
        """``False`` when the connection was closed: its client has gone, or has so many
        replies unread that the socket's buffer is full."""
        try:
            connection.sock.send(msgpack.packb(answer))
        except OSError:
            self._close(connection)
            return False
        return True

    def _close(self, connection: Connection) -> None:
        if connection not in self._connections:
            return
        self._connections.discard(connection)
        held = len(connection.regions)
        self._loop.remove_reader(connection.sock.fileno())
        connection.sock.close()
        self._table.release_all(connection.regions)
        if held:
            log.debug("regions.sock: a connection closed; its %d region(s) released", held)


def _received_fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % _INT_SIZE])
    return list(fds)


def _hung_up(sock: socket.socket) -> bool:
    """After an empty read: whether the peer has gone (rather than sent an empty message)."""
    poller = select.poll()
    poller.register(sock.fileno(), _HANGUP)
    return any(events & _HANGUP for _, events in poller.poll(0))


def _unpack(data: bytes) -> dict[str, Any]:
    try:
        message = msgpack.unpackb(data, raw=False)
    # msgpack's zoo of errors (see protocol.unpack_header) all mean the same here
    except Exception:
        raise BadRequest("a message must be one msgpack map") from None
    if not isinstance(message, dict):
        raise BadRequest(f"a message must be a msgpack map, not {type(message).__name__}")
    return message


def _check_keys(message: dict[str, Any], allowed: frozenset[str], op: str) -> None:
    extra = message.keys() - allowed
    if extra:
        raise BadRequest(
            f"unknown key(s) for {op}: {', '.join(map(repr, sorted(map(str, extra))))}"
        )
