"""Dynamic batching helpers: which requests may share a run, and how to merge and split them.

Pure numpy, no scheduling: the runner decides *when* to batch, this module decides *how*.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from edged.models.backend import Arrays


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


def merge(requests: Sequence[Arrays]) -> Arrays:
    if len(requests) == 1:
        return requests[0]
    return {name: np.concatenate([r[name] for r in requests]) for name in requests[0]}


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
