"""One model's drift monitor: profiles of its requests, off the request path, against the
reference of the version that served them.

A runner hands each reply's inputs and outputs to the hook ``profiler`` made for it, on the
event loop, which only samples (``sample``, at most ``max_per_s`` a second) and queues them:
the features, the histograms and the alarms are computed on the monitor's own thread, and a
full queue drops the sample (counted) rather than slow a request. Arrays are held, not copied,
until profiled: a region's frame the client rewrites meanwhile is profiled as it is then.

Each version has a reference (shipped in its bundle, saved from an earlier run, made from its
golden vectors, or captured from its first requests and saved) and a sliding window. Alarms,
each naming its features: ``drift`` (PSI or KS over its threshold), ``nonfinite`` (NaN or Inf
in the window), ``range`` (values outside the data contract's ``ranges`` in the window) and
``stuck`` (a feature the same value ``stuck_after`` times in a row). A new alarm is a journal
WARNING with MODEL and VERSION, at most once per ``warn_interval_s`` per kind. With
``capture_mb``, profiled requests are kept on disk while an alarm is up, always, or for a while
on request (``edged.drift.capture``).
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edged.config import MIB, DriftOptions
from edged.drift.capture import Capture
from edged.drift.features import Layout, Observed, observe, out_of_range
from edged.drift.reference import Reference
from edged.drift.window import Scores, Window, ks_critical, psi_limit
from edged.logsetup import log_fields

log = logging.getLogger(__name__)
Array = np.ndarray[Any, Any]
Arrays = Mapping[str, Array]
#: profiles waiting for the monitor's thread; beyond, samples are dropped
MAX_PENDING = 64
#: versions of a model watched at once (the serving one, a canary's, a shadow's)
MAX_VERSIONS = 3
ALARMS = ("drift", "nonfinite", "range", "stuck")


@dataclass(frozen=True)
class Tensors:
    """What the profiler knows of a version's tensors: each one's declared layout."""

    layouts: dict[str, Layout]


class Runs:
    """How many times in a row each feature had its last value (a stuck sensor's sign)."""

    def __init__(self) -> None:
        self.names: tuple[str, ...] = ()
        self._last = np.empty(0)
        self._count = np.empty(0, np.int64)

    def add(self, names: tuple[str, ...], values: Array) -> None:
        if names != self.names:  # another layout: start again
            self.names = names
            self._last = np.full(len(names), np.nan)
            self._count = np.zeros(len(names), np.int64)
        for row in values:
            same = row == self._last
            self._count = np.where(same, self._count + 1, 1)
            self._last = row

    def longer_than(self, count: int) -> list[str]:
        return [self.names[i] for i in np.flatnonzero(self._count > count)]

    def of(self, name: str) -> int:
        return int(self._count[self.names.index(name)]) if name in self.names else 0


@dataclass
class VersionProfile:
    version: int
    tensors: Tensors
    reference: Reference | None = None
    #: observations gathered for a reference from traffic: each request's features and values
    gathered: list[tuple[tuple[str, ...], Array]] = field(default_factory=list)
    gathered_rows: int = 0
    window: Window | None = None
    scores: Scores | None = None
    #: the features whose scores are over a threshold, the worst first
    drifted: tuple[str, ...] = ()
    #: each feature's side: "input" or "output"
    sides: dict[str, str] = field(default_factory=dict)
    #: the recent requests' (rows, non-finite values per feature, values out of range), and
    #: their sums (kept as they come and go: an alarm check must not walk the window)
    recent: deque[tuple[int, Counter[str], int]] = field(default_factory=deque)
    recent_rows: int = 0
    recent_nonfinite: Counter[str] = field(default_factory=Counter)
    recent_outside: int = 0
    #: per feature: its last value and how many times in a row it had it
    runs: Runs = field(default_factory=Runs)
    nonfinite_total: int = 0
    out_of_range_total: int = 0
    profiled: int = 0
    #: alarm kind -> the features (tensors, for range) it names now
    alarms: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: alarm kind -> how many times it was raised, and at which profiled request last
    raised: dict[str, int] = field(default_factory=dict)
    raised_at: dict[str, int] = field(default_factory=dict)
    #: the version it followed, and a window of its outputs binned as that version's reference
    #: (the health gate's comparison of a new version with the one it replaced)
    versus: tuple[int, Window] | None = None


@dataclass(frozen=True)
class Comparison:
    """A new version's outputs against the reference of the version it followed."""

    against: int
    observations: int
    worst: str
    ks: float
    psi: float
    ks_threshold: float
    drifted: bool


class DriftMonitor:
    def __init__(
        self, name: str, options: DriftOptions, directory: Path, capture_directory: Path
    ) -> None:
        self.name = name
        self.options = options
        #: where the versions' references are saved
        self.directory = directory
        self._versions: dict[int, VersionProfile] = {}
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[tuple[VersionProfile, Arrays, Arrays] | None] = (
            queue.SimpleQueue()
        )
        self._thread: threading.Thread | None = None
        #: when the next request may be profiled (``_sampled``), on ``time.monotonic()``
        self._next_at = 0.0
        self._closed = False
        self._warned: dict[str, float] = {}
        self.dropped = 0
        #: recent requests kept on disk for retraining (``capture_mb``); ``None``: off
        self.capture = (
            Capture(capture_directory, options.capture_mb * MIB) if options.capture_mb else None
        )
        #: ``capture_for``'s deadline, on ``time.monotonic()``
        self._capture_until = 0.0

    # -- on the event loop ----------------------------------------------------------------

    def profiler(
        self, version: int, model_path: str, tensors: Tensors
    ) -> Callable[[Arrays, Arrays], None]:
        """The hook a runner of ``version`` calls with each reply's inputs and outputs."""
        profile = self._profile(version, model_path, tensors)

        def offer(inputs: Arrays, outputs: Arrays) -> None:
            if self._sampled():
                self._queue.put((profile, inputs, outputs))

        return offer

    def _sampled(self) -> bool:
        """Whether to profile this request: each with the chance ``sample``, and at most
        ``max_per_s`` a second: after a profile, the next waits a random time (exponential,
        ``1 / max_per_s`` on average), so a busy model is sampled at random rather than every
        n-th request (a pattern that can beat with the traffic's) and with no burst after an
        idle spell."""
        options = self.options
        if self._closed or (options.sample < 1 and random.random() >= options.sample):
            return False
        if options.max_per_s:
            now = time.monotonic()
            if now < self._next_at:
                return False
            self._next_at = now + random.expovariate(options.max_per_s)
        if self._queue.qsize() >= MAX_PENDING:
            self.dropped += 1
            return False
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=f"drift-{self.name}")
            self._thread.daemon = True
            self._thread.start()
        return True

    def _profile(self, version: int, model_path: str, tensors: Tensors) -> VersionProfile:
        with self._lock:
            profile = self._versions.get(version)
            if profile is None:
                profile = VersionProfile(version, tensors)
                profile.reference = self._stored_reference(version, model_path)
                if profile.reference is not None:
                    profile.window = Window(profile.reference, self.options.window)
                profile.versus = self._versus()
                self._versions[version] = profile
                for old in sorted(self._versions)[:-MAX_VERSIONS]:
                    del self._versions[old]
            return profile

    def _versus(self) -> tuple[int, Window] | None:
        """A window on a new version's outputs, binned as the newest watched version's
        reference (the one it follows) has them."""
        known = [p for p in self._versions.values() if p.reference is not None and p.sides]
        if not known:
            return None
        previous = max(known, key=lambda profile: profile.version)
        assert previous.reference is not None
        outputs = {
            name: feature
            for name, feature in previous.reference.features.items()
            if previous.sides.get(name) == "output"
        }
        if not outputs:
            return None
        reference = Reference(outputs, f"version {previous.version}", previous.reference.count)
        return previous.version, Window(reference, self.options.window)

    def _stored_reference(self, version: int, model_path: str) -> Reference | None:
        """The version's reference from its bundle, an earlier run or its golden vectors."""
        candidates = [
            (Path(model_path).with_suffix(".reference.json"), "bundle"),
            (self._saved(version), None),
        ]
        for path, source in candidates:
            if path.is_file():
                try:
                    return Reference.load(path, source)
                except ValueError as exc:
                    log.error("model %s: %s", self.name, exc)
        golden = Path(model_path).with_suffix(".golden.npz")
        if self.options.reference == "golden" and golden.is_file():
            return self._golden_reference(version, golden)
        return None

    def _saved(self, version: int) -> Path:
        return self.directory / f"{version}.reference.json"

    def _golden_reference(self, version: int, golden: Path) -> Reference | None:
        with np.load(golden) as vectors:
            arrays = {key.split(".", 1)[1]: vectors[key] for key in vectors.files}
        parts = [part for name, array in arrays.items() if (part := observe(name, array))]
        reference = Reference.build(
            [n for p in parts for n in p.names],
            np.concatenate([p.values for p in parts], axis=1) if parts else np.empty((0, 0)),
            self.options.bins,
            "golden",
        )
        reference.save(self._saved(version))
        return reference

    def close(self) -> None:
        """Profile no more (a runner still retiring offers in vain), and end the thread."""
        self._closed = True
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(5)

    def capture_for(self, seconds: float) -> float:
        """Capture every profiled request for ``seconds`` from now, whatever the mode; the
        unix time it ends."""
        self._capture_until = time.monotonic() + seconds
        return time.time() + seconds

    # -- on the monitor's thread -----------------------------------------------------------

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            profile, inputs, outputs = item
            try:
                self._observe(profile, inputs, outputs)
            except Exception:  # a profile must never take the monitor down
                log.exception("model %s: profiling a request failed", self.name)
            del item, inputs, outputs  # not held while waiting: they may be a region's

    def _observe(self, profile: VersionProfile, inputs: Arrays, outputs: Arrays) -> None:
        tensors = profile.tensors
        observed: list[Observed] = []
        for side, arrays in (("input", inputs), ("output", outputs)):
            for name, array in arrays.items():
                part = observe(name, array, tensors.layouts.get(name, Layout()))
                if part is not None:
                    observed.append(part)
                    if part.names[0] not in profile.sides:
                        profile.sides.update(dict.fromkeys(part.names, side))
        names, values = _side_by_side(observed)
        rows = len(values)
        nonfinite: Counter[str] = Counter()
        for part in observed:
            if not part.nonfinite.any():
                continue
            for index in np.flatnonzero(part.nonfinite):
                nonfinite[part.names[index]] += int(part.nonfinite[index])
        outside = out_of_range(inputs, self.options.ranges) if self.options.ranges else 0
        with self._lock:
            profile.profiled += 1
            self._recent(profile, rows, nonfinite, outside)
            profile.runs.add(names, values)
            if profile.versus is not None:
                profile.versus[1].add(names, values)
            if profile.reference is None:
                self._gather(profile, names, values)
            elif (
                profile.window is not None
                and profile.window.add(names, values)
                and profile.window.full
            ):
                profile.scores = profile.window.scores()
                profile.drifted = self._drifted(profile.scores, profile.window.reference_count)
            alarms = self._alarms(profile)
        self._announce(profile, alarms)
        if self.capture is not None and (
            self.options.capture == "always"
            or profile.alarms
            or time.monotonic() < self._capture_until
        ):
            self.capture.write(profile.version, inputs, outputs, profile.alarms)

    def _recent(
        self, profile: VersionProfile, rows: int, nonfinite: Counter[str], outside: int
    ) -> None:
        profile.recent.append((rows, nonfinite, outside))
        profile.recent_rows += rows
        profile.recent_outside += outside
        profile.nonfinite_total += sum(nonfinite.values())
        profile.out_of_range_total += outside
        if nonfinite:
            profile.recent_nonfinite.update(nonfinite)
        while len(profile.recent) > 1 and profile.recent_rows > self.options.window:
            gone_rows, gone_nonfinite, gone_outside = profile.recent.popleft()
            profile.recent_rows -= gone_rows
            profile.recent_outside -= gone_outside
            if gone_nonfinite:
                profile.recent_nonfinite.subtract(gone_nonfinite)
                profile.recent_nonfinite = +profile.recent_nonfinite  # drop the zeros

    def _gather(self, profile: VersionProfile, names: tuple[str, ...], values: Array) -> None:
        if profile.gathered and names != profile.gathered[0][0]:
            return  # another layout than the first request's (a dynamic axis): not comparable
        profile.gathered.append((names, values))
        profile.gathered_rows += len(values)
        if profile.gathered_rows < self.options.reference_size:
            return
        names = profile.gathered[0][0]
        values = np.concatenate([values for _, values in profile.gathered])
        profile.reference = Reference.build(names, values, self.options.bins, "traffic")
        profile.gathered, profile.gathered_rows = [], 0
        profile.window = Window(profile.reference, self.options.window)
        try:
            profile.reference.save(self._saved(profile.version))
        except OSError as exc:
            log.error("model %s: cannot save its drift reference: %s", self.name, exc)
        log.info(
            "model %s version %d: drift reference captured from %d observations",
            self.name,
            profile.version,
            profile.reference.count,
            extra=log_fields(model=self.name, version=profile.version),
        )

    def _drifted(self, scores: Scores, reference: int) -> tuple[str, ...]:
        """The features over a threshold, the worst (by KS) first."""
        options = self.options
        ks_limit = options.ks_threshold or ks_critical(options.window, reference)
        psi = psi_limit(options.psi_threshold, options.window, reference, options.bins)
        over = (scores.ks > ks_limit) | (scores.psi > psi)
        order = np.argsort(-scores.ks[over], kind="stable")
        return tuple(np.array(scores.names)[over][order].tolist())

    def _alarms(self, profile: VersionProfile) -> dict[str, tuple[str, ...]]:
        options = self.options
        found: dict[str, tuple[str, ...]] = {}
        reference = profile.reference
        if profile.drifted:
            found["drift"] = profile.drifted
        if profile.recent_nonfinite:
            found["nonfinite"] = tuple(n for n, _ in profile.recent_nonfinite.most_common())
        if profile.recent_outside:
            found["range"] = tuple(sorted(options.ranges))
        stuck = [
            name
            for name in profile.runs.longer_than(options.stuck_after - 1)
            if (
                reference is None
                or name not in reference.features
                or reference.features[name].std > 0
            )
        ]
        if stuck:
            found["stuck"] = tuple(sorted(stuck))
        previous, profile.alarms = profile.alarms, found
        for kind in found.keys() - previous.keys():
            profile.raised[kind] = profile.raised.get(kind, 0) + 1
            profile.raised_at[kind] = profile.profiled
        return {kind: names for kind, names in found.items() if names != previous.get(kind)}

    def _announce(self, profile: VersionProfile, changed: dict[str, tuple[str, ...]]) -> None:
        """A journal WARNING for each alarm that is new or names other features now, at most
        once per ``warn_interval_s`` per kind."""
        now = time.monotonic()
        for kind, names in changed.items():
            last = self._warned.get(kind)
            if last is not None and now - last < self.options.warn_interval_s:
                continue
            self._warned[kind] = now
            log.warning(
                "model %s version %d: %s alarm on %s%s",
                self.name,
                profile.version,
                kind,
                ", ".join(names[:5]),
                f" and {len(names) - 5} more" if len(names) > 5 else "",
                extra=log_fields(
                    model=self.name,
                    version=profile.version,
                    code="DRIFT" if kind == "drift" else f"DATA_{kind.upper()}",
                ),
            )

    # -- what operators see ----------------------------------------------------------------

    def report(self, version: int | None = None) -> dict[str, Any]:
        """The version's profile (the newest watched by default): ``edgectl drift``."""
        with self._lock:
            if not self._versions:
                return {"model": self.name, "state": "no requests profiled yet"}
            profile = self._versions[version if version in self._versions else max(self._versions)]
            return self._report(profile)

    def _report(self, profile: VersionProfile) -> dict[str, Any]:
        options, reference, scores = self.options, profile.reference, profile.scores
        ks_limit = options.ks_threshold or (
            ks_critical(options.window, reference.count) if reference else 0.0
        )
        found: dict[str, Any] = {
            "model": self.name,
            "version": profile.version,
            "state": (
                "gathering a reference"
                if reference is None
                else "filling the window"
                if scores is None
                else "watching"
            ),
            "profiled": profile.profiled,
            "dropped": self.dropped,
            "reference": {
                "source": reference.source if reference else None,
                "observations": reference.count if reference else profile.gathered_rows,
                "wanted": options.reference_size,
            },
            "thresholds": {
                "ks": ks_limit,
                "psi": psi_limit(
                    options.psi_threshold,
                    options.window,
                    reference.count if reference else options.reference_size,
                    options.bins,
                ),
            },
            "alarms": dict(profile.alarms),
            "nonfinite_total": profile.nonfinite_total,
            "out_of_range_total": profile.out_of_range_total,
            "raised": {
                kind: {"count": count, "last_at_request": profile.raised_at[kind]}
                for kind, count in profile.raised.items()
            },
        }
        if scores is not None and reference is not None and len(scores.names):
            worst = int(np.argmax(scores.ks))
            found["worst"] = {
                "feature": scores.names[worst],
                "ks": float(scores.ks[worst]),
                "psi": float(scores.psi[worst]),
            }
            found["features"] = [
                {
                    "feature": name,
                    "side": profile.sides.get(name, "input"),
                    "ks": float(scores.ks[i]),
                    "psi": float(scores.psi[i]),
                    "mean": float(scores.mean[i]),
                    "reference_mean": reference.features[name].mean,
                    "reference_std": reference.features[name].std,
                    "run": profile.runs.of(name),
                }
                for i, name in enumerate(scores.names)
            ]
        return found

    def versus(self, version: int) -> Comparison | None:
        """How ``version``'s outputs compare with the reference of the version it followed,
        once a chunk of its window filled."""
        with self._lock:
            profile = self._versions.get(version)
            if profile is None or profile.versus is None:
                return None
            against, window = profile.versus
            scores = window.scores()
        observed = int(scores.count.max(initial=0))
        if not observed:
            return None
        worst = int(np.argmax(scores.ks))
        reference = window.reference_count
        ks_limit = self.options.ks_threshold or ks_critical(observed, reference)
        psi = psi_limit(self.options.psi_threshold, observed, reference, self.options.bins)
        drifted = bool(scores.ks[worst] > ks_limit or scores.psi.max() > psi)
        return Comparison(
            against,
            observed,
            scores.names[worst],
            float(scores.ks[worst]),
            float(scores.psi.max()),
            ks_limit,
            drifted,
        )

    def summary(self) -> dict[str, Any]:
        """A line for ``edgectl models``: the state, the worst feature and the alarms."""
        report = self.report()
        return {key: report[key] for key in ("state", "worst", "alarms") if key in report}


