"""Per-model scheduling: a bounded admission queue, dynamic batching, and where runs happen.

Each model gets one dedicated run thread (onnxruntime releases the GIL while it computes), so a
slow model never blocks the event loop or another model. A batch whose run is expected to take
less than ``inline_max_us`` runs on the event-loop thread instead: for tiny models the thread hop
costs more than the run. The expectation is the recent runs' time, scaled up by how much larger
the batch is than the recent runs were, so one huge request to a tiny model still goes to the
thread. Every job is answered exactly once (``Job.replied`` guards it).

Each connection gets a fair share of a model's queue (``FairShare``): a client that floods is
refused ``BUSY`` while one that keeps a request or two outstanding is still admitted.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np

from edged.config import ModelConfig
from edged.errors import BusyError, DeadlineExceeded, EdgedError, OpNotSupported, RunFailed
from edged.logsetup import log_error_reply
from edged.models import batching
from edged.models.backend import Arrays, Backend
from edged.models.calls import Embed, Infer, Inference
from edged.models.latency import RequestLatency
from edged.models.text_encoder import EmbeddingReply
from edged.models.validation import Interface, rehearse_tensors
from edged.replies import OutputShape, ReplyTo
from edged.requests import InferenceRequest

Outputs = dict[str, np.ndarray[Any, Any]]
#: a partial batch waiting for rows is started this long before its earliest deadline
DEADLINE_MARGIN_NS = 1_000_000
EWMA_WEIGHT = 0.1
#: a single slow (or large) run moves the estimates by at most this much
EWMA_CLAMP = 2.0
#: requests a connection may keep queued on a model whatever its share (room permitting)
FAIR_FLOOR = 2


def run_failed(name: str, exc: Exception) -> RunFailed:
    """The error to reply for a backend's failure (its reply is logged, ``log_error_reply``)."""
    return RunFailed(f"model {name!r} failed to run: {str(exc).strip()[:500]}")


class Failable(Protocol):
    """A queued request of either kind: answered once, with a result or an error."""

    replied: bool

    def fail(self, error: EdgedError) -> None: ...


def fail_logged(
    job: Failable,
    error: EdgedError,
    model: tuple[str, int],
    trace: str | None,
    request_id: int,
) -> None:
    """Answer ``job`` with ``error`` (once), logged with the fields the journal indexes;
    ``model`` is its (name, version)."""
    if not job.replied:
        name, version = model
        log_error_reply(
            error.code,
            error.message,
            model=name,
            version=version,
            trace=trace,
            request_id=request_id,
        )
        job.fail(error)


class Queued(Protocol):
    @property
    def peer(self) -> bytes: ...


QueuedJob = TypeVar("QueuedJob", bound=Queued)


