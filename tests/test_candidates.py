"""Candidate versions: canaries serve a share of requests, shadows are compared, then promote."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edged.errors import OpNotSupported
from edged.testing import DaemonProcess
from tests.conftest import DaemonFactory, store_versions
from tests.models import build_wide_model

X = np.random.default_rng(7).standard_normal((1, 64), dtype=np.float32)


@pytest.fixture
def trial_daemon(start_daemon: DaemonFactory, tmp_path: Path) -> DaemonProcess:
    """m: v1 active; v2 computes something else; v3 is a byte copy of v1."""
    first = build_wide_model(tmp_path / "one.onnx", 64, 0)
    other = build_wide_model(tmp_path / "two.onnx", 64, 1)
    same = shutil.copy(first, tmp_path / "same.onnx")
    store_versions(tmp_path / "d", "m", [first, other, Path(same)])
    return start_daemon({"models": {"m": {"preload": True, "version": 1}}}, workdir=tmp_path / "d")


def candidate(daemon: DaemonProcess, count: int) -> dict[str, Any]:
    """The candidate's figures once ``count`` shadow runs were compared."""
    deadline = time.monotonic() + 20
    with daemon.control() as control:
        while True:
            found: dict[str, Any] = control.command("models")["models"]["m"]["candidate"]
            if found["shadow"]["compared"] >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.02)


def test_a_shadow_is_compared_and_never_answers(trial_daemon: DaemonProcess) -> None:
    with trial_daemon.control() as control, trial_daemon.client() as client:
        control.command("shadow", model="m", version=2)
        versions = {client.infer("m", {"x": X}).version for _ in range(20)}
        differing = candidate(trial_daemon, 20)
        control.command("discard", model="m")
        control.command("shadow", model="m", version=3)
        for _ in range(10):
            client.infer("m", {"x": X})
        identical = candidate(trial_daemon, 10)
        models = control.command("models")["models"]["m"]
    assert versions == {1}
    assert differing["shadow"]["compared"] == 20 and differing["shadow"]["max_abs_diff"] > 0.1
    assert identical["shadow"] == {
        "compared": 10,
        "argmax_agreement": 1.0,
        "max_abs_diff": 0.0,
        "mean_max_abs_diff": 0.0,
        "mismatched": 0,
        "failures": 0,
        "skipped": 0,
    }
    assert models["loaded"] == [1, 3] and models["version"] == 1


def test_a_canary_takes_its_share_then_is_promoted_and_rolled_back(
    trial_daemon: DaemonProcess,
) -> None:
    with trial_daemon.control() as control, trial_daemon.client() as client:
        control.command("canary", model="m", version=2, fraction=0.25)
        results = [client.infer("m", {"x": X}) for _ in range(40)]
        by_version = {v: [r for r in results if r.version == v] for v in (1, 2)}
        pinned = client.infer("m", {"x": X}, version=2)
        report = control.command("promote", model="m")
        after = {client.infer("m", {"x": X}).version for _ in range(5)}
        control.command("rollback", model="m")
        back = client.infer("m", {"x": X}).version
    assert len(by_version[2]) == 10 and len(by_version[1]) == 30
    assert not np.allclose(by_version[1][0]["y"], by_version[2][0]["y"])
    assert pinned.version == 2 and np.allclose(pinned["y"], by_version[2][0]["y"])
    assert (report["from_version"], report["version"], report["policy"]) == (1, 2, "promote")
    assert after == {2} and back == 1


def test_gguf_models_take_canaries_but_not_shadows(
    start_daemon: DaemonFactory, gguf_models: dict[str, Path], tmp_path: Path
) -> None:
    store_versions(tmp_path / "d", "llm", [gguf_models["q8"], gguf_models["q4"]])
    model = {"preload": True, "version": 1, "gguf": {"n_ctx": 512, "n_threads": 1}}
    daemon = start_daemon({"models": {"llm": model}}, workdir=tmp_path / "d")
    with daemon.control() as control, daemon.client() as client:
        with pytest.raises(OpNotSupported, match="GGUF models take canaries"):
            control.command("shadow", model="llm", version=2)
        control.command("canary", model="llm", version=2, fraction=0.5)
        versions = [client.generate("llm", "hi", max_tokens=2).text().version for _ in range(4)]
    assert sorted(versions) == [1, 1, 2, 2]
