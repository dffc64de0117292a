"""The daemon's registered regions, and how requests use them.

A region is a sealed memfd a client handed over on regions.sock (``listener``), mapped here
once. ``RegionTable.resolve`` turns an ``infer`` request's references into numpy views on the
mappings and wraps its ``ReplyTo`` so that outputs named in ``outputs`` are written into them.

A released region (unregistered, or its connection closed) leaves the table at once, but its
mapping lives as long as a view on it does: every view hangs off one array made with
``np.frombuffer``, which holds a buffer export on the ``mmap``, so ``close`` cannot unmap it
under a queued request (it raises ``BufferError``) and the last view's end unmaps it.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import mmap
import os
import secrets
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from edged.errors import BadRegion, BadRequest, EdgedError, RegionLimit, UnknownRegion
from edged.logsetup import log_error_reply
from edged.models.calls import Infer, RegionInfer
from edged.protocol import (
    BOOL,
    DTYPES,
    WIRE_NAMES,
    RegionRef,
    TensorRef,
    check_bools,
    interleave,
)
from edged.replies import OutputShape, ReplyTo

MIB = 1024 * 1024
#: regions of every connection together: each mapping keeps a file descriptor (before Python
#: 3.13), so many small regions must not use up the daemon's
MAX_TOTAL_REGIONS = 1024
#: Python 3.13's mmap can do without the duplicate of the fd it otherwise keeps open
_MMAP_OPTIONS: dict[str, Any] = {"trackfd": False} if sys.version_info >= (3, 13) else {}


class MappedRegion:
    """One registered region, mapped read-write in the daemon."""

    __slots__ = ("_bytes", "_mapping", "live", "name", "owner", "size", "token")

    def __init__(self, token: str, name: str, owner: bytes, mapping: mmap.mmap) -> None:
        self.token = token
        self.name = name
        #: the ZeroMQ routing id of the only connection whose requests may use it
        self.owner = owner
        self.size = len(mapping)
        self.live = True
        self._mapping: mmap.mmap | None = mapping
        #: every view's root: its buffer export keeps the mapping from closing under a view
        self._bytes: np.ndarray[Any, Any] | None = np.frombuffer(mapping, np.uint8)

    def view(
        self, dtype: np.dtype[Any], shape: tuple[int, ...], offset: int
    ) -> np.ndarray[Any, Any]:
        """The tensor at ``offset`` (checked to fit), as a view: no copy."""
        assert self._bytes is not None, "a released region has no views"
        nbytes = math.prod(shape) * dtype.itemsize
        return self._bytes[offset : offset + nbytes].view(dtype).reshape(shape)

    def release(self) -> None:
        """Leave the table's hands: unmapped now, or when the last view on it goes."""
        self.live = False
        mapping, self._mapping, self._bytes = self._mapping, None, None
        if mapping is not None:
            with contextlib.suppress(BufferError):  # views remain: theirs to unmap
                mapping.close()


