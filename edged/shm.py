"""Shared-memory regions, the client's side: large tensors (camera frames) that need not travel
through the socket.

A region is a memfd sealed at its size (so the daemon, which maps it too, can never be made to
read past its end), handed to the daemon once over regions.sock (ZeroMQ cannot pass a file
descriptor) for the client's routing id. ``Region.array`` views on it are then sent by
reference; ``FrameRing`` hands out frame slots of one region in turn.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import mmap
import os
import secrets
import select
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, cast

import msgpack
import numpy as np

from edged import protocol
from edged.errors import (
    BadRegion,
    ClientTimeout,
    ConfigError,
    EdgedError,
    NoDaemon,
    UnknownRegion,
    error_from_code,
)
from edged.reach import check_endpoint

#: the socket beside infer.sock on which regions are handed to the daemon
REGIONS_SOCKET = "regions.sock"
#: where FrameRing's slots start: the boundary the daemon's models read their inputs from
SLOT_ALIGNMENT = 64
#: the largest reply on regions.sock
MAX_REGION_REPLY = 4096


def new_routing_id() -> bytes:
    """A DEALER's ZMQ_ROUTING_ID, chosen by the client so that it can register regions for it:
    random, its first byte never 0 (libzmq keeps ids that start with 0 for its own)."""
    return bytes([1 + secrets.randbelow(255)]) + secrets.token_bytes(15)


def regions_socket(endpoint: str) -> Path:
    """regions.sock: beside the socket file of an ``ipc://`` endpoint."""
    if not endpoint.startswith("ipc://") or endpoint.startswith("ipc://@"):
        raise ConfigError(
            f"regions need the IPC endpoint (ipc://.../infer.sock), not {endpoint}: the daemon "
            f"takes them on {REGIONS_SOCKET} beside its socket file"
        )
    return Path(endpoint[len("ipc://") :]).with_name(REGIONS_SOCKET)


class RegionChannel:
    """A connection to regions.sock: one msgpack map each way per call, a memfd along with
    ``register``. The daemon releases the connection's regions when it closes; so does a call
    that fails (its reply could otherwise answer the next call)."""

    def __init__(self, path: Path, timeout: float) -> None:
        check_endpoint(f"ipc://{path}")  # NoDaemon or SocketAccessDenied at once, saying why
        self.path = path
        self._timeout = timeout
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError as exc:
            sock.close()
            raise NoDaemon(f"no daemon at {path}: {exc.strerror}") from None
        self._sock = sock

    def call(self, message: dict[str, Any], fds: Sequence[int] = ()) -> dict[str, Any]:
        """The daemon's reply; an error reply raises its typed error."""
        try:
            if fds:
                socket.send_fds(self._sock, [msgpack.packb(message)], list(fds))
            else:
                self._sock.send(msgpack.packb(message))
            data = self._sock.recv(MAX_REGION_REPLY)
        except TimeoutError:
            self.close()
            raise ClientTimeout(f"no reply from {self.path} within {self._timeout:g} s") from None
        except OSError as exc:
            self.close()
            raise NoDaemon(f"{self.path}: {exc.strerror} (the daemon stopped?)") from None
        if not data:
            self.close()
            raise NoDaemon(f"{self.path}: the daemon closed the connection (it stopped?)")
        reply = msgpack.unpackb(data)
        if not reply.get("ok"):
            raise error_from_code(str(reply.get("code")), str(reply.get("message")))
        return cast("dict[str, Any]", reply)

    def alive(self) -> bool:
        """Whether the connection still serves: open, the daemon at its end (one poll, no
        wait), and no stray bytes waiting (a reply that came after its call gave up)."""
        if self._sock.fileno() < 0:
            return False
        poller = select.poll()
        poller.register(self._sock, select.POLLIN | select.POLLRDHUP)
        return not poller.poll(0)

    def close(self) -> None:
        self._sock.close()


