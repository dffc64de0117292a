"""Sample capture against a live daemon: off by default; a ring that never outgrows
``capture_mb`` and keeps the newest requests; ``edgectl capture --out`` exporting exactly what
was sent and answered; mode "drift" keeping nothing while the stream is stationary and every
request once an alarm is up; ``--for`` capturing on request; BAD_REQUEST naming the key that
turns capture on."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edged.config import MIB
from edged.errors import BadRequest, UnknownModel
from edged.testing import DaemonProcess
from tests.conftest import DaemonFactory, edgectl_json
from tests.models import build_wide_model

Array = np.ndarray[Any, Any]
WIDTH = 8
#: small windows keep the test short; the defaults are larger (docs/OPERATIONS.md)
DRIFT: dict[str, Any] = {"max_per_s": 0, "reference_size": 20, "window": 20}
#: the same rows, request after request: the window's distribution is the reference's exactly,
#: so no drift alarm can come from sampling
STATIONARY = np.random.default_rng(0).standard_normal((10, WIDTH)).astype(np.float32)


def config(tmp_path: Path, **drift: Any) -> dict[str, Any]:
    model = build_wide_model(tmp_path / "wide.onnx", WIDTH, 1)
    return {"models": {"m": {"path": str(model), "drift": DRIFT | drift}}}


def send(daemon: DaemonProcess, inputs: list[Array]) -> list[Array]:
    """Each input as one request; the outputs ``y``."""
    with daemon.client(timeout=30) as client:
        return [client.infer("m", {"x": x}).outputs["y"] for x in inputs]


def profiled(daemon: DaemonProcess, count: int) -> None:
    """Wait until the monitor has profiled ``count`` requests."""
    deadline = time.monotonic() + 30
    while edgectl_json(daemon, "drift", "m").get("profiled", 0) < count:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def ring(daemon: DaemonProcess) -> Path:
    return daemon.workdir / "state" / "capture" / "m"


def captured(daemon: DaemonProcess, count: int) -> list[Path]:
    """The ring's files once the ``count``-th captured request is in it (seq ``count - 1``)."""
    newest = ring(daemon) / f"{count - 1:012d}.npz"
    deadline = time.monotonic() + 30
    while not newest.exists():
        assert time.monotonic() < deadline, sorted(ring(daemon).glob("*"))
        time.sleep(0.02)
    return sorted(ring(daemon).glob("*.npz"))


def on_disk(directory: Path) -> int:
    """Bytes of every file in ``directory``, temporary ones included."""
    total = 0
    for path in directory.glob("*") if directory.is_dir() else []:
        with contextlib.suppress(FileNotFoundError):  # rotated out meanwhile
            total += path.stat().st_size
    return total


def export(daemon: DaemonProcess, out: Path) -> tuple[dict[str, Any], list[Path]]:
    """``edgectl capture m --out OUT``: its reply and the requests' directories, oldest first."""
    reply = edgectl_json(daemon, "capture", "m", "--out", str(out))
    assert reply["out"] == str(out) and reply["model"] == "m"
    return reply, sorted(path for path in out.iterdir() if path.is_dir())


