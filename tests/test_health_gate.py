"""The health gate: a version that serves live traffic worse than the one it replaced is
rolled back on its own, and a power cut during that rollback still leaves the old one."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edged.client import Client
from edged.errors import EdgedError, Unhealthy
from edged.faults import ENV
from edged.ota import bundle
from edged.store import ModelStore
from edged.testing import DaemonProcess
from tests.bundles import WIDTH, install, killed_during, make, serving, signing_keys
from tests.conftest import DaemonFactory, store_versions
from tests.models import SLOW_WIDTH, build_one_row_model, build_slow_model, build_wide_model

WINDOW_S = 30.0


def signed(tmp_path: Path, keys: dict[str, Path], version: int, model: Path) -> Path:
    out = tmp_path / f"m-{version}.bundle"
    bundle.build(out, "m", version, model)
    bundle.sign(out, keys["private"])
    return out


def start(
    start_daemon: DaemonFactory,
    tmp_path: Path,
    keys: dict[str, Path],
    v1: Path,
    window_s: float = WINDOW_S,
    **env: str,
) -> DaemonProcess:
    workdir = tmp_path / "d"
    store_versions(workdir, "m", [v1])
    ota = {
        "trusted_keys": str(keys["trusted"]),
        "health_window_s": window_s,
        "health_min_requests": 5,
    }
    config = {"ota": ota, "models": {"m": {"preload": True}}}
    return start_daemon(config, workdir=workdir, env=env)


@contextmanager
def traffic(daemon: DaemonProcess, x: np.ndarray) -> Iterator[Counter[Any]]:
    """A client sending ``x`` all along; replies tallied by version, errors by code."""
    tally: Counter[Any] = Counter()
    stop, first = threading.Event(), threading.Event()

    def run() -> None:
        # a short timeout: a request the daemon's death cuts off ends the thread soon
        with Client(daemon.endpoint, timeout=3) as client:
            while not stop.is_set():
                try:
                    tally[client.infer("m", {"x": x}).version] += 1
                except EdgedError as exc:
                    tally[exc.code] += 1
                first.set()

    worker = threading.Thread(target=run)
    worker.start()
    try:
        assert first.wait(30)
        yield tally
    finally:
        stop.set()
        worker.join(30)


def store(daemon: DaemonProcess) -> ModelStore:
    return ModelStore(daemon.workdir / "state" / "models")


def last_install(daemon: DaemonProcess) -> dict[str, Any]:
    with daemon.control() as control:
        installs: list[dict[str, Any]] = control.command("history")["installs"]
    return installs[-1]


def test_a_version_failing_live_requests_is_rolled_back_before_its_window_ends(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    keys = signing_keys(tmp_path)
    daemon = start(start_daemon, tmp_path, keys, build_wide_model(tmp_path / "v1.onnx", WIDTH))
    broken = signed(tmp_path, keys, 2, build_one_row_model(tmp_path / "v2.onnx", WIDTH))
    with traffic(daemon, np.ones((2, WIDTH), np.float32)) as tally:
        with pytest.raises(Unhealthy, match=r"requests failed.*rolled back to version 1"):
            install(daemon, broken)
        served_before = tally[1]
        assert serving(daemon) == 1
    assert tally["RUN_FAILED"] >= 5 and tally[1] > served_before  # served again after
    record = last_install(daemon)
    assert record["outcome"] == "rolled_back" and record["code"] == "UNHEALTHY"
    assert record["health"]["healthy"] is False and record["health"]["failures"] >= 5
    assert record["seconds"] < WINDOW_S  # judged as the failures came, not at the window's end
    assert store(daemon).versions("m") == [1] and store(daemon).current("m") == 1


def test_a_version_much_slower_on_live_traffic_is_rolled_back(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    keys = signing_keys(tmp_path)
    v1 = build_slow_model(tmp_path / "v1.onnx", layers=1)
    daemon = start(start_daemon, tmp_path, keys, v1, window_s=2.0)  # judged at its end
    slow = signed(tmp_path, keys, 2, build_slow_model(tmp_path / "v2.onnx", layers=200))
    x = np.ones((1, SLOW_WIDTH), np.float32)
    with traffic(daemon, x) as tally:
        while tally[1] < 50:  # the old version's latency is the baseline: let it have some
            time.sleep(0.01)
        with pytest.raises(Unhealthy, match="p50 latency"):
            install(daemon, slow)
    assert set(tally) == {1, 2}  # slow, but nothing failed
    health = last_install(daemon)["health"]
    assert health["latency_us"]["p50_us"] > 3 * health["baseline_latency_us"]["p50_us"]
    assert store(daemon).versions("m") == [1]


def test_a_power_cut_while_rolling_back_leaves_the_old_version_serving(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    keys = signing_keys(tmp_path)
    v1 = build_wide_model(tmp_path / "v1.onnx", WIDTH)
    doomed = start(start_daemon, tmp_path, keys, v1, **{ENV: "ota.rolling_back"})
    broken = signed(tmp_path, keys, 2, build_one_row_model(tmp_path / "v2.onnx", WIDTH))
    with traffic(doomed, np.ones((2, WIDTH), np.float32)):
        killed_during(doomed, broken)
    daemon = start_daemon(doomed.config, workdir=doomed.workdir)
    assert serving(daemon) == 1 and store(daemon).versions("m") == [1]
    assert last_install(daemon)["code"] == "INTERRUPTED"
    assert install(daemon, make(tmp_path, keys, 3))["outcome"] == "installed"
    assert serving(daemon) == 3
