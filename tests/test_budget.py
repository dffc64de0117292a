"""The memory budget: estimates, measured charges, LRU eviction, and refusals that explain."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import psutil
import pytest

from edged.client import Client
from edged.config import OnnxOptions
from edged.errors import BudgetExceeded
from edged.models.budget import MIB, MemoryBudget
from edged.models.onnx import OnnxBackend
from tests.conftest import DaemonFactory
from tests.models import build_wide_model

WIDTH = 2048  # 16 MiB of weights per model


def test_charges_the_larger_of_estimate_and_measurement_and_learns() -> None:
    budget = MemoryBudget(capacity_bytes=100 * MIB, reserve_bytes=0)
    budget.charge("a", 1, estimate=40 * MIB, measured=20 * MIB)
    assert budget.used == 40 * MIB
    assert budget.expected("a", 40 * MIB) == 40 * MIB  # a lower measurement lowers nothing
    budget.charge("a", 2, estimate=10 * MIB, measured=15 * MIB)
    assert budget.expected("a", 10 * MIB) == 15 * MIB  # a higher one is learned
    budget.release("a", 2, returned=15 * MIB)
    assert budget.expected("b", 40 * MIB) == 40 * MIB
    assert budget.shortfall(50 * MIB) == 0
    assert budget.shortfall(70 * MIB) == 10 * MIB
    budget.release("a", 1, returned=39 * MIB)
    assert budget.used == 0 and budget.statistics().returned_bytes == {"a": 39 * MIB}


def test_the_system_reserve_counts_without_a_budget() -> None:
    available = psutil.virtual_memory().available
    assert MemoryBudget(None, reserve_bytes=0).shortfall(MIB) == 0
    assert MemoryBudget(None, reserve_bytes=available).shortfall(64 * MIB) >= 64 * MIB - 4 * MIB


def test_estimate_covers_the_measured_load(tmp_path: Path) -> None:
    path = build_wide_model(tmp_path / "wide.onnx", WIDTH)
    process = psutil.Process()
    before = process.memory_info().rss
    backend = OnnxBackend.load(path, OnnxOptions())
    backend.run({"x": np.ones((1, WIDTH), np.float32)})
    measured = process.memory_info().rss - before
    backend.close()
    assert OnnxBackend.estimate(path) >= measured * 0.9


@pytest.fixture(scope="module")
def wide_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("wide")
    return {name: build_wide_model(root / f"{name}.onnx", WIDTH, i) for i, name in enumerate("abc")}


def infer(client: Client, name: str) -> None:
    result = client.infer(name, {"x": np.ones((1, WIDTH), np.float32)})
    assert result["y"].shape == (1, WIDTH)


def test_a_third_model_evicts_the_least_recently_used_and_rss_stays_bounded(
    start_daemon: DaemonFactory, wide_models: dict[str, Path]
) -> None:
    budget_mb = 120  # two models fit (about 48 MiB each), three do not
    daemon = start_daemon(
        {
            "memory": {"budget_mb": budget_mb, "reserve_mb": 0},
            "models": {name: {"path": str(path)} for name, path in wide_models.items()},
        }
    )
    baseline = psutil.Process(daemon.pid).memory_info().rss
    with daemon.client() as client:
        infer(client, "a")
        infer(client, "b")
        infer(client, "a")  # now b is the least recently used
        infer(client, "c")
        assert sorted(client.ping()["loaded"]) == ["a", "c"]
        infer(client, "b")  # and back: a is now the oldest
        assert sorted(client.ping()["loaded"]) == ["b", "c"]
    rss = psutil.Process(daemon.pid).memory_info().rss
    assert rss <= baseline + budget_mb * MIB * 1.1
    assert "unloading model b version 1 to make room for c" in daemon.log()


def test_pinned_models_are_never_evicted(
    start_daemon: DaemonFactory, wide_models: dict[str, Path]
) -> None:
    models = {name: {"path": str(path)} for name, path in wide_models.items()}
    models["a"]["pinned"] = True
    daemon = start_daemon({"memory": {"budget_mb": 120, "reserve_mb": 0}, "models": models})
    with daemon.client() as client:
        infer(client, "b")
        infer(client, "c")  # a is the oldest but pinned: b goes
        assert sorted(client.ping()["loaded"]) == ["a", "c"]


def test_a_model_larger_than_the_whole_budget_is_refused(
    start_daemon: DaemonFactory, wide_models: dict[str, Path], models_dir: Path
) -> None:
    models = {name: {"path": str(path)} for name, path in wide_models.items()}
    models["demo"] = {"path": str(models_dir / "demo.onnx")}
    daemon = start_daemon({"memory": {"budget_mb": 40, "reserve_mb": 0}, "models": models})
    with daemon.client() as client:
        with pytest.raises(BudgetExceeded, match="more than the whole budget of 40 MiB"):
            infer(client, "a")
        assert client.infer("demo", {"x": np.zeros((1, 16), np.float32)})["probs"].shape == (1, 4)


def test_no_room_when_every_loaded_model_is_pinned(
    start_daemon: DaemonFactory, wide_models: dict[str, Path]
) -> None:
    models = {
        name: {"path": str(path), "pinned": name != "c"} for name, path in wide_models.items()
    }
    daemon = start_daemon({"memory": {"budget_mb": 120, "reserve_mb": 0}, "models": models})
    with daemon.client() as client:
        with pytest.raises(BudgetExceeded) as info:
            infer(client, "c")
        message = str(info.value)
        assert "model 'c' needs" in message and "of 120 MiB are in use" in message
        assert "MiB are free" in message
        assert "loaded: a " in message and "MiB pinned" in message
        infer(client, "a")  # the pinned ones keep serving
