"""Dynamic batching helpers: which requests may share a run, and how to merge and split them.

Pure numpy, no scheduling: the runner decides *when* to batch, this module decides *how*.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from edged.models.backend import Arrays

#: Where a model's inputs start in memory. A tensor frame lies wherever libzmq put it (its
#: header's length moves it), and MLAS's vector kernels handle an unaligned head apart from the
#: aligned body: a ReduceSum over a row gave results an ulp or more apart depending on the
#: row's address modulo 16 (SSE/AVX2, measured), and AVX-512 kernels work on 64 bytes.
#: onnxruntime's own CPU allocator aligns every tensor to 64 bytes; inputs aligned the same way
#: give the same numbers wherever their frame landed.
ALIGNMENT = 64
#: below this, a tensor is copied without asking where it lies (the copy is the cheaper)
ASK_ABOVE_BYTES = 16 * 1024


def batch_key(inputs: Arrays) -> Hashable | None:
    """Requests with equal keys have equal per-row shapes and can be concatenated on axis 0.

    ``None`` means the request must run alone: its inputs disagree on the leading dimension.
    """
    if len({array.shape[0] for array in inputs.values()}) != 1:
        return None
    return tuple((name, array.shape[1:]) for name, array in inputs.items())


def batch_rows(inputs: Arrays) -> int:
    """Rows a request contributes: the leading dimension shared by all its inputs."""
    return next(iter(inputs.values())).shape[0] if inputs else 1


class AlignedBuffers:
    """The aligned buffers small inputs are copied into, kept from run to run: finding a fresh
    buffer's address costs more than the copy. One per input name, shape and dtype, the
    ``MAX_KEPT`` most recently made; each at most ``ASK_ABOVE_BYTES``, so a runner keeps under
    ``MAX_KEPT * ASK_ABOVE_BYTES``. Reuse is safe because a runner has one run at a time and a
    backend reads its inputs only while it runs."""

    MAX_KEPT = 16

    def __init__(self) -> None:
        self._kept: dict[tuple[str, tuple[int, ...], np.dtype[Any]], np.ndarray[Any, Any]] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray[Any, Any]:
        """An aligned array of ``shape``: kept for reuse when small, else a fresh one."""
        key = (name, shape, dtype)
        buffer = self._kept.get(key)
        if buffer is not None:
            return buffer
        buffer = aligned_empty(shape, dtype)
        if buffer.nbytes <= ASK_ABOVE_BYTES:
            if len(self._kept) >= self.MAX_KEPT:
                del self._kept[next(iter(self._kept))]  # the oldest made
            self._kept[key] = buffer
        return buffer


def merge(requests: Sequence[Arrays], buffers: AlignedBuffers | None = None) -> Arrays:
    """One run's inputs, each starting on an ``ALIGNMENT`` boundary: a request's own arrays
    when they already do (no copy), else aligned copies or the batch's concatenation, in
    ``buffers`` when given."""
    buffers = buffers or AlignedBuffers()
    if len(requests) == 1:
        return {name: aligned(array, buffers, name) for name, array in requests[0].items()}
    merged = {}
    for name in requests[0]:
        parts = [r[name] for r in requests]
        shape = (sum(part.shape[0] for part in parts), *parts[0].shape[1:])
        merged[name] = np.concatenate(parts, out=buffers.get(name, shape, parts[0].dtype))
    return merged


def aligned(
    array: np.ndarray[Any, Any], buffers: AlignedBuffers | None = None, name: str = ""
) -> np.ndarray[Any, Any]:
    """``array`` itself if it is large and starts on an ``ALIGNMENT`` boundary, else an
    aligned copy. Asking numpy for an address costs about 2 us, more than copying a small
    tensor (and libzmq's frames are never 64-aligned): only large ones are asked."""
    if array.nbytes >= ASK_ABOVE_BYTES and _address(array) % ALIGNMENT == 0:
        return array
    copy = (buffers or AlignedBuffers()).get(name, array.shape, array.dtype)
    copy[...] = array
    return copy


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray[Any, Any]:
    """An uninitialised C-contiguous array that starts on an ``ALIGNMENT`` boundary."""
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + ALIGNMENT, np.uint8)
    start = -_address(raw) % ALIGNMENT
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def _address(array: np.ndarray[Any, Any]) -> int:
    return int(array.ctypes.data)


def split(
    outputs: dict[str, np.ndarray[Any, Any]], rows: Sequence[int]
) -> list[dict[str, np.ndarray[Any, Any]]]:
    """Cut batched outputs back into one dict per request, in request order."""
    if len(rows) == 1:
        return [outputs]
    total = sum(rows)
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != total:
            raise ValueError(f"output {name!r} has {array.shape} rows for a batch of {total}")
    parts = []
    start = 0
    for count in rows:  # slicing makes views; np.split costs more for the small batches here
        parts.append({name: array[start : start + count] for name, array in outputs.items()})
        start += count
    return parts
