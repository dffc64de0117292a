"""examples/camera runs as its README says: a daemon from the example's config, the example's
camera process sending frames by shared memory, detections printed in the frame's pixels."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import DaemonFactory

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "camera"


def test_the_camera_example_prints_the_squares_it_sent(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    camera = [sys.executable, str(EXAMPLE / "camera.py")]
    model = tmp_path / "squares.onnx"
    subprocess.run([*camera, "--make-model", str(model)], capture_output=True, check=True)
    config = tomllib.loads((EXAMPLE / "edged.toml").read_text())
    del config["daemon"]  # the test's own directories
    config["models"]["detector"]["path"] = str(model)
    daemon = start_daemon(config)
    run = subprocess.run(
        [*camera, "--endpoint", daemon.endpoint, "--frames", "3"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = run.stdout.splitlines()
    assert lines[0].startswith("frame 0: 2 found  [0, 270, 480, 540]"), run.stdout
    assert "[960, 810, 1440, 1080]" in lines[0]
    assert lines[1].startswith("frame 1: 2 found  [480, 270, 960, 540]"), run.stdout
    assert lines[-1].startswith("round trip: median")
