"""Wire protocol v1: pure encode/decode of multipart messages (docs/PROTOCOL.md is the spec).

A message is ``[header, tensor_0, ..., tensor_n]``: the header a msgpack map, each tensor frame
the raw C-contiguous little-endian bytes of one array described in the header. This module
imports no socket or event loop so it can be tested and fuzzed on bytes alone; everything is
validated here before any model is touched. Tensors are views on the received buffers (no copy).
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import msgpack
import numpy as np

from edged.errors import (
    BadRequest,
    EdgedError,
    FrameMismatch,
    TooLarge,
    UnknownOp,
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

#: generation settings and their defaults (llama-cpp-python's own, except max_tokens)
GENERATE_DEFAULTS: dict[str, Any] = {
    "max_tokens": 128,
    "stop": (),
    "temperature": 0.8,
    "top_p": 0.95,
    "seed": None,
}
#: header keys each op accepts besides the common ones; anything else is a BAD_REQUEST.
COMMON_KEYS = frozenset({"v", "id", "op", "trace"})
OP_KEYS: dict[str, frozenset[str]] = {
    "ping": frozenset(),
    "describe": frozenset({"model", "version"}),
    "infer": frozenset({"model", "version", "deadline_ms", "inputs"}),
    "generate": frozenset({"model", "version", "deadline_ms", "prompt", *GENERATE_DEFAULTS}),
    "embed": frozenset({"model", "version", "deadline_ms", "input"}),
    "cancel": frozenset({"target"}),
    # control socket only
    "swap": frozenset({"model", "version", "path", "policy", "force"}),
    "rollback": frozenset({"model"}),
    "canary": frozenset({"model", "version", "path", "fraction", "force"}),
    "shadow": frozenset({"model", "version", "path", "force"}),
    "promote": frozenset({"model"}),
    "discard": frozenset({"model"}),
    "reload": frozenset(),
    "models": frozenset(),
    "metrics": frozenset(),
    "status": frozenset(),
    "sysinfo": frozenset(),
    "logs": frozenset({"last", "level", "follow"}),
    "config": frozenset(),
    "stack": frozenset(),
    "selftest": frozenset(),
    "load": frozenset({"model"}),
    "unload": frozenset({"model"}),
    "install": frozenset({"path", "upload", "allow_downgrade"}),
    "history": frozenset(),
    "upload": frozenset({"sha256", "size", "offset"}),
}
#: ops whose keys their handlers check (``Request.args``)
ARGS_OPS = frozenset({"logs", "install", "upload"})
SWAP_POLICIES = ("auto", "overlap", "replace")
ALLOWED_KEYS = {op: COMMON_KEYS | keys for op, keys in OP_KEYS.items()}
TENSOR_KEYS = frozenset({"name", "dtype", "shape"})
MODEL_OPS = frozenset(
    {"describe", "infer", "generate", "embed", "swap", "rollback", "canary", "shadow"}
    | {"promote", "discard", "load", "unload"}
)
#: control ops that name a version to load: a stored ``version`` or a new file at ``path``
VERSION_OPS = frozenset({"swap", "canary", "shadow"})
MAX_ID = 2**64 - 1
MAX_TRACE_LEN = 128
MAX_NAME_LEN = 256
MAX_STOPS = 16
MAX_STOP_LEN = 256
MAX_EMBED_TEXTS = 64
MAX_SEED = 2**32 - 1
MAX_TOKENS = 2**31 - 1
#: one day: longer is no deadline at all, and far longer overflows the clock arithmetic
MAX_DEADLINE_MS = 86_400_000
BOOL = DTYPES["bool"]


@dataclass(frozen=True)
class Limits:
    """Bounds enforced while decoding; the socket enforces ``max_message_bytes`` per frame too."""

    max_message_bytes: int = 64 * 1024 * 1024
    max_header_bytes: int = 64 * 1024
    max_tensors: int = 64
    max_dims: int = 8


@dataclass(frozen=True, slots=True)
class Generation:
    """What a ``generate`` request asks for (defaults in ``GENERATE_DEFAULTS``)."""

    prompt: str
    max_tokens: int
    stop: tuple[str, ...]
    temperature: float
    top_p: float
    seed: int | None


@dataclass(frozen=True, slots=True)
class SwapArgs:
    """What a ``swap`` asks for besides the model and its target ``version``."""

    path: str | None = None
    policy: str = "auto"
    force: bool = False
    #: ``canary``: the share of requests the candidate serves
    fraction: float = 0.1


@dataclass(frozen=True, slots=True)
class Request:
    id: int
    op: str
    model: str | None = None
    version: int | None = None
    deadline_ms: float | None = None
    trace: str | None = None
    inputs: dict[str, np.ndarray[Any, Any]] = field(default_factory=dict)
    #: ``generate`` only
    generation: Generation | None = None
    #: ``embed`` only: the texts to embed, in order
    texts: tuple[str, ...] = ()
    #: ``cancel`` only: the id of the request to cancel (sent earlier on the same connection)
    target: int | None = None
    #: the op's own keys, checked by its handler (``ARGS_OPS``)
    args: dict[str, Any] = field(default_factory=dict)
    #: ``swap``, ``canary``, ``shadow``: ``path`` (a new model file), ``policy``, ``force``...
    swap: SwapArgs | None = None
    #: ``upload`` only: the chunk of the bundle, the frame after the header (raw bytes, not in
    #: the header, whose size is bounded far below a chunk's)
    data: Buffer | None = None


@dataclass(frozen=True, slots=True)
class Reply:
    """A decoded reply: ``fields`` holds the op's result keys, ``tensors`` the outputs."""

    id: int | None
    fields: dict[str, Any]
    tensors: dict[str, np.ndarray[Any, Any]]
    error: EdgedError | None = None

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


