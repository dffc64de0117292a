"""Scheduling for language models: one generation (or embedding) per loaded context at a time.

A llama.cpp context holds one sequence's KV cache, so a model runs one job at a time on its own
thread while later ones wait in a bounded queue (``BUSY`` beyond ``queue_depth``). Generated
text streams back as it comes: the thread appends pieces to the job and wakes the event loop
at most once per ``stream_interval_ms`` (the first piece at once), so tokens that come faster
share a message instead of each paying for a wake-up that would slow the model's own thread.
A job stops between tokens when it is cancelled, when its client has gone (a send finds no
peer), or when the daemon aborts it. Each connection gets a fair share of the queue, as for
ONNX models (``runner.FairShare``).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from edged.config import ModelConfig
from edged.errors import (
    BusyError,
    Cancelled,
    ContextOverflow,
    DeadlineExceeded,
    EdgedError,
    OpNotSupported,
    SwapRejected,
)
from edged.logsetup import log_fields
from edged.models.calls import Embed, Generate, Inference, Sampling
from edged.models.latency import RequestLatency
from edged.models.runner import FairShare, IdleWaiters, fail_logged, run_failed
from edged.models.validation import Interface
from edged.replies import ReplyTo

log = logging.getLogger(__name__)

CANCELLED = "cancelled"
#: what a warm-up or a self-test asks of a model: one token, or one embedding
WARM_UP_PROMPT = "hello"
WARM_UP = Sampling(max_tokens=1, temperature=0.0, top_p=1.0, seed=0)


@dataclass(frozen=True, slots=True)
class Piece:
    """Text decoded from ``tokens`` new tokens; the last piece of a stream has a reason."""

    text: str
    tokens: int
    finish_reason: str | None = None


class TextBackend(Protocol):
    """A loaded language model; everything but ``tokenize`` runs on the model's thread."""

    @property
    def n_ctx(self) -> int: ...

    @property
    def n_batch(self) -> int: ...

    @property
    def embedding(self) -> bool: ...

    def tokenize(self, text: str) -> list[int]: ...

    def stream(self, tokens: list[int], sampling: Sampling) -> Iterator[Piece]: ...

    def embed(self, texts: tuple[str, ...]) -> np.ndarray[Any, Any]: ...

    def describe(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


@dataclass(eq=False)
class TextJob:
    """One admitted ``generate`` or ``embed`` request."""

    request: Generate | Embed
    peer: bytes
    reply: ReplyTo
    arrived_ns: int
    deadline_ns: int | None
    #: the prompt's tokens (generate), to hand to the model as they are
    prompt_tokens: list[int]
    #: tokens read: the prompt's (generate) or all texts' together (embed)
    prompt_count: int
    #: set on the loop, read by the model's thread between tokens
    cancelled: bool = False
    replied: bool = False
    #: pieces the model's thread produced and the loop has not sent yet (deque: thread-safe)
    pending: deque[Piece] = field(default_factory=deque)
    flush_scheduled: bool = False
    started_ns: int = 0
    first_token_ns: int = 0
    last_token_ns: int = 0
    ended_ns: int = 0
    tokens: int = 0
    finish_reason: str | None = None
    error: EdgedError | None = None
    embedding: np.ndarray[Any, Any] | None = None

    def fail(self, error: EdgedError) -> None:
        if not self.replied:
            self.replied = True
            self.cancelled = True
            self.reply.fail(error)


@dataclass(frozen=True)
class GenerationStatistics:
    queued: int
    running: bool
    requests: int
    busy_rejections: int
    deadline_misses: int
    cancelled: int
    clients_gone: int
    failures: int
    generated_tokens: int

    @property
    def runs_by_mode(self) -> dict[str, int]:
        """None counted: a language model runs one job at a time, always on its thread."""
        return {}


@dataclass
class _Counters:
    requests: int = 0
    busy_rejections: int = 0
    deadline_misses: int = 0
    cancelled: int = 0
    clients_gone: int = 0
    failures: int = 0
    generated_tokens: int = 0


class GenerationRunner:
    """Serves a GGUF model: ``generate`` (streamed) or ``embed``, one job at a time."""

    def __init__(
        self,
        name: str,
        version: int,
        backend: TextBackend,
        config: ModelConfig,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.name = name
        self.version = version
        self.backend = backend
        self.config = config
        self.ops = frozenset({"embed" if backend.embedding else "generate"})
        self._loop = loop
        self._queue: deque[TextJob] = deque()
        self._current: TextJob | None = None
        self._progress_ns = 0  # when the current job started or last streamed
        self._inbox: queue.SimpleQueue[TextJob | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name=f"gen-{name}", daemon=True)
        self._idle = IdleWaiters(loop)
        self._counters = _Counters()
        self._fair = FairShare()
        self.latency = RequestLatency()

    def start(self) -> None:
        self._thread.start()

    @property
    def busy(self) -> bool:
        return bool(self._queue) or self._current is not None

    def stalled_ns(self, now_ns: int) -> int:
        """How long the current job has gone without producing a token (0 when idle)."""
        return now_ns - self._progress_ns if self._current is not None else 0

    def unsupported(self, op: str) -> OpNotSupported:
        if op == "embed":
            return OpNotSupported(
                f"model {self.name!r} is a generative model: use generate, not embed"
            )
        if op == "generate":
            return OpNotSupported(f"model {self.name!r} is an embedding model: use embed")
        return OpNotSupported(
            f"model {self.name!r} is a GGUF language model: use generate or embed, not {op}"
        )

    def submit(self, request: Inference, reply: ReplyTo, peer: bytes) -> None:
        """Check and queue a ``generate`` or ``embed`` request, or refuse it at once."""
        if not isinstance(request, (Generate, Embed)):
            raise self.unsupported(request.op)
        self._counters.requests += 1
        tokens, count = self._admit(request)
        try:
            displaced = self._fair.admit(self.name, self._queue, self.config.queue_depth, peer)
        except BusyError:
            self._counters.busy_rejections += 1
            raise
        if displaced is not None:
            self._counters.busy_rejections += 1
            self._unqueue(displaced[0])
            self._fail(*displaced)
        now = time.monotonic_ns()
        deadline = request.deadline_ms
        deadline_ns = None if deadline is None else now + int(deadline * 1e6)
        self._queue.append(TextJob(request, peer, reply, now, deadline_ns, tokens, count))
        self._fair.add(peer)
        self._next()

    def pump(self) -> None:
        """Start the next job if the model is free (``submit`` already does: nothing waits to
        form a batch)."""
        self._next()

    def cancel(self, peer: bytes, request_id: int) -> bool:
        """Stop the job ``request_id`` of ``peer``; ``False`` if it is neither queued nor
        running. A queued job ends at once, a running one at its next token."""
        current = self._current
        if current is not None and (current.peer, current.request.id) == (peer, request_id):
            if current.cancelled:
                return False
            current.cancelled = True
            self._counters.cancelled += 1
            return True
        for job in self._queue:
            if (job.peer, job.request.id) == (peer, request_id):
                self._unqueue(job)
                self._counters.cancelled += 1
                job.cancelled = True
                self._reply_final(job)
                return True
        return False

    async def drained(self) -> None:
        waiter = self._idle.add()
        self._next()
        await waiter

    def abort(self, error: EdgedError) -> None:
        """Answer every queued and running job with ``error`` (after a drain timed out)."""
        for job in [*self._queue, *([self._current] if self._current else [])]:
            self._fail(job, error)
        self._queue.clear()
        self._fair.queued.clear()

    def close(self) -> None:
        if self._current is not None:
            self._current.cancelled = True
        self._inbox.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)
        self.backend.close()

    def statistics(self) -> GenerationStatistics:
        c = self._counters
        return GenerationStatistics(
            queued=len(self._queue),
            running=self._current is not None,
            requests=c.requests,
            busy_rejections=c.busy_rejections,
            deadline_misses=c.deadline_misses,
            cancelled=c.cancelled,
            clients_gone=c.clients_gone,
            failures=c.failures,
            generated_tokens=c.generated_tokens,
        )

    def describe(self) -> dict[str, Any]:
        return {"ops": sorted(self.ops), "llm": self.backend.describe()}

    def interface(self) -> Interface:
        backend = self.backend
        return ("embed", backend.describe()["n_embd"]) if backend.embedding else ("generate",)

    def warnings(self) -> tuple[str, ...]:
        return ()

    def rehearse(self) -> None:
        """One token (or one embedding) straight on the backend (blocking: runs before the
        version gets any traffic, so nothing else uses its context meanwhile)."""
        backend = self.backend
        try:
            if backend.embedding:
                backend.embed((WARM_UP_PROMPT,))
            else:
                list(backend.stream(backend.tokenize(WARM_UP_PROMPT), WARM_UP))
        except Exception as exc:  # any failure here means the version cannot serve
            raise SwapRejected(
                f"model {self.name!r}: the new version's warm-up failed: {exc}"
            ) from None

    async def probe(self) -> None:
        """One token (or one embedding) through the model's own queue: its context is never
        used from two threads at once."""
        done: asyncio.Future[None] = self._loop.create_future()
        if self.backend.embedding:
            probe: Inference = Embed(id=0, op="embed", model=self.name, texts=(WARM_UP_PROMPT,))
        else:
            probe = Generate(
                id=0, op="generate", model=self.name, prompt=WARM_UP_PROMPT, sampling=WARM_UP
            )
        self.submit(probe, _Outcome(done), b"selftest")
        await done

    # -- on the event loop ----------------------------------------------------------------

    def _admit(self, request: Generate | Embed) -> tuple[list[int], int]:
        """Check the prompt against the context; the prompt's tokens and how many tokens the
        request reads."""
        backend, n_ctx = self.backend, self.backend.n_ctx
        if isinstance(request, Embed):
            limit = min(n_ctx, backend.n_batch)  # llama.cpp embeds a text in one batch
            total = 0
            for index, text in enumerate(request.texts):
                count = len(backend.tokenize(text))
                if count > limit:
                    raise ContextOverflow(
                        f"input[{index}] is {count} tokens; model {self.name!r} embeds at most "
                        f"{limit} (n_ctx {n_ctx}, n_batch {backend.n_batch})"
                    )
                total += count
            return [], total
        max_tokens = request.sampling.max_tokens
        tokens = backend.tokenize(request.prompt)
        if len(tokens) + max_tokens > n_ctx:
            raise ContextOverflow(
                f"the prompt is {len(tokens)} tokens and max_tokens is {max_tokens}: "
                f"{len(tokens) + max_tokens} exceed model {self.name!r}'s n_ctx {n_ctx}"
            )
        return tokens, len(tokens)

    def _next(self) -> None:
        """Start the oldest queued job whose deadline has not passed, if the model is free."""
        while self._current is None and self._queue:
            job = self._queue[0]
            self._unqueue(job)
            now = time.monotonic_ns()
            if job.deadline_ns is not None and job.deadline_ns <= now:
                self._counters.deadline_misses += 1
                waited_ms = (now - job.arrived_ns) / 1e6
                error = DeadlineExceeded(f"deadline passed after {waited_ms:.1f} ms queued")
                self._fail(job, error)
                continue
            job.started_ns = self._progress_ns = now
            self._current = job
            self._inbox.put(job)
        if self._current is None and self._idle:
            self._idle.release()

    def _unqueue(self, job: TextJob) -> None:
        if job is self._queue[0]:
            self._queue.popleft()
        else:
            self._queue.remove(job)
        self._fair.remove(job.peer)

    def _fail(self, job: TextJob, error: EdgedError) -> None:
        fail_logged(job, error, (self.name, self.version), job.request.trace, job.request.id)

    def _flush(self, job: TextJob) -> None:
        """Send what the thread produced since the last flush as one partial reply."""
        job.flush_scheduled = False
        self._progress_ns = time.monotonic_ns()
        text, tokens = [], 0
        while job.pending:
            piece = job.pending.popleft()
            text.append(piece.text)
            tokens += piece.tokens
        if job.replied or not (tokens or any(text)):
            return
        job.tokens += tokens
        fields = {"more": True, "text": "".join(text), "tokens": tokens}
        if not job.reply.ok(fields) and not job.cancelled:
            trace = job.request.trace
            log.info(
                "model %s: client of request %d has gone; stopping [trace %s]",
                self.name,
                job.request.id,
                trace,
                extra=log_fields(model=self.name, version=self.version, trace=trace),
            )
            job.cancelled = True
            self._counters.clients_gone += 1

    def _finished(self, job: TextJob) -> None:
        self._flush(job)
        self._current = None
        self._counters.generated_tokens += job.tokens
        if job.error is not None:
            self._counters.failures += 1
            self._fail(job, job.error)
        else:
            self._reply_final(job)
        self._next()

    def _reply_final(self, job: TextJob) -> None:
        request = job.request
        if isinstance(request, Embed) and (job.cancelled or job.embedding is None):
            self._fail(job, Cancelled(f"embed request {request.id} was cancelled"))  # no result
            return
        if job.replied:
            return
        job.replied = True
        now = time.monotonic_ns()
        started = job.started_ns or now  # a queued job cancelled before it could start
        self.latency.observe(
            (started - job.arrived_ns) / 1e9,
            ((job.ended_ns or now) - started) / 1e9,
            (now - job.arrived_ns) / 1e9,
        )
        timing: dict[str, Any] = {
            "queue_us": (started - job.arrived_ns) // 1000,
            "run_us": ((job.ended_ns or now) - started) // 1000,
        }
        fields: dict[str, Any] = {"model": self.name, "version": self.version, "timing": timing}
        if job.embedding is not None:
            fields["usage"] = {"prompt_tokens": job.prompt_count}
            job.reply.ok(fields, {"embedding": job.embedding})
            return
        if job.first_token_ns:
            timing["ttft_us"] = (job.first_token_ns - job.started_ns) // 1000
            decode_s = (job.last_token_ns - job.first_token_ns) / 1e9
            timing["tokens_per_s"] = round((job.tokens - 1) / decode_s, 1) if decode_s else 0.0
        fields["finish_reason"] = CANCELLED if job.cancelled else job.finish_reason or CANCELLED
        fields["usage"] = {"prompt_tokens": job.prompt_count, "completion_tokens": job.tokens}
        job.reply.ok(fields)

    # -- on the model's thread -------------------------------------------------------------

    def _work(self) -> None:
        while (job := self._inbox.get()) is not None:
            try:
                request = job.request
                if isinstance(request, Embed):
                    job.embedding = self.backend.embed(request.texts)
                else:
                    self._generate(job, request)
            except Exception as exc:  # any backend failure becomes this job's error reply
                job.error = run_failed(self.name, exc)
            job.ended_ns = time.monotonic_ns()
            if not self._post(self._finished, job):
                return

    def _generate(self, job: TextJob, request: Generate) -> None:
        stream = self.backend.stream(job.prompt_tokens, request.sampling)
        interval_ns = int(self.config.gguf.stream_interval_ms * 1e6)
        posted_ns = 0  # the first piece goes at once
        try:
            for piece in stream:
                now = time.monotonic_ns()
                if piece.tokens:
                    job.first_token_ns = job.first_token_ns or now
                    job.last_token_ns = now
                if piece.finish_reason is not None:
                    job.finish_reason = piece.finish_reason
                if job.cancelled:
                    job.finish_reason = CANCELLED
                    break
                job.pending.append(piece)
                if not job.flush_scheduled and now - posted_ns >= interval_ns:
                    job.flush_scheduled, posted_ns = True, now
                    if not self._post(self._flush, job):
                        return
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()  # frees llama.cpp's sampler state at once, not at garbage collection

    def _post(self, callback: Callable[[TextJob], None], job: TextJob) -> bool:
        try:
            self._loop.call_soon_threadsafe(callback, job)
        except RuntimeError:  # the loop closed under us during shutdown
            return False
        return True


class _Outcome(ReplyTo):
    """Where a self-test probe's replies go: kept as they are, never encoded: the final one
    ends ``done``, an error as its exception."""

    __slots__ = ("_done",)

    def __init__(self, done: asyncio.Future[None]) -> None:
        super().__init__(lambda _: True, 0, None)
        self._done = done

    def ok(
        self,
        fields: dict[str, Any],
        outputs: Mapping[str, np.ndarray[Any, Any]] | None = None,
    ) -> bool:
        if not fields.get("more") and not self._done.done():
            self._done.set_result(None)
        return True

    def fail(self, error: EdgedError) -> bool:
        if not self._done.done():
            self._done.set_exception(error)
        return True
