"""Which models are declared and which are loaded: one slot per declared model.

A slot loads its model on first use (or at start when preloaded or pinned), holds the requests
that arrive while it loads (bounded like the admission queue), and its model is unloaded after
``keep_alive_s`` without requests, or to make room for another, unless it is pinned. Every
unload goes through the registry, which keeps the memory budget's books.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

from edged.config import ModelConfig
from edged.errors import BudgetExceeded, BusyError, EdgedError, InternalError, UnknownModel
from edged.models.budget import MIB, MemoryBudget, footprint, give_back_freed_memory
from edged.models.generation import GenerationRunner
from edged.models.runner import ModelRunner

log = logging.getLogger(__name__)

#: what serves a loaded model: tensor runs (ONNX) or one text stream at a time (GGUF)
Runner = ModelRunner | GenerationRunner
#: builds, starts and returns the runner of a model (blocking work happens off the loop)
Loader = Callable[["ModelSlot"], Awaitable[Runner]]
#: called once the load settles: with ``None`` when the model is ready, else the load error
Waiter = Callable[[EdgedError | None], None]


class ModelState(enum.Enum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    READY = "ready"


@dataclass(frozen=True)
class SlotStatistics:
    state: str
    loads: int
    unloads: int
    waiting: int


class ModelSlot:
    def __init__(
        self,
        name: str,
        version: int,
        config: ModelConfig,
        loader: Loader,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.name = name
        self.version = version
        self.config = config
        self.state = ModelState.UNLOADED
        self.runner: Runner | None = None
        self.last_used_ns = 0
        self._loader = loader
        self._loop = loop
        self._waiters: list[Waiter] = []
        self._loading: asyncio.Task[None] | None = None
        self._error: EdgedError | None = None
        self._loads = 0
        self._unloads = 0

    def when_ready(self, waiter: Waiter) -> None:
        """Call ``waiter`` once the model is loaded (starting the load), or refuse at once."""
        if len(self._waiters) >= self.config.queue_depth:
            raise BusyError(
                f"model {self.name!r} is loading with {len(self._waiters)} requests waiting "
                f"(queue_depth {self.config.queue_depth}); retry later"
            )
        self._waiters.append(waiter)
        self._start_load()

    async def load(self) -> None:
        """Load now and wait for it; raises the load error (start-up uses this)."""
        self._start_load()
        if self._loading is not None:
            await self._loading
        if self._error is not None:
            raise self._error

    async def settled(self) -> None:
        """Return once no load is in progress."""
        if self._loading is not None:
            await self._loading

    @property
    def evictable(self) -> bool:
        """Loaded, not pinned, and nothing queued or running on it."""
        return self.runner is not None and not self.config.pinned and not self.runner.busy

    def idle_expired(self, now_ns: int) -> bool:
        keep_alive = self.config.keep_alive_s
        return self.evictable and keep_alive > 0 and now_ns - self.last_used_ns >= keep_alive * 1e9

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()
            self.runner = None
            self._unloads += 1
        self.state = ModelState.UNLOADED

    def statistics(self) -> SlotStatistics:
        return SlotStatistics(self.state.value, self._loads, self._unloads, len(self._waiters))

    def _start_load(self) -> None:
        if self.state is ModelState.UNLOADED:
            self.state = ModelState.LOADING
            self._loading = self._loop.create_task(self._load())

    async def _load(self) -> None:
        try:
            runner = await self._loader(self)
        except Exception as exc:  # reported to every waiter; the next request tries again
            if isinstance(exc, EdgedError):
                log.error("%s", exc)
                self._error = exc
            else:
                log.exception("loading model %s failed", self.name)
                self._error = InternalError(f"model {self.name!r} failed to load; see the log")
            self.state = ModelState.UNLOADED
        else:
            self._error = None
            self.runner = runner
            self.state = ModelState.READY
            self._loads += 1
            self.last_used_ns = time.monotonic_ns()
        finally:
            self._loading = None
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter(self._error)


class Registry:
    def __init__(self, budget: MemoryBudget) -> None:
        self.budget = budget
        self._slots: dict[str, ModelSlot] = {}

    def add(self, slot: ModelSlot) -> None:
        self._slots[slot.name] = slot

    def slot(self, name: str, version: int | None = None) -> ModelSlot:
        slot = self._slots.get(name)
        if slot is None:
            known = ", ".join(sorted(self._slots)) or "none"
            raise UnknownModel(f"no model named {name!r}; serving: {known}")
        if version is not None and version != slot.version:
            raise UnknownModel(
                f"model {name!r} has no version {version} loaded; serving {slot.version}"
            )
        return slot

    def runners(self) -> list[Runner]:
        return [slot.runner for slot in self._slots.values() if slot.runner is not None]

    def unload_idle(self, now_ns: int) -> None:
        for slot in self._slots.values():
            if slot.idle_expired(now_ns):
                self.unload(slot, f"after {slot.config.keep_alive_s:g} s without requests")

    def unload(self, slot: ModelSlot, reason: str) -> None:
        """Unload, release its charge, and record what the system really got back."""
        log.info("unloading model %s %s", slot.name, reason)
        before = footprint()
        slot.close()
        give_back_freed_memory()
        self.budget.release(slot.name, before - footprint())

    def make_room(self, loading: ModelSlot, need: int) -> None:
        """Evict idle, unpinned models, least recently used first, until ``need`` bytes fit."""
        budget = self.budget
        if budget.capacity is not None and need > budget.capacity:
            raise BudgetExceeded(
                f"model {loading.name!r} needs {need / MIB:.0f} MiB, more than the whole "
                f"budget of {budget.capacity / MIB:.0f} MiB"
            )
        victims = sorted(
            (s for s in self._slots.values() if s is not loading and s.evictable),
            key=lambda s: s.last_used_ns,
        )
        while budget.shortfall(need) > 0 and victims:
            self.unload(victims.pop(0), f"to make room for {loading.name}")
        if budget.shortfall(need) > 0:
            raise BudgetExceeded(self._no_room(loading, need))

    def _no_room(self, loading: ModelSlot, need: int) -> str:
        budget = self.budget
        loaded = [
            f"{name} {charged / MIB:.0f} MiB"
            + (" pinned" if self._slots[name].config.pinned else " busy")
            for name, charged in budget.statistics().charged_bytes.items()
            if name in self._slots
        ]
        limit = "no budget" if budget.capacity is None else f"{budget.capacity / MIB:.0f} MiB"
        free = budget.free()
        return (
            f"model {loading.name!r} needs {need / MIB:.0f} MiB but only {free / MIB:.0f} MiB "
            f"are free: {budget.used / MIB:.0f} MiB of {limit} are in use, and the system keeps "
            f"{budget.reserve / MIB:.0f} MiB in reserve; loaded: {', '.join(loaded) or 'nothing'}"
        )

    async def settled(self) -> None:
        await asyncio.gather(*(slot.settled() for slot in self._slots.values()))

    def close(self) -> None:
        for slot in self._slots.values():
            if slot.runner is not None:
                self.unload(slot, "at stop")

    def __iter__(self) -> Iterator[ModelSlot]:
        return iter(list(self._slots.values()))

    def __len__(self) -> int:
        return len(self._slots)