def _side_by_side(observed: list[Observed]) -> tuple[tuple[str, ...], Array]:
    """Every tensor's features as one matrix [rows, features]; a tensor with fewer rows than
    the others (one not batched) is NaN below them, as a value not observed."""
    names = tuple(name for part in observed for name in part.names)
    rows = max((len(part.values) for part in observed), default=0)
    if all(len(part.values) == rows for part in observed):
        return names, np.hstack([part.values for part in observed]) if observed else np.empty(
            (0, 0)
        )
    values = np.full((rows, len(names)), np.nan)
    column = 0
    for part in observed:
        values[: len(part.values), column : column + len(part.names)] = part.values
        column += len(part.names)
    return names, values


class DriftMonitors:
    """The daemon's monitors, one per model with a ``drift`` table, their references saved
    under ``directory/<model>/``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._monitors: dict[str, DriftMonitor] = {}

    def monitor(self, name: str, options: DriftOptions) -> DriftMonitor:
        """The model's monitor, made anew when its options changed (a reload)."""
        found = self._monitors.get(name)
        if found is None or found.options != options:
            if found is not None:
                found.close()
            capture = self.directory.parent / "capture" / name  # <state>/capture/<model>
            found = self._monitors[name] = DriftMonitor(
                name, options, self.directory / name, capture
            )
        return found

    def get(self, name: str) -> DriftMonitor | None:
        return self._monitors.get(name)

    def __iter__(self) -> Iterator[DriftMonitor]:
        return iter(list(self._monitors.values()))

    def close(self) -> None:
        for monitor in self._monitors.values():
            monitor.close()
