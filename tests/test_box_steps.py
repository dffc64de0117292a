"""Detector post-processing as ONNX steps: what onnxruntime computes equals a numpy decode and
greedy non-maximum suppression done as onnxruntime's NonMaxSuppression does it (scores strictly
above the threshold, suppression at IoU strictly above it, IoU in float32, equal scores lower
box index first), then the best ``max_detections`` overall."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edged.steps.boxes import BoxSteps

Array = np.ndarray[Any, Any]
Detections = tuple[Array, Array, Array]
INPUT_SIZE = (480, 640)
CLASS_COUNT = 4


def run(model: Any, feeds: dict[str, Array]) -> Detections:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    boxes, scores, classes = session.run(None, feeds)
    return boxes, scores, classes


def scene(seed: int) -> tuple[Array, Array]:
    """Candidate boxes (cx, cy, w, h) in pixels and their class scores, shuffled: clusters of
    overlapping boxes (IoU around the threshold, so some are suppressed and some not), mostly
    of one class with a second class in some, and lone boxes of any classes."""
    rng = np.random.default_rng(seed)
    boxes, scores = [], []
    for _ in range(8):
        centre, size = rng.uniform(60, 580, 2), rng.uniform(30, 120, 2)
        main, other = rng.choice(CLASS_COUNT, 2, replace=False)
        for _ in range(rng.integers(3, 8)):
            boxes.append(
                [*(centre + rng.normal(0, 0.15, 2) * size), *(size * rng.uniform(0.7, 1.3, 2))]
            )
            score = rng.uniform(0, 0.2, CLASS_COUNT)
            score[main] = rng.uniform(0.3, 0.95)
            if rng.random() < 0.4:
                score[other] = rng.uniform(0.3, 0.9)
            scores.append(score)
    for _ in range(10):
        boxes.append([*rng.uniform(20, 620, 2), *rng.uniform(10, 60, 2)])
        scores.append(rng.uniform(0, 1, CLASS_COUNT))
    order = rng.permutation(len(boxes))
    return np.array(boxes, np.float32)[order], np.array(scores, np.float32)[order]


def feeds_for(steps: BoxSteps, boxes: Array, scores: Array) -> dict[str, Array]:
    """The scene as the layout's raw model output(s)."""
    if steps.layout == "yolov8":
        return {"post_raw": np.concatenate([boxes, scores], axis=1).T[None].copy()}
    if steps.layout == "yolov5":
        objectness = np.linspace(0.8, 1.0, len(boxes), dtype=np.float32)[:, None]
        return {"post_raw": np.concatenate([boxes, objectness, scores], axis=1)[None]}
    if steps.box_format == "xyxy":
        boxes = to_corners(boxes)
    return {"post_boxes": boxes[None], "post_scores": scores[None]}


def to_corners(boxes: Array) -> Array:
    half = boxes[:, 2:] * np.float32(0.5)
    return np.concatenate([boxes[:, :2] - half, boxes[:, :2] + half], axis=1)


def decode(
    steps: BoxSteps, feeds: dict[str, Array], input_size: tuple[int, int] | None
) -> tuple[Array, Array]:
    """Every candidate's x1, y1, x2, y2 and class scores, in float32 as the graph does it."""
    if steps.layout == "yolov8":
        rows = feeds["post_raw"][0].T
        boxes, scores = rows[:, :4], rows[:, 4:]
    elif steps.layout == "yolov5":
        rows = feeds["post_raw"][0]
        boxes, scores = rows[:, :4], rows[:, 4:5] * rows[:, 5:]
    else:
        boxes, scores = feeds["post_boxes"][0], feeds["post_scores"][0]
    if steps.normalized and input_size is not None:
        height, width = input_size
        boxes = boxes * np.array([width, height, width, height], np.float32)
    if steps.layout != "boxes_scores" or steps.box_format == "cxcywh":
        boxes = to_corners(boxes)
    return boxes, scores


def suppresses(kept: Array, candidate: Array, threshold: np.float32) -> bool:
    """onnxruntime's test, step by step in float32: IoU strictly above the threshold."""
    width = min(kept[2], candidate[2]) - max(kept[0], candidate[0])
    height = min(kept[3], candidate[3]) - max(kept[1], candidate[1])
    if width <= 0 or height <= 0:
        return False
    overlap = width * height
    area_kept = (kept[2] - kept[0]) * (kept[3] - kept[1])
    area_candidate = (candidate[2] - candidate[0]) * (candidate[3] - candidate[1])
    union = area_candidate + area_kept - overlap
    if area_kept <= 0 or area_candidate <= 0 or union <= 0:
        return False
    return bool(overlap / union > threshold)


def greedy_nms(steps: BoxSteps, boxes: Array, column: Array) -> list[int]:
    """The boxes one class keeps, best first: scores strictly above the threshold, equal
    scores lower index first, at most ``max_detections``."""
    above = [
        index for index in range(len(column)) if column[index] > np.float32(steps.score_threshold)
    ]
    kept: list[int] = []
    for index in sorted(above, key=lambda i: (-column[i], i)):
        if len(kept) == steps.max_detections:
            break
        if not any(
            suppresses(boxes[other], boxes[index], np.float32(steps.iou_threshold))
            for other in kept
        ):
            kept.append(index)
    return kept