def decode_request(frames: Sequence[Buffer], limits: Limits) -> Request:
    """Validate and decode a request; raise ``RequestRejected`` with the error to reply."""
    request_id: int | None = None
    try:
        if not frames or (len(frames) == 1 and len(frames[0]) == 0):
            raise BadRequest("empty message")
        header = unpack_header(frames[0], limits)
        request_id = _valid_id(header.get("id"))  # first, so every later error reaches its caller
        total = sum(len(f) for f in frames)
        if total > limits.max_message_bytes:
            raise TooLarge(f"message is {total} bytes, limit {limits.max_message_bytes}")
        return _parse_request(header, frames[1:], limits)
    except EdgedError as exc:
        # the error alone, not its traceback: that holds this call's frames, and with them the
        # message's buffers (up to max_message_bytes), for as long as anything holds the error
        raise RequestRejected(exc.with_traceback(None), request_id) from None


def _parse_request(header: dict[str, Any], tensors: Sequence[Buffer], limits: Limits) -> Request:
    version = header.get("v")
    if not _is_int(version) or version != PROTOCOL_VERSION:
        raise UnsupportedVersion(
            f"protocol version {version!r} is not supported; this daemon speaks {PROTOCOL_VERSION}"
        )
    request_id = _valid_id(header.get("id"))
    if request_id is None:
        raise BadRequest("'id' must be an unsigned 64-bit integer")
    op = header.get("op")
    if not isinstance(op, str):
        raise BadRequest("'op' must be a string")
    allowed = ALLOWED_KEYS.get(op)
    if allowed is None:
        raise UnknownOp(f"unknown op {op!r}; known: {', '.join(sorted(OP_KEYS))}")
    extra = header.keys() - allowed
    if extra:
        raise BadRequest(f"unknown header key(s) for op {op!r}: {', '.join(map(repr, extra))}")
    trace = _optional(header, "trace", str) or new_trace()
    if trace is not None and len(trace) > MAX_TRACE_LEN:
        raise BadRequest(f"'trace' is longer than {MAX_TRACE_LEN} characters")
    model = _optional(header, "model", str)
    if op in MODEL_OPS and not model:
        raise BadRequest(f"op {op!r} needs a 'model'")
    pinned = header.get("version")
    if pinned is not None and not (_is_int(pinned) and pinned >= 0):
        raise BadRequest("'version' must be a non-negative integer")
    deadline = header.get("deadline_ms")
    if deadline is not None and not (_is_number(deadline) and 0 < deadline <= MAX_DEADLINE_MS):
        raise BadRequest(f"'deadline_ms' must be a number above 0 and at most {MAX_DEADLINE_MS}")
    specs = header.get("inputs", [])
    if op not in ("infer", "upload") and tensors:
        raise FrameMismatch(f"op {op!r} takes no tensor frames, got {len(tensors)}")
    inputs = _decode_tensors(specs, tensors, limits) if op == "infer" else {}
    target = None
    if op == "cancel":
        target = _valid_id(header.get("target"))
        if target is None:
            raise BadRequest("'target' must be the unsigned 64-bit id of the request to cancel")
    return Request(
        id=request_id,
        op=op,
        model=model,
        version=pinned,
        deadline_ms=float(deadline) if deadline is not None else None,
        trace=trace,
        inputs=inputs,
        generation=_generation(header) if op == "generate" else None,
        texts=_texts(header.get("input")) if op == "embed" else (),
        target=target,
        swap=_swap_args(header) if op in VERSION_OPS else None,
        args={key: header[key] for key in OP_KEYS[op] if key in header} if op in ARGS_OPS else {},
        data=_data_frame(tensors) if op == "upload" else None,
    )


