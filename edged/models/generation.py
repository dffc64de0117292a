"""Scheduling for language models: up to ``parallel`` generations (or one embedding) at a time.

A generative model's context holds ``parallel`` sequences (``slots.SlotDecoder``): its thread
decodes every running generation in one batch per token, and a job joins or leaves between two
steps. Jobs beyond the free slots wait in a bounded queue (``BUSY`` beyond ``queue_depth``).
Generated text streams back as it comes: the thread appends pieces to the job and wakes the
event loop at most once per ``stream_interval_ms`` (the first piece at once), so tokens that
come faster share a message instead of each paying for a wake-up that would slow the model's
own thread.
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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

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
from edged.models.calls import Chat, ChatMessage, Embed, Generate, Inference, Sampling, TextRequest
from edged.models.latency import RequestLatency
from edged.models.runner import FairShare, IdleWaiters, fail_logged, run_failed
from edged.models.sampler import TokenSampler
from edged.models.slots import Piece, SlotDecoder
from edged.models.validation import Interface
from edged.replies import ReplyTo

log = logging.getLogger(__name__)

CANCELLED = "cancelled"
#: what a warm-up or a self-test asks of a model: one token, or one embedding
WARM_UP_PROMPT = "hello"
WARM_UP = Sampling(max_tokens=1, temperature=0.0, top_p=1.0, seed=0)


class TextBackend(Protocol):
    """A loaded language model. ``tokenize``, ``chat_tokens`` and ``sampler`` run on the event
    loop, the rest on the model's thread; ``decoder`` is ``None`` for an embedding model."""

    @property
    def n_ctx(self) -> int: ...

    @property
    def n_batch(self) -> int: ...

    @property
    def embedding(self) -> bool: ...

    @property
    def parallel(self) -> int: ...

    @property
    def decoder(self) -> SlotDecoder | None: ...

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]: ...

    def chat_tokens(self, messages: Sequence[ChatMessage]) -> list[int]: ...

    def sampler(self, sampling: Sampling) -> TokenSampler: ...

    def stream(self, tokens: list[int], sampling: Sampling) -> Iterator[Piece]: ...

    def embed(self, texts: tuple[str, ...]) -> np.ndarray[Any, Any]: ...

    def describe(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


@dataclass(eq=False)
class TextJob:
    """One admitted ``generate``, ``chat`` or ``embed`` request."""

    request: TextRequest | Embed
    peer: bytes
    reply: ReplyTo
    arrived_ns: int
    deadline_ns: int | None
    #: the prompt's tokens (generate), to hand to the model as they are
    prompt_tokens: list[int]
    #: tokens read: the prompt's (generate) or all texts' together (embed)
    prompt_count: int
    #: the generation's sampler chain, until the model's thread takes it
    sampler: TokenSampler | None = None
    #: set on the loop, read by the model's thread between tokens
    cancelled: bool = False
    replied: bool = False
    #: pieces the model's thread produced and the loop has not sent yet (deque: thread-safe)
    pending: deque[Piece] = field(default_factory=deque)
    flush_scheduled: bool = False
    posted_ns: int = 0
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
    #: generations (or one embedding) running now: at most ``parallel``
    in_flight: int
    requests: int
    busy_rejections: int
    deadline_misses: int
    cancelled: int
    clients_gone: int
    failures: int
    generated_tokens: int

    @property
    def runs_by_mode(self) -> dict[str, int]:
        """None counted: a language model's jobs all run on its thread."""
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
    """Serves a GGUF model: ``generate`` and ``chat`` (streamed, ``parallel`` at a time) or
    ``embed`` (one at a time)."""

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
        self.ops = frozenset({"embed"} if backend.embedding else {"generate", "chat"})
        self._loop = loop
        self._queue: deque[TextJob] = deque()
        self._running: list[TextJob] = []
        self._progress_ns = 0  # when a running job started or last streamed
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
        return bool(self._queue) or bool(self._running)

    def stalled_ns(self, now_ns: int) -> int:
        """How long the running jobs have gone without producing a token (0 when idle)."""
        return now_ns - self._progress_ns if self._running else 0

    def unsupported(self, op: str) -> OpNotSupported:
        if op == "embed":
            return OpNotSupported(
                f"model {self.name!r} is a generative model: use generate or chat, not embed"
            )
        if op in ("generate", "chat"):
            return OpNotSupported(f"model {self.name!r} is an embedding model: use embed")
        return OpNotSupported(
            f"model {self.name!r} is a GGUF language model: use generate, chat or embed, not {op}"
        )

    def submit(self, request: Inference, reply: ReplyTo, peer: bytes) -> None:
        """Check and queue a ``generate``, ``chat`` or ``embed`` request, or refuse it at
        once."""
        if not isinstance(request, (TextRequest, Embed)):
            raise self.unsupported(request.op)
        self._counters.requests += 1
        tokens, count = self._admit(request)
        sampler = None if isinstance(request, Embed) else self.backend.sampler(request.sampling)
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
        self._queue.append(TextJob(request, peer, reply, now, deadline_ns, tokens, count, sampler))
        self._fair.add(peer)
        self._next()

    def pump(self) -> None:
        """Start the next job if the model is free (``submit`` already does: nothing waits to
        form a batch)."""
        self._next()

    def cancel(self, peer: bytes, request_id: int) -> bool:
        """Stop the job ``request_id`` of ``peer``; ``False`` if it is neither queued nor
        running. A queued job ends at once, a running one at its next token."""
        for running in self._running:
            if (running.peer, running.request.id) == (peer, request_id):
                if running.cancelled:
                    return False
                running.cancelled = True
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
        for job in [*self._queue, *self._running]:
            self._fail(job, error)
        self._queue.clear()
        self._fair.queued.clear()

    def close(self) -> None:
        for job in self._running:
            job.cancelled = True
        self._inbox.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)
        self.backend.close()

    def statistics(self) -> GenerationStatistics:
        c = self._counters
        return GenerationStatistics(
            queued=len(self._queue),
            in_flight=len(self._running),
            requests=c.requests,
            busy_rejections=c.busy_rejections,
            deadline_misses=c.deadline_misses,
            cancelled=c.cancelled,
            clients_gone=c.clients_gone,
            failures=c.failures,
            generated_tokens=c.generated_tokens,
        )

    def describe(self) -> dict[str, Any]:
        slots = {"total": self.backend.parallel, "busy": len(self._running)}
        return {"ops": sorted(self.ops), "llm": self.backend.describe(), "slots": slots}

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

    def _admit(self, request: TextRequest | Embed) -> tuple[list[int], int]:
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
        if isinstance(request, Chat):
            tokens = backend.chat_tokens(request.messages)
        else:
            assert isinstance(request, Generate)
            tokens = backend.tokenize(request.prompt)
        if len(tokens) + max_tokens > n_ctx:
            raise ContextOverflow(
                f"the prompt is {len(tokens)} tokens and max_tokens is {max_tokens}: "
                f"{len(tokens) + max_tokens} exceed model {self.name!r}'s n_ctx {n_ctx}"
            )
        return tokens, len(tokens)

    def _next(self) -> None:
        """Start the oldest queued jobs whose deadlines have not passed, while slots are free."""
        while len(self._running) < self.backend.parallel and self._queue:
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
            self._running.append(job)
            self._inbox.put(job)
        if not self._running and self._idle:
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
        text, tokens, logprobs = [], 0, list[dict[str, Any]]()
        while job.pending:
            piece = job.pending.popleft()
            text.append(piece.text)
            tokens += piece.tokens
            logprobs.extend(piece.logprobs)
        if job.replied or not (tokens or any(text)):
            return
        job.tokens += tokens
        fields: dict[str, Any] = {"more": True, "text": "".join(text), "tokens": tokens}
        if logprobs:
            fields["logprobs"] = logprobs
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
        self._running.remove(job)
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
        decoder = self.backend.decoder
        if decoder is None:
            self._serve_embeddings()
            return
        try:
            self._serve_generations(decoder)
        finally:
            decoder.stop_all()

    def _serve_embeddings(self) -> None:
        while (job := self._inbox.get()) is not None:
            assert isinstance(job.request, Embed)
            try:
                job.embedding = self.backend.embed(job.request.texts)
            except Exception as exc:  # any backend failure becomes this job's error reply
                job.error = run_failed(self.name, exc)
            if not self._end(job):
                return

    def _serve_generations(self, decoder: SlotDecoder) -> None:
        """Decode step after step while any generation runs, taking new ones between steps."""
        running: list[TextJob] = []
        while self._take(decoder, running):
            for job in [job for job in running if job.cancelled]:
                decoder.stop(job)
                job.finish_reason = CANCELLED
                running.remove(job)
                if not self._end(job):
                    return
            if not running:
                continue
            try:
                pieces = decoder.step()
            except Exception as exc:  # a failed decode fails every generation in the batch
                error = run_failed(self.name, exc)
                decoder.stop_all()
                for job in running:
                    job.error = error
                running_now, running[:] = list(running), []
                if not all(self._end(job) for job in running_now):
                    return
                continue
            for key, piece in pieces:
                job = cast(TextJob, key)
                if not self._deliver(job, piece):
                    return
                if piece.finish_reason is not None:
                    running.remove(job)
                    if not self._end(job):
                        return

    def _take(self, decoder: SlotDecoder, running: list[TextJob]) -> bool:
        """Start the jobs the loop has sent, waiting for one when none runs; ``False`` once
        the runner closes."""
        block = not running
        while True:
            try:
                job = self._inbox.get(block=block)
            except queue.Empty:
                return True
            if job is None:
                return False
            assert isinstance(job.request, TextRequest) and job.sampler is not None
            decoder.start(job, job.prompt_tokens, job.sampler, job.request.sampling)
            job.sampler = None  # the decoder frees it when the generation ends
            running.append(job)
            block = False

    def _deliver(self, job: TextJob, piece: Piece) -> bool:
        """Queue ``piece`` for the loop, waking it at most once per stream interval."""
        if job.cancelled:
            return True  # stopped before the next step
        now = time.monotonic_ns()
        if piece.tokens:
            job.first_token_ns = job.first_token_ns or now
            job.last_token_ns = now
        if piece.finish_reason is not None:
            job.finish_reason = piece.finish_reason
        job.pending.append(piece)
        interval_ns = int(self.config.gguf.stream_interval_ms * 1e6)
        if job.flush_scheduled or now - job.posted_ns < interval_ns or piece.finish_reason:
            return True
        job.flush_scheduled, job.posted_ns = True, now
        return self._post(self._flush, job)

    def _end(self, job: TextJob) -> bool:
        job.ended_ns = time.monotonic_ns()
        return self._post(self._finished, job)

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
