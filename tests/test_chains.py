"""Chains against a live daemon: a detector whose crops feed a classifier, run in the daemon
for one request, give what the same steps give in-process; bad chains and failing steps get
clear errors, and the daemon keeps serving."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edged.config import parse_config
from edged.demo import build_squares_detector
from edged.errors import ConfigError, InputMismatch
from edged.steps.boxes import BoxSteps
from edged.steps.frame import FrameSteps
from edged.steps.pipeline import Pipeline, Postprocess
from edged.testing import DaemonProcess
from tests.conftest import DaemonFactory

DETECT = {
    "preprocess": {"height": 64, "width": 64, "scale": 1 / 255},
    "postprocess": {"boxes": {"layout": "boxes_scores", "box_format": "xyxy"}},
}
CROPS = {"height": 224, "width": 224, "scale": 1 / 255, "input": "image"}


def session(model: Any) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def squares_frame(*corners: tuple[int, int]) -> np.ndarray[Any, Any]:
    """A dark 480x480 frame with a bright 120x120 square at each (top, left)."""
    frame = np.full((480, 480, 3), 10, np.uint8)
    for top, left in corners:
        frame[top : top + 120, left : left + 120] = (250, 200, 150)
    return frame


@pytest.fixture
def chain_daemon(start_daemon: DaemonFactory, models_dir: Path, tmp_path: Path) -> DaemonProcess:
    detector = build_squares_detector(tmp_path / "squares.onnx")
    models = {
        "squares": {"path": str(detector), **DETECT},
        "classifier": {"path": str(models_dir / "image.onnx"), "max_batch": 8},
    }
    steps = [{"model": "squares"}, {"model": "classifier", "crops": CROPS}]
    bad = [{"model": "squares"}, {"model": "classifier", "crops": {**CROPS, "input": "x"}}]
    return start_daemon(
        {"models": models, "chains": {"sorter": {"steps": steps}, "broken": {"steps": bad}}}
    )


def test_a_detector_whose_crops_feed_a_classifier_replies_once_as_in_process(
    chain_daemon: DaemonProcess, models_dir: Path, tmp_path: Path
) -> None:
    frame = squares_frame((120, 0), (360, 360))
    with chain_daemon.client() as client:
        result = client.infer("sorter", {"frame": frame})
    assert result.model == "sorter"
    assert sorted(result.outputs) == [
        "classifier.logits",
        "squares.boxes",
        "squares.classes",
        "squares.scores",
    ]
    boxes = Pipeline(
        FrameSteps(height=64, width=64, scale=1 / 255),
        Postprocess(boxes=BoxSteps(layout="boxes_scores", box_format="xyxy")),
    ).apply(onnx.load(tmp_path / "squares.onnx"))
    expected_boxes = session(boxes).run(["boxes"], {"frame": frame})[0]
    np.testing.assert_array_equal(result["squares.boxes"], expected_boxes)
    found = sorted(map(tuple, result["squares.boxes"].round().astype(int).tolist()))
    assert found == [(0, 120, 120, 240), (360, 360, 480, 480)]  # the squares, in frame pixels
    crops = session(FrameSteps(**CROPS).build_crops()).run(
        None, {"frame": frame, "boxes": expected_boxes}
    )[0]
    classifier = ort.InferenceSession(str(models_dir / "image.onnx"))
    (logits,) = classifier.run(None, {"image": crops})
    assert result["classifier.logits"].shape == (2, 10)
    np.testing.assert_array_equal(result["classifier.logits"], logits)


def test_a_frame_with_nothing_detected_stops_after_the_detector(
    chain_daemon: DaemonProcess,
) -> None:
    with chain_daemon.client() as client:
        result = client.infer("sorter", {"frame": squares_frame()})
        assert result["squares.boxes"].shape == (0, 4)
        assert "classifier.logits" not in result.outputs
        assert client.ping()


def test_a_failing_step_fails_the_request_naming_the_chain_and_step(
    chain_daemon: DaemonProcess,
) -> None:
    with chain_daemon.client() as client:
        with pytest.raises(InputMismatch, match=r"chain 'broken' step 2 \(classifier\): "):
            client.infer("broken", {"frame": squares_frame((0, 0))})
        with pytest.raises(InputMismatch, match=r"chain 'sorter' step 1 \(squares\): .*'pixels'"):
            client.infer("sorter", {"pixels": squares_frame((0, 0))})
        assert client.infer("sorter", {"frame": squares_frame((0, 0))}).model == "sorter"


@pytest.mark.parametrize(
    ("chains", "message"),
    [
        ({"c": {"steps": [{"model": "a"}]}}, "at least two steps"),
        ({"c": {"steps": [{"model": "a"}, {"model": "z", "inputs": {"x": "y"}}]}}, "no model 'z'"),
        ({"a": {"steps": [{"model": "a"}, {"model": "b", "inputs": {"x": "y"}}]}}, "no model has"),
        ({"c": {"steps": [{"model": "a", "inputs": {"x": "y"}}, {"model": "b"}]}}, "first step"),
        ({"c": {"steps": [{"model": "a"}, {"model": "b"}]}}, "exactly one of 'crops' or 'inputs'"),
        (
            {"c": {"steps": [{"model": "a"}, {"model": "b", "crops": {"height": 8, "width": 8}}]}},
            "'input' names the model input",
        ),
    ],
)
def test_a_bad_chain_stops_the_start_naming_it(
    tmp_path: Path, chains: dict[str, Any], message: str
) -> None:
    models = {"a": {"path": "a.onnx"}, "b": {"path": "b.onnx"}}
    with pytest.raises(ConfigError, match=message):
        parse_config({"models": models, "chains": chains}, source="edged.toml", base_dir=tmp_path)


def test_a_changed_chain_is_named_as_needing_a_restart_and_the_old_one_serves(
    chain_daemon: DaemonProcess,
) -> None:
    import tomli_w

    config = {**chain_daemon.config, "chains": {"sorter": chain_daemon.config["chains"]["sorter"]}}
    chain_daemon.config_path.write_text(tomli_w.dumps(config))
    with chain_daemon.control() as control:
        assert "chains" in control.command("reload")["restart_needed"]
    broken = pytest.raises(InputMismatch, match="chain 'broken'")
    with chain_daemon.client() as client, broken:  # served still, until a restart
        client.infer("broken", {"frame": squares_frame((0, 0))})
