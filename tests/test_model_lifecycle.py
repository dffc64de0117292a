"""Declared models load on first use (or at start), unload when idle, and fail loads cleanly."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edged.client import AsyncClient, Client
from edged.errors import ModelLoadError
from tests.conftest import DaemonFactory

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
        for _ in range(2):  # a failed load is reported, and tried again on the next request
            with pytest.raises(ModelLoadError, match="model 'broken': cannot load"):
                client.infer("broken", {"x": X})
        assert client.infer("demo", {"x": X})["probs"].shape == (1, 4)
        assert client.ping()["loaded"] == ["demo"]
