"""Wire protocol v1: pure encode/decode of multipart messages (docs/PROTOCOL.md is the spec).

A message is ``[header, tensor_0, ..., tensor_n]``: the header a msgpack map, each tensor frame
the raw C-contiguous little-endian bytes of one array described in the header. This module
imports no socket or event loop so it can be tested and fuzzed on bytes alone; everything is
validated here before any model is touched. Tensors are views on the received buffers (no copy);
a tensor that lies in a client's shared-memory region stays a ``TensorRef`` here, resolved by the
serving layer, which holds the regions (``edged.regions``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import msgpack
import numpy as np

from edged.errors import (
    BadRequest,
    EdgedError,
    FrameMismatch,
    TooLarge,
    UnsupportedVersion,
    error_from_code,
)

PROTOCOL_VERSION = 1

Buffer = bytes | bytearray | memoryview

#: dtype names accepted on the wire, all little-endian.
DTYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(name).newbyteorder("<")
    for name in (
        "bool",
        "int8",
        "uint8",
        "int16",
        "uint16",
        "int32",
        "uint32",
        "int64",
        "uint64",
        "float16",
        "float32",
        "float64",
    )
}

WIRE_NAMES: dict[np.dtype[Any], str] = {dtype: name for name, dtype in DTYPES.items()}

#: the header keys of every request; an op's own keys are its request type's fields
COMMON_KEYS = frozenset({"v", "id", "op", "trace"})
TENSOR_KEYS = frozenset({"name", "dtype", "shape"})
#: a tensor in a shared-memory region: described as one in a frame, plus where it lies
REF_KEYS = TENSOR_KEYS | {"region", "offset"}
#: where an ``infer`` request wants an output written (its header's ``outputs``)
TARGET_KEYS = frozenset({"region", "offset"})
MAX_ID = 2**64 - 1
MAX_TRACE_LEN = 128
MAX_NAME_LEN = 256
#: a region's token is 32 hex digits; a longer string is no token at all
MAX_TOKEN_LEN = 64
BOOL = DTYPES["bool"]


@dataclass(frozen=True)
class Limits:
    """Bounds enforced while decoding; the socket enforces ``max_message_bytes`` per frame too."""

    max_message_bytes: int = 64 * 1024 * 1024
    max_header_bytes: int = 64 * 1024
    max_tensors: int = 64
    max_dims: int = 8


R = TypeVar("R", bound="Request")


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True, slots=True)
class RegionRef:
    """A place in a shared-memory region a client registered: the region's token and a byte
    offset into it (docs/PROTOCOL.md §11)."""

    region: str
    offset: int


@dataclass(frozen=True, slots=True)
class TensorRef:
    """A tensor that lies in a region rather than in a frame: an ``infer`` input, or an output
    the daemon wrote into its client's region."""

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    at: RegionRef
    #: its place among the message's tensors, where frames and references interleave
    index: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def __str__(self) -> str:
        return (
            f"{self.name!r} ({self.dtype.name}{list(self.shape)}, {self.nbytes} bytes at offset "
            f"{self.at.offset} of region {self.at.region})"
        )


NO_REFS: tuple[TensorRef, ...] = ()
#: where an output being encoded lies in a region (then it gets no frame), or None
Locate = Callable[[str, np.ndarray[Any, Any]], RegionRef | None]


