"""Per-version request accounting cheap enough for the hot path.

Fixed-bucket histograms (a bisect and two additions per observation) feed the Prometheus
exposition, which is built only when scraped; a short window of recent totals gives the
p50/p95/p99 that ``edgectl models`` shows. prometheus-client's own metric objects take a lock
and several Python calls per observation, several microseconds on a tiny model's request.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

#: upper bounds in seconds, from a tiny model's round trip to a long generation
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
BATCH_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
RECENT = 1024


@dataclass
class Histogram:
    bounds: tuple[float, ...]
    #: per bucket (not cumulative); the last one counts what exceeds every bound
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """(upper bound, observations at or below it), ending with +Inf, as Prometheus wants."""
        running, buckets = 0, []
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            buckets.append((bound, running))
        return buckets


class RequestLatency:
    """Queue, run and total seconds of one model version's requests, and its batch sizes."""

    def __init__(self) -> None:
        self.queue = Histogram(LATENCY_BUCKETS)
        self.run = Histogram(LATENCY_BUCKETS)
        self.total = Histogram(LATENCY_BUCKETS)
        self.batch = Histogram(BATCH_BUCKETS)
        self._recent: deque[float] = deque(maxlen=RECENT)

    def observe(self, queue_s: float, run_s: float, total_s: float) -> None:
        # Histogram.observe, inlined: this runs for every request
        for histogram, value in ((self.queue, queue_s), (self.run, run_s), (self.total, total_s)):
            histogram.counts[bisect.bisect_left(histogram.bounds, value)] += 1
            histogram.total += value
        self._recent.append(total_s)

    def percentiles(self) -> dict[str, float | None]:
        """p50/p95/p99 of the recent totals, in microseconds (``None`` before any request)."""
        recent = sorted(self._recent)
        if not recent:
            return {"p50_us": None, "p95_us": None, "p99_us": None}
        last = len(recent) - 1
        return {
            f"p{q}_us": round(recent[min(last, q * len(recent) // 100)] * 1e6, 1)
            for q in (50, 95, 99)
        }
