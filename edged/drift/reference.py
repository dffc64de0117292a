"""A model version's reference: per feature, the distribution its inputs and outputs had when
the version was known good, as the bins a window is compared in.

Each feature's bins are cut at the reference's own quantiles (equal shares, so every bin holds
evidence), with the share of the reference in each kept exactly (ties make them unequal). The
reference is captured from a version's first requests, built from its golden vectors, or
shipped in its bundle; it is saved as JSON (``FORMAT``) so a restart keeps it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edged.store import write_durably

FORMAT = "edged-drift-reference/1"
Array = np.ndarray[Any, Any]


@dataclass(frozen=True)
class FeatureReference:
    #: the bins' inner edges, ascending (a value v falls in bin ``searchsorted(edges, v, "right")``)
    edges: tuple[float, ...]
    #: the reference's share of each bin (one more than ``edges``)
    shares: tuple[float, ...]
    mean: float
    std: float
    count: int


@dataclass(frozen=True)
class Reference:
    features: dict[str, FeatureReference]
    #: where it came from: "traffic", "golden" or "bundle"
    source: str
    count: int

    @classmethod
    def build(cls, names: Sequence[str], values: Array, bins: int, source: str) -> Reference:
        """From observations ``values`` [rows, features] (NaN: not finite, left out)."""
        features = {}
        for column, name in enumerate(names):
            finite = values[:, column][~np.isnan(values[:, column])]
            if not len(finite):
                continue
            cuts = np.quantile(finite, np.arange(1, bins) / bins)
            edges = np.unique(cuts)
            counts = np.bincount(np.searchsorted(edges, finite, "right"), minlength=len(edges) + 1)
            features[name] = FeatureReference(
                tuple(edges.tolist()),
                tuple((counts / len(finite)).tolist()),
                float(finite.mean()),
                float(finite.std()),
                len(finite),
            )
        return cls(features, source, len(values))

    def to_json(self) -> str:
        features = {
            name: {
                "edges": list(f.edges),
                "shares": list(f.shares),
                "mean": f.mean,
                "std": f.std,
                "count": f.count,
            }
            for name, f in self.features.items()
        }
        return json.dumps(
            {"format": FORMAT, "source": self.source, "count": self.count, "features": features}
        )

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_durably(path, self.to_json())

    @classmethod
    def load(cls, path: Path, source: str | None = None) -> Reference:
        """Read a reference; ``ValueError`` saying what is wrong with one that is not."""
        try:
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT:
                raise ValueError(f"not an {FORMAT} file")
            features = {
                str(name): _feature(entry) for name, entry in dict(data["features"]).items()
            }
            return cls(features, source or str(data["source"]), int(data["count"]))
        except (OSError, KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not a drift reference: {exc}") from None


def _feature(entry: dict[str, Any]) -> FeatureReference:
    edges = tuple(float(edge) for edge in entry["edges"])
    shares = tuple(float(share) for share in entry["shares"])
    if len(shares) != len(edges) + 1 or list(edges) != sorted(edges):
        raise ValueError("a feature needs ascending edges and one share more than edges")
    return FeatureReference(
        edges, shares, float(entry["mean"]), float(entry["std"]), int(entry["count"])
    )


def from_samples(model: Path, inputs: dict[str, Array], bins: int) -> Reference:
    """A reference for ``model`` from sample inputs (its training or validation data, on the
    machine that builds its bundle): the inputs and the outputs the model gives for them."""
    import onnxruntime as ort

    from edged.drift.features import Layout, observe

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    layouts = {
        tensor.name: Layout.of(tensor.shape)
        for tensor in [*session.get_inputs(), *session.get_outputs()]
    }
    rows = len(next(iter(inputs.values())))
    step = 256 if all(layouts[name].rows for name in inputs) else rows
    columns: list[str] = []
    chunks: list[Array] = []
    for start in range(0, rows, step):
        feed = {name: array[start : start + step] for name, array in inputs.items()}
        outputs = dict(zip(names, session.run(names, feed), strict=True))
        parts = [
            part
            for name, array in (*feed.items(), *outputs.items())
            if (part := observe(name, array, layouts.get(name, Layout()))) is not None
        ]
        columns = [name for part in parts for name in part.names]
        chunks.append(np.concatenate([part.values for part in parts], axis=1))
    return Reference.build(columns, np.concatenate(chunks), bins, "bundle")