def sealed_size(fd: int) -> int:
    """The size of a client's memfd, once sure that it cannot shrink under a mapping (a read
    past a file's end is SIGBUS, which would kill the daemon)."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        raise BadRegion(
            "not a sealed memfd: a region is made with memfd_create(MFD_ALLOW_SEALING), "
            "ftruncate and fcntl(F_ADD_SEALS)"
        ) from None
    if not seals & fcntl.F_SEAL_SHRINK:
        raise BadRegion(
            "the memfd is not sealed against shrinking: add F_SEAL_SHRINK (with F_SEAL_GROW and "
            "F_SEAL_SEAL) by fcntl(F_ADD_SEALS) once it has its size"
        )
    size = os.fstat(fd).st_size
    if size == 0:
        raise BadRegion("the memfd is empty: ftruncate it to the region's size before sealing")
    return size


def map_region(fd: int, size: int) -> mmap.mmap:
    try:
        return mmap.mmap(
            fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, **_MMAP_OPTIONS
        )
    except OSError as exc:
        raise BadRegion(
            f"cannot map the memfd read-write: {exc.strerror} (sealed against writes? the "
            "daemon writes outputs into regions)"
        ) from None


@dataclass(frozen=True)
class RegionStatistics:
    regions: int
    mapped_bytes: int
    registered: int
    refused: int


class RegionTable:
    """Every registered region by token; each connection of regions.sock holds its own in a
    dict of its own (``held``), released together when it closes."""

    def __init__(self, max_regions: int, max_bytes: int) -> None:
        self.max_regions = max_regions
        self.max_bytes = max_bytes
        self._regions: dict[str, MappedRegion] = {}
        self._mapped = 0
        self._registered = 0
        self._refused = 0

    def register(
        self, held: dict[str, MappedRegion], owner: bytes, fd: int, name: str
    ) -> MappedRegion:
        """Map ``fd`` (the caller closes it) as a region of the connection holding ``held``."""
        try:
            if len(self._regions) >= MAX_TOTAL_REGIONS:
                raise RegionLimit(
                    f"the daemon holds {len(self._regions)} regions, its limit: each keeps a "
                    "file descriptor; unregister some first"
                )
            if len(held) >= self.max_regions:
                raise RegionLimit(
                    f"this connection holds {len(held)} regions, the limit "
                    f"(server.max_regions = {self.max_regions}); unregister one first"
                )
            size = sealed_size(fd)
            if self._mapped + size > self.max_bytes:
                raise RegionLimit(
                    f"a region of {_size(size)} would take the mapped regions past "
                    f"{_size(self.max_bytes)} (server.max_region_mb), with {_size(self._mapped)} "
                    "mapped now"
                )
            mapping = map_region(fd, size)
        except EdgedError:
            self._refused += 1
            raise
        region = MappedRegion(secrets.token_hex(16), name, owner, mapping)
        self._regions[region.token] = held[region.token] = region
        self._mapped += region.size
        self._registered += 1
        return region

    def unregister(self, held: dict[str, MappedRegion], token: str) -> None:
        region = held.pop(token, None)
        if region is None:
            raise UnknownRegion(f"this connection has no region {token!r}")
        self._release(region)

    def release_all(self, held: dict[str, MappedRegion]) -> None:
        """A connection's regions, when it closes."""
        regions = list(held.values())
        held.clear()
        for region in regions:
            self._release(region)

    def _release(self, region: MappedRegion) -> None:
        del self._regions[region.token]
        self._mapped -= region.size
        region.release()

    def resolve(self, request: RegionInfer, reply: ReplyTo, peer: bytes) -> tuple[Infer, ReplyTo]:
        """``request`` with its references made views on the regions (in their places among
        its inputs) and a reply that writes its ``outputs`` into them; for ``peer``'s regions
        only."""
        inputs = interleave(request.inputs, request.refs, lambda ref: self._input(ref, peer))
        if request.outputs:
            targets = {
                name: (self._owned(at.region, peer, f"output {name!r}"), at)
                for name, at in request.outputs.items()
            }
            reply = RegionReply(reply, targets)
        return request.resolved(inputs), reply

    def _input(self, ref: TensorRef, peer: bytes) -> np.ndarray[Any, Any]:
        region = self._owned(ref.at.region, peer, f"input {ref.name!r}")
        if ref.at.offset + ref.nbytes > region.size:
            raise BadRegion(f"input {ref} runs past the region's end ({region.size} bytes)")
        array = region.view(ref.dtype, ref.shape, ref.at.offset)
        if ref.dtype is BOOL:
            check_bools(ref.name, array)
        array.flags.writeable = False  # the client's memory: a model reads it, never writes
        return array

    def _owned(self, token: str, peer: bytes, what: str) -> MappedRegion:
        region = self._regions.get(token)
        if region is None:
            raise UnknownRegion(
                f"{what}: no region {token!r} is registered (it was unregistered, or the "
                "regions.sock connection that registered it closed)"
            )
        if region.owner != peer:
            raise UnknownRegion(
                f"{what}: region {token!r} is registered by another connection: a region "
                "serves the requests of the ZeroMQ routing id it was registered for"
            )
        return region

    def statistics(self) -> RegionStatistics:
        return RegionStatistics(len(self._regions), self._mapped, self._registered, self._refused)


