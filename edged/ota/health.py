"""The health gate: live traffic decides whether an installed version stays.

Validation before the flip (interface, warm-up, golden vectors) proves a version can run; only
real requests prove it serves as well as the one it replaced. For ``ota.health_window_s`` after
the flip the new version's requests are watched: more failures than
``ota.health_max_error_rate`` (checked as they come, so a broken version is caught early), or a
median or p99 latency above ``ota.health_max_latency_ratio`` times the old version's, fails the
gate and the install rolls back. With fewer than ``ota.health_min_requests`` requests there is
nothing to judge, and the version is committed unjudged (a device idle at night still updates).
With ``ota.health_output_drift``, a model watched for drift also fails the gate when the new
version's outputs drifted from the reference of the version it replaced (``edged.drift``): a
version that answers, fast, but differently.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edged.config import OtaConfig
from edged.drift.monitor import DriftMonitor
from edged.models.generation import GenerationStatistics
from edged.models.registry import Runner
from edged.models.runner import RunnerStatistics

Statistics = RunnerStatistics | GenerationStatistics

#: how often the window is checked for failures
POLL_S = 0.1
#: a latency within this of the old one is no regression, whatever the ratio
LATENCY_SLACK_US = 1000.0


@dataclass(frozen=True)
class Baseline:
    """The replaced version's median and p99 latency, and how many requests they rest on."""

    latency_us: dict[str, float | None]
    samples: int

    @classmethod
    def of(cls, runner: Runner | None) -> Baseline:
        if runner is None:
            return cls({}, 0)
        return cls(runner.latency.percentiles(), runner.latency.total.count)


@dataclass(frozen=True)
class Verdict:
    healthy: bool
    reason: str
    requests: int
    failures: int
    latency_us: dict[str, float | None]
    baseline_latency_us: dict[str, float | None]

    def fields(self) -> dict[str, Any]:
        return {
            "healthy": self.healthy,
            "reason": self.reason,
            "requests": self.requests,
            "failures": self.failures,
            "latency_us": self.latency_us,
            "baseline_latency_us": self.baseline_latency_us,
        }


class HealthGate:
    def __init__(self, config: OtaConfig) -> None:
        self.window_s = config.health_window_s
        self.max_error_rate = config.health_max_error_rate
        self.max_latency_ratio = config.health_max_latency_ratio
        self.min_requests = config.health_min_requests
        self.output_drift = config.health_output_drift

    async def watch(
        self,
        runner: Runner,
        baseline: Baseline,
        serving: Callable[[], bool],
        drift: DriftMonitor | None = None,
    ) -> Verdict:
        """Watch ``runner`` for the window, or until it fails or stops ``serving`` (an
        operator swapped it out: then there is nothing left to judge); ``drift``: the model's
        drift monitor, if it has one."""
        start = runner.statistics()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.window_s
        while (left := deadline - loop.time()) > 0:
            await asyncio.sleep(min(POLL_S, left))
            if not serving():
                return self._verdict(runner, start, baseline, "no longer active: not judged")
            verdict = self._errors(runner, start, baseline)
            if verdict is not None:
                return verdict
        return (
            self._errors(runner, start, baseline)
            or self._drift(runner, start, baseline, drift)
            or self._latency(runner, start, baseline)
        )

    def _drift(
        self, runner: Runner, start: Statistics, baseline: Baseline, drift: DriftMonitor | None
    ) -> Verdict | None:
        if not self.output_drift or drift is None:
            return None
        found = drift.versus(runner.version)
        if found is None or not found.drifted:
            return None
        reason = (
            f"its outputs drifted from version {found.against}'s: {found.worst} KS "
            f"{found.ks:.3f} (threshold {found.ks_threshold:.3f}), PSI {found.psi:.3f}, over "
            f"{found.observations} observations"
        )
        return self._verdict(runner, start, baseline, reason, healthy=False)

    def _errors(self, runner: Runner, start: Statistics, baseline: Baseline) -> Verdict | None:
        requests, failures = _since(runner, start)
        if requests < self.min_requests or failures <= self.max_error_rate * requests:
            return None
        reason = (
            f"{failures} of {requests} requests failed, more than the allowed "
            f"{self.max_error_rate:.1%}"
        )
        return self._verdict(runner, start, baseline, reason, healthy=False)

    def _latency(self, runner: Runner, start: Statistics, baseline: Baseline) -> Verdict:
        requests, _ = _since(runner, start)
        if requests < self.min_requests:
            reason = f"only {requests} requests in the window: not judged"
            return self._verdict(runner, start, baseline, reason)
        if baseline.samples < self.min_requests:
            return self._verdict(runner, start, baseline, "no latency baseline: errors only")
        latency = runner.latency.percentiles()
        for key in ("p50_us", "p99_us"):  # the median for a slower model, p99 for its tail
            new, old = latency[key], baseline.latency_us[key]
            if new is None or old is None:
                continue
            limit = max(old * self.max_latency_ratio, old + LATENCY_SLACK_US)
            if new > limit:
                name = key.removesuffix("_us")
                reason = f"{name} latency {new:.0f} us exceeds {limit:.0f} us (was {old:.0f} us)"
                return self._verdict(runner, start, baseline, reason, healthy=False)
        return self._verdict(runner, start, baseline, "healthy")

    @staticmethod
    def _verdict(
        runner: Runner, start: Statistics, baseline: Baseline, reason: str, *, healthy: bool = True
    ) -> Verdict:
        requests, failures = _since(runner, start)
        latency = runner.latency.percentiles()
        return Verdict(healthy, reason, requests, failures, latency, baseline.latency_us)


def _since(runner: Runner, start: Statistics) -> tuple[int, int]:
    """Requests and failures since ``start`` (an earlier ``statistics()``)."""
    now = runner.statistics()
    return now.requests - start.requests, now.failures - start.failures
