"""Continuous batching: up to ``parallel`` generations share one llama.cpp context.

Each generation holds a slot: a sequence id with ``n_ctx`` cells of KV cache of its own (the
cache is not unified, so a sequence attends only to its own cells and its greedy text is what it
would be alone). Every step is one ``llama_decode`` holding the next token of each generating
sequence plus as much of the waiting prompts as the batch has room for, as llama.cpp's server
does: a request joins between two steps, and a long prompt is read over several. A slot keeps
the tokens its cache holds after its generation ends, and a new prompt takes the free slot that
shares its longest prefix, so a repeated system prompt is read once.

Everything here runs on the model's own thread.
"""

from __future__ import annotations

import codecs
import ctypes
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edged.models.calls import Sampling
from edged.models.sampler import TokenSampler


@dataclass(frozen=True, slots=True)
class Piece:
    """Text decoded from ``tokens`` new tokens; the last piece of a stream has a reason."""

    text: str
    tokens: int
    finish_reason: str | None = None
    #: each token's log-probabilities, when the request asked for them
    logprobs: tuple[dict[str, Any], ...] = ()


class StopScanner:
    """Cuts generated text at the first stop sequence, holding back any tail that could still
    become one, so that no part of a stop sequence is ever streamed to the client."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = stops
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Text that is safe to send now, and whether a stop sequence was found."""
        if not self._stops:
            return text, False
        held = self._held + text
        found = [held.index(stop) for stop in self._stops if stop in held]
        if found:
            self._held = ""
            return held[: min(found)], True
        keep = max(
            (n for stop in self._stops for n in range(1, len(stop)) if held.endswith(stop[:n])),
            default=0,
        )
        self._held = held[len(held) - keep :] if keep else ""
        return held[: len(held) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


@dataclass
class Slot:
    """A sequence id and the tokens its KV cells hold, in order."""

    seq_id: int
    cached: list[int] = field(default_factory=list)
    #: when it last served (a step count): of two free slots alike, the staler one is taken
    used: int = 0


@dataclass(eq=False)
class Sequence:
    """One generation in progress."""

    key: object
    slot: Slot
    sampler: TokenSampler
    sampling: Sampling
    #: prompt tokens not yet read
    unread: list[int]
    #: the sampled token to read next (``None`` while the prompt is being read)
    next_token: int | None = None
    produced: int = 0
    #: the batch row whose logits this sequence samples after the step, -1 for none
    row: int = -1
    stops: StopScanner = field(init=False)
    decoder: codecs.IncrementalDecoder = field(init=False)

    def __post_init__(self) -> None:
        self.stops = StopScanner(self.sampling.stop)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class SlotDecoder:
    """Generations on one context with ``n_slots`` sequences, one decode step at a time."""

    def __init__(self, llama_cpp: Any, model: Any, ctx: Any, n_slots: int, n_batch: int) -> None:
        self._lib = llama_cpp
        self._model = model  # llama-cpp-python's LlamaModel: detokenize, vocab
        self._ctx = ctx
        self._memory = llama_cpp.llama_get_memory(ctx)
        self._n_vocab = int(model.n_vocab())
        self._capacity = max(n_batch, n_slots)
        self._batch = llama_cpp.llama_batch_init(self._capacity, 0, 1)
        self._slots = [Slot(seq_id) for seq_id in range(n_slots)]
        self._running: list[Sequence] = []
        self._steps = 0

    @property
    def active(self) -> bool:
        return bool(self._running)

    def start(
        self, key: object, tokens: list[int], sampler: TokenSampler, sampling: Sampling
    ) -> None:
        """Begin a generation from ``tokens`` in the free slot sharing the longest prefix."""
        taken = {id(sequence.slot) for sequence in self._running}
        free = [slot for slot in self._slots if id(slot) not in taken]
        if not free:
            raise RuntimeError("no free slot: the runner admitted more generations than slots")
        slot = max(free, key=lambda s: (common_prefix(s.cached, tokens), -s.used))
        # at least the prompt's last token is read again: its logits give the first token
        keep = min(common_prefix(slot.cached, tokens), len(tokens) - 1)
        if not self._lib.llama_memory_seq_rm(self._memory, slot.seq_id, keep, -1):
            self._lib.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
            keep = 0
        del slot.cached[keep:]
        self._running.append(Sequence(key, slot, sampler, sampling, tokens[keep:]))

    def stop(self, key: object) -> None:
        """End ``key``'s generation now; its slot is free for the next (its cache is kept)."""
        for sequence in self._running:
            if sequence.key is key:
                self._end(sequence)
                return

    def stop_all(self) -> None:
        for sequence in list(self._running):
            self._end(sequence)

    def step(self) -> list[tuple[object, Piece]]:
        """One decode: a piece for every sequence that sampled a token (a finished one's has
        its ``finish_reason`` and its slot is free again)."""
        self._steps += 1
        self._fill()
        rc = self._lib.llama_decode(self._ctx, self._batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc})")
        pieces = []
        for sequence in list(self._running):
            if sequence.row < 0:
                continue
            piece = self._sample(sequence)
            pieces.append((sequence.key, piece))
            if piece.finish_reason is not None:
                self._end(sequence)
        return pieces

    def close(self) -> None:
        self.stop_all()
        if self._batch is not None:
            self._lib.llama_batch_free(self._batch)
            self._batch = None

    def _fill(self) -> None:
        """The batch: each generating sequence's next token, then prompts while room is left."""
        batch, n = self._batch, 0

        def add(token: int, sequence: Sequence, logits: bool) -> None:
            nonlocal n
            cached = sequence.slot.cached
            batch.token[n] = token
            batch.pos[n] = len(cached)
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = sequence.slot.seq_id
            batch.logits[n] = logits
            if logits:
                sequence.row = n
            cached.append(token)
            n += 1

        # in sequence-id order: llama.cpp splits a batch for separate caches into runs of
        # consecutive ids, so any other order costs a compute pass per sequence
        self._running.sort(key=lambda sequence: sequence.slot.seq_id)
        for sequence in self._running:
            sequence.row = -1
            sequence.slot.used = self._steps
            if sequence.next_token is not None:
                add(sequence.next_token, sequence, True)
        for sequence in self._running:
            room = self._capacity - n
            if not sequence.unread or room <= 0:
                continue
            take, sequence.unread = sequence.unread[:room], sequence.unread[room:]
            for index, token in enumerate(take):
                add(token, sequence, not sequence.unread and index == len(take) - 1)
        batch.n_tokens = n

    def _sample(self, sequence: Sequence) -> Piece:
        """The sampled token as text (the stop sequences held back), with its log-probability
        when asked."""
        sampling = sequence.sampling
        logprobs = self._logprobs(sequence.row, sampling) if sampling.logprobs else None
        token = sequence.sampler.sample(self._ctx, sequence.row)
        sequence.next_token = token
        sequence.produced += 1
        stops, decoder = sequence.stops, sequence.decoder
        if self._lib.llama_vocab_is_eog(self._model.vocab, token):
            return Piece(stops.flush() + decoder.decode(b"", final=True), 0, "stop")
        text, stopped = stops.feed(decoder.decode(self._model.detokenize([token])))
        logged = () if logprobs is None else (self._token_logprob(logprobs, token, sampling),)
        if stopped:
            return Piece(text, 1, "stop", logged)
        if sequence.produced >= sampling.max_tokens:
            tail = stops.flush() + decoder.decode(b"", final=True)
            return Piece(text + tail, 1, "length", logged)
        return Piece(text, 1, None, logged)

    def _logprobs(self, row: int, sampling: Sampling) -> np.ndarray[Any, Any]:
        """The model's own log-probabilities at ``row`` (before any sampling setting)."""
        pointer = self._lib.llama_get_logits_ith(self._ctx, row)
        logits = np.ctypeslib.as_array(
            ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(self._n_vocab,)
        ).astype(np.float64)
        peak = logits.max()
        normalised: np.ndarray[Any, Any] = logits - (peak + np.log(np.exp(logits - peak).sum()))
        return normalised

    def _token_logprob(
        self, logprobs: np.ndarray[Any, Any], token: int, sampling: Sampling
    ) -> dict[str, Any]:
        entry: dict[str, Any] = {"token": self._text(token), "logprob": float(logprobs[token])}
        if sampling.top_logprobs:
            top = np.argpartition(-logprobs, sampling.top_logprobs)[: sampling.top_logprobs]
            top = top[np.argsort(-logprobs[top])]
            entry["top_logprobs"] = [
                {"token": self._text(int(t)), "logprob": float(logprobs[t])} for t in top
            ]
        return entry

    def _text(self, token: int) -> str:
        return bytes(self._model.detokenize([token])).decode("utf-8", errors="replace")

    def _end(self, sequence: Sequence) -> None:
        self._running.remove(sequence)
        sequence.sampler.close()
