"""Memory accounting for loaded models: estimate before a load, measure after, learn.

Each loaded model is charged max(estimate, measured) bytes. The estimate comes from the model's
files; the measurement is the memory the load really took (``footprint``), and their ratio
corrects that model's next estimate. The corrections are kept in a small JSON file in the state
directory, so they survive restarts. A load goes ahead only if its expected size fits both the
configured budget and what the system can spare above the reserve.
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
        self._correction: dict[str, float] = _read_corrections(state_file)
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
        measured, and learn for the next load. Corrections only grow: a load's RSS delta runs
        low when the allocator reuses pages an earlier unload freed, and some buffers fill only
        later (llama.cpp's compute buffers, under long prompts). They are learned per model
        name, as versions are alike in size."""
        expected = self.expected(name, estimate)
        charged = self._charged[name, version] = max(expected, measured)
        self._measured_versions[name, version] = measured
        self._estimated[name], self._measured[name] = estimate, measured
        if estimate > 0 and measured > 0:
            ratio = max(1.0, measured / estimate, self._correction.get(name, 1.0))
            if self._correction.get(name) != ratio:
                self._correction[name] = ratio
                self._save_corrections()
        log.info(
            "model %s version %d: estimated %.1f MiB, measured %.1f MiB, charged %.1f MiB",
            name,
            version,
            estimate / MIB,
            measured / MIB,
            charged / MIB,
        )

    def release(self, name: str, version: int, returned: int) -> None:
        self._charged.pop((name, version), None)
        took = self._measured_versions.pop((name, version), 0)
        self._returned[name] = returned
        if returned < took // 2:
            log.warning(
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
            tmp.write_text(json.dumps({"corrections": self._correction}, sort_keys=True))
            tmp.replace(self._state_file)
        except OSError as exc:  # losing a correction costs accuracy, never correctness
            log.warning("cannot save memory corrections to %s: %s", self._state_file, exc)


def _read_corrections(state_file: Path | None) -> dict[str, float]:
    if state_file is None or not state_file.exists():
        return {}
    try:
        data = json.loads(state_file.read_text())["corrections"]
        return {str(k): float(v) for k, v in data.items() if float(v) > 0}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("ignoring unreadable memory corrections in %s: %s", state_file, exc)
        return {}


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
