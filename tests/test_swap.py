"""Hot swap: versions replaced under load without a failed request, validated, reversible."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edged.store import ModelStore
from edged.testing import DaemonProcess
from tests.conftest import DaemonFactory
from tests.models import build_wide_model

CLIENTS = 3
SWAPS = 20


def store_versions(daemon_dir: Path, name: str, files: list[Path], **golden: Path) -> ModelStore:
    store = ModelStore(daemon_dir / "state" / "models")
    for file in files:
        store.add(name, file, "gguf" if file.suffix == ".gguf" else "onnx", golden.get(file.name))
    return store


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
    files = wide_versions(tmp_path, 2048)  # 16 MiB of weights, about 52 MiB charged each
    expected = expected_outputs(files, 2048, tmp_path / "expected.npz")
    config = {"memory": {"budget_mb": 80, "reserve_mb": 0}, "models": {"m": {"preload": True}}}
    store_versions(tmp_path / "d", "m", files)
    daemon = start_daemon(config, workdir=tmp_path / "d")
    with load_clients(daemon, expected, tmp_path) as tallies:
        reports = swap_back_and_forth(daemon)
    assert {r["policy"] for r in reports} == {"replace"}
    assert_nothing_failed(tallies)
