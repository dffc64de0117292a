"""The model store: complete versions only, manifests checked, and served by the daemon."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from edged.errors import StoreError
from edged.store import MANIFEST, STAGING, STALE_STAGING_S, ModelStore
from edged.testing import DaemonExited
from tests.conftest import DaemonFactory


def test_add_numbers_versions_and_writes_a_manifest(tmp_path: Path, models_dir: Path) -> None:
    store = ModelStore(tmp_path / "models")
    source = models_dir / "demo.onnx"
    first = store.add("vad", source, "onnx")
    second = store.add("vad", models_dir / "image.onnx", "onnx")
    assert (first.version, second.version) == (1, 2)
    assert store.versions("vad") == [1, 2]
    assert store.latest("vad") == second
    assert first.sha256 == hashlib.sha256(source.read_bytes()).hexdigest()
    assert first.size == source.stat().st_size and first.format == "onnx"
    assert store.model_path(first).read_bytes() == source.read_bytes()
    on_disk = json.loads((tmp_path / "models" / "vad" / "1" / MANIFEST).read_text())
    assert on_disk["sha256"] == first.sha256 and on_disk["created"].endswith("+00:00")


def test_incomplete_versions_are_never_served_nor_reused(tmp_path: Path, models_dir: Path) -> None:
    store = ModelStore(tmp_path)
    (tmp_path / "m" / "1").mkdir(parents=True)  # a version directory without its manifest
    old = tmp_path / STAGING / "leftover"  # an add cut off by a power loss, hours ago
    old.mkdir(parents=True)
    os.utime(old, (time.time() - 2 * STALE_STAGING_S,) * 2)
    recent = tmp_path / STAGING / "running"  # an add still running in another process
    recent.mkdir()
    assert store.versions("m") == [] and store.latest("m") is None
    manifest = store.add("m", models_dir / "demo.onnx", "onnx")
    assert manifest.version == 2
    assert sorted(p.name for p in (tmp_path / STAGING).iterdir()) == ["running"]


@pytest.mark.parametrize(
    "broken",
    ["not json", json.dumps({"name": "m"}), json.dumps({"name": "m", "version": "1"})],
)
def test_unreadable_manifests_are_store_errors(tmp_path: Path, broken: str) -> None:
    directory = tmp_path / "m" / "1"
    directory.mkdir(parents=True)
    (directory / MANIFEST).write_text(broken)
    with pytest.raises(StoreError, match="manifest"):
        ModelStore(tmp_path).latest("m")


def test_a_model_declared_without_a_path_serves_the_newest_store_version(
    start_daemon: DaemonFactory, models_dir: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    store = ModelStore(state / "models")
    store.add("clf", models_dir / "demo.onnx", "onnx")
    store.add("clf", models_dir / "demo.onnx", "onnx")
    daemon = start_daemon({"daemon": {"state_dir": str(state)}, "models": {"clf": {}}})
    with daemon.client() as client:
        result = client.infer("clf", {"x": np.zeros((1, 16), np.float32)})
    assert (result.model, result.version) == ("clf", 2)


def test_a_store_reference_with_no_version_fails_the_start(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    with pytest.raises(DaemonExited, match="model 'clf' has no path and the store has no version"):
        start_daemon({"daemon": {"state_dir": str(tmp_path / "state")}, "models": {"clf": {}}})
