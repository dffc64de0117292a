"""Config reload (SIGHUP, the reload command): files swapped in, models added and removed."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import tomli_w

from edged.errors import ConfigError, UnknownModel
from edged.store import ModelStore
from edged.testing import DaemonProcess
from tests.conftest import DaemonFactory, edgectl_json
from tests.models import build_wide_model

X = np.ones((1, 64), np.float32)


def rewrite(daemon: DaemonProcess, models: dict[str, Any]) -> None:
    config = {**daemon.config, "models": models}
    daemon.config_path.write_text(tomli_w.dumps(config))


def wait_for_version(daemon: DaemonProcess, model: str, version: int) -> None:
    deadline = time.monotonic() + 30
    with daemon.client() as client:
        while client.infer(model, {"x": X}).version != version:
            assert time.monotonic() < deadline, daemon.log()
            time.sleep(0.05)


def test_sighup_swaps_a_changed_file_adds_and_removes_models(
    start_daemon: DaemonFactory, models_dir: Path, tmp_path: Path
) -> None:
    first = build_wide_model(tmp_path / "a1.onnx", 64, 1)
    second = build_wide_model(tmp_path / "a2.onnx", 64, 2)
    demo = str(models_dir / "demo.onnx")
    daemon = start_daemon({"models": {"a": {"path": str(first)}, "b": {"path": demo}}})
    rewrite(daemon, {"a": {"path": str(second)}, "c": {"path": demo, "preload": True}})
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for_version(daemon, "a", 2)
    with daemon.client() as client:
        assert sorted(client.ping()["models"]) == ["a", "c"]
        with pytest.raises(UnknownModel):
            client.infer("b", {"x": np.zeros((1, 16), np.float32)})
        assert client.infer("c", {"x": np.zeros((1, 16), np.float32)})["probs"].shape == (1, 4)
        expected = ort.InferenceSession(str(second)).run(None, {"x": X})[0]
        np.testing.assert_allclose(client.infer("a", {"x": X})["y"], expected, rtol=1e-5)


def test_edgectl_config_shows_what_the_last_reload_put_in_effect(
    start_daemon: DaemonFactory, models_dir: Path
) -> None:
    demo = str(models_dir / "demo.onnx")
    daemon = start_daemon({"models": {"demo": {"path": demo}}})
    rewrite(daemon, {"demo": {"path": demo}, "extra": {"path": demo, "queue_depth": 7}})
    edgectl_json(daemon, "reload")
    shown = edgectl_json(daemon, "config")["config"]["models"]
    assert sorted(shown) == ["demo", "extra"] and shown["extra"]["queue_depth"] == 7


def test_an_http_change_waits_for_a_restart_and_says_so(
    start_daemon: DaemonFactory, models_dir: Path
) -> None:
    daemon = start_daemon({"models": {"demo": {"path": str(models_dir / "demo.onnx")}}})
    daemon.config_path.write_text(
        tomli_w.dumps({**daemon.config, "http": {"listen": "127.0.0.1:1"}})
    )
    report = edgectl_json(daemon, "reload")
    assert report["restart_needed"] == ["http.listen"]
    assert edgectl_json(daemon, "config")["config"]["http"]["listen"] == ""  # still off


def test_an_invalid_config_changes_nothing(start_daemon: DaemonFactory, models_dir: Path) -> None:
    daemon = start_daemon({"models": {"demo": {"path": str(models_dir / "demo.onnx")}}})
    daemon.config_path.write_text("[models.demo]\npaht = 'typo.onnx'\n")
    with daemon.control() as control, pytest.raises(ConfigError, match="did you mean"):
        control.command("reload")
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)  # logged, nothing changes
    with daemon.client() as client:
        assert client.infer("demo", {"x": np.zeros((1, 16), np.float32)}).version == 1
    deadline = time.monotonic() + 10
    while "reload refused, nothing changed" not in daemon.log():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_reload_takes_new_store_versions_but_never_undoes_a_rollback(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    store = ModelStore(tmp_path / "d" / "state" / "models")
    for seed in (1, 2):
        store.add("m", build_wide_model(tmp_path / f"m{seed}.onnx", 64, seed), "onnx")
    daemon = start_daemon({"models": {"m": {"preload": True}}}, workdir=tmp_path / "d")
    with daemon.control() as control:
        assert control.command("reload")["swapped"] == {}
        control.command("swap", model="m", version=1)  # the operator goes back to 1
        assert control.command("reload")["swapped"] == {}  # 2 served before: not "new"
        store.add("m", build_wide_model(tmp_path / "m3.onnx", 64, 3), "onnx")
        report = control.command("reload")
    assert report["swapped"]["m"]["version"] == 3
    wait_for_version(daemon, "m", 3)


def test_a_failed_addition_is_retried_by_the_next_reload_and_edgectl_drives_it(
    start_daemon: DaemonFactory, models_dir: Path, tmp_path: Path
) -> None:
    demo = {"path": str(models_dir / "demo.onnx")}
    daemon = start_daemon({"models": {"demo": demo}})
    later = tmp_path / "later.onnx"
    rewrite(daemon, {"demo": demo, "late": {"path": str(later)}})
    with daemon.control() as control:
        assert "no file at" in control.command("reload")["failed"]["late"]
        build_wide_model(later, 64, 4)
        assert control.command("reload")["added"] == ["late"]
        rewrite(daemon, {})
        with pytest.raises(ConfigError, match="declares no models"):
            control.command("reload")
    assert sorted(edgectl_json(daemon, "models")["models"]) == ["demo", "late"]