@dataclass(frozen=True, kw_only=True)
class Request:
    """A decoded request: the envelope that every op's own request type extends.

    An op's type declares the header keys it takes as its fields and checks them in
    ``__post_init__`` (calling its parent's first), so a request that exists is valid however
    it was made, from the wire or in code, as h11's events are. Not slotted: zero-argument
    ``super()`` does not work in slotted dataclasses before Python 3.14.
    """

    id: int
    op: str
    trace: str | None = None

    def __post_init__(self) -> None:
        """Nothing to check: decoding checked the envelope's keys."""

    @classmethod
    def wire_keys(cls) -> frozenset[str]:
        """The header keys this op takes besides ``COMMON_KEYS``: its fields, by default."""
        return frozenset(f.name for f in dataclasses.fields(cls)) - ENVELOPE

    @classmethod
    def wire_values(cls, header: Mapping[str, Any]) -> dict[str, Any]:
        """The fields the header's keys give (by default, each key its field)."""
        return given(header)

    @classmethod
    def from_wire(
        cls: type[R],
        envelope: dict[str, Any],
        header: Mapping[str, Any],
        frames: Sequence[Buffer],
        limits: Limits,
    ) -> R:
        """The request from its header (a nil value means the key's default) and the frames
        after it: none, unless the op's type says otherwise."""
        request = cls(**envelope, **cls.wire_values(header))
        if frames:
            raise FrameMismatch(f"op {envelope['op']!r} takes no tensor frames, got {len(frames)}")
        return request


ENVELOPE = frozenset(f.name for f in dataclasses.fields(Request))


def given(header: Mapping[str, Any]) -> dict[str, Any]:
    """The op's own keys in a checked ``header`` (one whose keys the op allows), nil values
    left out: those mean the default."""
    return {
        key: value for key, value in header.items() if key not in COMMON_KEYS and value is not None
    }


class RequestTypes(Protocol):
    """What decoding needs of the ops a socket serves."""

    def request_type(self, op: str) -> tuple[type[Request], frozenset[str]]:
        """The op's request type and every header key it allows; ``UnknownOp`` if none."""
        ...


@dataclass(frozen=True, slots=True)
class Reply:
    """A decoded reply: ``fields`` holds the op's result keys, ``tensors`` the outputs."""

    id: int | None
    fields: dict[str, Any]
    tensors: dict[str, np.ndarray[Any, Any]]
    error: EdgedError | None = None
    #: outputs the daemon wrote into the client's regions instead of frames
    refs: tuple[TensorRef, ...] = NO_REFS

    def raise_for_error(self) -> None:
        if self.error is not None:
            raise self.error


class RequestRejected(Exception):
    """Decoding failed: ``error`` is what to send back, ``request_id`` the id if it was readable."""

    def __init__(self, error: EdgedError, request_id: int | None) -> None:
        super().__init__(str(error))
        self.error = error
        self.request_id = request_id


# -- decoding ---------------------------------------------------------------------------------


def unpack_header(frame: Buffer, limits: Limits) -> dict[str, Any]:
    """Parse frame 0 as a msgpack map within the header size limit."""
    if len(frame) > limits.max_header_bytes:
        raise TooLarge(f"header is {len(frame)} bytes, limit {limits.max_header_bytes}")
    try:
        header = msgpack.unpackb(frame, raw=False)
    # msgpack raises a zoo of types (ExtraData, FormatError, StackError, ValueError, TypeError
    # for unhashable keys, UnicodeDecodeError): all mean the same thing to a client.
    except Exception as exc:
        raise BadRequest(f"header is not valid msgpack: {exc}") from None
    if not isinstance(header, dict):
        raise BadRequest(f"header must be a msgpack map, got {type(header).__name__}")
    return header


def decode_request(frames: Sequence[Buffer], limits: Limits, types: RequestTypes) -> Request:
    """Validate and decode a request to one of ``types``; raise ``RequestRejected`` with the
    error to reply."""
    request_id: int | None = None
    try:
        if not frames or (len(frames) == 1 and len(frames[0]) == 0):
            raise BadRequest("empty message")
        header = unpack_header(frames[0], limits)
        request_id = valid_id(header.get("id"))  # first, so every later error reaches its caller
        total = sum(len(f) for f in frames)
        if total > limits.max_message_bytes:
            raise TooLarge(f"message is {total} bytes, limit {limits.max_message_bytes}")
        return _parse_request(header, frames[1:], limits, types)
    except EdgedError as exc:
        # the error alone, not its traceback: that holds this call's frames, and with them the
        # message's buffers (up to max_message_bytes), for as long as anything holds the error
        raise RequestRejected(exc.with_traceback(None), request_id) from None


