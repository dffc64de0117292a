"""The backend interface every model format implements, and input checks against a signature.

Kept tiny on purpose: the scheduler, batcher and registry only need a signature to check
requests against and a blocking ``run`` they call off the event loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from edged.errors import DtypeMismatch, InputMismatch, ShapeMismatch

if TYPE_CHECKING:
    from edged.models.text_encoder import TextEncoder

Arrays = Mapping[str, np.ndarray[Any, Any]]


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One input or output: ``None`` in ``shape`` is a dynamic dimension."""

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int | None, ...]
    #: (axis, size) of every fixed dimension: what ``fits`` compares, per request
    _fixed: tuple[tuple[int, int], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        fixed = tuple((axis, dim) for axis, dim in enumerate(self.shape) if dim is not None)
        object.__setattr__(self, "_fixed", fixed)

    def fits(self, shape: tuple[int, ...]) -> bool:
        """Whether an array of ``shape`` has this spec's rank and fixed dimensions."""
        if len(shape) != len(self.shape):
            return False
        for axis, dim in self._fixed:  # noqa: SIM110 (all() of a generator costs more)
            if shape[axis] != dim:
                return False
        return True

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype.name, "shape": list(self.shape)}

    def __str__(self) -> str:
        return f"{self.name}: {self.dtype.name}{format_shape(self.shape)}"


def format_shape(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


@dataclass(frozen=True, slots=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    _names: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_names", frozenset(spec.name for spec in self.inputs))

    @property
    def batchable(self) -> bool:
        """True when every input and output has a dynamic leading (batch) dimension."""
        return all(spec.shape and spec.shape[0] is None for spec in self.inputs + self.outputs)

    def check(self, model: str, inputs: Arrays) -> None:
        """Raise the specific mismatch error, naming the input and expected vs received. Runs
        for every request: the names are compared as a set, each shape by ``fits``."""
        if inputs.keys() != self._names:
            missing = [spec.name for spec in self.inputs if spec.name not in inputs]
            extra = [name for name in inputs if name not in self._names]
            parts = [f"missing input {name!r}" for name in missing]
            parts += [f"unexpected input {name!r}" for name in extra]
            takes = "; ".join(str(spec) for spec in self.inputs)
            raise InputMismatch(f"model {model!r}: {', '.join(parts)}; it takes {takes}")
        for spec in self.inputs:
            array = inputs[spec.name]
            if array.dtype != spec.dtype:
                raise DtypeMismatch(
                    f"model {model!r} input {spec.name!r}: expected {spec.dtype.name}, "
                    f"got {array.dtype.name}"
                )
            if not spec.fits(array.shape):
                raise ShapeMismatch(
                    f"model {model!r} input {spec.name!r}: expected shape "
                    f"{format_shape(spec.shape)}, got {format_shape(array.shape)}"
                )


class Backend(Protocol):
    """A loaded model. ``run`` blocks and is called from one thread at a time per model."""

    @property
    def signature(self) -> Signature: ...

    #: texts to the model's inputs and its outputs to vectors, for a text encoder
    text: TextEncoder | None

    def run(
        self, inputs: Arrays, into: Mapping[str, np.ndarray[Any, Any]] | None = None
    ) -> dict[str, np.ndarray[Any, Any]]:
        """The outputs; those named in ``into`` written there by the run itself, and returned
        as those arrays."""
        ...

    def close(self) -> None: ...