def _data_frame(frames: Sequence[Buffer]) -> Buffer | None:
    """``upload``'s chunk: one frame after the header, or none (a question of progress)."""
    if len(frames) > 1:
        raise FrameMismatch(f"op 'upload' takes one data frame at most, got {len(frames)}")
    return frames[0] if frames else None


def _swap_args(header: Mapping[str, Any]) -> SwapArgs:
    path = _optional(header, "path", str)
    if path is not None and (not valid_path(path) or header.get("version") is not None):
        raise BadRequest(
            "'path' must be a non-empty string without NUL, and not given with 'version'"
        )
    policy = header.get("policy")
    policy = "auto" if policy is None else policy
    if type(policy) is not str or policy not in SWAP_POLICIES:
        raise BadRequest(f"'policy' must be one of {', '.join(SWAP_POLICIES)}")
    force = header.get("force")
    force = False if force is None else force
    if type(force) is not bool:
        raise BadRequest("'force' must be a boolean")
    fraction = header.get("fraction")
    fraction = 0.1 if fraction is None else fraction
    if not (_is_number(fraction) and 0 < fraction <= 1):
        raise BadRequest("'fraction' must be a number above 0 and at most 1")
    return SwapArgs(path, policy, force, float(fraction))


def _generation(header: Mapping[str, Any]) -> Generation:
    prompt = header.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise BadRequest("'prompt' must be a non-empty string")
    values = {  # nil means the default, as for the other optional keys
        key: default if header.get(key) is None else header[key]
        for key, default in GENERATE_DEFAULTS.items()
    }
    max_tokens = values["max_tokens"]
    if not _is_int(max_tokens) or not 1 <= max_tokens <= MAX_TOKENS:
        raise BadRequest(f"'max_tokens' must be an integer from 1 to {MAX_TOKENS}")
    stop = values["stop"]
    if isinstance(stop, str):
        stop = [stop]
    if (
        not isinstance(stop, (list, tuple))
        or len(stop) > MAX_STOPS
        or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_LEN for s in stop)
    ):
        raise BadRequest(
            f"'stop' must be a string or an array of at most {MAX_STOPS} non-empty strings of "
            f"at most {MAX_STOP_LEN} characters"
        )
    temperature, top_p = values["temperature"], values["top_p"]
    if not (_is_number(temperature) and 0 <= temperature <= 100):
        raise BadRequest("'temperature' must be a number from 0 to 100 (0 is greedy)")
    if not (_is_number(top_p) and 0 < top_p <= 1):
        raise BadRequest("'top_p' must be a number above 0 and at most 1")
    seed = values["seed"]
    if seed is not None and not (_is_int(seed) and 0 <= seed <= MAX_SEED):
        raise BadRequest(f"'seed' must be an integer from 0 to {MAX_SEED}")
    return Generation(prompt, max_tokens, tuple(stop), float(temperature), float(top_p), seed)


def _texts(value: Any) -> tuple[str, ...]:
    texts = [value] if isinstance(value, str) else value
    if (
        not isinstance(texts, list)
        or not 0 < len(texts) <= MAX_EMBED_TEXTS
        or not all(isinstance(text, str) and text for text in texts)
    ):
        raise BadRequest(
            f"'input' must be a non-empty string or an array of 1 to {MAX_EMBED_TEXTS} of them"
        )
    return tuple(texts)


