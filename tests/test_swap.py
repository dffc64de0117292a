"""Hot swap: versions replaced under load without a failed request, validated, reversible."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import onnxruntime as ort
import pytest
import zmq

from edged.errors import BusyError, ModelLoadError, SwapRejected, UnknownModel, UnknownOp
from edged.testing import DaemonProcess
from tests.conftest import Connect, DaemonFactory, store_versions
from tests.models import build_wide_model

CLIENTS = 3
SWAPS = 20
REPO = Path(__file__).resolve().parents[1]


def wide_versions(root: Path, width: int) -> list[Path]:
    return [build_wide_model(root / f"wide{seed}.onnx", width, seed) for seed in (0, 1)]


def expected_outputs(files: list[Path], width: int, out: Path) -> Path:
    """Each version's output for the one input the load clients send, by version number."""
    x = np.random.default_rng(3).standard_normal((1, width), dtype=np.float32)
    outputs = {
        f"v{version}": ort.InferenceSession(str(file)).run(None, {"x": x})[0]
        for version, file in enumerate(files, start=1)
    }
    np.savez(out, x=x, **outputs)
    return out


@contextmanager
def load_clients(
    daemon: DaemonProcess, expected: Path, tmp: Path
) -> Iterator[list[dict[str, Any]]]:
    """CLIENTS sensor processes inferring in a loop; their tallies fill the list on exit."""
    stop = tmp / "stop"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.swap_load",
                daemon.endpoint,
                "m",
                str(expected),
                str(stop),
            ],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,  # where ``tests`` is importable, wherever pytest was started
        )
        for _ in range(CLIENTS)
    ]
    tallies: list[dict[str, Any]] = []
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        yield tallies
    finally:
        stop.touch()
        for proc in procs:
            out, _ = proc.communicate(timeout=60)
            tallies.append(json.loads(out))


def swap_back_and_forth(daemon: DaemonProcess, **options: Any) -> list[dict[str, Any]]:
    with daemon.control() as control:
        return [
            control.command("swap", model="m", version=1 + i % 2, **options) for i in range(SWAPS)
        ]


def assert_nothing_failed(tallies: list[dict[str, Any]]) -> None:
    assert len(tallies) == CLIENTS
    for tally in tallies:
        assert tally["failures"] == 0, tally["errors"][:5]
        assert tally["mismatches"] == 0
        assert tally["versions"] == [1, 2]  # its traffic spanned swaps


