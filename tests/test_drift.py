"""Drift and data-contract monitoring against a live daemon: a stationary stream raises no
alarm; a 0.5-sigma shift of one feature, a stuck feature, NaNs and values outside the contract
each raise theirs, naming the feature, in the journal (log), the metrics, ``edgectl drift`` and
``edgectl models``; a reference captured from traffic survives a restart."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edged.config import parse_config
from edged.drift.features import Layout, observe
from edged.drift.reference import Reference
from edged.drift.window import Window, ks_critical
from edged.errors import ConfigError
from edged.testing import DaemonProcess
from tests.conftest import DaemonFactory, edgectl_json, store_versions
from tests.models import build_wide_model
from tests.test_metrics import samples

WIDTH = 8
ROWS = 10
#: small windows keep the test short; the defaults are larger (docs/OPERATIONS.md)
DRIFT = {
    "max_per_s": 0,
    "reference_size": 1000,
    "window": 400,
    "stuck_after": 30,
    "warn_interval_s": 0,
    "ranges": {"x": [-10, 10]},
}


@pytest.fixture
def config(tmp_path: Path) -> dict[str, Any]:
    model = build_wide_model(tmp_path / "wide.onnx", WIDTH, 1)
    return {"models": {"m": {"path": str(model), "drift": DRIFT}}}


def send(daemon: DaemonProcess, requests: int, seed: int, change: Any = None) -> None:
    """``requests`` requests of ``ROWS`` standard normal rows each, changed by ``change``."""
    rng = np.random.default_rng(seed)
    with daemon.client(timeout=30) as client:
        for _ in range(requests):
            x = rng.standard_normal((ROWS, WIDTH)).astype(np.float32)
            if change is not None:
                change(x)
            client.infer("m", {"x": x})


def report(daemon: DaemonProcess, profiled: int) -> dict[str, Any]:
    """``edgectl drift m`` once the monitor has profiled ``profiled`` requests."""
    deadline = time.monotonic() + 30
    while True:
        found: dict[str, Any] = edgectl_json(daemon, "drift", "m")
        if found.get("profiled", 0) >= profiled:
            return found
        assert time.monotonic() < deadline, found
        time.sleep(0.05)


def test_a_shift_of_half_a_sigma_is_flagged_and_a_stationary_stream_is_not(
    start_daemon: DaemonFactory, config: dict[str, Any]
) -> None:
    daemon = start_daemon(config)
    send(daemon, 100, seed=1)  # the reference: 1000 rows
    found = report(daemon, 100)
    assert found["reference"] == {"source": "traffic", "observations": 1000, "wanted": 1000}
    send(daemon, 200, seed=2)  # 2000 more rows of the same distribution
    found = report(daemon, 300)
    assert found["state"] == "watching" and found["alarms"] == {}, found
    assert found["worst"]["ks"] < found["thresholds"]["ks"]

    def shifted(x: np.ndarray[Any, Any]) -> None:
        x[:, 3] += 0.5

    send(daemon, 60, seed=3, change=shifted)
    found = report(daemon, 360)
    assert found["alarms"]["drift"][0] == "x[3]", found
    assert found["worst"]["feature"] == "x[3]" and found["worst"]["ks"] > found["thresholds"]["ks"]
    features = {row["feature"]: row for row in found["features"]}
    assert features["x[3]"]["mean"] == pytest.approx(0.5, abs=0.15)
    assert features["y[0]"]["side"] == "output"
    assert "model m version 1: drift alarm on x[3]" in daemon.log()
    assert set(found["alarms"]) == {"drift"}  # nothing stuck, no NaN, all in range
    models = edgectl_json(daemon, "models")["models"]["m"]["drift"]
    assert models["worst"]["feature"] == "x[3]" and "drift" in models["alarms"]
    with daemon.control() as control:
        metrics = samples(control.command("metrics")["text"])
    labels = (("kind", "drift"), ("model", "m"), ("version", "1"))
    assert metrics["edged_drift_alarm", labels] == 1
    assert metrics["edged_drift_alarm", (("kind", "stuck"), ("model", "m"), ("version", "1"))] == 0
    score = metrics["edged_drift_score", (("model", "m"), ("statistic", "ks"), ("version", "1"))]
    assert score == pytest.approx(found["worst"]["ks"])


@pytest.mark.parametrize(
    ("kind", "change", "named"),
    [
        ("stuck", lambda x: x.__setitem__((slice(None), 5), 0.25), "x[5]"),
        ("nonfinite", lambda x: x.__setitem__((0, 2), np.nan), "x[2]"),
        ("range", lambda x: x.__setitem__((0, 6), 50.0), "x"),
    ],
)
def test_broken_data_raises_its_alarm_naming_the_feature(
    start_daemon: DaemonFactory, config: dict[str, Any], kind: str, change: Any, named: str
) -> None:
    daemon = start_daemon(config)
    send(daemon, 100, seed=1)
    send(daemon, 10, seed=2, change=change)
    found = report(daemon, 110)
    assert named in found["alarms"][kind], found
    assert f"{kind} alarm on {named}" in daemon.log()
    with daemon.client() as client:  # the daemon serves on
        assert client.infer("m", {"x": np.ones((1, WIDTH), np.float32)}).outputs["y"].shape == (
            1,
            WIDTH,
        )
    if kind == "nonfinite":
        assert found["nonfinite_total"] >= 10


def test_the_reference_survives_a_restart(
    start_daemon: DaemonFactory, config: dict[str, Any], tmp_path: Path
) -> None:
    workdir = tmp_path / "d"
    daemon = start_daemon(config, workdir=workdir)
    send(daemon, 100, seed=1)
    before = report(daemon, 100)["reference"]
    daemon.stop()
    saved = workdir / "state" / "drift" / "m" / "1.reference.json"
    assert Reference.load(saved).count == 1000
    again = start_daemon(config, workdir=workdir)
    send(again, 1, seed=5)
    found = report(again, 1)
    assert found["reference"] == before and found["state"] == "filling the window"


def test_drift_config_is_checked(tmp_path: Path) -> None:
    base = {"path": "m.onnx"}
    for drift, message in [
        ({"sample": 1.5}, "'models.m.drift.sample' must be above 0 and at most 1"),
        ({"ranges": {"x": [1, 0]}}, "must be \\[low, high\\] with low <= high"),
        ({"window": 5}, "'models.m.drift.window' must be >= 20"),
        ({"reference": "gut"}, "must be one of traffic, golden"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_config({"models": {"m": base | {"drift": drift}}}, "t.toml", tmp_path)
    with pytest.raises(ConfigError, match="drift monitoring applies to ONNX models"):
        parse_config({"models": {"m": {"path": "m.gguf", "drift": {}}}}, "t.toml", tmp_path)


def test_features_of_tables_images_and_wide_tensors() -> None:
    image = np.random.default_rng(0).random((2, 3, 16, 16)).astype(np.float32)
    found = observe("img", image)
    assert found is not None and found.names[:2] == ("img[0].mean", "img[0].std")
    np.testing.assert_allclose(found.values[:, 0], image[:, 0].mean(axis=(1, 2)), rtol=1e-6)
    last = observe("img", np.moveaxis(image, 1, -1))  # NHWC: the same features
    assert last is not None and last.names == found.names
    np.testing.assert_allclose(last.values, found.values, rtol=1e-6)
    wide = observe("e", np.ones((4, 384), np.float32))
    assert wide is not None and wide.names == ("e.mean", "e.std", "e.min", "e.max")
    assert observe("s", np.array(["a"])) is None
    tokens = observe("ids", np.ones((2, 7), np.int64), Layout.of(["batch", "tokens"]))
    assert tokens is not None and tokens.names == ("ids.mean", "ids.std", "ids.min", "ids.max")
    assert Layout.of([None, 3]) == Layout(rows=True, variable=False)
    assert Layout.of([1, 3]) == Layout(rows=False, variable=False)
    table = np.ones((3, 4))
    table[1, 2] = np.inf
    found = observe("t", table)
    assert found is not None and found.nonfinite.tolist() == [0, 0, 1, 0]
    assert np.isnan(found.values[1, 2])


def test_window_scores_follow_a_shift_and_stay_low_without_one() -> None:
    rng = np.random.default_rng(0)
    names = tuple(f"x[{i}]" for i in range(4))
    reference = Reference.build(names, rng.standard_normal((2000, 4)), 20, "traffic")
    limit = ks_critical(500, 2000)
    for shift, flagged in ((0.0, False), (0.5, True)):
        window = Window(reference, 500)
        for _ in range(50):
            values = rng.standard_normal((10, 4))
            values[:, 1] += shift
            window.add(names, values)
        scores = window.scores()
        assert window.full and (scores.ks[1] > limit) == flagged, scores.ks
        assert (scores.ks[[0, 2, 3]] < limit).all()
    assert scores.mean[1] == pytest.approx(0.5, abs=0.15)


def test_a_reference_made_from_golden_vectors_watches_from_the_first_request(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    import onnxruntime as ort

    model = build_wide_model(tmp_path / "wide.onnx", WIDTH, 1)
    x = np.random.default_rng(4).standard_normal((300, WIDTH)).astype(np.float32)
    y = ort.InferenceSession(str(model)).run(None, {"x": x})[0]
    golden = tmp_path / "wide.golden.npz"
    np.savez(golden, **{"input.x": x, "output.y": y})
    workdir = tmp_path / "d"
    store_versions(workdir, "m", [model], **{model.name: golden})
    drift = DRIFT | {"reference": "golden"}
    daemon = start_daemon({"models": {"m": {"preload": True, "drift": drift}}}, workdir=workdir)
    send(daemon, 1, seed=1)
    found = report(daemon, 1)
    assert found["reference"]["source"] == "golden" and found["reference"]["observations"] == 300
    assert found["state"] == "filling the window"
