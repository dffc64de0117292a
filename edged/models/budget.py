"""Memory accounting for loaded models: estimate before a load, measure after, learn.

Each loaded model is charged max(estimate, measured) bytes. The estimate comes from the model's
files; the measurement is the memory the load really took (``footprint``), and their ratio
corrects that model's next estimate. The corrections are kept in a small JSON file in the state
directory, so they survive restarts. A load goes ahead only if its expected size fits both the
configured budget and what the system can spare above the reserve.

A correction rises with the first load that measures more, and comes down only after
``LOWER_AFTER`` loads in a row measured less (to the largest of them, never below the estimate):
one low measurement proves little (the allocator may have reused pages an earlier unload freed),
and a load beside another version of the same model (an overlapping swap, a candidate) never
lowers it, as the two may share pages. So a one-time cost once learned as a model's size (a
runtime's first start-up, before the loader primed it) does not stay on its books for ever.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger(__name__)

MIB = 1024 * 1024
#: a correction comes down after this many loads in a row measured below it
LOWER_AFTER = 2
#: CPU and GPU share RAM on a Jetson: there the system's available memory is the measure
JETSON_RELEASE = Path("/etc/nv_tegra_release")


@dataclass(frozen=True)
class BudgetStatistics:
    capacity_bytes: int | None
    reserve_bytes: int
    used_bytes: int
    #: per model, all its loaded versions together (two while a swap overlaps them)
    charged_bytes: dict[str, int]
    #: per model, the last load's estimate and measurement
    estimated_bytes: dict[str, int]
    measured_bytes: dict[str, int]
    #: per model, what the last unload gave back to the system
    returned_bytes: dict[str, int]


class MemoryBudget:
    def __init__(
        self, capacity_bytes: int | None, reserve_bytes: int, state_file: Path | None = None
    ) -> None:
        self.capacity = capacity_bytes
        self.reserve = reserve_bytes
        self._state_file = state_file
        self._charged: dict[tuple[str, int], int] = {}  # (model, version) -> bytes
        self._measured_versions: dict[tuple[str, int], int] = {}
        self._estimated: dict[str, int] = {}
        self._measured: dict[str, int] = {}
        self._correction, self._lower = _read_corrections(state_file)
        self._returned: dict[str, int] = {}

    @property
    def used(self) -> int:
        return sum(self._charged.values())

    def expected(self, name: str, estimate: int) -> int:
        """What loading ``name`` will take, its past loads taken into account."""
        return int(estimate * self._correction.get(name, 1.0))

    def free(self) -> int:
        """Bytes a load could take now: within the budget and above the system reserve."""
        system = int(psutil.virtual_memory().available) - self.reserve
        budget = system if self.capacity is None else self.capacity - self.used
        return max(0, min(budget, system))

    def shortfall(self, need: int) -> int:
        """Bytes to free before ``need`` more fit the budget and leave the reserve free."""
        over_budget = 0 if self.capacity is None else self.used + need - self.capacity
        over_system = need + self.reserve - psutil.virtual_memory().available
        return max(0, over_budget, over_system)

    def charge(self, name: str, version: int, estimate: int, measured: int) -> None:
        """Charge a loaded model version the larger of what was expected and what its load
        measured, and learn for the next load (per model name, as versions are alike in
        size)."""
        expected = self.expected(name, estimate)
        beside = any(model == name for model, _ in self._charged)  # another version is loaded
        charged = self._charged[name, version] = max(expected, measured)
        self._measured_versions[name, version] = measured
        self._estimated[name], self._measured[name] = estimate, measured
        if estimate > 0 and measured > 0 and self._learn(name, measured / estimate, beside):
            self._save_corrections()
        log.info(
            "model %s version %d: estimated %.1f MiB, measured %.1f MiB, charged %.1f MiB",
            name,
            version,
            estimate / MIB,
            measured / MIB,
            charged / MIB,
        )

    def _learn(self, name: str, ratio: float, beside: bool) -> bool:
        """Move the correction as the module says; whether anything changed (to save)."""
        ratio = max(1.0, ratio)
        current = self._correction.get(name, 1.0)
        if ratio >= current:
            changed = ratio > current or name in self._lower
            self._lower.pop(name, None)
        elif beside:
            return False
        else:
            lower = self._lower.setdefault(name, [])
            lower.append(ratio)
            if len(lower) < LOWER_AFTER:
                return True
            ratio = max(lower)
            del self._lower[name]
            changed = True
        if ratio > 1.0:
            self._correction[name] = ratio
        else:
            self._correction.pop(name, None)
        return changed

    def release(self, name: str, version: int, returned: int, *, report: bool = True) -> None:
        """Drop a version's charge and record what its unload gave back. Memory that did not
        come back is noted (at INFO: the budget's checks read the system's available memory
        too, so it still limits loads), except when ``report`` is false (at stop)."""
        self._charged.pop((name, version), None)
        took = self._measured_versions.pop((name, version), 0)
        self._returned[name] = returned
        if report and returned < took // 2:
            log.info(
                "model %s version %d unloaded but only %.1f of the %.1f MiB its load took "
                "came back",
                name,
                version,
                returned / MIB,
                took / MIB,
            )

    def statistics(self) -> BudgetStatistics:
        return BudgetStatistics(
            capacity_bytes=self.capacity,
            reserve_bytes=self.reserve,
            used_bytes=self.used,
            charged_bytes=self._charged_by_name(),
            estimated_bytes=dict(self._estimated),
            measured_bytes=dict(self._measured),
            returned_bytes=dict(self._returned),
        )

    def _charged_by_name(self) -> dict[str, int]:
        by_name: dict[str, int] = {}
        for (name, _), charged in self._charged.items():
            by_name[name] = by_name.get(name, 0) + charged
        return by_name

    def _save_corrections(self) -> None:
        """Write the corrections atomically: a power cut leaves the old file or the new one."""
        if self._state_file is None:
            return
        tmp = self._state_file.with_suffix(".tmp")
        try:
            self._state_file.parent.mkdir(parents=True, exist_ok=True)
            state = {"corrections": self._correction, "lower": self._lower}
            tmp.write_text(json.dumps(state, sort_keys=True))
            tmp.replace(self._state_file)
        except OSError as exc:  # losing a correction costs accuracy, never correctness
            log.warning("cannot save memory corrections to %s: %s", self._state_file, exc)


def _read_corrections(
    state_file: Path | None,
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """The corrections, and the lower measurements that may bring them down (none in files
    written before those were kept)."""
    if state_file is None or not state_file.exists():
        return {}, {}
    try:
        data = json.loads(state_file.read_text())
        corrections = {str(k): float(v) for k, v in data["corrections"].items() if float(v) > 0}
        lower = {
            str(k): [float(r) for r in v]
            for k, v in data.get("lower", {}).items()
            if k in corrections
        }
        return corrections, lower
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("ignoring unreadable memory corrections in %s: %s", state_file, exc)
        return {}, {}


def footprint() -> int:
    """The memory models take from the system, as a number to difference across a load."""
    if JETSON_RELEASE.exists():
        return -int(psutil.virtual_memory().available)
    return int(psutil.Process().memory_info().rss)


def give_back_freed_memory() -> None:
    """Ask glibc to return freed heap pages to the system after an unload.

    Without this a model's freed small allocations stay in the process's arenas, and RSS (and
    the system's available memory) would not show the unload at all. No-op off glibc.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    """libc's malloc_trim, looked up once: find_library runs ``ldconfig -p`` (about 2 ms)."""
    name = ctypes.util.find_library("c")
    return None if name is None else getattr(ctypes.CDLL(name), "malloc_trim", None)
