"""Which models are declared and which versions are loaded: one slot per declared model.

A slot loads its active version on first use (or at start when preloaded or pinned), holds the
requests that arrive while it loads (bounded like the admission queue), and its model is
unloaded after ``keep_alive_s`` without requests, or to make room for another, unless it is
pinned. A load that fails (other than for want of memory) backs off: until the next attempt is
due (1 s, doubling to 60 s) requests get its error at once rather than each reading the file
again; ``load`` or a swap (a reload's too) tries again at once. During a swap a slot may also
hold the old version while it finishes its requests (``retiring``), or hold new requests back
while one version replaces another. Every unload goes through the registry, which keeps the
memory budget's books.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from edged.config import ModelConfig
from edged.errors import (
    BudgetExceeded,
    BusyError,
    EdgedError,
    InternalError,
    OpNotSupported,
    RunFailed,
    UnknownModel,
)
from edged.logsetup import log_fields
from edged.models.budget import MIB, MemoryBudget, footprint, give_back_freed_memory
from edged.models.calls import Inference
from edged.models.generation import GenerationStatistics
from edged.models.latency import RequestLatency
from edged.models.runner import RunnerStatistics
from edged.models.validation import Interface
from edged.replies import ReplyTo
from edged.tasks import TaskGroup

if TYPE_CHECKING:
    from edged.models.candidate import Candidate

log = logging.getLogger(__name__)


@runtime_checkable
class Runner(Protocol):
    """What serves a loaded model version: tensor runs (ONNX, ``runner.ModelRunner``) or one
    text stream at a time (GGUF, ``generation.GenerationRunner``). Everything above the models
    uses a model through this alone, never by asking which kind it is."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> int: ...

    @property
    def config(self) -> ModelConfig: ...

    @property
    def latency(self) -> RequestLatency: ...

    @property
    def ops(self) -> frozenset[str]:
        """The model ops it serves: ``infer``; or ``generate`` or ``embed``."""
        ...

    @property
    def busy(self) -> bool:
        """Whether anything is queued or running."""
        ...

    def start(self) -> None: ...

    def unsupported(self, op: str) -> OpNotSupported:
        """The refusal for ``op``, one of the model ops it does not serve."""
        ...

    def submit(self, request: Inference, reply: ReplyTo, peer: bytes) -> None:
        """Check and queue a request for one of ``ops``, or refuse it at once."""
        ...

    def pump(self) -> None:
        """Start what was admitted since the last pump, when the model is free."""
        ...

    def cancel(self, peer: bytes, request_id: int) -> bool:
        """Stop the request ``request_id`` of ``peer``; ``False`` when none is queued or
        running, or the model's requests cannot be cancelled."""
        ...

    def stalled_ns(self, now_ns: int) -> int:
        """How long the model's thread has gone without progress (0 when idle)."""
        ...

    async def drained(self) -> None:
        """Return once nothing is queued or running."""
        ...

    def abort(self, error: EdgedError) -> None:
        """Answer every queued and running request with ``error``."""
        ...

    def close(self) -> None: ...

    def statistics(self) -> RunnerStatistics | GenerationStatistics: ...

    def describe(self) -> dict[str, Any]:
        """The model's fields of a ``describe`` reply, after its name and version."""
        ...

    def interface(self) -> Interface:
        """What its clients rely on: a new version must offer the same (``validation``)."""
        ...

    def warnings(self) -> tuple[str, ...]:
        """What its configuration asks for but will not get: said at load (in the log) and
        by ``edgectl models``, rather than found out from latency."""
        ...

    def rehearse(self) -> None:
        """A warm-up run, with golden vectors where there are any; raises ``SwapRejected``
        (blocking, straight on the backend: only before the version serves)."""
        ...

    async def probe(self) -> None:
        """The self-test while it serves: ``rehearse``'s check beside its requests where that
        is safe, else through its own queue."""
        ...


@dataclass(frozen=True)
class VersionSpec:
    """One version of a model: its number and its resolved declaration (file, backend)."""

    version: int
    config: ModelConfig


