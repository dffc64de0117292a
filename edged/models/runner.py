"""Per-model scheduling: a bounded admission queue, dynamic batching, and where runs happen.

Each model gets one dedicated run thread (onnxruntime releases the GIL while it computes), so a
slow model never blocks the event loop or another model. A model whose recent runs took less
than ``inline_max_us`` runs on the event-loop thread instead: for tiny models the thread hop
costs more than the run. Every job is answered exactly once (``Job.replied`` guards it).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from edged import protocol
from edged.config import ModelConfig
from edged.errors import BusyError, DeadlineExceeded, EdgedError, RunFailed
from edged.logsetup import log_fields
from edged.models import batching
from edged.models.backend import Arrays, Backend
from edged.models.latency import RequestLatency

log = logging.getLogger(__name__)

#: sends one reply message; ``False`` when it was dropped (the client has gone or stopped reading)
ReplySink = Callable[[list[Any]], bool]
Outputs = dict[str, np.ndarray[Any, Any]]
#: a partial batch waiting for rows is started this long before its earliest deadline
DEADLINE_MARGIN_NS = 1_000_000
EWMA_WEIGHT = 0.1
#: a single slow run (preemption, a page fault) moves the estimate by at most this much
EWMA_CLAMP = 2.0


def run_failed(name: str, version: int, exc: Exception, trace: str | None) -> RunFailed:
    """Log a backend's failure (with the fields the journal indexes); the error to reply."""
    fields = log_fields(model=name, version=version, trace=trace, code=RunFailed.code)
    log.warning("model %s run failed: %s [trace %s]", name, exc, trace, extra=fields)
    return RunFailed(f"model {name!r} failed to run: {str(exc).strip()[:500]}")


@dataclass(slots=True, eq=False)
class Job:
    """One admitted request waiting for, or in, a run."""

    request_id: int
    trace: str | None
    inputs: Arrays
    send: ReplySink
    arrived_ns: int
    deadline_ns: int | None
    replied: bool = False
    #: sees the outputs before they are sent (a shadow comparison)
    observe: Callable[[Outputs], None] | None = None

    def fail(self, error: EdgedError) -> None:
        if not self.replied:
            self.replied = True
            self.send(protocol.encode_error(self.request_id, error, self.trace))