def test_twenty_swaps_under_load_fail_nothing_and_replies_name_their_version(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    files = wide_versions(tmp_path, 256)
    expected = expected_outputs(files, 256, tmp_path / "expected.npz")
    store_versions(tmp_path / "d", "m", files)
    daemon = start_daemon({"models": {"m": {"preload": True}}}, workdir=tmp_path / "d")
    with load_clients(daemon, expected, tmp_path) as tallies:
        reports = swap_back_and_forth(daemon)
    assert [r["version"] for r in reports] == [1 + i % 2 for i in range(SWAPS)]
    assert {r["policy"] for r in reports} == {"overlap"}
    assert_nothing_failed(tallies)


def test_with_room_for_one_version_swaps_replace_and_still_fail_nothing(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    files = wide_versions(tmp_path, 2048)  # 16 MiB of weights, about 36 MiB charged each
    expected = expected_outputs(files, 2048, tmp_path / "expected.npz")
    config = {"memory": {"budget_mb": 60, "reserve_mb": 0}, "models": {"m": {"preload": True}}}
    store_versions(tmp_path / "d", "m", files)
    daemon = start_daemon(config, workdir=tmp_path / "d")
    with load_clients(daemon, expected, tmp_path) as tallies:
        reports = swap_back_and_forth(daemon)
    assert {r["policy"] for r in reports} == {"replace"}
    assert_nothing_failed(tallies)


def write_golden(path: Path, model: Path, width: int, *, wrong: bool = False) -> Path:
    """Golden vectors for ``model``: its real outputs, or deliberately wrong ones."""
    x = np.ones((2, width), np.float32)
    y = ort.InferenceSession(str(model)).run(None, {"x": x})[0]
    np.savez(path, **{"input.x": x, "output.y": y + 1.0 if wrong else y})
    return path


@pytest.fixture
def swappable(start_daemon: DaemonFactory, tmp_path: Path) -> DaemonProcess:
    """Model m: v1 and v2 compatible (v2 with passing golden vectors), v3 with another
    signature, v4 failing its golden vectors, v5 not a model at all."""
    good = wide_versions(tmp_path, 64)
    other = build_wide_model(tmp_path / "other.onnx", 32, 5)
    failing = build_wide_model(tmp_path / "failing.onnx", 64, 6)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model" * 10)
    golden = {
        "wide1.onnx": write_golden(tmp_path / "g1.npz", good[1], 64),
        "failing.onnx": write_golden(tmp_path / "g4.npz", failing, 64, wrong=True),
    }
    store_versions(tmp_path / "d", "m", [*good, other, failing, broken], **golden)
    return start_daemon({"models": {"m": {"preload": True, "version": 1}}}, workdir=tmp_path / "d")


def serving_version(daemon: DaemonProcess) -> int:
    with daemon.client() as client:
        return client.infer("m", {"x": np.ones((1, 64), np.float32)}).version


def test_bad_versions_are_rejected_and_the_old_one_keeps_serving(swappable: DaemonProcess) -> None:
    with swappable.control() as control:
        assert control.command("swap", model="m", version=2)["version"] == 2  # golden vectors pass
        cases = [
            (3, "overlap", SwapRejected, "input x: float32[?, 64] became x: float32[?, 32]"),
            (4, "overlap", SwapRejected, "fails its golden vectors: output 'y' differs by up to 1"),
            (5, "overlap", ModelLoadError, "cannot load"),
            (3, "replace", SwapRejected, "incompatible"),  # unloaded first, then loaded back
            (5, "replace", ModelLoadError, "cannot load"),
        ]
        for version, policy, error, message in cases:
            with pytest.raises(error, match=re.escape(message)):
                control.command("swap", model="m", version=version, policy=policy)
            assert serving_version(swappable) == 2
        models = control.command("models")["models"]["m"]
    assert (
        models["version"] == 2 and models["loaded"] == [2] and models["stored"] == [1, 2, 3, 4, 5]
    )
    assert "loading version 2 back" in swappable.log()


def test_rollback_pinning_and_one_swap_at_a_time(
    swappable: DaemonProcess, connect: Connect
) -> None:
    with swappable.control() as control:
        control.command("swap", model="m", version=2)
        report = control.command("rollback", model="m")
        assert (report["from_version"], report["version"]) == (2, 1)
        assert serving_version(swappable) == 1
        with pytest.raises(SwapRejected):  # force skips the interface check, not the warm-up
            control.command("swap", model="m", version=4, force=True)
        with swappable.client() as client, pytest.raises(UnknownModel, match="no version 2"):
            client.infer("m", {"x": np.ones((1, 64), np.float32)}, version=2)
    sock = connect(swappable.control_endpoint)
    sock.setsockopt(zmq.RCVTIMEO, 30_000)
    for request_id in (1, 2):  # the second arrives while the first is loading version 2
        header = {"v": 1, "id": request_id, "op": "swap", "model": "m", "version": 2}
        sock.send(msgpack.packb(header))
    replies = {reply["id"]: reply for reply in (msgpack.unpackb(sock.recv()) for _ in range(2))}
    assert replies[1]["ok"] and replies[1]["version"] == 2
    assert replies[2]["error"]["code"] == BusyError.code
    assert "already swapping" in replies[2]["error"]["message"]


def test_control_and_inference_ops_stay_on_their_own_sockets(swappable: DaemonProcess) -> None:
    with swappable.client() as client, pytest.raises(UnknownOp, match="control socket"):
        client.command("swap", model="m", version=2)
    with swappable.control() as control, pytest.raises(UnknownOp, match="not a control command"):
        control.infer("m", {"x": np.ones((1, 64), np.float32)})


def test_a_gguf_swap_lets_the_running_generation_finish_on_the_old_version(
    start_daemon: DaemonFactory, gguf_models: dict[str, Path], models_dir: Path, tmp_path: Path
) -> None:
    versions = [gguf_models["q8"], gguf_models["q4"], models_dir / "demo.onnx"]
    store_versions(tmp_path / "d", "llm", versions)
    model = {"preload": True, "version": 2, "gguf": {"n_ctx": 512, "n_threads": 1}}
    daemon = start_daemon({"models": {"llm": model}}, workdir=tmp_path / "d")
    with daemon.client() as client, daemon.control() as control:
        with pytest.raises(SwapRejected, match="serves infer where the active version serves"):
            control.command("swap", model="llm", version=3)
        stream = client.generate("llm", "the cat", max_tokens=300, temperature=0)
        next(iter(stream))  # version 2 is generating
        report = control.command("swap", model="llm", version=1)  # returns once 2 is done
        done = stream.text()
        after = client.generate("llm", "the cat", max_tokens=3).text()
    assert report["policy"] == "overlap"
    assert done.version == 2 and done.completion_tokens == 300 and done.finish_reason == "length"
    assert after.version == 1


def test_what_an_operator_swaps_to_is_what_a_restart_serves(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    store_versions(tmp_path / "d", "m", wide_versions(tmp_path, 64))
    config = {"models": {"m": {"preload": True}}}
    daemon = start_daemon(config, workdir=tmp_path / "d")
    assert serving_version(daemon) == 2  # the newest, while nothing was committed
    with daemon.control() as control:
        control.command("swap", model="m", version=1)
    assert daemon.stop() == 0
    assert serving_version(start_daemon(config, workdir=tmp_path / "d")) == 1
