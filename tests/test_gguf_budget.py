"""GGUF models under one memory budget: header estimates, LRU eviction, pinning, refusals."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from edged.client import Client
from edged.config import GgufOptions
from edged.errors import BudgetExceeded
from edged.models.budget import MIB, MemoryBudget
from edged.models.gguf import GgufBackend
from edged.models.gguf_size import read_header
from tests.conftest import DaemonFactory, llm_config

BUDGET_MB = 80  # two of the wide models fit (about 35 MiB each at n_ctx 512), three do not


@pytest.fixture(scope="module")
def wide_llms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from edged.tinyllama import build_tiny_llama

    root = tmp_path_factory.mktemp("wide-gguf")
    return {
        name: build_tiny_llama(
            root / f"{name}.gguf", n_embd=512, n_ff=1536, n_layer=4, seed=i, quantize="Q8_0"
        )
        for i, name in enumerate("abc")
    }


def generate(client: Client, name: str) -> None:
    assert client.generate(name, "hello", max_tokens=2).text().completion_tokens == 2


def test_the_estimate_comes_from_the_header_and_grows_with_the_context(
    wide_llms: dict[str, Path], tmp_path: Path
) -> None:
    from gguf import GGUFReader

    header = read_header(wide_llms["a"])
    assert (header["block_count"], header["embedding_length"], header["head_count"]) == (4, 512, 4)
    reader = GGUFReader(wide_llms["a"])  # the package's full reader agrees with the quick walk
    assert header["tensor_bytes"] == sum(int(t.n_bytes) for t in reader.tensors)
    assert header["vocab_size"] == len(reader.fields["tokenizer.ggml.tokens"].data)
    small = GgufBackend.estimate(wide_llms["a"], GgufOptions(n_ctx=512))
    large = GgufBackend.estimate(wide_llms["a"], GgufOptions(n_ctx=2048))
    kv_growth = 2 * 4 * (2048 - 512) * 512 * 2  # K and V, 4 layers, f16
    assert small > header["tensor_bytes"] and large - small > kv_growth
    garbage = tmp_path / "x.gguf"
    garbage.write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(ValueError, match="not a readable GGUF"):
        read_header(garbage)


def test_three_gguf_models_under_a_budget_for_two_evict_the_least_recently_used(
    start_daemon: DaemonFactory, wide_llms: dict[str, Path]
) -> None:
    models = {name: llm_config(path, preload=False) for name, path in wide_llms.items()}
    daemon = start_daemon({"memory": {"budget_mb": BUDGET_MB, "reserve_mb": 0}, "models": models})
    baseline = psutil.Process(daemon.pid).memory_info().rss
    with daemon.client(timeout=30) as client:
        generate(client, "a")
        generate(client, "b")
        generate(client, "a")  # now b is the least recently used
        generate(client, "c")
        status = client.ping()
        assert sorted(status["loaded"]) == ["a", "c"]
        generate(client, "b")  # and back: a is now the oldest
        status = client.ping()
    assert sorted(status["loaded"]) == ["b", "c"]
    memory = status["memory"]
    assert memory["used_bytes"] <= BUDGET_MB * MIB
    assert memory["models"]["a"]["returned_bytes"] > 0  # the unload gave memory back
    assert memory["models"]["b"]["charged_bytes"] >= memory["models"]["b"]["estimated_bytes"]
    rss = psutil.Process(daemon.pid).memory_info().rss
    assert rss <= baseline + BUDGET_MB * MIB * 1.1
    assert "unloading model b version 1 to make room for c" in daemon.log()


def test_a_pinned_gguf_model_stays_and_an_oversized_context_is_refused(
    start_daemon: DaemonFactory, wide_llms: dict[str, Path]
) -> None:
    models = {name: llm_config(path, preload=False) for name, path in wide_llms.items()}
    models["a"]["pinned"] = True
    models["huge"] = llm_config(wide_llms["a"], preload=False, gguf={"n_ctx": 16384})
    daemon = start_daemon({"memory": {"budget_mb": BUDGET_MB, "reserve_mb": 0}, "models": models})
    with daemon.client(timeout=30) as client:
        generate(client, "b")
        generate(client, "c")  # a is the oldest but pinned: b goes
        assert sorted(client.ping()["loaded"]) == ["a", "c"]
        with pytest.raises(BudgetExceeded, match="more than the whole budget of 80 MiB"):
            generate(client, "huge")
        generate(client, "a")


def test_corrections_survive_a_restart_and_an_overlap_lowers_none(tmp_path: Path) -> None:
    state = tmp_path / "memory.json"
    budget = MemoryBudget(None, 0, state)
    budget.charge("small", 1, estimate=40 * MIB, measured=10 * MIB)
    budget.charge("big", 1, estimate=40 * MIB, measured=60 * MIB)
    budget.charge("big", 2, estimate=40 * MIB, measured=50 * MIB)
    restarted = MemoryBudget(None, 0, state)
    assert restarted.expected("small", 40 * MIB) == 40 * MIB
    assert restarted.expected("big", 40 * MIB) == 60 * MIB
    state.write_text("{not json")
    assert MemoryBudget(None, 0, state).expected("big", 40 * MIB) == 40 * MIB


def test_parallel_slots_are_charged_a_kv_cache_each_and_the_estimate_holds(
    start_daemon: DaemonFactory, wide_llms: dict[str, Path]
) -> None:
    one = GgufBackend.estimate(wide_llms["a"], GgufOptions(n_ctx=2048))
    four = GgufBackend.estimate(wide_llms["a"], GgufOptions(n_ctx=2048, parallel=4))
    kv = 2 * 4 * 2048 * 512 * 2  # K and V, 4 layers, f16, per slot
    assert four - one == 3 * kv
    models = {
        f"p{n}": llm_config(wide_llms["a"], gguf={"n_ctx": 2048, "parallel": n}) for n in (1, 4)
    }
    daemon = start_daemon({"models": models})
    with daemon.client(timeout=30) as client:
        charged = client.ping()["memory"]["models"]
    measured = {name: charged[name]["measured_bytes"] for name in models}
    assert measured["p4"] - measured["p1"] > 2.5 * kv  # the slots' caches are really there
    for name in models:
        assert measured[name] <= charged[name]["estimated_bytes"] * 1.1