def _parse_request(
    header: dict[str, Any], frames: Sequence[Buffer], limits: Limits, types: RequestTypes
) -> Request:
    version = header.get("v")
    if not is_int(version) or version != PROTOCOL_VERSION:
        raise UnsupportedVersion(
            f"protocol version {version!r} is not supported; this daemon speaks {PROTOCOL_VERSION}"
        )
    request_id = valid_id(header.get("id"))
    if request_id is None:
        raise BadRequest("'id' must be an unsigned 64-bit integer")
    op = header.get("op")
    if not isinstance(op, str):
        raise BadRequest("'op' must be a string")
    request_type, allowed = types.request_type(op)
    if not allowed.issuperset(header):
        extra = header.keys() - allowed
        raise BadRequest(f"unknown header key(s) for op {op!r}: {', '.join(map(repr, extra))}")
    trace = header.get("trace")
    if trace is not None and not isinstance(trace, str):
        raise BadRequest("'trace' must be a str")
    if trace and len(trace) > MAX_TRACE_LEN:
        raise BadRequest(f"'trace' is longer than {MAX_TRACE_LEN} characters")
    envelope = {"id": request_id, "op": op, "trace": trace or new_trace()}
    return request_type.from_wire(envelope, header, frames, limits)


def decode_described(
    specs: Any, frames: Sequence[Buffer], limits: Limits
) -> tuple[dict[str, np.ndarray[Any, Any]], tuple[TensorRef, ...]]:
    """The tensors ``specs`` describes: views on the frames, and references to those that lie
    in regions (no frame each). One frame per description is the usual case, checked first."""
    if type(specs) is list and len(specs) == len(frames):
        return decode_tensors(specs, frames, limits), NO_REFS
    return _decode_with_refs(specs, frames, limits)


def decode_tensors(
    specs: Any, frames: Sequence[Buffer], limits: Limits
) -> dict[str, np.ndarray[Any, Any]]:
    if not isinstance(specs, list):
        raise BadRequest("'inputs' must be an array of tensor descriptions")
    if len(specs) > limits.max_tensors:
        raise TooLarge(f"{len(specs)} tensors, limit {limits.max_tensors}")
    if len(specs) != len(frames):
        raise FrameMismatch(
            f"header declares {len(specs)} tensor(s) but {len(frames)} frame(s) follow"
        )
    arrays: dict[str, np.ndarray[Any, Any]] = {}
    # this loop runs for every tensor received, so it is inline: ``_in_frame`` does the same
    # for the rarer messages with tensors in regions
    for index, (spec, frame) in enumerate(zip(specs, frames, strict=True)):
        name, dtype, shape = _tensor_spec(spec, index, limits)
        if name in arrays:
            raise BadRequest(f"tensor {name!r} is declared twice")
        if len(frame) != math.prod(shape) * dtype.itemsize:
            raise _wrong_length(name, dtype, shape, frame, index + 1)
        array: np.ndarray[Any, Any] = np.ndarray(shape, dtype, frame)  # a view: no copy
        if dtype is BOOL:
            check_bools(name, array)
        arrays[name] = array
    return arrays


def _in_frame(
    name: str, dtype: np.dtype[Any], shape: tuple[int, ...], frame: Buffer, number: int
) -> np.ndarray[Any, Any]:
    """The tensor in frame ``number``: a view on it, no copy."""
    if len(frame) != math.prod(shape) * dtype.itemsize:
        raise _wrong_length(name, dtype, shape, frame, number)
    array: np.ndarray[Any, Any] = np.ndarray(shape, dtype, frame)
    if dtype is BOOL:
        check_bools(name, array)
    return array


