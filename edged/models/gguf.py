"""GGUF language models through llama.cpp (llama-cpp-python): load, estimate, generate, embed.

``llama_cpp`` and ``gguf`` are imported only when a GGUF model is estimated or loaded, so a
daemon serving ONNX models alone never maps llama.cpp. A generative model gets a context of
its own making, with one sequence per ``parallel`` slot (``slots.SlotDecoder`` batches them):
llama-cpp-python's ``Llama`` holds a single sequence, and its generator re-decodes text and
hides token counts. An embedding model is served by ``Llama.embed`` as it is.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edged.config import EmbedOptions, GgufOptions
from edged.errors import ModelLoadError, OpNotSupported
from edged.models.calls import ChatMessage, Sampling
from edged.models.chat import ChatTemplate
from edged.models.sampler import TokenSampler, build_sampler
from edged.models.slots import Piece, SlotDecoder
from edged.models.text_encoder import normalized

log = logging.getLogger(__name__)

#: llama.cpp's own allocations besides weights, KV cache and compute buffers (threads, batch)
RUNTIME_OVERHEAD_BYTES = 4 * 1024 * 1024
#: llama.cpp pads each sequence's context to a multiple of this many tokens
N_CTX_PAD = 256
#: llama.cpp's pooling by ``[models.X.embed] pooling``
POOLING = {
    "mean": "LLAMA_POOLING_TYPE_MEAN",
    "cls": "LLAMA_POOLING_TYPE_CLS",
    "last": "LLAMA_POOLING_TYPE_LAST",
}
#: llama.cpp's LLAMA_FLASH_ATTN_TYPE_* by config value
FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}
#: tokens llama.cpp computes at once within a batch (its default micro-batch)
MAX_UBATCH = 512


def _import_llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise ModelLoadError(
            "GGUF models need llama-cpp-python: pip install 'edged[gguf]'"
        ) from None
    _init_backend(llama_cpp)
    return llama_cpp


@functools.cache
def _init_backend(llama_cpp: Any) -> None:
    from llama_cpp._logger import set_verbose

    set_verbose(False)  # llama.cpp's errors only, on stderr (the journal)
    llama_cpp.llama_backend_init()


def thread_counts(options: GgufOptions) -> tuple[int, int]:
    """Generation and prompt threads. ``n_threads_batch`` -1 follows ``n_threads``; 0 in either
    is llama-cpp-python's choice: half the cores for generation and all of them for prompts."""
    cores = os.cpu_count() or 1
    batch = options.n_threads if options.n_threads_batch < 0 else options.n_threads_batch
    return options.n_threads or max(cores // 2, 1), batch or cores


def padded_n_ctx(options: GgufOptions) -> int:
    return -(-options.n_ctx // N_CTX_PAD) * N_CTX_PAD


class GgufBackend:
    """What the loader asks of a GGUF file: its size in memory, and the loaded model."""

    @staticmethod
    def estimate(path: Path, options: GgufOptions) -> int:
        """Tensor bytes plus the KV cache of every slot plus compute buffers, from the header.

        Imports llama.cpp too: a missing install fails here, and the library's own memory is
        not counted against the first model loaded."""
        from edged.models.gguf_size import estimate_bytes

        _import_llama_cpp()
        return estimate_bytes(path, options) + RUNTIME_OVERHEAD_BYTES

    @staticmethod
    def load(
        path: Path, options: GgufOptions, embed: EmbedOptions | None = None
    ) -> GgufGenerator | GgufEmbedder:
        llama_cpp = _import_llama_cpp()
        if options.embedding:
            return GgufEmbedder.open(llama_cpp, path, options, embed or EmbedOptions())
        return GgufGenerator.open(llama_cpp, path, options)


class GgufGenerator:
    """A generative model: ``parallel`` slots on one context, tokenizing and chat formatting."""

    embedding = False

    def __init__(
        self, llama_cpp: Any, model: Any, ctx: Any, options: GgufOptions, chat: ChatTemplate | None
    ) -> None:
        self._lib = llama_cpp
        self._model = model
        self._ctx = ctx
        self._options = options
        self._chat = chat
        self.n_ctx = int(llama_cpp.llama_n_ctx_seq(ctx.ctx))
        self.n_batch = max(options.n_batch, options.parallel)
        self.parallel = options.parallel
        self.decoder = SlotDecoder(llama_cpp, model, ctx.ctx, options.parallel, self.n_batch)
        self._bos = _token_text(model, model.token_bos())

    @classmethod
    def open(cls, llama_cpp: Any, path: Path, options: GgufOptions) -> GgufGenerator:
        from llama_cpp import _internals

        model = _load_model(llama_cpp, path, options)
        params = llama_cpp.llama_context_default_params()
        params.n_seq_max = options.parallel
        params.kv_unified = False  # each sequence attends to its own cells only
        params.n_ctx = padded_n_ctx(options) * options.parallel
        params.n_batch = max(options.n_batch, options.parallel)
        params.n_ubatch = min(params.n_batch, MAX_UBATCH)
        params.n_threads, params.n_threads_batch = thread_counts(options)
        params.flash_attn_type = FLASH_ATTN[options.flash_attn]
        params.no_perf = True
        try:
            chat = ChatTemplate.select(
                model.metadata(),
                options.chat_template,
                _token_text(model, model.token_bos()),
                _token_text(model, model.token_eos()),
            )
            ctx = _internals.LlamaContext(model=model, params=params, verbose=False)
        except ValueError as exc:
            model.close()
            raise ModelLoadError(f"llama.cpp cannot make a context for {path}: {exc}") from None
        except ModelLoadError:
            model.close()
            raise
        log.info(
            "loaded %s: %d slots of n_ctx %d, %d threads (%d for prompts), %d GPU layers",
            path,
            options.parallel,
            llama_cpp.llama_n_ctx_seq(ctx.ctx),
            params.n_threads,
            params.n_threads_batch,
            options.n_gpu_layers,
        )
        return cls(llama_cpp, model, ctx, options, chat)

    @property
    def threads(self) -> tuple[int, int]:
        """The threads the context computes with: (generation, prompts)."""
        ctx = self._ctx.ctx
        return int(self._lib.llama_n_threads(ctx)), int(self._lib.llama_n_threads_batch(ctx))

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        # special=True: a chat template's markers become its special tokens, as in llama.cpp
        return list(self._model.tokenize(text.encode(), add_bos=add_bos, special=True))

    def chat_tokens(self, messages: Sequence[ChatMessage]) -> list[int]:
        """The messages as the model's chat template lays them out, the assistant's turn
        opened; a template that writes the BOS text itself gets no second one."""
        if self._chat is None:
            raise OpNotSupported(
                "the model has no chat template: set [models.NAME.gguf] chat_template, "
                "or use generate"
            )
        text = self._chat.render(messages)
        return self.tokenize(text, add_bos=not (self._bos and text.startswith(self._bos)))

    def sampler(self, sampling: Sampling) -> TokenSampler:
        return build_sampler(self._lib, self._model.vocab, self._model.n_vocab(), sampling)

    def stream(self, tokens: list[int], sampling: Sampling) -> Iterator[Piece]:
        """One generation alone (a warm-up, a measurement): nothing else may use the context
        meanwhile."""
        decoder, key = self.decoder, object()
        decoder.start(key, tokens, self.sampler(sampling), sampling)
        try:
            while decoder.active:
                for _, piece in decoder.step():
                    yield piece
        finally:
            decoder.stop(key)

    def embed(self, texts: tuple[str, ...]) -> np.ndarray[Any, Any]:
        raise OpNotSupported("a generative model does not embed")

    def describe(self) -> dict[str, Any]:
        return {**_describe(self._model, self.n_ctx, False), "parallel": self.parallel}

    def close(self) -> None:
        self.decoder.close()
        self._ctx.close()
        self._model.close()


class GgufEmbedder:
    """An embedding model, served by llama-cpp-python's ``Llama.embed``, pooled by llama.cpp as
    ``[models.X.embed] pooling`` says."""

    embedding = True
    parallel = 1
    decoder = None

    def __init__(self, llm: Any, normalize: bool) -> None:
        self._llm = llm
        self._normalize = normalize
        self.n_ctx = int(llm.n_ctx())
        self.n_batch = int(llm.n_batch)

    @classmethod
    def open(
        cls, llama_cpp: Any, path: Path, options: GgufOptions, embed: EmbedOptions
    ) -> GgufEmbedder:
        n_threads, n_threads_batch = thread_counts(options)
        try:
            llm = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=options.n_ctx,
                n_batch=options.n_batch,
                n_gpu_layers=options.n_gpu_layers,
                embedding=True,
                pooling_type=getattr(llama_cpp, POOLING[embed.pooling]),
                use_mmap=options.use_mmap,
                verbose=False,
                n_threads=n_threads,
                n_threads_batch=n_threads_batch,
            )
        except ValueError as exc:  # llama-cpp-python says only "Failed to load model"
            raise ModelLoadError(f"llama.cpp cannot load {path}: {exc}") from None
        log.info("loaded %s for embeddings: n_ctx %d", path, llm.n_ctx())
        return cls(llm, embed.normalize)

    @property
    def threads(self) -> tuple[int, int]:
        params = self._llm.context_params
        return int(params.n_threads), int(params.n_threads_batch)

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        return list(self._llm.tokenize(text.encode(), add_bos=add_bos, special=True))

    def chat_tokens(self, messages: Sequence[ChatMessage]) -> list[int]:
        raise OpNotSupported("an embedding model does not chat")

    def sampler(self, sampling: Sampling) -> TokenSampler:
        raise OpNotSupported("an embedding model does not generate")

    def stream(self, tokens: list[int], sampling: Sampling) -> Iterator[Piece]:
        raise OpNotSupported("an embedding model does not generate")

    def embed(self, texts: tuple[str, ...]) -> np.ndarray[Any, Any]:
        vectors = np.asarray(self._llm.embed(list(texts), truncate=False), dtype=np.float32)
        return normalized(vectors) if self._normalize else vectors

    def describe(self) -> dict[str, Any]:
        return _describe(self._llm._model, self.n_ctx, True)

    def close(self) -> None:
        self._llm.close()


def _load_model(llama_cpp: Any, path: Path, options: GgufOptions) -> Any:
    from llama_cpp import _internals

    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = 0x7FFFFFFF if options.n_gpu_layers < 0 else options.n_gpu_layers
    params.use_mmap = options.use_mmap
    try:
        return _internals.LlamaModel(path_model=str(path), params=params, verbose=False)
    except ValueError as exc:  # llama.cpp says why only in its log
        raise ModelLoadError(f"llama.cpp cannot load {path}: {exc}") from None


def _token_text(model: Any, token: int) -> str:
    return str(model.token_get_text(token)) if token >= 0 else ""


def _describe(model: Any, n_ctx: int, embedding: bool) -> dict[str, Any]:
    return {
        "n_ctx": n_ctx,
        "n_ctx_train": int(model.n_ctx_train()),
        "n_vocab": int(model.n_vocab()),
        "n_embd": int(model.n_embd()),
        "embedding": embedding,
    }