def reference(
    steps: BoxSteps,
    feeds: dict[str, Array],
    input_size: tuple[int, int] | None = None,
    gain: Array | None = None,
    offset: Array | None = None,
) -> Detections:
    boxes, scores = decode(steps, feeds, input_size)
    ids = list(steps.classes) or list(range(scores.shape[1]))
    scores = scores[:, ids]
    labels = scores.argmax(axis=1)
    columns = scores.max(axis=1, keepdims=True) if steps.class_agnostic else scores
    found = [
        (columns[index, column], ids[labels[index] if steps.class_agnostic else column], index)
        for column in range(columns.shape[1])
        for index in greedy_nms(steps, boxes, columns[:, column])
    ]
    # a stable sort: equal scores keep the suppression's order (class, then score), as TopK
    found = sorted(found, key=lambda item: -item[0])[: steps.max_detections]
    picked = boxes[[index for _, _, index in found]].reshape(-1, 4)
    if gain is not None and offset is not None:
        picked = picked * gain + offset
    return (
        picked,
        np.array([score for score, _, _ in found], np.float32),
        np.array([label for _, label, _ in found], np.int64),
    )


def assert_same(actual: Detections, expected: Detections) -> None:
    for got, want in zip(actual, expected, strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    ("layout", "box_format"),
    [
        ("yolov8", "cxcywh"),
        ("yolov5", "cxcywh"),
        ("boxes_scores", "cxcywh"),
        ("boxes_scores", "xyxy"),
    ],
)
@pytest.mark.parametrize("class_agnostic", [False, True])
def test_detections_equal_decode_and_greedy_nms_in_numpy(
    layout: str, box_format: str, class_agnostic: bool
) -> None:
    steps = BoxSteps(layout=layout, box_format=box_format, class_agnostic=class_agnostic)
    feeds = feeds_for(steps, *scene(1))
    actual = run(steps.build(), feeds)
    assert_same(actual, reference(steps, feeds))
    _, scores = decode(steps, feeds, None)
    candidates = (scores.max(axis=1) if class_agnostic else scores) > np.float32(0.25)
    assert 5 < len(actual[1]) < candidates.sum()  # something was suppressed
    assert len(set(actual[2].tolist())) >= 3
    assert np.all(np.diff(actual[1]) <= 0)


def test_only_the_best_max_detections_are_kept() -> None:
    steps = BoxSteps(max_detections=5)
    feeds = feeds_for(steps, *scene(2))
    actual = run(steps.build(), feeds)
    assert len(actual[1]) == 5
    assert_same(actual, reference(steps, feeds))
    everything = run(BoxSteps().build(), feeds)
    assert len(everything[1]) > 5
    np.testing.assert_array_equal(actual[1], everything[1][:5])


@pytest.mark.parametrize("class_agnostic", [False, True])
def test_the_class_filter_keeps_only_the_listed_classes_by_their_ids(class_agnostic: bool) -> None:
    steps = BoxSteps(layout="yolov5", classes=(3, 1), class_agnostic=class_agnostic)
    feeds = feeds_for(steps, *scene(3))
    actual = run(steps.build(), feeds)
    assert_same(actual, reference(steps, feeds))
    assert set(actual[2].tolist()) == {1, 3}
    unfiltered = run(BoxSteps(layout="yolov5", class_agnostic=class_agnostic).build(), feeds)
    assert set(unfiltered[2].tolist()) - {1, 3}


def test_class_agnostic_suppresses_overlapping_boxes_of_different_classes() -> None:
    boxes = np.array([[10, 10, 110, 110], [12, 12, 112, 112], [300, 300, 350, 350]], np.float32)
    scores = np.array([[0.9, 0.1], [0.1, 0.8], [0.2, 0.6]], np.float32)
    feeds = {"post_boxes": boxes[None], "post_scores": scores[None]}
    per_class = run(BoxSteps(layout="boxes_scores", box_format="xyxy").build(), feeds)
    agnostic_steps = BoxSteps(layout="boxes_scores", box_format="xyxy", class_agnostic=True)
    agnostic = run(agnostic_steps.build(), feeds)
    np.testing.assert_array_equal(per_class[0], boxes)
    np.testing.assert_array_equal(per_class[1], np.array([0.9, 0.8, 0.6], np.float32))
    np.testing.assert_array_equal(per_class[2], [0, 1, 1])
    np.testing.assert_array_equal(agnostic[0], boxes[[0, 2]])
    np.testing.assert_array_equal(agnostic[1], np.array([0.9, 0.6], np.float32))
    np.testing.assert_array_equal(agnostic[2], [0, 1])


