"""What a new model version must pass before requests are routed to it.

Three checks, in order: its interface is one the old version's clients can keep using (the
same input and output names, dtypes, ranks and fixed dimensions for an ONNX model; the same
kind, and embedding width, for a GGUF one); a warm-up run succeeds; and, when the version ships
golden vectors, its outputs for their inputs match theirs within tolerance. Each runner
answers for itself (``Runner.interface``, ``Runner.rehearse``); what they share is here.

Golden vectors live next to the model file, as ``<stem>.golden.npz`` (``model.onnx`` ->
``model.golden.npz``): an ``input.<name>`` array per model input, an ``output.<name>`` array
per output to check, and optionally scalar ``atol`` and ``rtol`` (defaults below).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edged.errors import SwapRejected
from edged.models.backend import Backend, Signature, TensorSpec

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-3

#: what a version offers its clients: a tensor signature, or ("generate",) / ("embed", n_embd)
Interface = Signature | tuple[Any, ...]


def check_compatible(name: str, old: Interface, new: Interface) -> None:
    """Raise ``SwapRejected`` naming every difference a client of ``old`` would trip over."""
    if isinstance(old, Signature) and isinstance(new, Signature):
        problems = _signature_problems(old, new)
    elif old != new:
        problems = [f"it serves {_kind(new)} where the active version serves {_kind(old)}"]
    else:
        problems = []
    if problems:
        raise SwapRejected(
            f"model {name!r}: the new version is incompatible: {'; '.join(problems)}"
        )


def golden_path(model_path: str) -> Path:
    return Path(model_path).with_suffix(".golden.npz")


def rehearse_tensors(name: str, backend: Backend, model_path: str) -> None:
    """A warm-up run, checked against the golden vectors when there are any (blocking: runs
    before the version gets any traffic, so nothing else uses its backend meanwhile)."""
    golden = golden_path(model_path)
    vectors = _read_golden(name, golden) if golden.is_file() else {}
    inputs = {
        spec.name: vectors.get(f"input.{spec.name}", _zeros(spec))
        for spec in backend.signature.inputs
    }
    try:
        outputs = backend.run(inputs)
    except Exception as exc:  # any failure here means the version cannot serve
        raise SwapRejected(f"model {name!r}: the new version's warm-up run failed: {exc}") from None
    atol = float(vectors.get("atol", DEFAULT_ATOL))
    rtol = float(vectors.get("rtol", DEFAULT_RTOL))
    for key, expected in vectors.items():
        if not key.startswith("output."):
            continue
        output = key.removeprefix("output.")
        actual = outputs.get(output)
        if actual is None or actual.shape != expected.shape:
            got = "nothing" if actual is None else f"shape {list(actual.shape)}"
            raise SwapRejected(
                f"model {name!r}: golden output {output!r} has shape {list(expected.shape)}, "
                f"the new version gives {got}"
            )
        if not np.allclose(actual, expected, atol=atol, rtol=rtol):
            worst = float(np.max(np.abs(actual.astype(np.float64) - expected)))
            raise SwapRejected(
                f"model {name!r}: the new version fails its golden vectors: output {output!r} "
                f"differs by up to {worst:.3g} (atol {atol:g}, rtol {rtol:g})"
            )


def _read_golden(name: str, path: Path) -> dict[str, np.ndarray[Any, Any]]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError) as exc:
        raise SwapRejected(f"model {name!r}: cannot read golden vectors {path}: {exc}") from None


def _zeros(spec: TensorSpec) -> np.ndarray[Any, Any]:
    return np.zeros([1 if dim is None else dim for dim in spec.shape], dtype=spec.dtype)


def _kind(interface: Interface) -> str:
    if isinstance(interface, Signature):
        return "infer"
    return "generate" if interface == ("generate",) else f"embed (width {interface[1]})"


def _signature_problems(old: Signature, new: Signature) -> list[str]:
    problems = []
    new_inputs = {spec.name: spec for spec in new.inputs}
    for spec in old.inputs:
        got = new_inputs.pop(spec.name, None)
        if got is None:
            problems.append(f"input {spec.name!r} is gone")
        elif not _accepts(got, spec):
            problems.append(f"input {spec} became {got}")
    problems += [f"it needs a new input {spec}" for spec in new_inputs.values()]
    new_outputs = {spec.name: spec for spec in new.outputs}
    for spec in old.outputs:
        got = new_outputs.get(spec.name)
        if got is None:
            problems.append(f"output {spec.name!r} is gone")
        elif got.dtype != spec.dtype or len(got.shape) != len(spec.shape):
            problems.append(f"output {spec} became {got}")
    return problems


def _accepts(new: TensorSpec, old: TensorSpec) -> bool:
    """Whether every tensor the old input accepted is accepted by the new one."""
    if new.dtype != old.dtype or len(new.shape) != len(old.shape):
        return False
    return all(n is None or n == o for n, o in zip(new.shape, old.shape, strict=True))