def _wrong_length(
    name: str, dtype: np.dtype[Any], shape: tuple[int, ...], frame: Buffer, number: int
) -> FrameMismatch:
    return FrameMismatch(
        f"tensor {name!r}: {dtype.name}{list(shape)} needs {math.prod(shape) * dtype.itemsize} "
        f"bytes, frame {number} has {len(frame)}"
    )


def check_bools(name: str, array: np.ndarray[Any, Any]) -> None:
    """PROTOCOL §3: a ``bool`` tensor holds only the bytes 0 and 1."""
    if array.size and array.view(np.uint8).max() > 1:
        raise BadRequest(f"tensor {name!r}: a bool element is neither 0 nor 1")


def _decode_with_refs(
    specs: Any, frames: Sequence[Buffer], limits: Limits
) -> tuple[dict[str, np.ndarray[Any, Any]], tuple[TensorRef, ...]]:
    """``decode_described`` when some tensors may lie in regions: each description in a frame
    takes the next frame, each reference none."""
    if not isinstance(specs, list):
        raise BadRequest("'inputs' must be an array of tensor descriptions")
    if len(specs) > limits.max_tensors:
        raise TooLarge(f"{len(specs)} tensors, limit {limits.max_tensors}")
    in_regions = sum(1 for spec in specs if _is_ref(spec))
    if len(specs) - in_regions != len(frames):
        without = f" ({in_regions} in regions, with no frame)" if in_regions else ""
        raise FrameMismatch(
            f"header declares {len(specs)} tensor(s){without} but {len(frames)} frame(s) follow"
        )
    arrays: dict[str, np.ndarray[Any, Any]] = {}
    refs: list[TensorRef] = []
    names: set[str] = set()
    number = 0
    for index, spec in enumerate(specs):
        if _is_ref(spec):
            ref = _tensor_ref(spec, index, limits)
            name = ref.name
            refs.append(ref)
        else:
            name, dtype, shape = _tensor_spec(spec, index, limits)
            number += 1
            arrays[name] = _in_frame(name, dtype, shape, frames[number - 1], number)
        if name in names:
            raise BadRequest(f"tensor {name!r} is declared twice")
        names.add(name)
    return arrays, tuple(refs)


def _is_ref(spec: Any) -> bool:
    return type(spec) is dict and spec.keys() == REF_KEYS


def _tensor_ref(spec: dict[str, Any], index: int, limits: Limits) -> TensorRef:
    """A tensor description with ``region`` and ``offset``: where the tensor lies, checked as
    far as the message alone tells (its region's size is the service's to check)."""
    described = {key: spec[key] for key in TENSOR_KEYS}
    name, dtype, shape = _tensor_spec(described, index, limits)
    at = region_ref(spec["region"], spec["offset"], f"inputs[{index}] ({name!r})")
    ref = TensorRef(name, dtype, shape, at, index)
    if at.offset % dtype.itemsize:
        raise BadRequest(
            f"tensor {ref}: the offset is not a multiple of {dtype.name}'s {dtype.itemsize} bytes"
        )
    return ref


def region_ref(region: Any, offset: Any, what: str) -> RegionRef:
    """A place in a region, as a message gives it: a token from ``register`` and an offset."""
    if type(region) is not str or not 0 < len(region) <= MAX_TOKEN_LEN:
        raise BadRequest(f"{what}: 'region' must be a region's token, the string register gave")
    if type(offset) is not int or offset < 0:
        raise BadRequest(f"{what}: 'offset' must be a non-negative integer, got {offset!r}")
    return RegionRef(region, offset)


def decode_targets(value: Any, limits: Limits) -> dict[str, RegionRef]:
    """An ``infer`` header's ``outputs``: output name -> where in a region to write it."""
    if type(value) is not dict or len(value) > limits.max_tensors:
        raise BadRequest(
            f"'outputs' must be a map of at most {limits.max_tensors} output names to "
            "{region, offset}"
        )
    targets: dict[str, RegionRef] = {}
    for name, target in value.items():
        if type(name) is not str or not 0 < len(name) <= MAX_NAME_LEN:
            raise BadRequest("'outputs' keys must be output names (non-empty strings)")
        if type(target) is not dict or target.keys() != TARGET_KEYS:
            raise BadRequest(
                f"outputs[{name!r}] must be a map with exactly the keys region, offset"
            )
        targets[name] = region_ref(target["region"], target["offset"], f"outputs[{name!r}]")
    return targets