class Region:
    """A shared-memory region the daemon has mapped too: a sealed memfd registered on
    regions.sock for the client's routing id. ``array`` views on it are sent by reference.

    The caller must not change a tensor while a request that reads it (or an output that is
    written to it) is in flight. ``close`` (or the end of a ``with`` block) unregisters it;
    closing the client releases all of its regions.
    """

    def __init__(self, regions: Regions, fd: int, name: str, mapping: mmap.mmap) -> None:
        #: given by the daemon; a new one when a restarted daemon gets the region again
        self.token = ""
        self.name = name
        self.size = len(mapping)
        #: the memfd, kept to register the region again with a daemon that restarted
        self.fd = fd
        self._regions = regions
        self._mapping = mapping
        #: every view's root (its buffer export keeps the mapping open under a view)
        self._bytes: np.ndarray[Any, Any] | None = np.frombuffer(mapping, np.uint8)
        self._address = int(self._bytes.ctypes.data)

    @property
    def closed(self) -> bool:
        return self._bytes is None

    def array(self, shape: Sequence[int], dtype: Any, offset: int = 0) -> np.ndarray[Any, Any]:
        """A writable view of ``shape`` and ``dtype`` (one of PROTOCOL §3, little-endian) at
        byte ``offset``, which must be a multiple of the dtype's size."""
        if self._bytes is None:
            raise BadRegion(f"region {self.name or self.token!r} is closed")
        wire = _wire_dtype(dtype)
        shape = tuple(shape)
        nbytes = math.prod(shape) * wire.itemsize
        if offset < 0 or offset % wire.itemsize or offset + nbytes > self.size:
            raise BadRegion(
                f"{wire.name}{list(shape)} ({nbytes} bytes) cannot start at offset {offset} of "
                f"a region of {self.size} bytes (offsets are multiples of {wire.itemsize})"
            )
        return self._bytes[offset : offset + nbytes].view(wire).reshape(shape)

    def place(self, array: np.ndarray[Any, Any]) -> protocol.RegionRef | None:
        """Where ``array`` lies in this region, if it is a C-contiguous view on it."""
        if array.base is not self._bytes or self._bytes is None or not array.flags.c_contiguous:
            return None
        address = int(array.__array_interface__["data"][0])
        return protocol.RegionRef(self.token, address - self._address)

    def close(self) -> None:
        """Unregister the region and unmap it (at once, or when the last view on it goes). A
        daemon that has gone took the region with it: closing never fails."""
        if self._bytes is None:
            return
        self._bytes = None
        self._regions.forget(self)
        os.close(self.fd)
        with contextlib.suppress(BufferError):  # views remain: theirs to unmap
            self._mapping.close()

    def __enter__(self) -> Region:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _wire_dtype(dtype: Any) -> np.dtype[Any]:
    wire = protocol.DTYPES.get(np.dtype(dtype).name)
    if wire is None:
        raise BadRegion(f"dtype {dtype} is none of the wire's: {', '.join(protocol.DTYPES)}")
    return wire