def test_thresholds_are_strict_and_equal_scores_go_lower_index_first() -> None:
    boxes = np.array(
        [[0, 0, 2, 1], [0, 0, 1, 1], [10, 0, 11, 1], [20, 0, 21, 1], [20, 0, 21.1, 1]],
        np.float32,
    )
    scores = np.array([[0.9], [0.8], [0.25], [0.7], [0.7]], np.float32)
    steps = BoxSteps(layout="boxes_scores", box_format="xyxy", iou_threshold=0.5)
    feeds = {"post_boxes": boxes[None], "post_scores": scores[None]}
    actual = run(steps.build(), feeds)
    # IoU of boxes 0 and 1 is exactly 0.5: both stay; box 2 is at the threshold: dropped;
    # boxes 3 and 4 tie and overlap: the lower index stays
    np.testing.assert_array_equal(actual[0], boxes[[0, 1, 3]])
    np.testing.assert_array_equal(actual[1], np.array([0.9, 0.8, 0.7], np.float32))
    assert_same(actual, reference(steps, feeds))


def test_mapped_boxes_take_the_gain_and_offset() -> None:
    steps = BoxSteps()
    feeds = feeds_for(steps, *scene(4))
    gain = np.array([0.5, 0.75, 0.5, 0.75], np.float32)
    offset = np.array([3, -7, 3, -7], np.float32)
    mapped = run(
        steps.build(mapped=True), {**feeds, "post_box_gain": gain, "post_box_offset": offset}
    )
    assert_same(mapped, reference(steps, feeds, gain=gain, offset=offset))
    plain = run(steps.build(), feeds)
    np.testing.assert_array_equal(mapped[1], plain[1])
    assert not np.array_equal(mapped[0], plain[0])


@pytest.mark.parametrize("layout", ["yolov8", "boxes_scores"])
def test_normalized_boxes_are_scaled_by_the_input_size(layout: str) -> None:
    steps = BoxSteps(layout=layout, normalized=True)
    boxes, scores = scene(5)
    height, width = INPUT_SIZE
    fractions = boxes / np.array([width, height, width, height], np.float32)
    feeds = feeds_for(steps, fractions, scores)
    actual = run(steps.build(INPUT_SIZE), feeds)
    assert_same(actual, reference(steps, feeds, INPUT_SIZE))
    in_pixels = run(BoxSteps(layout=layout).build(), feeds_for(steps, boxes, scores))
    np.testing.assert_allclose(actual[0], in_pixels[0], rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("layout", ["yolov8", "yolov5", "boxes_scores"])
@pytest.mark.parametrize("class_agnostic", [False, True])
def test_no_score_above_the_threshold_gives_empty_detections(
    layout: str, class_agnostic: bool
) -> None:
    steps = BoxSteps(layout=layout, class_agnostic=class_agnostic)
    boxes, _ = scene(6)
    scores = np.full((len(boxes), CLASS_COUNT), 0.25, np.float32)
    scores[::2] = 0.1
    feeds = feeds_for(steps, boxes, scores)
    if layout == "yolov5":
        feeds["post_raw"][0, :, 4] = 1.0  # objectness 1: the class scores stay at 0.25
    boxes_out, scores_out, classes_out = run(steps.build(), feeds)
    assert boxes_out.shape == (0, 4) and boxes_out.dtype == np.float32
    assert scores_out.shape == (0,) and scores_out.dtype == np.float32
    assert classes_out.shape == (0,) and classes_out.dtype == np.int64


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"layout": "ssd"}, "layout must be one of"),
        ({"layout": "boxes_scores", "box_format": "yxyx"}, "box_format must be one of"),
        ({"layout": "yolov8", "box_format": "xyxy"}, "yolov8 layout's boxes are cxcywh"),
        ({"score_threshold": 1.5}, "score_threshold must be between 0 and 1"),
        ({"score_threshold": -0.1}, "score_threshold must be between 0 and 1"),
        ({"iou_threshold": float("nan")}, "iou_threshold must be between 0 and 1"),
        ({"iou_threshold": 2.0}, "iou_threshold must be between 0 and 1"),
        ({"max_detections": 0}, "max_detections must be at least 1"),
        ({"classes": (2, -1)}, "class ids must not be negative"),
        ({"classes": (1, 3, 1)}, "class ids must be unique"),
    ],
)
def test_bad_steps_are_refused_naming_the_setting(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BoxSteps(**settings)


def test_building_normalized_steps_needs_a_valid_input_size() -> None:
    with pytest.raises(ValueError, match="normalized boxes need the model's input_size"):
        BoxSteps(normalized=True).build()
    with pytest.raises(ValueError, match="input_size must be a positive"):
        BoxSteps(normalized=True).build((0, 640))


@pytest.mark.parametrize(
    ("settings", "mapped"),
    [
        ({}, False),
        ({"layout": "yolov5", "classes": (0, 2), "class_agnostic": True}, True),
        ({"layout": "boxes_scores", "box_format": "xyxy", "normalized": True}, True),
    ],
)
def test_the_built_model_passes_the_full_onnx_check(settings: dict[str, Any], mapped: bool) -> None:
    steps = BoxSteps(**settings)
    model = steps.build(INPUT_SIZE, mapped=mapped)
    onnx.checker.check_model(model, full_check=True)
    extra = ("post_box_gain", "post_box_offset") if mapped else ()
    assert tuple(value.name for value in model.graph.input) == steps.inputs() + extra
    assert [value.name for value in model.graph.output] == ["boxes", "scores", "classes"]