def interleave(
    arrays: Mapping[str, np.ndarray[Any, Any]],
    refs: Sequence[TensorRef],
    view: Callable[[TensorRef], np.ndarray[Any, Any]],
) -> dict[str, np.ndarray[Any, Any]]:
    """A message's tensors in its header's order: those from frames, with each reference's
    tensor (made by ``view``) back at its place. The order matters to batching (§7.4)."""
    from_frames = iter(arrays.items())
    at = {ref.index: ref for ref in refs}
    tensors: dict[str, np.ndarray[Any, Any]] = {}
    for index in range(len(arrays) + len(refs)):
        ref = at.get(index)
        if ref is None:
            name, array = next(from_frames)
        else:
            name, array = ref.name, view(ref)
        tensors[name] = array
    return tensors


def _tensor_spec(
    spec: Any, index: int, limits: Limits
) -> tuple[str, np.dtype[Any], tuple[int, ...]]:
    # Exact type checks (msgpack decodes to exact types): this runs for every tensor received,
    # so the message's prefix is made only when one fails.
    if type(spec) is not dict or spec.keys() != TENSOR_KEYS:
        if _is_ref(spec):  # with one frame per description: one too many for a reference
            raise FrameMismatch(
                f"inputs[{index}] lies in a region, so takes no frame, but every tensor has one"
            )
        raise BadRequest(
            f"inputs[{index}] must be a map with exactly the keys name, dtype, shape "
            "(and region, offset for a tensor in a shared-memory region)"
        )
    name, dtype_name, shape = spec["name"], spec["dtype"], spec["shape"]
    if type(name) is not str or not name or len(name) > MAX_NAME_LEN:
        raise BadRequest(f"inputs[{index}].name must be a non-empty string")
    dtype = DTYPES.get(dtype_name) if type(dtype_name) is str else None
    if dtype is None:
        raise BadRequest(
            f"inputs[{index}] ({name!r}): dtype {dtype_name!r} is not one of {', '.join(DTYPES)}"
        )
    if type(shape) is not list or len(shape) > limits.max_dims:
        raise BadRequest(
            f"inputs[{index}] ({name!r}): shape must be an array of at most {limits.max_dims} dims"
        )
    for dim in shape:
        if type(dim) is not int or not 0 <= dim <= limits.max_message_bytes:
            raise BadRequest(
                f"inputs[{index}] ({name!r}): shape dims must be integers from 0 to "
                f"{limits.max_message_bytes}"
            )
    return name, dtype, tuple(shape)


def new_trace() -> str:
    """A trace id for a request that brought none: unique per daemon run and readable in logs
    (a random per-process prefix and a counter: cheaper than a random id per request)."""
    return f"{_TRACE_PREFIX}-{next(_TRACE_COUNTER):x}"


_TRACE_PREFIX = os.urandom(4).hex()
_TRACE_COUNTER = itertools.count(1)


def valid_id(value: Any) -> int | None:
    return value if is_int(value) and 0 <= value <= MAX_ID else None


def is_int(value: Any) -> bool:
    return type(value) is int  # bool is a subclass of int, and never an integer here


def is_number(value: Any) -> bool:
    return (type(value) is int or type(value) is float) and math.isfinite(value)


# -- encoding ---------------------------------------------------------------------------------


