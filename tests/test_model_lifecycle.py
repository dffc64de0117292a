"""Declared models load on first use (or at start), unload when idle, and fail loads cleanly."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edged.client import AsyncClient, Client
from edged.errors import ModelLoadError, RunFailed
from edged.testing import DaemonProcess
from tests.conftest import EDGECTL, DaemonFactory, edgectl_json
from tests.models import build_one_row_model

X = np.zeros((1, 16), np.float32)


def wait_until_loaded(client: Client, expected: list[str], timeout: float = 20.0) -> None:
    """Poll ping until the loaded set is ``expected`` (the daemon's tick unloads within ~1 s)."""
    deadline = time.monotonic() + timeout
    while sorted(client.ping()["loaded"]) != sorted(expected):
        assert time.monotonic() < deadline, f"loaded is {client.ping()['loaded']}, not {expected}"
        time.sleep(0.05)


def model(models_dir: Path, file: str = "demo.onnx", **options: Any) -> dict[str, Any]:
    return {"path": str(models_dir / file), **options}


def test_models_load_on_first_request_unless_preloaded(
    start_daemon: DaemonFactory, models_dir: Path
) -> None:
    daemon = start_daemon(
        {"models": {"lazy": model(models_dir), "eager": model(models_dir, preload=True)}}
    )
    with daemon.client() as client:
        assert client.ping()["loaded"] == ["eager"]
        assert client.infer("lazy", {"x": X})["probs"].shape == (1, 4)
        assert sorted(client.ping()["loaded"]) == ["eager", "lazy"]


def test_requests_arriving_during_a_load_are_all_answered(
    start_daemon: DaemonFactory, models_dir: Path
) -> None:
    daemon = start_daemon({"models": {"lazy": model(models_dir, "image.onnx")}})
    images = [np.full((1, 3, 224, 224), i, np.float32) for i in range(20)]

    async def send_all() -> list[Any]:
        async with AsyncClient(daemon.endpoint, timeout=30) as client:
            return await asyncio.gather(*(client.infer("lazy", {"image": x}) for x in images))

    results = asyncio.run(send_all())
    assert len(results) == 20 and all(r["logits"].shape == (1, 10) for r in results)


def test_idle_models_unload_and_reload_but_pinned_ones_stay(
    start_daemon: DaemonFactory, models_dir: Path
) -> None:
    daemon = start_daemon(
        {
            "models": {
                "idle": model(models_dir, keep_alive_s=0.3),
                "pinned": model(models_dir, pinned=True, keep_alive_s=0.3),
            }
        }
    )
    with daemon.client() as client:
        before = client.infer("idle", {"x": X})["probs"]
        client.infer("pinned", {"x": X})
        wait_until_loaded(client, ["pinned"])  # idle went; pinned, just as idle, stayed
        after = client.infer("idle", {"x": X})["probs"]  # loads again on demand
        assert sorted(client.ping()["loaded"]) == ["idle", "pinned"]
    np.testing.assert_array_equal(before, after)
    assert "unloading model idle" in daemon.log()


def test_a_model_that_fails_to_load_answers_load_failed_and_others_serve(
    start_daemon: DaemonFactory, models_dir: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx file")
    daemon = start_daemon({"models": {"broken": {"path": str(broken)}, "demo": model(models_dir)}})
    with daemon.client() as client:
        for _ in range(2):  # a failed load is reported (at once while it backs off)
            with pytest.raises(ModelLoadError, match="model 'broken': cannot load"):
                client.infer("broken", {"x": X})
        assert client.infer("demo", {"x": X})["probs"].shape == (1, 4)
        assert client.ping()["loaded"] == ["demo"]


def edgectl_text(daemon: DaemonProcess, *args: str) -> str:
    """What ``edgectl ARGS`` prints for an operator."""
    command = [*EDGECTL, "--control", daemon.control_endpoint, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout


def load_attempts(daemon: DaemonProcess, name: str) -> int:
    """Failed loads of ``name`` so far, as the log records them (one record per attempt)."""
    return daemon.log().count(f"ERROR edged.models.registry: model {name!r}: cannot load")


def test_a_model_that_cannot_load_shows_as_failed_and_backs_off_until_fixed(
    start_daemon: DaemonFactory, models_dir: Path, tmp_path: Path
) -> None:
    files = {name: tmp_path / f"{name}.onnx" for name in ("waited", "loaded")}
    for file in files.values():
        file.write_bytes(b"not an onnx file")
    daemon = start_daemon({"models": {name: {"path": str(file)} for name, file in files.items()}})
    with daemon.client() as client:
        for name in files:
            for _ in range(5):  # back to back: the first failed load answers the others at once
                with pytest.raises(ModelLoadError, match=f"model '{name}': cannot load"):
                    client.infer(name, {"x": X})
    models = edgectl_json(daemon, "status")["models"]
    for name in files:
        entry = models[name]
        assert entry["state"] == "failed"
        assert entry["error"]["code"] == "LOAD_FAILED"
        assert f"model '{name}': cannot load" in entry["error"]["message"]
        assert 1 <= entry["failed_loads"] == load_attempts(daemon, name) < 5
        assert 0 <= entry["retry_in_s"] <= 2 ** (entry["failed_loads"] - 1)
        assert edgectl_json(daemon, "models")["models"][name]["error"] == entry["error"]
    assert "  waited: v1 failed\n    LOAD_FAILED: model 'waited'" in edgectl_text(daemon, "status")

    attempts = load_attempts(daemon, "loaded")
    with daemon.control() as control:  # `load` tries now, whatever the back-off, and resets it
        with pytest.raises(ModelLoadError):
            control.command("load", model="loaded")
        assert control.command("status")["models"]["loaded"]["failed_loads"] == 1
    assert load_attempts(daemon, "loaded") == attempts + 1

    for file in files.values():
        shutil.copyfile(models_dir / "demo.onnx", file)
    assert edgectl_json(daemon, "load", "loaded")["state"] == "ready"
    deadline = time.monotonic() + 30  # "waited": the first request after the back-off loads it
    while edgectl_json(daemon, "status")["models"]["waited"]["retry_in_s"] > 0:
        assert time.monotonic() < deadline, "the back-off never ended"
        time.sleep(0.1)
    with daemon.client() as client:
        for name in files:
            assert client.infer(name, {"x": X})["probs"].shape == (1, 4)
    assert edgectl_json(daemon, "status")["models"] == {
        "waited": {"version": 1, "state": "ready"},
        "loaded": {"version": 1, "state": "ready"},
    }


def build_fixed_model(path: Path) -> Path:
    """x float32[1, 8] -> Relu -> y: a model without a dynamic batch dimension."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what every onnxruntime edged supports reads (the onnx default may not)
    onnx.save(model, path)
    return path


def test_max_batch_without_a_batch_dimension_is_a_warning_at_load_and_in_models(
    start_daemon: DaemonFactory, models_dir: Path, tmp_path: Path
) -> None:
    fixed = build_fixed_model(tmp_path / "fixed.onnx")
    models = {
        "fixed": {"path": str(fixed), "max_batch": 8, "preload": True},
        "demo": model(models_dir, max_batch=8, preload=True),
    }
    daemon = start_daemon({"models": models})
    replies = edgectl_json(daemon, "models")["models"]
    assert replies["demo"]["warnings"] == []
    (warning,) = replies["fixed"]["warnings"]
    assert warning.startswith("max_batch 8 has no effect") and "x: float32[1, 8]" in warning
    assert f"WARNING edged.models.loading: model fixed version 1: {warning}" in daemon.log()
    assert f"  warning: {warning}" in edgectl_text(daemon, "models")


def test_onnxruntime_prints_nothing_and_a_normal_stop_warns_of_nothing(
    start_daemon: DaemonFactory, models_dir: Path, tmp_path: Path
) -> None:
    one_row = build_one_row_model(tmp_path / "one_row.onnx", 8)
    daemon = start_daemon(
        {"models": {"demo": model(models_dir), "one_row": {"path": str(one_row)}}}
    )
    with daemon.client() as client:
        assert client.infer("demo", {"x": X})["probs"].shape == (1, 4)
        assert client.infer("one_row", {"x": np.ones((1, 8), np.float32)})["y"].shape == (1, 8)
    assert daemon.stop() == 0
    log = daemon.log()
    assert "stopped" in log
    assert " WARNING " not in log and " ERROR " not in log, log
    # a run that fails: onnxruntime would print its own error line beside edged's record
    failing = start_daemon({"models": {"one_row": {"path": str(one_row)}}}, tmp_path / "fails")
    with failing.client() as client, pytest.raises(RunFailed):
        client.infer("one_row", {"x": np.ones((2, 8), np.float32)})
    assert failing.stop() == 0
    for daemon_log in (log, failing.log()):
        assert ":onnxruntime:" not in daemon_log and "\x1b[" not in daemon_log, daemon_log