class IdleWaiters:
    """Futures resolved the next time a runner has nothing queued or running (drain, swap)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiting: list[asyncio.Future[None]] = []

    def add(self) -> asyncio.Future[None]:
        waiter = self._loop.create_future()
        self._waiting.append(waiter)
        return waiter

    def release(self) -> None:
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            if not waiter.done():
                waiter.set_result(None)

    def __bool__(self) -> bool:
        return bool(self._waiting)


@dataclass(frozen=True)
class RunnerStatistics:
    queued: int
    in_flight: int
    requests: int
    busy_rejections: int
    deadline_misses: int
    failures: int
    runs: int
    rows: int
    inline_runs: int
    recent_run_us: float | None


@dataclass
class _Counters:
    requests: int = 0
    busy_rejections: int = 0
    deadline_misses: int = 0
    failures: int = 0
    runs: int = 0
    rows: int = 0
    inline_runs: int = 0


@dataclass(slots=True)
class _Run:
    jobs: list[Job]
    started_ns: int
    outputs: Outputs | None = None
    error: EdgedError | None = None
    ended_ns: int = 0


class ModelRunner:
    def __init__(
        self,
        name: str,
        version: int,
        backend: Backend,
        config: ModelConfig,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.name = name
        self.version = version
        self.backend = backend
        self.config = config
        self.batching = config.max_batch > 1 and backend.signature.batchable
        self._loop = loop
        self._queue: deque[Job] = deque()
        self._in_flight: list[Job] = []
        self._in_flight_since_ns = 0
        self._inbox: queue.SimpleQueue[_Run | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name=f"run-{name}", daemon=True)
        self._timer: asyncio.TimerHandle | None = None
        self._recent_run_us: float | None = None
        self._with_deadline = 0  # queued jobs that carry a deadline: skip the scan when none
        self._draining = False
        self._idle = IdleWaiters(loop)
        self._counters = _Counters()
        self.latency = RequestLatency()

    def start(self) -> None:
        self._thread.start()

    @property
    def busy(self) -> bool:
        return bool(self._queue or self._in_flight)

    def stalled_ns(self, now_ns: int) -> int:
        """How long the run on the model's thread has been going (0 when none is)."""
        return now_ns - self._in_flight_since_ns if self._in_flight else 0

    def submit(self, job: Job) -> None:
        """Admit a job or refuse it at once; runs start on the next ``pump``."""
        self._counters.requests += 1
        if len(self._queue) >= self.config.queue_depth:
            self._counters.busy_rejections += 1
            raise BusyError(
                f"model {self.name!r} has {len(self._queue)} requests queued "
                f"(queue_depth {self.config.queue_depth}); retry later"
            )
        self._queue.append(job)
        if job.deadline_ns is not None:
            self._with_deadline += 1

    def pump(self) -> None:
        """Start runs while the model is free and a batch is ready."""
        while not self._in_flight and self._queue:
            jobs = self._take_batch()
            if jobs is None:
                break
            run = _Run(jobs, time.monotonic_ns())
            if self._runs_inline():
                self._counters.inline_runs += 1
                self._execute(run)
                self._finish(run)
            else:
                self._in_flight, self._in_flight_since_ns = jobs, run.started_ns
                self._inbox.put(run)
        if self._idle and not self._in_flight and not self._queue:
            self._idle.release()

    async def drained(self) -> None:
        """Return once nothing is queued or running; delays stop holding partial batches."""
        self._draining = True
        waiter = self._idle.add()
        self.pump()
        await waiter

    def abort(self, error: EdgedError) -> None:
        """Answer every queued and running job with ``error`` (after a drain timed out)."""
        if self._timer is not None:
            self._timer.cancel()
        for job in [*self._queue, *self._in_flight]:
            job.fail(error)
        self._queue.clear()
        self._with_deadline = 0

    def close(self) -> None:
        self._inbox.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout=1.0)
        self.backend.close()

    def statistics(self) -> RunnerStatistics:
        c = self._counters
        return RunnerStatistics(
            queued=len(self._queue),
            in_flight=len(self._in_flight),
            requests=c.requests,
            busy_rejections=c.busy_rejections,
            deadline_misses=c.deadline_misses,
            failures=c.failures,
            runs=c.runs,
            rows=c.rows,
            inline_runs=c.inline_runs,
            recent_run_us=self._recent_run_us,
        )

    # -- batching --------------------------------------------------------------------------

    def _take_batch(self) -> list[Job] | None:
        """Pop the next batch, or ``None`` while a partial batch may still wait for rows."""
        queue = self._queue
        if self._with_deadline:
            self._expire(time.monotonic_ns())
            if not queue:
                return None
        first = queue[0]
        if not self.batching or (len(queue) == 1 and not self.config.max_delay_us):
            self._remove(first)  # the common case pays for no batching bookkeeping
            return [first]
        key = batching.batch_key(first.inputs)
        if key is None:
            self._remove(first)
            return [first]
        chosen: list[Job] = []
        rows = 0
        for job in queue:
            job_rows = batching.batch_rows(job.inputs)
            if (not chosen or rows + job_rows <= self.config.max_batch) and (
                job is first or batching.batch_key(job.inputs) == key
            ):
                chosen.append(job)
                rows += job_rows
        now = time.monotonic_ns()
        wait_until = first.arrived_ns + self.config.max_delay_us * 1000
        if self._with_deadline:  # never hold a job for rows past its own deadline
            deadlines = [job.deadline_ns for job in chosen if job.deadline_ns is not None]
            wait_until = min([wait_until, *(d - DEADLINE_MARGIN_NS for d in deadlines)])
        if rows < self.config.max_batch and now < wait_until and not self._draining:
            if self._timer is None:
                self._timer = self._loop.call_later((wait_until - now) / 1e9, self._on_timer)
            return None
        for job in chosen:
            self._remove(job)
        return chosen

    def _remove(self, job: Job) -> None:
        if job is self._queue[0]:
            self._queue.popleft()
        else:
            self._queue.remove(job)
        if job.deadline_ns is not None:
            self._with_deadline -= 1

    def _on_timer(self) -> None:
        self._timer = None
        self.pump()

    def _expire(self, now: int) -> None:
        for job in [j for j in self._queue if j.deadline_ns is not None and j.deadline_ns <= now]:
            self._remove(job)
            self._counters.deadline_misses += 1
            waited_ms = (now - job.arrived_ns) / 1e6
            job.fail(DeadlineExceeded(f"deadline passed after {waited_ms:.1f} ms in the queue"))

    # -- running ---------------------------------------------------------------------------

    def _runs_inline(self) -> bool:
        recent = self._recent_run_us
        return recent is not None and recent < self.config.inline_max_us

    def _work(self) -> None:
        while (run := self._inbox.get()) is not None:
            self._execute(run)
            try:
                self._loop.call_soon_threadsafe(self._finish_threaded, run)
            except RuntimeError:  # the loop closed under us during shutdown
                return

    def _execute(self, run: _Run) -> None:
        merged = batching.merge([job.inputs for job in run.jobs])
        try:
            run.outputs = self.backend.run(merged)
        except Exception as exc:  # any backend failure becomes this batch's error reply
            traces = ",".join(job.trace or "-" for job in run.jobs)
            run.error = run_failed(self.name, self.version, exc, traces)
        run.ended_ns = time.monotonic_ns()

    def _finish_threaded(self, run: _Run) -> None:
        self._in_flight = []
        self._finish(run)
        self.pump()

    def _finish(self, run: _Run) -> None:
        run_us = (run.ended_ns - run.started_ns) / 1000
        recent = self._recent_run_us
        if recent is None:
            self._recent_run_us = run_us
        else:
            sample = min(run_us, EWMA_CLAMP * max(recent, self.config.inline_max_us))
            self._recent_run_us = recent + EWMA_WEIGHT * (sample - recent)
        rows = [batching.batch_rows(job.inputs) for job in run.jobs]
        c = self._counters
        c.runs += 1
        c.rows += sum(rows)
        self.latency.batch.observe(len(run.jobs))
        parts: list[Outputs] = []
        if run.outputs is not None:
            try:
                parts = batching.split(run.outputs, rows)
            except ValueError as exc:
                run.error = RunFailed(f"model {self.name!r}: cannot split batch: {exc}")
        if run.error is not None:
            c.failures += len(run.jobs)
            for job in run.jobs:
                job.fail(run.error)
            return
        for job, outputs in zip(run.jobs, parts, strict=True):
            self._reply(job, outputs, run)

    def _reply(self, job: Job, outputs: Outputs, run: _Run) -> None:
        if job.replied:
            return
        fields: dict[str, Any] = {
            "model": self.name,
            "version": self.version,
            "timing": {
                "queue_us": (run.started_ns - job.arrived_ns) // 1000,
                "run_us": (run.ended_ns - run.started_ns) // 1000,
                "batch": len(run.jobs),
            },
        }
        if job.trace is not None:
            fields["trace"] = job.trace
        if job.observe is not None:
            job.observe(outputs)
        queue_s = (run.started_ns - job.arrived_ns) / 1e9
        run_s = (run.ended_ns - run.started_ns) / 1e9
        self.latency.observe(queue_s, run_s, (time.monotonic_ns() - job.arrived_ns) / 1e9)
        try:
            frames = protocol.encode_reply(job.request_id, fields, outputs)
        except EdgedError as exc:
            job.fail(exc)
            return
        job.replied = True
        job.send(frames)
