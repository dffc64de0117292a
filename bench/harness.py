"""Shared machinery: settings, result rows, the one timing loop, helper-server processes.

Kept free of heavy imports: the helper servers import it to announce that they are ready.
"""

from __future__ import annotations

import json
import math
import select
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType

#: one request, sent and answered; what every benchmark times
Call = Callable[[], object]
#: one request that times itself and returns the seconds that count, for when that is not the
#: whole call (a stream's first piece)
Sample = Callable[[], float]

ROOT = Path(__file__).resolve().parent.parent
READY = "READY"
#: how long a helper server may take to start (a cold onnxruntime import on a slow box)
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Settings:
    """How long to measure; ``--quick`` trades precision for a fast edit-run cycle.

    Windows are in seconds rather than iterations so that a 100 us call and a 100 ms call both
    get a sensible sample count; ``min_samples`` keeps the median meaningful for slow calls.
    """

    warmup_s: float
    #: latency window per call, cut into ``rounds`` slices taken in turn with the other calls
    window_s: float
    min_samples: int
    #: closed-loop window per target of the throughput benchmark, also cut into slices
    load_s: float
    #: latency slices per call
    rounds: int = 10
    #: fewer, longer slices under load: 16 processes take a while to all get going
    load_rounds: int = 3
    #: the swap benchmark's window per side (steady, swapping), also cut into slices
    swap_s: float = 8.0
    swap_rounds: int = 8
    #: how long the daemon sits idle before its RSS is read
    idle_s: float = 1.0
    #: cold loads per model; each waits up to ~1.5 s for the daemon to unload for idleness
    cold_loads: int = 8


FULL = Settings(warmup_s=0.3, window_s=2.0, min_samples=30, load_s=3.0)
QUICK = Settings(
    warmup_s=0.1,
    window_s=0.4,
    min_samples=10,
    load_s=1.0,
    swap_s=2.0,
    swap_rounds=2,
    cold_loads=3,
)


@dataclass(frozen=True)
class Row:
    """One measurement and the baseline it is judged against, both taken in this run."""

    name: str
    metric: str
    unit: str
    value: float
    baseline: str
    baseline_value: float

    @property
    def ratio(self) -> float:
        return self.value / self.baseline_value

    def to_json(self) -> dict[str, object]:
        rounded = {"value": round(self.value, 1), "baseline_value": round(self.baseline_value, 1)}
        return {**asdict(self), **rounded, "ratio": round(self.ratio, 3)}


def p99_us(spans: Sequence[float]) -> float:
    """The 99th percentile of spans in seconds, in us."""
    return statistics.quantiles(spans, n=100, method="inclusive")[98] * 1e6


def timed(call: Call) -> Sample:
    """``call`` as a ``Sample``: the whole call is the span that counts."""

    def sample() -> float:
        started = time.perf_counter()
        call()
        return time.perf_counter() - started

    return sample


def sample_for(sample: Sample, seconds: float, at_least: int) -> list[float]:
    """Sample back to back for ``seconds`` and at least ``at_least`` times; every span."""
    spans: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(spans) < at_least or time.perf_counter() < deadline:
        spans.append(sample())
    return spans


def repeat_for(call: Call, seconds: float, at_least: int) -> list[float]:
    """Call back to back for ``seconds`` and at least ``at_least`` times; each call's duration."""
    return sample_for(timed(call), seconds, at_least)


def medians_s(samples: Mapping[str, Sample], settings: Settings) -> dict[str, float]:
    """Median span in seconds of each sample, after a warm-up.

    The samples take turns in ``settings.rounds`` short slices rather than one window each, so
    a noisy neighbour's bursts hit them alike instead of skewing their ratio; the median shrugs
    off single spikes.
    """
    for sample in samples.values():
        sample_for(sample, settings.warmup_s, at_least=3)
    spans: dict[str, list[float]] = {label: [] for label in samples}
    per_slice = math.ceil(settings.min_samples / settings.rounds)
    for _ in range(settings.rounds):
        for label, sample in samples.items():
            spans[label] += sample_for(sample, settings.window_s / settings.rounds, per_slice)
    return {label: statistics.median(values) for label, values in spans.items()}


def p50s_us(calls: Mapping[str, Call], settings: Settings) -> dict[str, float]:
    """Median latency in us of each call, the calls taking turns (see ``medians_s``)."""
    medians = medians_s({label: timed(call) for label, call in calls.items()}, settings)
    return {label: median * 1e6 for label, median in medians.items()}


def announce_ready(info: str = "") -> None:
    """Called by a helper server once it serves; ``info`` reaches ``ServerProcess.info``."""
    print(f"{READY} {info}", flush=True)


class ServerProcess:
    """A helper server ``python -m MODULE ARGS``, up once it announces ready, killed on exit.

    Waiting for its READY line rather than sleeping makes start-up as fast as the box allows.
    """

    def __init__(self, module: str, *args: str) -> None:
        self.command = [sys.executable, "-m", module, *args]
        self.info = ""
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServerProcess:
        self._proc = subprocess.Popen(
            self.command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE
        )
        try:
            self.info = self._wait_ready(self._proc)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers; idempotent."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> str:
        assert proc.stdout is not None
        command = " ".join(self.command)
        readable, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT_S)
        if not readable:
            raise RuntimeError(f"{command} not ready after {START_TIMEOUT_S:.0f} s")
        line = proc.stdout.readline().decode()
        if not line.startswith(READY):  # its traceback, if any, went to our stderr
            raise RuntimeError(f"{command} printed {line!r} instead of {READY}")
        return line[len(READY) :].strip()


def write_results(rows: Sequence[Row], path: Path) -> None:
    path.write_text(json.dumps([row.to_json() for row in rows], indent=2) + "\n")


def merge_results(rows: Sequence[Row], path: Path) -> None:
    """Add ``rows`` to the results already in ``path``, replacing earlier rows of their names:
    for runs (the soak) that are not part of ``make bench``."""
    names = {row.name for row in rows}
    kept = json.loads(path.read_text()) if path.exists() else []
    kept = [row for row in kept if row.get("name") not in names]
    path.write_text(json.dumps(kept + [row.to_json() for row in rows], indent=2) + "\n")


def format_table(rows: Sequence[Row]) -> str:
    """Aligned table; ``delta`` (value - baseline) is printed only, being derivable from a row.

    For ``idle_rss`` it is the MiB the daemon costs over a bare process holding the same session;
    for a latency it is edged's overhead in us (in ms for ``gguf_ttft`` and ``load_time``); for
    ``budget_accuracy`` the MiB the budget charges beyond what the model really uses.
    """
    header = ("name", "metric", "value", "unit", "baseline", "baseline_value", "ratio", "delta")
    cells = [
        (
            row.name,
            row.metric,
            f"{row.value:.1f}",
            row.unit,
            row.baseline,
            f"{row.baseline_value:.1f}",
            f"{row.ratio:.3f}",
            f"{row.value - row.baseline_value:+.1f}",
        )
        for row in rows
    ]
    widths = [max(len(cell) for cell in column) for column in zip(header, *cells, strict=True)]
    numeric = {2, 5, 6, 7}

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            value.rjust(width) if index in numeric else value.ljust(width)
            for index, (value, width) in enumerate(zip(values, widths, strict=True))
        ).rstrip()

    return "\n".join(
        [line(header), line(["-" * width for width in widths])] + [line(c) for c in cells]
    )
