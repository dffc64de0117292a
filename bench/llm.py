"""Generation through edged against llama-cpp-python in-process, on the same tiny-llama GGUF.

The models are random but real llama GGUFs (``edged.tinyllama``); the larger one costs about
1.5 ms a token on one thread, so a row measures llama.cpp plus edged's overhead rather than
Python call costs. Both sides run one llama.cpp thread (the box has two cores: the client and
the daemon's loop need the other), greedy, with the same context settings.

llama-cpp-python reuses the KV cache for the longest common prefix with the previous prompt,
so every request starts with a different word, the same sequence of words on both sides: each
then evaluates its whole prompt but the BOS token, like the other.
"""

from __future__ import annotations

import codecs
import itertools
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness import Call, Sample
from edged.client import Client
from edged.config import GgufOptions
from edged.models.gguf import thread_counts
from edged.tinyllama import build_tiny_llama

#: words that are one token each in the tiny-llama vocabulary ("▁the" is a piece)
WORDS = ("the", "of", "and", "to", "in", "is", "it", "that", "was", "for", "on", "are", "with")
#: how the generation benchmarks serve the larger model, on both sides
GENERATION = GgufOptions(n_ctx=512, n_threads=1)
#: a request waits this long at most for each streamed message (a 2k-token prompt takes a while)
STREAM_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class GgufFile:
    """A tiny-llama GGUF, quantized to Q8_0, by its size."""

    name: str
    n_embd: int
    n_ff: int
    n_layer: int

    @property
    def filename(self) -> str:
        return f"{self.name}.gguf"

    def build(self, path: Path) -> Path:
        return build_tiny_llama(
            path, n_embd=self.n_embd, n_ff=self.n_ff, n_layer=self.n_layer, quantize="Q8_0"
        )


#: edged.tinyllama's default size: a couple of MiB, where fixed costs dominate
TINY = GgufFile("tiny_llama", n_embd=256, n_ff=512, n_layer=2)
#: about 14 MiB, a token costs ~1.5 ms
LARGE = GgufFile("large_llama", n_embd=512, n_ff=1536, n_layer=4)
#: about 210 MiB: weights far beyond the CPU's caches, as a real language model's are
XL = GgufFile("xl_llama", n_embd=2048, n_ff=5632, n_layer=4)


def declaration(path: Path, options: GgufOptions, preload: bool) -> dict[str, object]:
    """The model as a user declares it in the daemon config."""
    gguf = {
        "n_ctx": options.n_ctx,
        "n_batch": options.n_batch,
        "n_threads": options.n_threads,
        "parallel": options.parallel,
    }
    return {"path": str(path), "preload": preload, "gguf": gguf}


def prompt(lead: int, tokens: int) -> str:
    """A prompt of exactly ``tokens`` tokens with BOS, starting with word number ``lead``."""
    body = [WORDS[(lead + i) % len(WORDS)] for i in range(tokens - 1)]
    return " ".join(body)


def prompts(llm: Any, tokens: int) -> Iterator[str]:
    """Prompts of ``tokens`` tokens, each starting with another word than the one before;
    ``llm`` checks the count once, as the daemon will see it."""
    counted = len(tokenize(llm, prompt(0, tokens)))
    if counted != tokens:
        raise RuntimeError(f"a prompt meant to be {tokens} tokens is {counted}")
    return (prompt(lead, tokens) for lead in itertools.count())


def open_llama(path: Path, options: GgufOptions) -> Any:
    """The in-process model, set up with the context settings the daemon is given."""
    import llama_cpp  # here: only the GGUF benchmarks need it

    n_threads, n_threads_batch = thread_counts(options)  # prompt threads too, as the daemon
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=options.n_ctx,
        n_batch=options.n_batch,
        verbose=False,
        n_threads=n_threads,
        n_threads_batch=n_threads_batch,
    )


def tokenize(llm: Any, text: str) -> list[int]:
    """As the daemon tokenizes a prompt (``GgufBackend.tokenize``)."""
    tokens: list[int] = llm.tokenize(text.encode(), add_bos=True, special=True)
    return tokens


def generate_direct(llm: Any, text: str, max_tokens: int) -> int:
    """The daemon's own loop: ``Llama.generate`` and each token detokenized and decoded."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    produced = 0
    with closing(llm.generate(tokenize(llm, text), temp=0.0)) as sampled:
        for token in sampled:
            decoder.decode(llm.detokenize([token]))
            produced += 1
            if produced >= max_tokens:
                break
    return produced


def generate_completion(llm: Any, text: str, max_tokens: int) -> int:
    """What a user writes by hand: ``create_completion`` streaming. Its chunks are not tokens
    (the last one is extra), but ending for length means ``max_tokens`` were produced: the
    model never emits EOS."""
    chunks = llm.create_completion(text, max_tokens=max_tokens, temperature=0.0, stream=True)
    reasons = [chunk["choices"][0]["finish_reason"] for chunk in chunks]
    return max_tokens if reasons[-1] == "length" else len(reasons) - 1


def generate_edged(client: Client, model: str, text: str, max_tokens: int) -> int:
    """One ``generate`` streamed to its end; the daemon's count of the tokens it produced."""
    stream = client.generate(model, text, max_tokens=max_tokens, temperature=0.0)
    for _ in stream:
        pass
    return stream.completion.completion_tokens


def whole_generations(
    client: Client, model: str, llm: Any, prompt_tokens: int, max_tokens: int
) -> dict[str, Call]:
    """Each side's call: one generation of exactly ``max_tokens`` tokens, send to last token."""
    sides = {
        "edged": lambda text: generate_edged(client, model, text, max_tokens),
        "generate": lambda text: generate_direct(llm, text, max_tokens),
        "completion": lambda text: generate_completion(llm, text, max_tokens),
    }
    return {
        label: _checked(label, run, prompts(llm, prompt_tokens), max_tokens)
        for label, run in sides.items()
    }


def _checked(label: str, run: Callable[[str], int], texts: Iterator[str], max_tokens: int) -> Call:
    """A call on the next prompt that fails the run unless all ``max_tokens`` came: a short
    generation would inflate its rate."""

    def call() -> None:
        produced = run(next(texts))
        if produced != max_tokens:
            raise RuntimeError(f"{label} generated {produced} tokens, not {max_tokens}")

    return call


def first_tokens(client: Client, model: str, llm: Any, prompt_tokens: int) -> dict[str, Sample]:
    """Each side's time to its first text: from sending the prompt (edged) or tokenizing it
    (in-process) to holding the first piece of text."""
    edged_texts, direct_texts = prompts(llm, prompt_tokens), prompts(llm, prompt_tokens)
    return {
        "edged": lambda: _first_piece_edged(client, model, next(edged_texts)),
        "direct": lambda: _first_piece_direct(llm, next(direct_texts)),
    }


def _first_piece_edged(client: Client, model: str, text: str) -> float:
    started = time.perf_counter()
    stream = client.generate(model, text, max_tokens=1, temperature=0.0)
    pieces = iter(stream)
    next(pieces)
    span = time.perf_counter() - started
    for _ in pieces:  # the final message, outside the span
        pass
    return span


def _first_piece_direct(llm: Any, text: str) -> float:
    started = time.perf_counter()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with closing(llm.generate(tokenize(llm, text), temp=0.0)) as sampled:
        decoder.decode(llm.detokenize([next(sampled)]))
        return time.perf_counter() - started
