"""A candidate version beside the active one, so that an operator promotes on evidence.

- ``canary``: a fixed share of the model's unpinned requests is served by the candidate (its
  replies name its version). The share is spread evenly (every 1/fraction-th request), not
  drawn at random, so a small fraction still shows up within a few requests.
- ``shadow``: every ``infer`` the active version serves is also run on the candidate; the
  candidate's outputs are never sent anywhere, only compared with the active version's (max
  abs diff, argmax agreement along the last axis). A shadow run the candidate cannot queue is
  skipped: it never slows the active version's requests. Tensor models only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edged.models.registry import Runner, VersionSpec
from edged.models.runner import Job, Outputs
from edged.replies import ReplyTo

MODES = ("canary", "shadow")


@dataclass
class ShadowStatistics:
    compared: int = 0
    #: requests whose every output had the same argmax (last axis) on both versions
    argmax_agreed: int = 0
    max_abs_diff: float = 0.0
    sum_max_abs_diff: float = 0.0
    #: outputs missing, or of another shape, on the candidate
    mismatched: int = 0
    failures: int = 0
    skipped: int = 0

    def fields(self) -> dict[str, Any]:
        compared = self.compared
        return {
            "compared": compared,
            "argmax_agreement": self.argmax_agreed / compared if compared else None,
            "max_abs_diff": self.max_abs_diff if compared else None,
            "mean_max_abs_diff": self.sum_max_abs_diff / compared if compared else None,
            "mismatched": self.mismatched,
            "failures": self.failures,
            "skipped": self.skipped,
        }


class Candidate:
    def __init__(self, runner: Runner, spec: VersionSpec, mode: str, fraction: float) -> None:
        self.runner = runner
        self.spec = spec
        self.mode = mode
        self.fraction = fraction
        self.routed = 0
        self.shadow = ShadowStatistics()
        self._credit = 0.0

    def takes_request(self) -> bool:
        """Canary: whether this request goes to the candidate."""
        if self.mode != "canary":
            return False
        self._credit += self.fraction
        if self._credit < 1.0:
            return False
        self._credit -= 1.0
        self.routed += 1
        return True

    def shadow_job(self, job: Job) -> Job:
        """Hook ``job`` (bound for the active version) and return its shadow twin."""
        pair = _Pair(self.shadow)
        job.observe = pair.active_outputs
        return Job(
            job.request_id,
            job.trace,
            job.inputs,
            ReplyTo(pair.shadow_sink, job.request_id, job.trace),
            job.arrived_ns,
            None,
            observe=pair.shadow_outputs,
        )

    def fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"version": self.spec.version, "mode": self.mode}
        if self.mode == "canary":
            fields.update(fraction=self.fraction, routed=self.routed)
        else:
            fields["shadow"] = self.shadow.fields()
        return fields


class _Pair:
    """One request's two results, compared once both are in."""

    __slots__ = ("active", "candidate", "failed", "stats")

    def __init__(self, stats: ShadowStatistics) -> None:
        self.stats = stats
        self.active: Outputs | None = None
        self.candidate: Outputs | None = None
        self.failed = False

    def active_outputs(self, outputs: Outputs) -> None:
        self.active = outputs
        self._compare()

    def shadow_outputs(self, outputs: Outputs) -> None:
        self.candidate = outputs
        self._compare()

    def shadow_sink(self, frames: list[Any]) -> bool:
        """The shadow's replies go nowhere; one that comes without outputs is a failure."""
        if self.candidate is None and not self.failed:
            self.failed = True
            self.stats.failures += 1
        return True

    def _compare(self) -> None:
        active, candidate = self.active, self.candidate
        if active is None or candidate is None:
            return
        stats = self.stats
        worst, agreed = 0.0, True
        for name, expected in active.items():
            got = candidate.get(name)
            if got is None or got.shape != expected.shape:
                stats.mismatched += 1
                return
            if expected.size:
                diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))
                worst = max(worst, float(diff.max()))
                if expected.ndim and not np.array_equal(expected.argmax(-1), got.argmax(-1)):
                    agreed = False
        stats.compared += 1
        stats.argmax_agreed += agreed
        stats.max_abs_diff = max(stats.max_abs_diff, worst)
        stats.sum_max_abs_diff += worst