def test_capture_is_off_by_default_and_asking_for_it_names_the_key(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    settings = config(tmp_path)
    settings["models"]["plain"] = {"path": settings["models"]["m"]["path"]}
    daemon = start_daemon(settings, workdir=tmp_path / "d")
    send(daemon, [STATIONARY] * 5)
    profiled(daemon, 5)
    assert not (daemon.workdir / "state" / "capture").exists()
    with daemon.control() as control:
        for model, options in (("m", {"out": str(tmp_path / "o")}), ("plain", {"seconds": 5})):
            with pytest.raises(BadRequest, match=r"capture_mb above 0 turns capture on"):
                control.command("capture", model=model, **options)
        with pytest.raises(UnknownModel):
            control.command("capture", model="nope", seconds=5)
        for options, message in (
            ({}, "one of 'out'"),
            ({"out": "relative"}, "absolute path"),
            ({"seconds": 0}, "'seconds' must be a number above 0"),
        ):
            with pytest.raises(BadRequest, match=message):
                control.command("capture", model="m", **options)
    assert not (tmp_path / "o").exists()


def test_always_keeps_the_newest_requests_within_the_cap(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    daemon = start_daemon(config(tmp_path, capture_mb=1, capture="always"), workdir=tmp_path / "d")
    rng = np.random.default_rng(1)
    inputs = [rng.standard_normal((800, WIDTH)).astype(np.float32) for _ in range(50)]
    outputs = []
    with daemon.client(timeout=30) as client:
        for x in inputs:  # about 52 kB a request: some 20 fit in 1 MiB
            outputs.append(client.infer("m", {"x": x}).outputs["y"])
            assert on_disk(ring(daemon)) <= MIB
    kept = captured(daemon, len(inputs))
    assert on_disk(ring(daemon)) <= MIB
    assert 15 <= len(kept) < len(inputs)
    assert kept[-1].name == f"{len(inputs) - 1:012d}.npz"
    reply, requests = export(daemon, tmp_path / "out")
    assert reply["captured"] == len(requests) == len(kept) and reply["skipped"] == 0
    files = [path for path in (tmp_path / "out").rglob("*") if path.is_file()]
    assert reply["bytes"] == sum(path.stat().st_size for path in files)
    newest = list(zip(inputs, outputs, strict=True))[-len(requests) :]
    for directory, (x, y) in zip(requests, newest, strict=True):
        assert np.array_equal(np.load(directory / "input.x.npy"), x)
        assert np.array_equal(np.load(directory / "output.y.npy"), y)
    exported = [np.load(directory / "input.x.npy") for directory in requests]
    assert not any(np.array_equal(inputs[0], x) for x in exported)
    meta = json.loads((requests[-1] / "meta.json").read_text())
    assert meta["version"] == 1 and abs(meta["time"] - time.time()) < 60
    assert meta["files"] == {"input": {"x": "input.x.npy"}, "output": {"y": "output.y.npy"}}


def test_a_restart_carries_on_the_ring(start_daemon: DaemonFactory, tmp_path: Path) -> None:
    settings = config(tmp_path, capture_mb=1, capture="always")
    daemon = start_daemon(settings, workdir=tmp_path / "d")
    rng = np.random.default_rng(2)
    inputs = [rng.standard_normal((800, WIDTH)).astype(np.float32) for _ in range(31)]
    send(daemon, inputs[:30])
    before = captured(daemon, 30)
    daemon.stop()
    (ring(daemon) / f".{40:012d}.npz.tmp").write_bytes(bytes(MIB))  # a write cut short
    again = start_daemon(settings, workdir=tmp_path / "d")
    send(again, inputs[30:])
    after = captured(again, 31)
    assert after[-1].name == f"{30:012d}.npz" and before[0] not in after
    assert set(after[:-1]) <= set(before[1:])
    assert on_disk(ring(again)) <= MIB


def watching(start_daemon: DaemonFactory, tmp_path: Path) -> DaemonProcess:
    """A daemon capturing in "drift" mode, its model watched after 30 stationary requests."""
    daemon = start_daemon(config(tmp_path, capture_mb=1), workdir=tmp_path / "d")
    send(daemon, [STATIONARY] * 30)
    profiled(daemon, 30)
    return daemon


def test_drift_mode_captures_only_while_an_alarm_is_up(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    daemon = watching(start_daemon, tmp_path)
    found = edgectl_json(daemon, "drift", "m")
    assert found["state"] == "watching" and found["alarms"] == {}, found
    assert not ring(daemon).exists()
    broken = STATIONARY.copy()
    broken[0, 2] = np.nan
    send(daemon, [broken])
    profiled(daemon, 31)
    assert "nonfinite" in edgectl_json(daemon, "drift", "m")["alarms"]
    assert len(captured(daemon, 1)) == 1
    _, requests = export(daemon, tmp_path / "out")
    assert np.array_equal(np.load(requests[0] / "input.x.npy"), broken, equal_nan=True)
    assert "x[2]" in json.loads((requests[0] / "meta.json").read_text())["alarms"]["nonfinite"]


def test_for_seconds_captures_every_request_meanwhile(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    daemon = watching(start_daemon, tmp_path)
    started = time.time()
    until = edgectl_json(daemon, "capture", "m", "--for", "3")["capturing_until"]
    assert started + 2.5 < until < time.time() + 3.5
    rows = [STATIONARY[::-1], np.roll(STATIONARY, 1, axis=0)]  # new requests, no drift
    send(daemon, rows)
    assert len(captured(daemon, 2)) == 2
    time.sleep(max(0.0, until - time.time()) + 0.2)
    send(daemon, [STATIONARY])
    profiled(daemon, 33)
    _, requests = export(daemon, tmp_path / "out")
    assert len(requests) == 2
    for directory, x in zip(requests, rows, strict=True):
        assert np.array_equal(np.load(directory / "input.x.npy"), x)
