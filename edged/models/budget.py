"""Memory accounting for loaded models: estimate before a load, measure after, learn.

Each loaded model is charged max(estimate, measured) bytes. The estimate comes from the model's
files; the measurement is the memory the load really took (``footprint``), and their ratio
corrects that model's next estimate. A load goes ahead only if its expected size fits both the
configured budget and what the system can spare above the reserve.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from dataclasses import dataclass
from pathlib import Path

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
    charged_bytes: dict[str, int]
    #: per model, what the last unload gave back to the system
    returned_bytes: dict[str, int]


class MemoryBudget:
    def __init__(self, capacity_bytes: int | None, reserve_bytes: int) -> None:
        self.capacity = capacity_bytes
        self.reserve = reserve_bytes
        self._charged: dict[str, int] = {}
        self._correction: dict[str, float] = {}
        self._returned: dict[str, int] = {}

    @property
    def used(self) -> int:
        return sum(self._charged.values())

    def expected(self, name: str, estimate: int) -> int:
        """What loading ``name`` will take, its past loads taken into account."""
        return int(estimate * self._correction.get(name, 1.0))

    def shortfall(self, need: int) -> int:
        """Bytes to free before ``need`` more fit the budget and leave the reserve free."""
        over_budget = 0 if self.capacity is None else self.used + need - self.capacity
        over_system = need + self.reserve - psutil.virtual_memory().available
        return max(0, over_budget, over_system)

    def charge(self, name: str, estimate: int, measured: int) -> None:
        self._charged[name] = max(estimate, measured)
        if estimate > 0 and measured > 0:
            self._correction[name] = measured / estimate
        log.info(
            "model %s: estimated %.1f MiB, measured %.1f MiB, charged %.1f MiB",
            name,
            estimate / MIB,
            measured / MIB,
            self._charged[name] / MIB,
        )

    def release(self, name: str, returned: int) -> None:
        charged = self._charged.pop(name, 0)
        self._returned[name] = returned
        if returned < charged // 2:
            log.warning(
                "model %s unloaded but only %.1f of %.1f MiB came back",
                name,
                returned / MIB,
                charged / MIB,
            )

    def statistics(self) -> BudgetStatistics:
        return BudgetStatistics(
            capacity_bytes=self.capacity,
            reserve_bytes=self.reserve,
            used_bytes=self.used,
            charged_bytes=dict(self._charged),
            returned_bytes=dict(self._returned),
        )


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
    name = ctypes.util.find_library("c")
    if name is None:
        return
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None)
    if trim is not None:
        trim(0)