class FairShare:
    """Each connection's share of a model's queue: ``queue_depth`` split evenly between the
    connections (ROUTER peers) with requests queued, never below ``FAIR_FLOOR``.

    A connection at its share is refused ``BUSY``. When the queue is full, a connection below
    its share still gets in: the newest queued request of a connection above its share is
    answered ``BUSY`` to make room (longest-queue drop), so a flood can never lock another
    client out and the queue never exceeds ``queue_depth``. Costs a dict update per request.
    """

    __slots__ = ("queued",)

    def __init__(self) -> None:
        #: requests queued per connection; connections with none are not in it
        self.queued: dict[bytes, int] = {}

    def share(self, depth: int, peer: bytes) -> int:
        """How many requests ``peer`` may have queued, counting it among the active."""
        active = len(self.queued) + (peer not in self.queued)
        return max(FAIR_FLOOR, depth // active)

    def add(self, peer: bytes) -> None:
        self.queued[peer] = self.queued.get(peer, 0) + 1

    def remove(self, peer: bytes) -> None:
        count = self.queued.get(peer, 0) - 1
        if count > 0:
            self.queued[peer] = count
        else:
            self.queued.pop(peer, None)

    def admit(
        self, name: str, queue: Sequence[QueuedJob], depth: int, peer: bytes
    ) -> tuple[QueuedJob, BusyError] | None:
        """Check that ``peer`` may queue one more request on model ``name``: raise its
        ``BUSY``; or return the queued job to refuse, and how, to make room for it; or ``None``
        when there is room."""
        share = self.share(depth, peer)
        if self.queued.get(peer, 0) >= share:
            raise self._refusal(name, peer, depth, share)
        if len(queue) < depth:
            return None
        queued = self.queued
        victim = next((job for job in reversed(queue) if queued[job.peer] > share), None)
        if victim is None:
            raise BusyError(
                f"model {name!r} has {len(queue)} requests queued (queue_depth {depth}); "
                "retry later"
            )
        return victim, self._refusal(name, victim.peer, depth, share)

    def _refusal(self, name: str, peer: bytes, depth: int, share: int) -> BusyError:
        return BusyError(
            f"model {name!r}: this connection has {self.queued.get(peer, 0)} requests queued, "
            f"its share ({share}) of queue_depth {depth} among {len(self.queued)} connections; "
            "retry later"
        )


@dataclass(slots=True, eq=False)
class Job:
    """One admitted request waiting for, or in, a run."""

    request_id: int
    trace: str | None
    inputs: Arrays
    reply: ReplyTo
    arrived_ns: int
    deadline_ns: int | None
    #: the connection it came from (its fair share of the queue)
    peer: bytes = b""
    replied: bool = False
    #: sees the outputs before they are sent (a shadow comparison)
    observe: Callable[[Outputs], None] | None = None

    def fail(self, error: EdgedError) -> None:
        if not self.replied:
            self.replied = True
            self.reply.fail(error)


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
    threaded_runs: int
    recent_run_us: float | None

    @property
    def runs_by_mode(self) -> dict[str, int]:
        """Runs on the event-loop thread (inline) and on the model's thread."""
        return {"inline": self.inline_runs, "threaded": self.threaded_runs}

    @property
    def generated_tokens(self) -> None:
        """None: a tensor model generates no tokens."""
        return None


@dataclass
class _Counters:
    requests: int = 0
    busy_rejections: int = 0
    deadline_misses: int = 0
    failures: int = 0
    runs: int = 0
    rows: int = 0
    inline_runs: int = 0
    threaded_runs: int = 0


@dataclass(slots=True)
class _Run:
    jobs: list[Job]
    #: when the backend began the run: on a model's thread, after the hand-off to it, which is
    #: queueing, not running (a run time with it in would keep a tiny model off the loop for
    #: good on a box whose thread wake-ups take longer than ``inline_max_us``)
    started_ns: int
    #: the inputs' bytes, what the run time is scaled by
    nbytes: int
    outputs: Outputs | None = None
    error: EdgedError | None = None
    ended_ns: int = 0


class ModelRunner:
    """Serves an ONNX model: ``infer`` requests, batched, run on the model's thread or inline."""

    def __init__(
        self,
        name: str,
        version: int,
        backend: Backend,
        config: ModelConfig,
        loop: asyncio.AbstractEventLoop,
        *,
        profile: Callable[[Arrays, Outputs], None] | None = None,
    ) -> None:
        self.name = name
        self.version = version
        self.backend = backend
        self.config = config
        self.batching = config.max_batch > 1 and backend.signature.batchable
        self.ops = frozenset({"infer", "embed"} if backend.text else {"infer"})
        self._loop = loop
        self._queue: deque[Job] = deque()
        self._in_flight: list[Job] = []
        self._in_flight_since_ns = 0
        self._inbox: queue.SimpleQueue[_Run | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name=f"run-{name}", daemon=True)
        self._timer: asyncio.TimerHandle | None = None
        self._recent_run_us: float | None = None
        self._recent_bytes = 1.0  # bytes of the runs behind _recent_run_us (moving average)
        self._fair = FairShare()
        self._buffers = batching.AlignedBuffers()
        self._with_deadline = 0  # queued jobs that carry a deadline: skip the scan when none
        self._draining = False
        self._idle = IdleWaiters(loop)
        self._counters = _Counters()
        self.latency = RequestLatency()
        #: sees each reply's inputs and outputs (drift monitoring, ``edged.drift``), if set
        self.profile = profile

    def start(self) -> None:
        self._thread.start()

    @property
    def busy(self) -> bool:
        return bool(self._queue or self._in_flight)

    def stalled_ns(self, now_ns: int) -> int:
        """How long the run on the model's thread has been going (0 when none is)."""
        return now_ns - self._in_flight_since_ns if self._in_flight else 0

    def unsupported(self, op: str) -> OpNotSupported:
        ops = " or ".join(sorted(self.ops))
        return OpNotSupported(f"model {self.name!r} is an ONNX model: use {ops}, not {op}")

    def submit(self, request: Inference, reply: ReplyTo, peer: bytes) -> None:
        """Check an ``infer`` request's inputs (or tokenize an ``embed`` request's texts, for
        a text encoder) and admit it (``admit``)."""
        text = self.backend.text
        if isinstance(request, Embed) and text is not None:
            inputs, mask = text.encode(self.name, request.texts)
            self.admit(self.job(request, inputs, EmbeddingReply(reply, text, mask), peer))
            return
        if not isinstance(request, Infer):
            raise self.unsupported(request.op)
        self.admit(self.job(request, request.inputs, reply, peer))

    def job(self, request: InferenceRequest, inputs: Arrays, reply: ReplyTo, peer: bytes) -> Job:
        """The job for a request, once its inputs match the signature."""
        self.backend.signature.check(self.name, inputs)
        now = time.monotonic_ns()
        deadline = request.deadline_ms
        deadline_ns = None if deadline is None else now + int(deadline * 1e6)
        return Job(request.id, request.trace, inputs, reply, now, deadline_ns, peer)

    def admit(self, job: Job) -> None:
        """Admit a job or refuse it at once (``FairShare``); runs start on the next ``pump``."""
        self._counters.requests += 1
        try:
            displaced = self._fair.admit(self.name, self._queue, self.config.queue_depth, job.peer)
        except BusyError:
            self._counters.busy_rejections += 1
            raise
        if displaced is not None:
            self._counters.busy_rejections += 1
            self._remove(displaced[0])
            self._fail(*displaced)
        self._queue.append(job)
        self._fair.add(job.peer)
        if job.deadline_ns is not None:
            self._with_deadline += 1

    def pump(self) -> None:
        """Start runs while the model is free and a batch is ready."""
        while not self._in_flight and self._queue:
            jobs = self._take_batch()
            if jobs is None:
                break
            nbytes = sum(array.nbytes for job in jobs for array in job.inputs.values())
            run = _Run(jobs, time.monotonic_ns(), nbytes)
            if self._runs_inline(nbytes):
                self._counters.inline_runs += 1
                self._execute(run)
                self._finish(run)
            else:
                self._counters.threaded_runs += 1
                self._in_flight, self._in_flight_since_ns = jobs, run.started_ns
                self._inbox.put(run)
        if self._idle and not self._in_flight and not self._queue:
            self._idle.release()

    def cancel(self, peer: bytes, request_id: int) -> bool:
        """``False``: a tensor run is short and not cancellable (``cancel`` names generate and
        embed requests)."""
        return False

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
            self._fail(job, error)
        self._queue.clear()
        self._fair.queued.clear()
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
            threaded_runs=c.threaded_runs,
            recent_run_us=self._recent_run_us,
        )

    def describe(self) -> dict[str, Any]:
        signature = self.backend.signature
        return {
            "ops": sorted(self.ops),
            "signature": {
                "inputs": [spec.describe() for spec in signature.inputs],
                "outputs": [spec.describe() for spec in signature.outputs],
            },
            "max_batch": self.config.max_batch if self.batching else 1,
            **self.config.pipeline.describe(),
            **({"embed": self.backend.text.describe()} if self.backend.text else {}),
        }

    def interface(self) -> Interface:
        return self.backend.signature

    def warnings(self) -> tuple[str, ...]:
        if self.config.max_batch > 1 and not self.batching:
            inputs = "; ".join(str(spec) for spec in self.backend.signature.inputs)
            return (
                f"max_batch {self.config.max_batch} has no effect: batching needs a dynamic "
                f"leading (batch) dimension on every input and output, and the model takes "
                f"{inputs}; it runs one request at a time",
            )
        return ()

    def rehearse(self) -> None:
        """A warm-up run, checked against the golden vectors when the version ships them."""
        rehearse_tensors(self.name, self.backend, self.config.path)

    async def probe(self) -> None:
        """``rehearse`` on a thread of its own: onnxruntime runs concurrent requests safely."""
        from edged.models.loading import in_fresh_thread  # loading imports this module

        await in_fresh_thread(self.rehearse)

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
        self._fair.remove(job.peer)
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
            error = DeadlineExceeded(f"deadline passed after {waited_ms:.1f} ms in the queue")
            self._fail(job, error)

    def _fail(self, job: Job, error: EdgedError) -> None:
        fail_logged(job, error, (self.name, self.version), job.trace, job.request_id)

    # -- running ---------------------------------------------------------------------------

    def _runs_inline(self, nbytes: int) -> bool:
        """Whether a run of ``nbytes`` of inputs is expected to end within ``inline_max_us``:
        the recent runs' time, scaled up by how much larger this batch is than theirs."""
        recent, limit = self._recent_run_us, self.config.inline_max_us
        if recent is None or recent >= limit:
            return False
        return recent * max(1.0, nbytes / self._recent_bytes) < limit

    def _work(self) -> None:
        while (run := self._inbox.get()) is not None:
            self._execute(run)
            try:
                self._loop.call_soon_threadsafe(self._finish_threaded, run)
            except RuntimeError:  # the loop closed under us during shutdown
                return
            del run  # not held while waiting: its inputs may be views on a client's region

    def _execute(self, run: _Run) -> None:
        merged = batching.merge([job.inputs for job in run.jobs], self._buffers)
        first = run.jobs[0]  # one attribute test per run: almost no request places outputs
        into = (
            self._placed_outputs(first)
            if first.reply.places_outputs and len(run.jobs) == 1
            else None
        )
        run.started_ns = time.monotonic_ns()
        try:
            run.outputs = self.backend.run(merged, into) if into else self.backend.run(merged)
        except Exception as exc:  # any backend failure becomes this batch's error reply
            run.error = run_failed(self.name, exc)
        run.ended_ns = time.monotonic_ns()

    def _placed_outputs(self, job: Job) -> dict[str, np.ndarray[Any, Any]]:
        """Where a request that runs alone wants outputs written by the run itself, given what
        is known of their shapes before the run (a batchable model's rows are the request's)."""
        signature = self.backend.signature
        rows = batching.batch_rows(job.inputs)
        shapes: dict[str, OutputShape] = {}
        for spec in signature.outputs:
            dims = spec.shape
            if signature.batchable and dims and dims[0] is None:
                dims = (rows, *dims[1:])
            shapes[spec.name] = (spec.dtype, dims)
        return job.reply.place(shapes)

    def _finish_threaded(self, run: _Run) -> None:
        self._in_flight = []
        self._finish(run)
        self.pump()

    def _finish(self, run: _Run) -> None:
        """Reply to the run's jobs, then account for it: on a box with few cores the reply's
        way out (libzmq's I/O thread, the client) needs the CPU more than the bookkeeping."""
        rows = [batching.batch_rows(job.inputs) for job in run.jobs]
        parts: list[Outputs] = []
        if run.outputs is not None:
            try:
                parts = batching.split(run.outputs, rows)
            except ValueError as exc:
                run.error = RunFailed(f"model {self.name!r}: cannot split batch: {exc}")
        c = self._counters
        if run.error is not None:
            c.failures += len(run.jobs)
            for job in run.jobs:
                self._fail(job, run.error)
        else:
            for job, outputs in zip(run.jobs, parts, strict=True):
                self._reply(job, outputs, run)
            if self.profile is not None:  # after the replies: it only queues them
                for job, outputs in zip(run.jobs, parts, strict=True):
                    self.profile(job.inputs, outputs)
        self._observe_run((run.ended_ns - run.started_ns) / 1000, max(run.nbytes, 1))
        c.runs += 1
        c.rows += sum(rows)
        self.latency.batch.observe(len(run.jobs))

    def _observe_run(self, run_us: float, nbytes: int) -> None:
        """Move the recent run time and size towards this run's; one outlier moves neither
        by more than ``EWMA_CLAMP`` times."""
        recent = self._recent_run_us
        if recent is None:
            self._recent_run_us, self._recent_bytes = run_us, nbytes
            return
        sample = min(run_us, EWMA_CLAMP * max(recent, self.config.inline_max_us))
        self._recent_run_us = recent + EWMA_WEIGHT * (sample - recent)
        size = self._recent_bytes
        self._recent_bytes = size + EWMA_WEIGHT * (min(nbytes, EWMA_CLAMP * size) - size)

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
        if job.observe is not None:
            job.observe(outputs)
        total_s = (time.monotonic_ns() - job.arrived_ns) / 1e9
        job.replied = True
        job.reply.ok(fields, outputs)
        queue_s = (run.started_ns - job.arrived_ns) / 1e9
        self.latency.observe(queue_s, (run.ended_ns - run.started_ns) / 1e9, total_s)