#: builds, starts and returns the runner of a model version (blocking work happens off the loop)
Loader = Callable[[str, VersionSpec], Awaitable[Runner]]
#: called once the model is ready: with ``None`` when it is, else the error that stopped it
Waiter = Callable[[EdgedError | None], None]


#: after a failed load, the next one is not tried for this long, doubling up to the cap
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 60.0


class ModelState(enum.Enum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    READY = "ready"
    #: a swap replaces the active version: requests wait as during a load
    SWAPPING = "swapping"
    #: the last load failed: requests get its error until the next attempt is due
    FAILED = "failed"


@dataclass(frozen=True)
class SlotStatistics:
    state: str
    version: int
    loads: int
    unloads: int
    waiting: int
    #: failed loads since the last one that succeeded (or since ``load`` or a swap)
    failed_loads: int
    #: the last load's error while ``state`` is "failed": (wire code, message)
    error: tuple[str, str] | None
    #: seconds until a request (or ``load``) tries the load again; 0 when it is due
    retry_in_s: float | None
    #: what the loaded version's configuration does not do as written (``Runner.warnings``)
    warnings: tuple[str, ...]


class ModelSlot:
    def __init__(
        self,
        name: str,
        spec: VersionSpec,
        loader: Loader,
        tasks: TaskGroup,
    ) -> None:
        self.name = name
        self.spec = spec
        self.state = ModelState.UNLOADED
        self.runner: Runner | None = None
        #: old versions still answering the requests they had when a swap flipped routing
        self.retiring: list[Runner] = []
        #: what ``rollback`` goes back to
        self.previous: VersionSpec | None = None
        #: a version on trial beside the active one (canary or shadow)
        self.candidate: Candidate | None = None
        self.swapping = False
        self.last_used_ns = 0
        self._loader = loader
        self._tasks = tasks  # where its loads run
        self._waiters: list[Waiter] = []
        self._loading: asyncio.Task[None] | None = None
        self._error: EdgedError | None = None
        self._failed_loads = 0
        self._retry_at = 0.0  # time.monotonic() when a failed load may be tried again
        self._loads = 0
        self._unloads = 0
        #: what the last loaded version's configuration does not do as written
        self.warnings: tuple[str, ...] = ()

    @property
    def version(self) -> int:
        return self.spec.version

    @property
    def config(self) -> ModelConfig:
        return self.spec.config

    def runner_for(self, version: int | None) -> Runner | None:
        """The loaded runner serving ``version`` (the active one when ``None``)."""
        if version is None or version == self.spec.version:
            return self.runner
        trial = [self.candidate.runner] if self.candidate is not None else []
        return next((r for r in [*self.retiring, *trial] if r.version == version), None)

    def loaded_versions(self) -> list[int]:
        active = [self.runner.version] if self.runner is not None else []
        trial = [self.candidate.runner.version] if self.candidate is not None else []
        return active + [runner.version for runner in self.retiring] + trial

    def when_ready(self, waiter: Waiter) -> None:
        """Call ``waiter`` once the active version is loaded (starting the load), or refuse at
        once when ``queue_depth`` requests already wait, or with the last load's error while the
        next attempt is not due."""
        if self.state is ModelState.FAILED and self._error is not None and self.retry_in_s() > 0:
            raise self._error
        if len(self._waiters) >= self.config.queue_depth:
            raise BusyError(
                f"model {self.name!r} is {self.state.value} with {len(self._waiters)} requests "
                f"waiting (queue_depth {self.config.queue_depth}); retry later"
            )
        self._waiters.append(waiter)
        self._start_load()

    async def load(self) -> None:
        """Load now, backing off or not, and wait for it; raises the load error (start-up and
        the ``load`` command use this)."""
        self.retry_now()
        self._start_load()
        if self._loading is not None:
            await self._loading
        if self._error is not None:
            raise self._error

    async def settled(self) -> None:
        """Return once no load is in progress."""
        if self._loading is not None:
            await self._loading

    def retry_now(self) -> None:
        """Forget a failed load's back-off: the next request or ``load`` tries again."""
        self._failed_loads, self._retry_at = 0, 0.0
        if self.state is ModelState.FAILED:
            self.state = ModelState.UNLOADED

    def retry_in_s(self) -> float:
        """Seconds until a failed load may be tried again (0 when it may now)."""
        return max(0.0, self._retry_at - time.monotonic())

    def hold(self) -> None:
        """Park new requests until ``activate`` or ``release`` (a swap that replaces)."""
        self.retry_now()
        self.state = ModelState.SWAPPING

    def activate(self, runner: Runner, spec: VersionSpec) -> None:
        """Route to ``runner`` from now on and let parked requests through."""
        self.runner, self.spec = runner, spec
        self.state = ModelState.READY
        self.warnings = runner.warnings()
        self._error, self._failed_loads = None, 0
        self._loads += 1
        self.last_used_ns = time.monotonic_ns()
        self.release(None)

    def release(self, error: EdgedError | None) -> None:
        """Answer the parked requests: ``None`` sends them on to the active version (and, if
        none is loaded, the first of them loads it)."""
        if self.runner is None:
            self.state = ModelState.UNLOADED
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter(error)

    @property
    def evictable(self) -> bool:
        """Loaded, not pinned, not swapping or on trial, and nothing queued or running."""
        return (
            self.runner is not None
            and not self.config.pinned
            and not self.swapping
            and self.candidate is None
            and not self.runner.busy
        )

    def idle_expired(self, now_ns: int) -> bool:
        keep_alive = self.config.keep_alive_s
        return self.evictable and keep_alive > 0 and now_ns - self.last_used_ns >= keep_alive * 1e9

    def detach(self) -> Runner | None:
        """Take the active runner out of routing (the caller closes it)."""
        runner, self.runner = self.runner, None
        if runner is not None:
            self._unloads += 1
        if self.state is ModelState.READY:
            self.state = ModelState.UNLOADED
        return runner

    def statistics(self) -> SlotStatistics:
        failed = self.state is ModelState.FAILED and self._error is not None
        error = self._error if failed else None
        return SlotStatistics(
            state=self.state.value,
            version=self.version,
            loads=self._loads,
            unloads=self._unloads,
            waiting=len(self._waiters),
            failed_loads=self._failed_loads,
            error=None if error is None else (error.code, str(error)),
            retry_in_s=round(self.retry_in_s(), 1) if failed else None,
            warnings=self.warnings,
        )

    def _start_load(self) -> None:
        if self.state is ModelState.UNLOADED or (
            self.state is ModelState.FAILED and self.retry_in_s() == 0
        ):
            self.state = ModelState.LOADING
            self._loading = self._tasks.start(self._load(), f"load {self.name}")

    async def _load(self) -> None:
        try:
            runner = await self._loader(self.name, self.spec)
        except Exception as exc:  # reported to every waiter; a later request tries again
            self._loading = None
            self._failed(as_edged_error(exc, f"model {self.name!r} failed to load; see the log"))
            return
        self._loading = None
        self.activate(runner, self.spec)

    def _failed(self, error: EdgedError) -> None:
        """Answer the waiters with ``error``; back off unless memory was short (that passes
        as other models unload, and costs no file read to find out)."""
        self._error = error
        self.release(error)
        fields = log_fields(model=self.name, version=self.version, code=error.code)
        if isinstance(error, BudgetExceeded):
            log.error("%s", error, extra=fields)
            return
        self._failed_loads += 1
        delay = min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** (self._failed_loads - 1))
        self._retry_at = time.monotonic() + delay
        self.state = ModelState.FAILED
        log.error(
            "%s (failed load %d; requests get this error for %.0f s, then one tries again; "
            "edgectl load %s tries now)",
            error,
            self._failed_loads,
            delay,
            self.name,
            extra=fields,
        )