def tensor_frames(
    arrays: Mapping[str, Any], locate: Locate | None = None
) -> tuple[list[dict[str, Any]], list[np.ndarray[Any, Any]]]:
    """Describe arrays (or what ``np.asarray`` makes one of) for a header; return them
    C-contiguous little-endian (copied only if not), but for those ``locate`` finds in a
    region: described with their place there, and no frame."""
    specs: list[dict[str, Any]] = []
    frames: list[np.ndarray[Any, Any]] = []
    for name, array in arrays.items():
        arr = np.asarray(array)
        dtype_name = WIRE_NAMES.get(arr.dtype)  # a dict hit; dtype.name is slow to compute
        if dtype_name is None or not arr.flags.c_contiguous:
            wire = DTYPES.get(arr.dtype.name)  # e.g. big-endian: converted to little-endian
            if wire is None:
                raise BadRequest(f"tensor {name!r}: dtype {arr.dtype} cannot be sent")
            arr = np.asarray(arr, dtype=wire, order="C")  # ascontiguousarray makes 0-d 1-d
            dtype_name = wire.name
        spec = {"name": name, "dtype": dtype_name, "shape": list(arr.shape)}
        specs.append(spec)
        where = None if locate is None else locate(name, arr)
        if where is None:
            frames.append(arr)
        else:
            spec["region"], spec["offset"] = where.region, where.offset
    return specs, frames


def encode_request(
    request_id: int,
    op: str,
    *,
    model: str | None = None,
    inputs: Mapping[str, Any] | None = None,
    version: int | None = None,
    deadline_ms: float | None = None,
    trace: str | None = None,
    fields: Mapping[str, Any] | None = None,
    data: Buffer | None = None,
    locate: Locate | None = None,
) -> list[Any]:
    """Frames of a request, as a client sends them; ``fields`` are the op's own keys, ``data``
    an ``upload``'s chunk, ``locate`` finds the inputs that lie in the client's regions."""
    header: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": request_id, "op": op}
    if model is not None:
        header["model"] = model
    if version is not None:
        header["version"] = version
    if deadline_ms is not None:
        header["deadline_ms"] = deadline_ms
    if trace is not None:
        header["trace"] = trace
    if fields:
        header.update(fields)
    frames: list[Any] = []
    if inputs is not None:
        header["inputs"], frames = tensor_frames(inputs, locate)
    if data is not None:
        frames.append(data)
    return [msgpack.packb(header), *frames]


def encode_reply(
    request_id: int | None,
    fields: Mapping[str, Any],
    outputs: Mapping[str, np.ndarray[Any, Any]] | None = None,
    locate: Locate | None = None,
) -> list[Any]:
    """Frames of a success reply: ``fields`` are the op's result keys; ``locate`` finds the
    outputs already written into the client's regions."""
    header: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": request_id, "ok": True, **fields}
    frames: list[Any] = []
    if outputs is not None:
        header["outputs"], frames = tensor_frames(outputs, locate)
    return [msgpack.packb(header), *frames]


def encode_error(request_id: int | None, error: EdgedError, trace: str | None = None) -> list[Any]:
    header: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "id": request_id,
        "ok": False,
        "error": {"code": error.code, "message": error.message},
    }
    if trace is not None:
        header["trace"] = trace
    return [msgpack.packb(header)]


def decode_reply(frames: Sequence[Buffer], limits: Limits = DEFAULT_LIMITS) -> Reply:
    """Decode a reply; an error reply carries the matching typed ``EdgedError`` in ``error``."""
    if not frames:
        raise BadRequest("empty reply")
    header = unpack_header(frames[0], limits)
    request_id = valid_id(header.get("id"))
    if not header.get("ok"):
        error = header.get("error")
        if not isinstance(error, dict):
            error = {}
        exc = error_from_code(str(error.get("code", "INTERNAL")), str(error.get("message", "")))
        return Reply(id=request_id, fields=header, tensors={}, error=exc)
    tensors, refs = decode_described(header.pop("outputs", []), frames[1:], limits)
    return Reply(id=request_id, fields=header, tensors=tensors, refs=refs)
