"""GGUF thread counts: ``n_threads`` bounds prompt evaluation too, unless ``n_threads_batch``
says otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest

from edged.config import GgufOptions
from edged.models.gguf import GgufBackend, thread_counts


def test_prompt_threads_follow_n_threads_and_zero_leaves_the_choice_to_llama_cpp() -> None:
    assert thread_counts(GgufOptions()) == {}
    assert thread_counts(GgufOptions(n_threads=2)) == {"n_threads": 2, "n_threads_batch": 2}
    assert thread_counts(GgufOptions(n_threads=2, n_threads_batch=0)) == {"n_threads": 2}
    assert thread_counts(GgufOptions(n_threads_batch=3)) == {"n_threads_batch": 3}


@pytest.mark.parametrize(("n_threads_batch", "expected"), [(-1, 1), (3, 3)])
def test_the_loaded_context_evaluates_prompts_on_the_configured_threads(
    gguf_models: dict[str, Path], n_threads_batch: int, expected: int
) -> None:
    options = GgufOptions(n_ctx=512, n_threads=1, n_threads_batch=n_threads_batch)
    backend = GgufBackend.load(gguf_models["q8"], options)
    try:
        params = backend._llm.context_params
        assert (params.n_threads, params.n_threads_batch) == (1, expected)
    finally:
        backend.close()
