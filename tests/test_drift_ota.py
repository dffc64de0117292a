"""Drift monitoring and OTA: a bundle ships its version's reference (``edged bundle reference``),
which the device watches from the first request on; and with ``ota.health_output_drift`` a new
version whose outputs drift from the replaced version's reference is rolled back."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edged.client import Client
from edged.errors import EdgedError
from edged.ota import bundle
from edged.testing import DaemonProcess
from tests.bundles import calling, install, signing_keys
from tests.conftest import DaemonFactory, edgectl_json, store_versions
from tests.models import build_wide_model, wide_model

WIDTH = 8
DRIFT = {"max_per_s": 0, "reference_size": 200, "window": 200}


def scaled_model(path: Path, scale: float) -> Path:
    """The wide model of seed 1 with its weights times ``scale``: other outputs, same shape."""
    model = wide_model(WIDTH, 1)
    weight = numpy_helper.to_array(model.graph.initializer[0]) * scale
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(weight, "w"))
    onnx.save(model, str(path))
    return path


def signed(tmp_path: Path, keys: dict[str, Path], version: int, model: Path, **files: Path) -> Path:
    out = tmp_path / f"m-{version}.bundle"
    bundle.build(out, "m", version, model, **files)
    bundle.sign(out, keys["private"])
    return out


def start(
    start_daemon: DaemonFactory, tmp_path: Path, keys: dict[str, Path], **ota: Any
) -> DaemonProcess:
    workdir = tmp_path / "d"
    store_versions(workdir, "m", [build_wide_model(tmp_path / "v1.onnx", WIDTH, 1)])
    config = {
        "ota": {"trusted_keys": str(keys["trusted"]), **ota},
        "models": {"m": {"preload": True, "drift": DRIFT}},
    }
    return start_daemon(config, workdir=workdir)


def infer_rows(daemon: DaemonProcess, requests: int) -> None:
    rng = np.random.default_rng(0)
    with daemon.client(timeout=30) as client:
        for _ in range(requests):
            client.infer("m", {"x": rng.standard_normal((10, WIDTH)).astype(np.float32)})


def drift_report(daemon: DaemonProcess, profiled: int) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while (found := edgectl_json(daemon, "drift", "m")).get("profiled", 0) < profiled:
        assert time.monotonic() < deadline, found
        time.sleep(0.05)
    return dict(found)


def test_a_bundle_ships_the_reference_its_version_is_watched_against(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    keys = signing_keys(tmp_path)
    daemon = start(start_daemon, tmp_path, keys, health_window_s=0)
    model = build_wide_model(tmp_path / "v2.onnx", WIDTH, 2)
    samples = tmp_path / "samples.npz"
    np.savez(samples, x=np.random.default_rng(1).standard_normal((500, WIDTH)).astype(np.float32))
    made = subprocess.run(
        [
            *(sys.executable, "-m", "edged", "bundle", "reference", str(model)),
            *("--inputs", str(samples), "-o", str(tmp_path / "ref.json")),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(made.stdout)["rows"] == 500
    shipped = signed(tmp_path, keys, 2, model, reference=tmp_path / "ref.json")
    assert install(daemon, shipped)["outcome"] == "installed"
    infer_rows(daemon, 1)
    found = drift_report(daemon, 1)
    assert found["version"] == 2 and found["state"] == "filling the window"
    assert found["reference"]["source"] == "bundle" and found["reference"]["observations"] == 500
    broken = tmp_path / "broken.json"
    broken.write_text('{"format": "edged-drift-reference/1", "features": 3}')
    with daemon.control(timeout=60) as control, pytest.raises(EdgedError) as refused:
        control.command("install", path=str(signed(tmp_path, keys, 3, model, reference=broken)))
    assert refused.value.code == "BAD_BUNDLE" and "drift reference is not valid" in str(
        refused.value
    )


@pytest.mark.parametrize(("scale", "kept"), [(3.0, False), (1.0, True)])
def test_the_health_gate_rolls_back_a_version_whose_outputs_drifted(
    start_daemon: DaemonFactory, tmp_path: Path, scale: float, kept: bool
) -> None:
    keys = signing_keys(tmp_path)
    daemon = start(
        start_daemon,
        tmp_path,
        keys,
        health_window_s=3,
        health_min_requests=5,
        health_output_drift=True,
    )
    infer_rows(daemon, 20)  # version 1's reference: 200 rows
    assert drift_report(daemon, 20)["reference"]["source"] == "traffic"
    candidate = signed(tmp_path, keys, 2, scaled_model(tmp_path / "v2.onnx", scale))
    rng = np.random.default_rng(3)  # traffic like the reference's

    def infer(client: Client) -> int:
        x = rng.standard_normal((10, WIDTH)).astype(np.float32)
        return client.infer("m", {"x": x}).version

    with calling(daemon, infer) as tally:
        if kept:
            assert install(daemon, candidate)["outcome"] == "installed"
        else:
            with daemon.control(timeout=60) as control, pytest.raises(EdgedError) as failed:
                control.command("install", path=str(candidate))
            assert failed.value.code == "UNHEALTHY", failed.value
            assert "outputs drifted from version 1's: y[" in str(failed.value)
    assert tally["failures"] == 0 and 2 in tally["seen"]
    with daemon.client() as client:
        assert infer(client) == (2 if kept else 1)
