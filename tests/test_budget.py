"""The memory budget: estimates, measured charges, LRU eviction, and refusals that explain."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import psutil
import pytest

from edged.client import Client
from edged.config import OnnxOptions
from edged.errors import BudgetExceeded
from edged.models.budget import MIB, MemoryBudget, give_back_freed_memory
from edged.models.onnx import OnnxBackend
from edged.testing import DaemonProcess
from tests.conftest import DaemonFactory, edgectl_json
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


def test_a_correction_rises_at_once_and_comes_down_only_after_repeated_lower_loads(
    tmp_path: Path,
) -> None:
    state = tmp_path / "memory.json"
    budget = MemoryBudget(None, 0, state)

    def load(measured_mib: float, version: int = 1, budget: MemoryBudget = budget) -> int:
        """Charge and release one load of model m (estimate 10 MiB); what the next expects."""
        budget.charge("m", version, estimate=10 * MIB, measured=int(measured_mib * MIB))
        budget.release("m", version, returned=0)
        return budget.expected("m", 10 * MIB)

    assert load(18) == 18 * MIB  # e.g. a runtime's one-time start-up measured with the model
    assert load(11) == 18 * MIB  # one lower load proves nothing
    restarted = MemoryBudget(None, 0, state)  # the lower loads so far survive a restart
    assert load(12, budget=restarted) == 12 * MIB  # two in a row: the larger of them
    assert load(15, budget=restarted) == 15 * MIB  # a higher one counts at once...
    assert load(11, budget=restarted) == 15 * MIB
    assert load(16, budget=restarted) == 16 * MIB  # ...and starts the count afresh
    assert load(5, budget=restarted) == 16 * MIB
    assert load(4, budget=restarted) == 10 * MIB  # down to the estimate, never below
    assert "m" not in json.loads(state.read_text())["corrections"]


def test_a_load_beside_another_version_never_lowers_a_correction() -> None:
    budget = MemoryBudget(None, 0)
    budget.charge("m", 1, estimate=10 * MIB, measured=20 * MIB)
    for version in (2, 3):  # overlapping swaps: v1 still loaded, pages may be shared
        budget.charge("m", version, estimate=10 * MIB, measured=10 * MIB)
        budget.release("m", version, returned=0)
    assert budget.expected("m", 10 * MIB) == 20 * MIB
    budget.charge("m", 4, estimate=10 * MIB, measured=30 * MIB)  # rising is always learned
    assert budget.expected("m", 10 * MIB) == 30 * MIB


def test_the_system_reserve_counts_without_a_budget() -> None:
    available = psutil.virtual_memory().available
    assert MemoryBudget(None, reserve_bytes=0).shortfall(MIB) == 0
    assert MemoryBudget(None, reserve_bytes=available).shortfall(64 * MIB) >= 64 * MIB - 4 * MIB


def test_estimate_covers_the_measured_load(tmp_path: Path) -> None:
    path = build_wide_model(tmp_path / "wide.onnx", WIDTH)
    OnnxBackend.prime()  # as the loader does: onnxruntime's start-up is not the model's
    process = psutil.Process()
    # freed heap that glibc keeps (how much depends on what earlier tests freed: large frees
    # raise its mmap threshold) is no part of the model's memory: handed back on both sides
    give_back_freed_memory()
    before = process.memory_info().rss
    backend = OnnxBackend.load(path, OnnxOptions())
    backend.run({"x": np.ones((1, WIDTH), np.float32)})
    give_back_freed_memory()
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
    budget_mb = 90  # two models fit (about 36 MiB each), three do not
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
    daemon = start_daemon({"memory": {"budget_mb": 90, "reserve_mb": 0}, "models": models})
    with daemon.client() as client:
        infer(client, "b")
        infer(client, "c")  # a is the oldest but pinned: b goes
        assert sorted(client.ping()["loaded"]) == ["a", "c"]


def test_a_model_larger_than_the_whole_budget_is_refused(
    start_daemon: DaemonFactory, wide_models: dict[str, Path], models_dir: Path
) -> None:
    models = {name: {"path": str(path)} for name, path in wide_models.items()}
    models["demo"] = {"path": str(models_dir / "demo.onnx")}
    daemon = start_daemon({"memory": {"budget_mb": 30, "reserve_mb": 0}, "models": models})
    with daemon.client() as client:
        with pytest.raises(BudgetExceeded, match="more than the whole budget of 30 MiB"):
            infer(client, "a")
        assert client.infer("demo", {"x": np.zeros((1, 16), np.float32)})["probs"].shape == (1, 4)


def test_no_room_when_every_loaded_model_is_pinned(
    start_daemon: DaemonFactory, wide_models: dict[str, Path]
) -> None:
    models = {
        name: {"path": str(path), "pinned": name != "c"} for name, path in wide_models.items()
    }
    daemon = start_daemon({"memory": {"budget_mb": 90, "reserve_mb": 0}, "models": models})
    with daemon.client() as client:
        with pytest.raises(BudgetExceeded) as info:
            infer(client, "c")
        message = str(info.value)
        assert "model 'c' needs" in message and "of 90 MiB are in use" in message
        assert "MiB are free" in message
        assert "loaded: a " in message and "MiB pinned" in message
        infer(client, "a")  # the pinned ones keep serving


def test_identical_models_are_charged_alike_and_as_their_files_say(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    """The first ONNX model loaded is not charged onnxruntime's own start-up (about 8 MiB) as
    its size, and a correction learned that way once comes down again."""
    path = build_wide_model(tmp_path / "m.onnx", 256)  # 256 KiB of weights: estimate 4.5 MiB
    config = {
        "memory": {"budget_mb": 200, "reserve_mb": 0},
        "models": {name: {"path": str(path)} for name in ("a", "b")},
    }
    workdir = tmp_path / "daemon"
    (workdir / "state").mkdir(parents=True)  # as a daemon that learned that start-up left it:
    (workdir / "state" / "memory.json").write_text('{"corrections": {"a": 1.9}}')

    def load_both(daemon: DaemonProcess) -> dict[str, dict[str, int]]:
        """Load a and b, then unload them; their memory books while loaded."""
        with daemon.client() as client:
            for name in ("a", "b"):
                assert client.infer(name, {"x": np.ones((1, 256), np.float32)})["y"].size
        models = edgectl_json(daemon, "models")["models"]
        for name in ("a", "b"):
            edgectl_json(daemon, "unload", name)
        return {name: models[name]["memory"] for name in ("a", "b")}

    def charged_alike(books: dict[str, dict[str, int]]) -> bool:
        charged = [books[name]["charged_bytes"] for name in ("a", "b")]
        estimate = books["a"]["estimated_bytes"]
        return abs(charged[0] - charged[1]) <= MIB // 2 and all(
            estimate <= bytes_ <= estimate * 1.1 for bytes_ in charged
        )

    daemon = start_daemon(config, workdir=workdir)
    books = [load_both(daemon) for _ in range(3)]
    assert charged_alike(books[2]), books  # two loads measured a at its size: a comes down
    assert daemon.stop() == 0
    restarted = start_daemon(config, workdir=workdir)  # the first load of the process included
    books = [load_both(restarted) for _ in range(2)]
    assert all(charged_alike(b) for b in books), books