def as_edged_error(exc: Exception, unexpected: str) -> EdgedError:
    """``exc`` itself when it is one of ours; else a logged bug, reported as ``unexpected``."""
    if isinstance(exc, EdgedError):
        return exc
    log.error("unexpected failure", exc_info=exc)
    return InternalError(unexpected)


class Registry:
    def __init__(self, budget: MemoryBudget) -> None:
        self.budget = budget
        self._slots: dict[str, ModelSlot] = {}
        self._stopping = False

    def add(self, slot: ModelSlot) -> None:
        self._slots[slot.name] = slot

    def remove(self, name: str) -> ModelSlot:
        """Stop routing to a model; its requests in flight are the caller's to finish."""
        return self._slots.pop(name)

    def slot(self, name: str) -> ModelSlot:
        slot = self._slots.get(name)
        if slot is None:
            known = ", ".join(sorted(self._slots)) or "none"
            raise UnknownModel(f"no model named {name!r}; serving: {known}")
        return slot

    def runners(self) -> list[Runner]:
        """Every loaded runner, retiring versions included."""
        found: list[Runner] = []
        for slot in self._slots.values():
            if slot.runner is not None:
                found.append(slot.runner)
            found.extend(slot.retiring)
            if slot.candidate is not None:
                found.append(slot.candidate.runner)
        return found

    def unload_idle(self, now_ns: int) -> None:
        for slot in self._slots.values():
            if slot.idle_expired(now_ns):
                self.unload(slot, f"after {slot.config.keep_alive_s:g} s without requests")

    def unload(self, slot: ModelSlot, reason: str) -> None:
        """Unload the active version (idle, evicted, at stop)."""
        runner = slot.detach()
        if runner is not None:
            self.close_runner(runner, reason)

    def close_runner(self, runner: Runner, reason: str) -> None:
        """Close, release its charge, and record what the system really got back."""
        log.info(
            "unloading model %s version %d %s",
            runner.name,
            runner.version,
            reason,
            extra=log_fields(model=runner.name, version=runner.version),
        )
        # a request that reached it after it was last seen idle gets an answer, not silence
        runner.abort(RunFailed(f"model {runner.name!r} version {runner.version} was unloaded"))
        before = footprint()
        runner.close()
        give_back_freed_memory()
        returned = before - footprint()
        self.budget.release(runner.name, runner.version, returned, report=not self._stopping)

    def make_room(self, name: str, need: int) -> None:
        """Evict idle, unpinned models, least recently used first, until ``need`` bytes fit."""
        budget = self.budget
        if budget.capacity is not None and need > budget.capacity:
            raise BudgetExceeded(
                f"model {name!r} needs {need / MIB:.0f} MiB, more than the whole "
                f"budget of {budget.capacity / MIB:.0f} MiB"
            )
        victims = sorted(
            (s for s in self._slots.values() if s.name != name and s.evictable),
            key=lambda s: s.last_used_ns,
        )
        while budget.shortfall(need) > 0 and victims:
            self.unload(victims.pop(0), f"to make room for {name}")
        if budget.shortfall(need) > 0:
            raise BudgetExceeded(self.no_room(name, need))

    def no_room(self, name: str, need: int) -> str:
        budget = self.budget
        loaded = [
            f"{loaded} {charged / MIB:.0f} MiB"
            + (" pinned" if self._slots[loaded].config.pinned else " busy")
            for loaded, charged in budget.statistics().charged_bytes.items()
            if loaded in self._slots
        ]
        limit = "no budget" if budget.capacity is None else f"{budget.capacity / MIB:.0f} MiB"
        free = budget.free()
        return (
            f"model {name!r} needs {need / MIB:.0f} MiB but only {free / MIB:.0f} MiB "
            f"are free: {budget.used / MIB:.0f} MiB of {limit} are in use, and the system keeps "
            f"{budget.reserve / MIB:.0f} MiB in reserve; loaded: {', '.join(loaded) or 'nothing'}"
        )

    async def settled(self) -> None:
        await asyncio.gather(*(slot.settled() for slot in self._slots.values()))

    def close(self) -> None:
        """Unload everything (at stop: what comes back no longer matters)."""
        self._stopping = True
        for slot in self._slots.values():
            trial = [slot.candidate.runner] if slot.candidate is not None else []
            for runner in [*slot.retiring, *trial]:
                self.close_runner(runner, "at stop")
            slot.retiring.clear()
            slot.candidate = None
            self.unload(slot, "at stop")

    def __iter__(self) -> Iterator[ModelSlot]:
        return iter(list(self._slots.values()))

    def __len__(self) -> int:
        return len(self._slots)
