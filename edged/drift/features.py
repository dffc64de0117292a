"""What a request's tensors are to drift monitoring: a few numbers per row (an observation),
each a named feature, cheap enough to compute for every profiled request.

- a table ``[rows, F]`` (up to ``MAX_FEATURES`` columns): each column is a feature, ``x[3]``;
- an image or any tensor ``[rows, C, ...]`` with up to ``MAX_CHANNELS`` channels (NCHW, or NHWC
  when the last axis is the smaller of the two): each channel's mean and standard deviation over its
  pixels, ``x[c].mean`` and ``x[c].std``: a gain change moves the first, fog the second;
- anything wider: each row's mean, standard deviation, minimum and maximum, ``x.mean`` ...;
- a scalar per row (``[rows]``): the tensor itself, ``x``.

Rows are the leading axis of a tensor of rank 2 or more, and of a rank-1 tensor whose leading
axis is dynamic; otherwise the tensor is one row. A table whose width varies (token ids) is
summarised per row: its columns are not the same features from one request to the next.
Strings and booleans are not profiled.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Array = np.ndarray[Any, Any]
#: columns of a table profiled one by one; a wider one is summarised per row
MAX_FEATURES = 64
#: channels of an image profiled one by one
MAX_CHANNELS = 16
#: a large channel's standard deviation is taken over every this many pixels
STD_STRIDE = 8


@dataclass(frozen=True)
class Layout:
    """What a tensor's declared shape says: whether its leading axis is a batch of rows, and
    whether another axis varies."""

    rows: bool = True
    variable: bool = False

    @classmethod
    def of(cls, shape: Sequence[object]) -> Layout:
        """From a declared shape, whose dynamic axes are ``None`` or names (onnxruntime's)."""
        dynamic = [not isinstance(size, int) or size < 0 for size in shape]
        return cls(bool(dynamic) and dynamic[0], any(dynamic[1:]))


@dataclass(frozen=True)
class Observed:
    """One tensor's observations: ``values`` [rows, features], float64, NaN where not finite
    (``nonfinite`` counts them per feature)."""

    names: tuple[str, ...]
    values: Array
    nonfinite: Array


def observe(name: str, tensor: Array, layout: Layout = Layout()) -> Observed | None:
    """The features of ``tensor`` (``None`` for one not profiled)."""
    if tensor.dtype.kind not in "fiu":
        return None
    data = tensor if tensor.ndim >= 2 or (tensor.ndim == 1 and layout.rows) else tensor[None]
    names: tuple[str, ...]
    values: Array
    if data.ndim == 1:
        names, values = (name,), data[:, None].astype(np.float64)
    elif data.ndim == 2 and data.shape[1] <= MAX_FEATURES and not layout.variable:
        names = _columns(name, data.shape[1])
        values = data.astype(np.float64)
    else:
        names, values = _summaries(name, data)
    finite = np.isfinite(values)
    nonfinite = (~finite).sum(axis=0)
    if nonfinite.any():
        values = np.where(finite, values, np.nan)
    return Observed(names, values, nonfinite)


@functools.lru_cache(maxsize=256)
def _columns(name: str, width: int) -> tuple[str, ...]:
    return tuple(f"{name}[{i}]" for i in range(width))


@functools.lru_cache(maxsize=256)
def _channels(name: str, count: int) -> tuple[str, ...]:
    return tuple(f"{name}[{c}].{stat}" for c in range(count) for stat in ("mean", "std"))


def _summaries(name: str, data: Array) -> tuple[tuple[str, ...], Array]:
    # reduced in the tensor's own float type (numpy sums pairwise: accurate enough for a
    # histogram's bin), not after a float64 copy: a fifth of the time on a camera frame
    exact = None if data.dtype.kind == "f" else np.float64
    channels = min(data.shape[1], data.shape[-1]) if data.ndim >= 3 else MAX_CHANNELS + 1
    if channels <= MAX_CHANNELS:
        channels_first = data.shape[1] <= data.shape[-1]
        moved = data if channels_first else np.moveaxis(data, -1, 1)
        pixels: Array = moved.reshape(moved.shape[0], moved.shape[1], -1)
        count = pixels.shape[1]
        names = _channels(name, count)
        # the mean over every pixel (a NaN or Inf anywhere shows in it), the spread over every
        # STD_STRIDE-th one: within 1% on a camera frame, for half the time of all of them
        stride = STD_STRIDE if pixels.shape[2] > 8 * STD_STRIDE**2 else 1
        spread = pixels[:, :, ::stride].std(axis=2, dtype=exact)
        stats = np.stack([pixels.mean(axis=2, dtype=exact), spread], axis=2)
        return names, stats.reshape(len(pixels), 2 * count).astype(np.float64)
    flat: Array = data.reshape(len(data), -1)
    stats = np.stack(
        [
            flat.mean(axis=1, dtype=exact),
            flat.std(axis=1, dtype=exact),
            flat.min(axis=1),
            flat.max(axis=1),
        ]
    )
    return tuple(f"{name}.{stat}" for stat in ("mean", "std", "min", "max")), stats.T.astype(
        np.float64
    )


def out_of_range(tensors: Mapping[str, Array], ranges: Mapping[str, tuple[float, ...]]) -> int:
    """Values of the tensors named in ``ranges`` outside their [low, high]."""
    outside = 0
    for name, (low, high) in ranges.items():
        tensor = tensors.get(name)
        if tensor is not None and tensor.dtype.kind in "fiu":
            outside += int(np.count_nonzero((tensor < low) | (tensor > high)))
    return outside
