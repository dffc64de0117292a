"""GGUF language models through llama.cpp (llama-cpp-python): load, estimate, stream, embed.

``llama_cpp`` and ``gguf`` are imported only when a GGUF model is estimated or loaded, so a
daemon serving ONNX models alone never maps llama.cpp. Generation drives llama-cpp-python's
token generator directly rather than its ``create_completion`` stream, which re-decodes the
whole completion on every token and does not say how many tokens each chunk holds; the stop
sequences and UTF-8 handling that this takes are ``StopScanner`` and an incremental decoder.
"""

from __future__ import annotations

import codecs
import logging
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edged.config import GgufOptions
from edged.errors import ModelLoadError
from edged.models.calls import Sampling
from edged.models.generation import Piece

log = logging.getLogger(__name__)

#: llama.cpp's own allocations besides weights, KV cache and compute buffers (threads, batch)
RUNTIME_OVERHEAD_BYTES = 4 * 1024 * 1024


def _import_llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise ModelLoadError(
            "GGUF models need llama-cpp-python: pip install 'edged[gguf]'"
        ) from None
    return llama_cpp


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


def thread_counts(options: GgufOptions) -> dict[str, int]:
    """llama-cpp-python's thread arguments: those left out (0) are its own choice, half the
    cores for generation and all of them for prompts; ``n_threads_batch`` -1 follows
    ``n_threads``."""
    batch = options.n_threads if options.n_threads_batch < 0 else options.n_threads_batch
    given = {"n_threads": options.n_threads, "n_threads_batch": batch}
    return {name: count for name, count in given.items() if count}


class GgufBackend:
    def __init__(self, llm: Any, options: GgufOptions, llama_cpp: Any) -> None:
        self._llm = llm
        self._options = options
        self._is_eog = llama_cpp.llama_vocab_is_eog
        self._vocab = llm._model.vocab

    @classmethod
    def load(cls, path: Path, options: GgufOptions) -> GgufBackend:
        llama_cpp = _import_llama_cpp()
        pooling = (
            llama_cpp.LLAMA_POOLING_TYPE_MEAN
            if options.embedding
            else llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED
        )
        try:
            llm = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=options.n_ctx,
                n_batch=options.n_batch,
                n_gpu_layers=options.n_gpu_layers,
                embedding=options.embedding,
                pooling_type=pooling,
                use_mmap=options.use_mmap,
                verbose=False,
                **thread_counts(options),
            )
        except ValueError as exc:  # llama-cpp-python says only "Failed to load model"
            raise ModelLoadError(f"llama.cpp cannot load {path}: {exc}") from None
        log.info(
            "loaded %s: n_ctx %d, %d threads (%d for prompts), %d GPU layers",
            path,
            llm.n_ctx(),
            llm.context_params.n_threads,
            llm.context_params.n_threads_batch,
            options.n_gpu_layers,
        )
        return cls(llm, options, llama_cpp)

    @staticmethod
    def estimate(path: Path, options: GgufOptions) -> int:
        """Tensor bytes plus the KV cache for ``n_ctx`` plus compute buffers, from the header.

        Imports llama.cpp too: a missing install fails here, and the library's own memory is
        not counted against the first model loaded."""
        from edged.models.gguf_size import estimate_bytes

        _import_llama_cpp()
        return estimate_bytes(path, options) + RUNTIME_OVERHEAD_BYTES

    @property
    def n_ctx(self) -> int:
        return int(self._llm.n_ctx())

    @property
    def n_batch(self) -> int:
        return int(self._llm.n_batch)

    @property
    def embedding(self) -> bool:
        return self._options.embedding

    def tokenize(self, text: str) -> list[int]:
        # special=True: a chat template's markers become its special tokens, as in llama.cpp
        tokens: list[int] = self._llm.tokenize(text.encode(), add_bos=True, special=True)
        return tokens

    def describe(self) -> dict[str, Any]:
        llm = self._llm
        return {
            "n_ctx": self.n_ctx,
            "n_ctx_train": int(llm._model.n_ctx_train()),
            "n_vocab": int(llm.n_vocab()),
            "n_embd": int(llm.n_embd()),
            "embedding": self.embedding,
        }

    def stream(self, tokens: list[int], sampling: Sampling) -> Iterator[Piece]:
        llm = self._llm
        seed = sampling.seed if sampling.seed is not None else random.getrandbits(32)
        llm.set_seed(seed)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = StopScanner(sampling.stop)
        sampled = llm.generate(
            tokens,
            temp=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            min_p=sampling.min_p,
            repeat_penalty=sampling.repeat_penalty,
            presence_penalty=sampling.presence_penalty,
            frequency_penalty=sampling.frequency_penalty,
        )
        for produced, token in enumerate(sampled, start=1):
            if self._is_eog(self._vocab, token):
                yield Piece(stops.flush() + decoder.decode(b"", final=True), 0, "stop")
                return
            text, stopped = stops.feed(decoder.decode(llm.detokenize([token])))
            if stopped:
                yield Piece(text, 1, "stop")
                return
            if produced >= sampling.max_tokens:
                tail = stops.flush() + decoder.decode(b"", final=True)
                yield Piece(text + tail, 1, "length")
                return
            yield Piece(text, 1)

    def embed(self, texts: tuple[str, ...]) -> np.ndarray[Any, Any]:
        vectors = self._llm.embed(list(texts), truncate=False)
        return np.asarray(vectors, dtype=np.float32)

    def close(self) -> None:
        self._llm.close()
