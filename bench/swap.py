"""Hot swaps under load: the same clients on the same daemon, with and without swaps going on.

The model is served from the store with two versions (same graph, other weights). SWAP_CLIENTS
processes infer in a closed loop (``bench.load``), in slices that alternate between *steady*,
no swaps, and *swapping*, where this process swaps the model back and forth between the two
versions with the availability-preserving policy (``overlap``), one swap every SWAP_PERIOD_S.
Every request counts, failed ones too: its round trip goes into the latency sample, and a
request fails when it gets an error, no reply within CALL_TIMEOUT_S, or outputs other than
those of the version its reply names.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from bench.harness import Call, Settings, p99_us, sample_for
from bench.load import Load, closed_loop
from bench.session import open_session
from bench.workloads import Workload
from edged.client import Client
from edged.errors import EdgedError
from edged.store import ModelStore
from edged.testing import DaemonProcess

#: several sensor processes, not so many that a 2-core box only measures its run queue
SWAP_CLIENTS = 4
#: from the start of one swap to the start of the next
SWAP_PERIOD_S = 0.15
#: shorter than the other benchmarks' timeout: a request this late has failed, and the window
#: must not stall for long on it
CALL_TIMEOUT_S = 5.0
#: both sides run the same onnxruntime on the same input; they may differ only by rounding
ATOL = 1e-5
#: failure messages each worker keeps per slice, and how many distinct ones are printed
KEPT_ERRORS = 3
PRINTED_ERRORS = 5
STEADY = "steady"
SWAPPING = "swapping"

#: each version's outputs for the workload's input, by output name
Expected = dict[int, dict[str, np.ndarray[Any, Any]]]


class Outcomes(NamedTuple):
    """Requests in a slice, or in a whole window once merged."""

    #: every request's round trip in seconds, failed ones included
    spans: list[float]
    failed: int
    #: the first few failures' messages
    errors: list[str]

    @classmethod
    def merged(cls, parts: Sequence[Outcomes]) -> Outcomes:
        return cls(
            [span for part in parts for span in part.spans],
            sum(part.failed for part in parts),
            [error for part in parts for error in part.errors],
        )

    def p99_us(self) -> float:
        return p99_us(self.spans)


@dataclass(frozen=True)
class Windows:
    steady: Outcomes
    swapping: Outcomes
    #: the control socket's reply to every swap
    swaps: list[dict[str, Any]]


@contextmanager
def checked_caller(endpoint: str, workload: Workload, expected: Expected) -> Iterator[Call]:
    """A call that never raises: it returns why the request failed, or None."""
    inputs = workload.inputs()
    with Client(endpoint, timeout=CALL_TIMEOUT_S) as client:

        def call() -> str | None:
            try:
                result = client.infer(workload.model, inputs)
            except EdgedError as exc:
                return f"{exc.code}: {exc}"
            outputs = expected.get(result.version)
            if outputs is None:
                return f"the reply names version {result.version}, which was never stored"
            for name, want in outputs.items():
                if not np.allclose(result[name], want, rtol=0.0, atol=ATOL):
                    return f"output {name!r} is not version {result.version}'s"
            return None

        yield call


def outcomes(call: Call, seconds: float) -> Outcomes:
    """A worker's slice of ``checked_caller`` calls."""
    errors: list[str] = []

    def sample() -> float:
        started = time.perf_counter()
        error = call()
        span = time.perf_counter() - started
        if isinstance(error, str):
            errors.append(error)
        return span

    spans = sample_for(sample, seconds, at_least=1)
    return Outcomes(spans, len(errors), errors[:KEPT_ERRORS])


@dataclass
class SwapDriver:
    """``during`` for ``closed_loop``: swaps back and forth through the swapping slices."""

    control: Client
    model: str
    version: int = 1
    reports: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, label: str, seconds: float) -> None:
        deadline = time.perf_counter() + seconds
        while label == SWAPPING and time.perf_counter() < deadline:
            started = time.perf_counter()
            target = 3 - self.version
            report = self.control.command(
                "swap", model=self.model, version=target, policy="overlap"
            )
            self.version = int(report["version"])
            self.reports.append(report)
            time.sleep(max(0.0, min(started + SWAP_PERIOD_S, deadline) - time.perf_counter()))


def measure(
    workdir: Path,
    workload: Workload,
    declaration: dict[str, object],
    versions: Sequence[Path],
    settings: Settings,
) -> Windows:
    """Steady and swapping windows on a fresh daemon serving ``versions`` 1 and 2 from its
    store, the model declared as ``declaration`` (its path is dropped: the store serves it)."""
    store = ModelStore(workdir / "state" / "models")
    for path in versions:
        store.add(workload.model, path, "onnx")
    expected = {number: expected_outputs(path, workload) for number, path in enumerate(versions, 1)}
    model = {**declaration, "path": "", "version": 1}
    with DaemonProcess(workdir, {"models": {workload.model: model}}) as daemon:
        caller = partial(checked_caller, expected=expected)
        load = Load(
            {label: (caller, daemon.endpoint) for label in (STEADY, SWAPPING)},
            workload,
            outcomes,
            settings.swap_s,
            settings.swap_rounds,
            settings.warmup_s,
            clients=SWAP_CLIENTS,
        )
        with daemon.control() as control:
            driver = SwapDriver(control, workload.model)
            slices = closed_loop(load, driver)
        result = Windows(
            Outcomes.merged(slices[STEADY]), Outcomes.merged(slices[SWAPPING]), driver.reports
        )
        _print_summary(result, settings, daemon.log())
    return result


def expected_outputs(path: Path, workload: Workload) -> dict[str, np.ndarray[Any, Any]]:
    session = open_session(str(path))
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(None, workload.inputs()), strict=True))


def _print_summary(result: Windows, settings: Settings, log: str) -> None:
    """The swaps, and what failed; the daemon's warnings too when something did."""
    seconds = [report["seconds"] for report in result.swaps]
    policies = sorted({str(report["policy"]) for report in result.swaps})
    lines = [
        f"swap: {len(seconds)} swaps ({', '.join(policies)}) in {settings.swap_s:.1f} s of "
        f"swapping, each {statistics.median(seconds) * 1e3:.1f} ms median, "
        f"{max(seconds) * 1e3:.1f} ms max",
    ]
    for label, window in ((STEADY, result.steady), (SWAPPING, result.swapping)):
        lines.append(
            f"swap: {label}: {len(window.spans)} requests, {window.failed} failed, "
            f"p99 {window.p99_us():.0f} us, max {max(window.spans) * 1e6:.0f} us"
        )
        distinct = list(dict.fromkeys(window.errors))[:PRINTED_ERRORS]
        lines += [f"swap:   e.g. {error}" for error in distinct]
    if result.steady.failed or result.swapping.failed:
        lines += [
            f"swap: daemon log: {line}"
            for line in log.splitlines()
            if "WARNING" in line or "ERROR" in line
        ]
    print("\n".join(lines), file=sys.stderr, flush=True)
