"""Well-formed messages of every kind, and a mutator that breaks them: the corpus for the
decoder's property tests and for fuzzing a live daemon (``make fuzz``).

The mutator draws every choice from a ``random.Random``: hypothesis drives it through
``st.randoms()`` (and shrinks what it draws), the live fuzz through a seeded one at full speed.
"""

from __future__ import annotations

import random
import sys
from typing import Any

import msgpack
import numpy as np

from edged import protocol
from edged.control.ops import CONTROL_OPS
from edged.errors import EdgedError
from edged.ops import DATA_OPS
from edged.opunit import Op, OpTable

#: every op of both sockets (``ping`` and ``cancel`` take the same keys on each)
EVERY_OP: dict[str, Op[Any, Any]] = {**DATA_OPS, **CONTROL_OPS}
#: what decoding knows when it may meet any op
ALL_OPS = OpTable(EVERY_OP)

X = np.arange(12, dtype=np.float32).reshape(3, 4)


def decode_request(frames: list[Any], limits: protocol.Limits) -> protocol.Request:
    """Decode a request of any op, as either socket would."""
    return protocol.decode_request(frames, limits, ALL_OPS)


def _as_bytes(messages: list[list[Any]]) -> list[list[bytes]]:
    return [[bytes(memoryview(frame)) for frame in frames] for frames in messages]


def valid_requests(model: str = "m") -> list[list[bytes]]:
    """One well-formed request per kind: every op family, tensors, a data frame."""
    return _as_bytes(
        [
            protocol.encode_request(
                1, "infer", model=model, inputs={"x": X, "n": np.array(3)}, deadline_ms=50
            ),
            protocol.encode_request(
                2, "generate", model="llm", fields={"prompt": "hi", "seed": 1, "top_p": 0.5}
            ),
            protocol.encode_request(3, "embed", model="e", fields={"input": ["a", "b"]}),
            protocol.encode_request(4, "cancel", fields={"target": 2}),
            protocol.encode_request(5, "describe", model=model, version=2),
            protocol.encode_request(6, "swap", model="m", fields={"policy": "overlap"}),
            protocol.encode_request(7, "logs", fields={"last": 10, "level": "info"}),
            protocol.encode_request(8, "install", fields={"path": "/x.bundle"}),
            protocol.encode_request(
                9, "upload", fields={"sha256": "0" * 64, "size": 3, "offset": 0}, data=b"abc"
            ),
            protocol.encode_request(
                10, "canary", model="m", fields={"path": "/m.onnx", "fraction": 0.5}
            ),
        ]
    )


def valid_replies() -> list[list[bytes]]:
    good = protocol.encode_reply(1, {"model": "m", "version": 2}, {"y": X})
    bad = protocol.encode_error(2, EdgedError("boom"), "trace")
    return _as_bytes([good, bad])


#: header keys an edit may touch: the common ones, every op's numbers and paths, and one
#: nobody knows
HEADER_KEYS = [
    *("v", "id", "op", "inputs", "outputs", "shape", "error", "ok", "model", "trace", "zz"),
    *("version", "deadline_ms", "max_tokens", "temperature", "top_p", "seed", "target"),
    *("top_k", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty"),
    *("path", "fraction", "last", "level", "offset", "size", "sha256"),
]
#: numbers no field takes: non-finite, beyond any bound, beyond a double's integers
ABSURD_NUMBERS = [
    *(float("nan"), float("inf"), -float("inf"), 1e300, 1e308, -1e308, sys.float_info.max),
    *(2**63 - 1, 2**64 - 1, -(2**63), 86_400_001),
]
EDITS = ["flip", "cut", "insert", "drop", "dup", "empty", "header", "junk"]


def random_value(rng: random.Random) -> Any:
    """Something msgpack can carry, of any type a header might hold."""
    kind = rng.randrange(8)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, 1, -1, 2**31, 2**63 - 1, -(2**63), 2**64 - 1, rng.randrange(-9, 99)])
    if kind == 3:
        return rng.choice([0.0, -1.5, 0.5, *ABSURD_NUMBERS])
    if kind == 4:  # NUL bytes included: a path or a name holding one must be refused
        return "".join(rng.choice("abz/\u00e9\u20ac\x00") for _ in range(rng.randrange(16)))
    if kind == 5:
        return rng.randbytes(rng.randrange(16))
    if kind == 6:
        return [rng.randrange(-5, 6) for _ in range(rng.randrange(5))]
    return {rng.choice(["name", "dtype", "shape", "x"]): rng.randrange(-9, 9)}


def mutate(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    """``frames`` with one to three edits: bytes flipped, cut or inserted; frames dropped,
    duplicated, emptied or replaced by junk; header values replaced, keys added or removed."""
    frames = list(frames)
    for _ in range(rng.randint(1, 3)):
        edit = rng.choice(EDITS)
        if not frames:
            frames.append(rng.randbytes(rng.randrange(17)))
            continue
        i = rng.randrange(len(frames))
        frame = frames[i]
        if edit == "flip" and frame:
            at = rng.randrange(len(frame))
            frames[i] = frame[:at] + bytes([frame[at] ^ rng.randint(1, 255)]) + frame[at + 1 :]
        elif edit == "cut":
            frames[i] = frame[: rng.randint(0, len(frame))]
        elif edit == "insert":
            at = rng.randint(0, len(frame))
            frames[i] = frame[:at] + rng.randbytes(rng.randint(1, 8)) + frame[at:]
        elif edit == "drop":
            del frames[i]
        elif edit == "dup":
            frames.insert(i, frame)
        elif edit == "empty":
            frames[i] = b""
        elif edit == "junk":
            frames[i] = rng.randbytes(rng.randrange(64))
        else:
            frames[0] = edit_header(rng, frames[0])
    return frames


def edit_header(rng: random.Random, frame: bytes) -> bytes:
    """Replace, add or remove one header key; a frame that is no msgpack map is left as it is."""
    try:
        header = msgpack.unpackb(frame)
    except Exception:  # already broken by an earlier edit: leave it so
        return frame
    if not isinstance(header, dict):
        return frame
    key = rng.choice([*header, *HEADER_KEYS])
    if key in header and rng.random() < 0.5:
        del header[key]
    else:
        header[key] = random_value(rng)
    return bytes(msgpack.packb(header))
