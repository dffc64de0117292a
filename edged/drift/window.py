"""The recent observations of a model version, binned as its reference is, and how far they
moved from it.

The window is a ring of ``CHUNKS`` chunks of histograms: a chunk fills, the oldest goes, and the
scores are computed again, so memory is fixed (features x bins x chunks counters) and a score
costs one pass over the bins. Per feature: the population stability index (PSI, the
reference's and the window's shares compared bin by bin) and the Kolmogorov-Smirnov statistic
(the largest gap between their cumulative shares, at the bins' edges).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from edged.drift.reference import Reference

Array = np.ndarray[Any, Any]
CHUNKS = 10
#: a share below this counts as this in PSI (an empty bin would make it infinite)
EPSILON = 1e-4
#: the chance, per feature and check, that a window of the reference's own distribution
#: exceeds the automatic KS threshold
ALPHA = 1e-6


def ks_critical(window: int, reference: int) -> float:
    """The two-sample KS statistic exceeded with probability ``ALPHA`` when nothing moved."""
    c = math.sqrt(-math.log(ALPHA / 2) / 2)
    return c * math.sqrt((window + reference) / (window * reference))


def psi_limit(threshold: float, window: int, reference: int, bins: int) -> float:
    """``threshold`` plus the PSI that sampling alone gives a window and a reference of these
    sizes (``(n m / (n + m)) PSI`` is about chi-square with ``bins - 1`` degrees of freedom;
    its mean plus five standard deviations): without it, small windows would cry wolf."""
    freedom = max(bins - 1, 1)
    return threshold + (freedom + 5 * math.sqrt(2 * freedom)) * (1 / window + 1 / reference)


@dataclass(frozen=True)
class Scores:
    names: tuple[str, ...]
    psi: Array
    ks: Array
    #: observations of each feature in the window (finite ones)
    count: Array
    mean: Array


class Window:
    def __init__(self, reference: Reference, size: int) -> None:
        self.names = tuple(reference.features)
        features = [reference.features[name] for name in self.names]
        bins = max((len(f.shares) for f in features), default=1)
        self._edges = np.full((len(features), max(bins - 1, 1)), np.inf)
        self._shares = np.zeros((len(features), bins))
        for i, feature in enumerate(features):
            self._edges[i, : len(feature.edges)] = feature.edges
            self._shares[i, : len(feature.shares)] = feature.shares
        self.size = size
        #: observations the reference was made of (what a KS threshold depends on)
        self.reference_count = reference.count
        self._chunk_rows = max(1, size // CHUNKS)
        self._counts = np.zeros((CHUNKS, len(features), bins), np.int64)
        self._sums = np.zeros((CHUNKS, len(features)))
        self._total = np.zeros((len(features), bins), np.int64)
        self._total_sums = np.zeros(len(features))
        self._chunk = 0
        self._rows_in_chunk = 0
        self._chunks_filled = 0
        self._columns: dict[tuple[str, ...], tuple[Array, Array]] = {}

    def add(self, names: tuple[str, ...], values: Array) -> bool:
        """Bin one request's observations ``values`` [rows, features named ``names``] (NaN:
        not observed); whether a chunk filled (the scores moved)."""
        observed, ours = self._align(names)
        if len(ours) and len(values):
            picked = values[:, observed]
            finite = ~np.isnan(picked)
            known = np.where(finite, picked, 0.0)
            bins = (self._edges[ours][None] <= known[:, :, None]).sum(axis=2)
            flat = (ours[None, :] * self._counts.shape[2] + bins)[finite]
            chunk = self._counts[self._chunk].reshape(-1)
            chunk += np.bincount(flat, minlength=chunk.size)
            self._sums[self._chunk, ours] += known.sum(axis=0)
        self._rows_in_chunk += len(values)
        if self._rows_in_chunk < self._chunk_rows:
            return False
        self._total += self._counts[self._chunk]
        self._total_sums += self._sums[self._chunk]
        self._chunk = (self._chunk + 1) % CHUNKS
        self._chunks_filled = min(self._chunks_filled + 1, CHUNKS)
        if self._chunks_filled == CHUNKS:  # the chunk to fill next is the oldest: it goes
            self._total -= self._counts[self._chunk]
            self._total_sums -= self._sums[self._chunk]
        self._counts[self._chunk] = 0
        self._sums[self._chunk] = 0
        self._rows_in_chunk = 0
        return True

    @property
    def full(self) -> bool:
        return self._chunks_filled == CHUNKS

    def scores(self) -> Scores:
        count = self._total.sum(axis=1)
        shares = self._total / np.maximum(count, 1)[:, None]
        reference = self._shares
        psi = (
            (shares - reference)
            * np.log(np.maximum(shares, EPSILON) / np.maximum(reference, EPSILON))
        ).sum(axis=1)
        ks = np.abs(np.cumsum(shares - reference, axis=1)).max(axis=1)
        mean = self._total_sums / np.maximum(count, 1)
        return Scores(self.names, psi, ks, count, mean)

    def _align(self, names: tuple[str, ...]) -> tuple[Array, Array]:
        """Which observed columns are which of the window's features (cached per layout)."""
        found = self._columns.get(names)
        if found is None:
            index = {name: i for i, name in enumerate(self.names)}
            pairs = [(column, index[name]) for column, name in enumerate(names) if name in index]
            found = (
                np.array([p[0] for p in pairs], np.int64),
                np.array([p[1] for p in pairs], np.int64),
            )
            self._columns[names] = found
        return found
