"""GGUF thread counts: ``n_threads`` bounds prompt evaluation too, unless ``n_threads_batch``
says otherwise."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edged.config import GgufOptions
from edged.models.gguf import GgufBackend, thread_counts


def test_prompt_threads_follow_n_threads_and_zero_leaves_the_choice_to_llama_cpp() -> None:
    cores = os.cpu_count() or 1
    half = max(cores // 2, 1)
    assert thread_counts(GgufOptions()) == (half, cores)
    assert thread_counts(GgufOptions(n_threads=2)) == (2, 2)
    assert thread_counts(GgufOptions(n_threads=2, n_threads_batch=0)) == (2, cores)
    assert thread_counts(GgufOptions(n_threads_batch=3)) == (half, 3)


@pytest.mark.parametrize(("n_threads_batch", "expected"), [(-1, 1), (3, 3)])
@pytest.mark.parametrize("embedding", [False, True])
def test_the_loaded_context_evaluates_prompts_on_the_configured_threads(
    gguf_models: dict[str, Path], n_threads_batch: int, expected: int, embedding: bool
) -> None:
    options = GgufOptions(
        n_ctx=512, n_threads=1, n_threads_batch=n_threads_batch, embedding=embedding
    )
    backend = GgufBackend.load(gguf_models["q8"], options)
    try:
        assert backend.threads == (1, expected)
    finally:
        backend.close()