class RegionReply(ReplyTo):
    """A request's ``ReplyTo`` that has the outputs it placed in regions written there, then
    replies with their places instead of frames (the other outputs go as frames, as always).
    A run that knows an output's shape beforehand writes it there itself (``place``, an
    onnxruntime IO binding); any other is copied there once the run is done."""

    __slots__ = ("_targets",)

    places_outputs = True

    def __init__(
        self, reply: ReplyTo, targets: Mapping[str, tuple[MappedRegion, RegionRef]]
    ) -> None:
        super().__init__(reply._send, reply.request_id, reply.trace)
        self._targets = targets
        self._locate = self._placed

    def ok(
        self,
        fields: dict[str, Any],
        outputs: Mapping[str, np.ndarray[Any, Any]] | None = None,
    ) -> bool:
        if outputs is not None:
            try:
                self._write(outputs)
            except EdgedError as exc:
                log_error_reply(exc.code, exc.message, trace=self.trace, request_id=self.request_id)
                return self.fail(exc)
        return super().ok(fields, outputs)

    def place(self, outputs: Mapping[str, OutputShape]) -> dict[str, np.ndarray[Any, Any]]:
        """Every placed output's destination, if each is an output of the model whose shape
        is known now and that fits its live region; else none (all or nothing: the copy after
        the run then says what is wrong, and writes nothing)."""
        placed = {}
        for name, (region, at) in self._targets.items():
            dtype, dims = outputs.get(name, (None, (None,)))
            if dtype is None or any(dim is None for dim in dims):
                return {}
            shape = cast("tuple[int, ...]", dims)
            nbytes = math.prod(shape) * dtype.itemsize
            fits = at.offset % dtype.itemsize == 0 and at.offset + nbytes <= region.size
            if not (region.live and fits and DTYPES.get(dtype.name) is not None):
                return {}
            placed[name] = region.view(dtype, shape, at.offset)
        return placed

    def _placed(self, name: str, _: np.ndarray[Any, Any]) -> RegionRef | None:
        target = self._targets.get(name)
        return None if target is None else target[1]

    def _write(self, outputs: Mapping[str, np.ndarray[Any, Any]]) -> None:
        """Every placed output checked to fit first, then written: all or nothing."""
        unknown = self._targets.keys() - outputs.keys()
        if unknown:
            raise BadRequest(
                f"'outputs' names {', '.join(map(repr, sorted(unknown)))}: not an output of "
                f"this model (its outputs: {', '.join(map(repr, outputs))})"
            )
        writes = [
            (_destination(name, outputs[name], region, at), outputs[name])
            for name, (region, at) in self._targets.items()
        ]
        for destination, output in writes:
            if _address(destination) != _address(output):  # not written there by the run
                destination[...] = output


def _destination(
    name: str, output: np.ndarray[Any, Any], region: MappedRegion, at: RegionRef
) -> np.ndarray[Any, Any]:
    """Where in ``region`` output ``name`` goes, in its wire form (little-endian)."""
    if not region.live:
        raise UnknownRegion(
            f"output {name!r}: region {at.region!r} was released (unregistered, or its "
            "connection closed) before the output was ready; nothing was written"
        )
    wire = DTYPES.get(WIRE_NAMES.get(output.dtype) or output.dtype.name)
    if wire is None:
        raise BadRequest(f"tensor {name!r}: dtype {output.dtype} cannot be sent")
    ref = TensorRef(name, wire, output.shape, at, 0)
    if at.offset % wire.itemsize:
        raise BadRegion(
            f"output {ref}: the offset is not a multiple of {wire.name}'s {wire.itemsize} bytes"
        )
    if at.offset + ref.nbytes > region.size:
        raise BadRegion(
            f"output {ref} does not fit: the region ends at {region.size} bytes; nothing was "
            "written"
        )
    return region.view(wire, output.shape, at.offset)


def _address(array: np.ndarray[Any, Any]) -> int:
    return int(array.__array_interface__["data"][0])


def _size(nbytes: int) -> str:
    return f"{nbytes / MIB:.1f} MiB"