class Regions:
    """A client's regions and its connection to regions.sock, opened with its first region.
    When that connection has ended (the daemon restarted) the next infer that uses a region
    opens another and registers every region again, so a camera process outlives its daemon."""

    def __init__(self, endpoint: str, routing_id: bytes, timeout: float) -> None:
        self.endpoint = endpoint
        self.routing_id = routing_id
        self.timeout = timeout
        self._channel: RegionChannel | None = None
        self._regions: list[Region] = []

    def __bool__(self) -> bool:
        return bool(self._regions)

    def create(self, size: int, name: str) -> Region:
        """A region of ``size`` bytes: a memfd sealed at that size, mapped here and there."""
        if size < 1:
            raise BadRegion(f"a region holds at least one byte, not {size}")
        fd = os.memfd_create(f"edged:{name}"[:200], os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            region = Region(self, fd, name, mmap.mmap(fd, size))
        except BaseException:
            os.close(fd)
            raise
        try:
            self._register(self.connected(), region)
        except BaseException:
            region.close()
            raise
        self._regions.append(region)
        return region

    def connected(self) -> RegionChannel:
        """The connection, opened again if it has ended, with every region registered again."""
        channel = self._channel
        if channel is not None and channel.alive():
            return channel
        self._channel = None
        if channel is not None:
            channel.close()
        channel = RegionChannel(regions_socket(self.endpoint), self.timeout)
        try:
            for region in self._regions:
                self._register(channel, region)
        except BaseException:  # the next use tries them all again
            channel.close()
            raise
        self._channel = channel
        return channel

    def rebind(self, routing_id: bytes) -> None:
        """The client connects under a new routing id: its regions are registered again for
        it (by the next use), and released in the daemon for the old one at once."""
        self.routing_id = routing_id
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()

    def _register(self, channel: RegionChannel, region: Region) -> None:
        message = {"op": "register", "routing_id": self.routing_id, "name": region.name}
        region.token = str(channel.call(message, [region.fd])["region"])

    def forget(self, region: Region) -> None:
        """A region closed: unregistered, if the daemon still has it."""
        if region not in self._regions:
            return
        self._regions.remove(region)
        if self._channel is not None:
            with contextlib.suppress(EdgedError):
                self._channel.call({"op": "unregister", "region": region.token})

    def locate(self, name: str, array: np.ndarray[Any, Any]) -> protocol.RegionRef | None:
        """Where an input lies, if in one of these regions (then it is sent as a reference)."""
        for region in self._regions:
            place = region.place(array)
            if place is not None:
                return place
        return None

    def targets(self, outputs_to: Mapping[str, np.ndarray[Any, Any]]) -> dict[str, Any]:
        """An infer header's ``outputs``: where in these regions each output goes."""
        targets = {}
        for name, array in outputs_to.items():
            place = self.locate(name, array)
            if place is None:
                raise BadRegion(
                    f"outputs_to[{name!r}] is not a view on a region of this client (made by "
                    "Region.array)"
                )
            targets[name] = {"region": place.region, "offset": place.offset}
        return targets

    def outputs(self, reply: protocol.Reply) -> dict[str, np.ndarray[Any, Any]]:
        """A reply's outputs, those the daemon wrote into these regions as views on them."""
        return protocol.interleave(reply.tensors, reply.refs, self._view)

    def _view(self, ref: protocol.TensorRef) -> np.ndarray[Any, Any]:
        region = next((r for r in self._regions if r.token == ref.at.region), None)
        if region is None:
            raise UnknownRegion(f"output {ref}: this client has no such region (closed?)")
        return region.array(ref.shape, ref.dtype, ref.at.offset)

    def close(self) -> None:
        """Close every region; closing the connection releases them in the daemon at once."""
        channel, self._channel = self._channel, None
        for region in list(self._regions):
            region.close()
        if channel is not None:
            channel.close()


class RegionMaker(Protocol):
    """What makes regions: ``Client`` and ``AsyncClient``."""

    def region(self, size: int, name: str = "") -> Region: ...


class FrameRing:
    """``slots`` frames of one shape and dtype in one region, handed out in turn: a camera fills
    the next slot while the daemon still reads the one before. Keep fewer than ``slots``
    requests on its frames in flight; each slot starts on a 64-byte boundary.

        with FrameRing(client, (1080, 1920, 3), np.uint8) as ring:
            frame = ring.next()
            camera.read_into(frame)
            client.infer("detector", {"frame": frame})
    """

    def __init__(
        self,
        client: RegionMaker,
        shape: Sequence[int],
        dtype: Any,
        slots: int = 4,
        name: str = "frames",
    ) -> None:
        if slots < 1:
            raise ValueError(f"a ring has at least one slot, not {slots}")
        wire = _wire_dtype(dtype)
        nbytes = max(math.prod(shape) * wire.itemsize, 1)
        #: bytes from one slot's start to the next's
        self.stride = -(-nbytes // SLOT_ALIGNMENT) * SLOT_ALIGNMENT
        self.region = client.region(self.stride * slots, name)
        self.slots = [self.region.array(shape, wire, k * self.stride) for k in range(slots)]
        self._next = 0

    def next(self) -> np.ndarray[Any, Any]:
        """The next slot to fill, round robin."""
        slot = self.slots[self._next]
        self._next = (self._next + 1) % len(self.slots)
        return slot

    def close(self) -> None:
        self.slots = []
        self.region.close()

    def __enter__(self) -> FrameRing:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
