"""Camera frames: a 1920x1080x3 uint8 frame through an in-daemon pipeline, against the same
fused session in this process, and against the usual way (numpy preprocessing in the client,
a float32 tensor over the socket, numpy NMS on the raw outputs).

The detector is a small CNN (two convolutions) with a YOLOv8-style head, ``[1, 4+C, N]``,
built here with fixed random weights: what matters is that both ways do the same work on the
same bytes, not what it detects.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness import Call
from bench.workloads import CALL_TIMEOUT_S
from edged.client import Client
from edged.shm import FrameRing

FRAME_SHAPE = (1080, 1920, 3)
#: the detector's input side, classes and stride (its candidates: (SIDE / STRIDE) ** 2)
SIDE, CLASSES, STRIDE = 224, 4, 8
SCALE = 1 / 255
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SCORE_THRESHOLD, IOU_THRESHOLD, MAX_DETECTIONS = 0.6, 0.45, 100
#: the detector's pipeline as a user declares it
PREPROCESS: dict[str, Any] = {
    "height": SIDE,
    "width": SIDE,
    "scale": SCALE,
    "mean": MEAN,
    "std": STD,
}
POSTPROCESS: dict[str, dict[str, Any]] = {
    "boxes": {
        "layout": "yolov8",
        "score_threshold": SCORE_THRESHOLD,
        "iou_threshold": IOU_THRESHOLD,
        "max_detections": MAX_DETECTIONS,
    }
}
Arrays = dict[str, np.ndarray[Any, Any]]


def build_detector(path: Path) -> Path:
    """image float32[1, 3, 224, 224] -> output0 float32[1, 4+C, N]: box centres and sizes in
    input pixels (sigmoids scaled to the input), then class scores (sigmoids)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    cells = (SIDE // STRIDE) ** 2
    weights = {
        "w1": rng.standard_normal((16, 3, 3, 3)).astype(np.float32) * 0.3,
        "w2": rng.standard_normal((4 + CLASSES, 16, 1, 1)).astype(np.float32) * 0.5,
        "side": np.array(SIDE, np.float32),
        "shape": np.array([1, 4 + CLASSES, cells], np.int64),
        "box_rows": np.array([0, 1, 2, 3], np.int64),
        "class_rows": np.arange(4, 4 + CLASSES, dtype=np.int64),
    }
    nodes = [
        helper.make_node("Conv", ["image", "w1"], ["c1"], strides=[STRIDE, STRIDE], pads=[1] * 4),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"]),
        helper.make_node("Reshape", ["c2", "shape"], ["rows"]),
        helper.make_node("Sigmoid", ["rows"], ["unit"]),
        helper.make_node("Gather", ["unit", "box_rows"], ["box_unit"], axis=1),
        helper.make_node("Mul", ["box_unit", "side"], ["box"]),
        helper.make_node("Gather", ["unit", "class_rows"], ["scores"], axis=1),
        helper.make_node("Concat", ["box", "scores"], ["output0"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "bench-detector",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, SIDE, SIDE])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 4 + CLASSES, cells])],
        initializer=[numpy_helper.from_array(value, name) for name, value in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def frame() -> np.ndarray[Any, Any]:
    return np.random.default_rng(0).integers(0, 256, FRAME_SHAPE, dtype=np.uint8)


def fused_session(path: Path) -> Any:
    """The detector with its pipeline, as the daemon fuses it, in this process."""
    import onnx
    import onnxruntime as ort

    from edged.steps.boxes import BoxSteps
    from edged.steps.frame import FrameSteps
    from edged.steps.pipeline import Pipeline, Postprocess

    pipeline = Pipeline(
        FrameSteps(**PREPROCESS), Postprocess(boxes=BoxSteps(**POSTPROCESS["boxes"]))
    )
    fused = pipeline.apply(onnx.load(path)).SerializeToString()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # as the daemon's default
    options.inter_op_num_threads = 1
    return ort.InferenceSession(fused, options, providers=["CPUExecutionProvider"])


@contextmanager
def in_process(path: Path) -> Iterator[Call]:
    session, image = fused_session(path), frame()
    yield lambda: session.run(None, {"frame": image})


@contextmanager
def by_socket(endpoint: str, model: str) -> Iterator[Call]:
    """The frame to the daemon's pipeline in the request's frames."""
    image = frame()
    with Client(endpoint, timeout=CALL_TIMEOUT_S) as client:
        yield lambda: client.infer(model, {"frame": image})


@contextmanager
def by_region(endpoint: str, model: str) -> Iterator[Call]:
    """The frame to the daemon's pipeline from a shared-memory ring: the request carries only
    the slot's reference (a camera writes each frame into its slot; here it is there once)."""
    with (
        Client(endpoint, timeout=CALL_TIMEOUT_S) as client,
        FrameRing(client, FRAME_SHAPE, np.uint8, slots=1) as ring,
    ):
        slot = ring.next()
        slot[...] = frame()
        yield lambda: client.infer(model, {"frame": slot})


@contextmanager
def client_prep(endpoint: str, model: str) -> Iterator[Call]:
    """The usual way: resize and normalise in numpy, send float32, suppress in numpy."""
    image = frame()
    resize = bilinear_resizer(FRAME_SHAPE[0], FRAME_SHAPE[1], SIDE, SIDE)
    mean = np.array(MEAN, np.float32)
    std = np.array(STD, np.float32)

    def call() -> Arrays:
        pixels = (resize(image) * np.float32(SCALE) - mean) / std
        tensor = np.ascontiguousarray(pixels.transpose(2, 0, 1)[None])
        raw = client.infer(model, {"image": tensor})["output0"][0]
        return detections(raw, FRAME_SHAPE[0] / SIDE, FRAME_SHAPE[1] / SIDE)

    with Client(endpoint, timeout=CALL_TIMEOUT_S) as client:
        yield call


def bilinear_resizer(
    height: int, width: int, out_height: int, out_width: int
) -> Callable[[np.ndarray[Any, Any]], np.ndarray[Any, Any]]:
    """Half-pixel bilinear resize in numpy (float32), its indices and weights made once, as a
    careful client would."""

    def axis(size_in: int, size_out: int) -> tuple[Any, Any, Any]:
        source = np.clip((np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5, 0, size_in - 1)
        low = np.floor(source).astype(np.intp)
        return low, np.minimum(low + 1, size_in - 1), (source - low).astype(np.float32)

    rows, cols = axis(height, out_height), axis(width, out_width)

    def resize(image: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        top, bottom = image[rows[0]].astype(np.float32), image[rows[1]].astype(np.float32)
        weight = rows[2][:, None, None]
        vertical = top + (bottom - top) * weight
        left, right = vertical[:, cols[0]], vertical[:, cols[1]]
        return np.asarray(left + (right - left) * cols[2][None, :, None])

    return resize


def detections(raw: np.ndarray[Any, Any], gain_y: float, gain_x: float) -> Arrays:
    """YOLOv8 rows ``[4+C, N]`` -> boxes in frame pixels, scores, classes: per-class greedy
    NMS, the best ``MAX_DETECTIONS`` overall."""
    centre, size = raw[0:2].T, raw[2:4].T
    boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1)
    kept: list[tuple[float, int, int]] = []
    for label, scores in enumerate(raw[4:]):
        candidates = np.flatnonzero(scores > SCORE_THRESHOLD)
        order = candidates[np.argsort(-scores[candidates], kind="stable")]
        while order.size:
            best, order = order[0], order[1:]
            kept.append((float(scores[best]), label, int(best)))
            order = order[iou(boxes[best], boxes[order]) <= IOU_THRESHOLD]
    kept.sort(key=lambda entry: -entry[0])
    kept = kept[:MAX_DETECTIONS]
    picked = boxes[[index for _, _, index in kept]] * np.array([gain_x, gain_y] * 2, np.float32)
    return {
        "boxes": picked,
        "scores": np.array([score for score, _, _ in kept], np.float32),
        "classes": np.array([label for _, label, _ in kept], np.int64),
    }


def iou(box: np.ndarray[Any, Any], others: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    top_left = np.maximum(box[:2], others[:, :2])
    bottom_right = np.minimum(box[2:], others[:, 2:])
    overlap = np.prod(np.clip(bottom_right - top_left, 0, None), axis=1)
    area = np.prod(box[2:] - box[:2])
    areas = np.prod(others[:, 2:] - others[:, :2], axis=1)
    return np.asarray(overlap / (area + areas - overlap + 1e-9))