def _decode_tensors(
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
    for index, (spec, frame) in enumerate(zip(specs, frames, strict=True)):
        name, dtype, shape = _tensor_spec(spec, index, limits)
        if name in arrays:
            raise BadRequest(f"tensor {name!r} is declared twice")
        expected = math.prod(shape) * dtype.itemsize
        if len(frame) != expected:
            raise FrameMismatch(
                f"tensor {name!r}: {dtype.name}{list(shape)} needs {expected} bytes, "
                f"frame {index + 1} has {len(frame)}"
            )
        array = np.frombuffer(frame, dtype=dtype).reshape(shape)
        if dtype is BOOL and array.size and array.view(np.uint8).max() > 1:
            raise BadRequest(f"tensor {name!r}: a bool element is neither 0 nor 1")
        arrays[name] = array
    return arrays


def _tensor_spec(
    spec: Any, index: int, limits: Limits
) -> tuple[str, np.dtype[Any], tuple[int, ...]]:
    where = f"inputs[{index}]"
    # Exact type checks (msgpack decodes to exact types): this runs for every tensor received.
    if type(spec) is not dict or spec.keys() != TENSOR_KEYS:
        raise BadRequest(f"{where} must be a map with exactly the keys name, dtype, shape")
    name, dtype_name, shape = spec["name"], spec["dtype"], spec["shape"]
    if type(name) is not str or not name or len(name) > MAX_NAME_LEN:
        raise BadRequest(f"{where}.name must be a non-empty string")
    dtype = DTYPES.get(dtype_name) if type(dtype_name) is str else None
    if dtype is None:
        raise BadRequest(
            f"{where} ({name!r}): dtype {dtype_name!r} is not one of {', '.join(DTYPES)}"
        )
    if type(shape) is not list or len(shape) > limits.max_dims:
        raise BadRequest(
            f"{where} ({name!r}): shape must be an array of at most {limits.max_dims} dims"
        )
    for dim in shape:
        if type(dim) is not int or not 0 <= dim <= limits.max_message_bytes:
            raise BadRequest(
                f"{where} ({name!r}): shape dims must be integers from 0 to "
                f"{limits.max_message_bytes}"
            )
    return name, dtype, tuple(shape)


def new_trace() -> str:
    """A trace id for a request that brought none: unique per daemon run and readable in logs
    (a random per-process prefix and a counter: cheaper than a random id per request)."""
    return f"{_TRACE_PREFIX}-{next(_TRACE_COUNTER):x}"


_TRACE_PREFIX = os.urandom(4).hex()
_TRACE_COUNTER = itertools.count(1)


def _optional(header: Mapping[str, Any], key: str, kind: type) -> Any:
    value = header.get(key)
    if value is not None and not isinstance(value, kind):
        raise BadRequest(f"{key!r} must be a {kind.__name__}")
    return value


def valid_path(value: Any) -> TypeGuard[str]:
    """A file path a client may name: a non-empty string the OS can take (no NUL byte)."""
    return type(value) is str and bool(value) and "\0" not in value


def _valid_id(value: Any) -> int | None:
    return value if _is_int(value) and 0 <= value <= MAX_ID else None


def _is_int(value: Any) -> bool:
    return type(value) is int  # bool is a subclass of int, and never an integer here


def _is_number(value: Any) -> bool:
    return (type(value) is int or type(value) is float) and math.isfinite(value)


# -- encoding ---------------------------------------------------------------------------------


def tensor_frames(
    arrays: Mapping[str, np.ndarray[Any, Any]],
) -> tuple[list[dict[str, Any]], list[np.ndarray[Any, Any]]]:
    """Describe arrays for a header; return them C-contiguous little-endian (copied only if not)."""
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
        specs.append({"name": name, "dtype": dtype_name, "shape": list(arr.shape)})
        frames.append(arr)
    return specs, frames


def encode_request(
    request_id: int,
    op: str,
    *,
    model: str | None = None,
    inputs: Mapping[str, np.ndarray[Any, Any]] | None = None,
    version: int | None = None,
    deadline_ms: float | None = None,
    trace: str | None = None,
    fields: Mapping[str, Any] | None = None,
    data: Buffer | None = None,
) -> list[Any]:
    """Frames of a request, as a client sends them; ``fields`` are the op's own keys, ``data``
    an ``upload``'s chunk."""
    header: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": request_id, "op": op}
    for key, value in (("model", model), ("version", version), ("deadline_ms", deadline_ms)):
        if value is not None:
            header[key] = value
    if trace is not None:
        header["trace"] = trace
    if fields:
        header.update(fields)
    frames: list[Any] = []
    if inputs is not None:
        header["inputs"], frames = tensor_frames(inputs)
    if data is not None:
        frames.append(data)
    return [msgpack.packb(header), *frames]


def encode_reply(
    request_id: int | None,
    fields: Mapping[str, Any],
    outputs: Mapping[str, np.ndarray[Any, Any]] | None = None,
) -> list[Any]:
    """Frames of a success reply: ``fields`` are the op's result keys."""
    header: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": request_id, "ok": True, **fields}
    frames: list[Any] = []
    if outputs is not None:
        header["outputs"], frames = tensor_frames(outputs)
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


def decode_reply(frames: Sequence[Buffer], limits: Limits | None = None) -> Reply:
    """Decode a reply; an error reply carries the matching typed ``EdgedError`` in ``error``."""
    limits = limits or Limits()
    if not frames:
        raise BadRequest("empty reply")
    header = unpack_header(frames[0], limits)
    request_id = _valid_id(header.get("id"))
    if not header.get("ok"):
        error = header.get("error")
        if not isinstance(error, dict):
            error = {}
        exc = error_from_code(str(error.get("code", "INTERNAL")), str(error.get("message", "")))
        return Reply(id=request_id, fields=header, tensors={}, error=exc)
    tensors = _decode_tensors(header.pop("outputs", []), frames[1:], limits)
    return Reply(id=request_id, fields=header, tensors=tensors)
