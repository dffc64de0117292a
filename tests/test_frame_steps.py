"""Pre- and post-processing as ONNX steps fused with a model: what onnxruntime computes equals
the same steps in numpy (half-pixel sampling, as OpenCV's resize; scores and classes)."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edged.steps.frame import FRAME, FrameSteps
from edged.steps.pipeline import Pipeline, Postprocess
from edged.steps.scores import ScoreSteps

RNG = np.random.default_rng(7)


def axis_sources(size_in: int, size_out: int) -> np.ndarray[Any, Any]:
    """Where each output position samples the input: half-pixel centres, clamped."""
    centres = (np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5
    return np.clip(centres, 0, size_in - 1)


def resize_nearest(image: np.ndarray[Any, Any], height: int, width: int) -> np.ndarray[Any, Any]:
    rows = np.clip(np.floor(axis_sources(image.shape[0], height) + 0.5), 0, image.shape[0] - 1)
    cols = np.clip(np.floor(axis_sources(image.shape[1], width) + 0.5), 0, image.shape[1] - 1)
    return image[rows.astype(int)][:, cols.astype(int)]


def resize_linear(image: np.ndarray[Any, Any], height: int, width: int) -> np.ndarray[Any, Any]:
    def along(array: np.ndarray[Any, Any], axis: int, size: int) -> np.ndarray[Any, Any]:
        source = axis_sources(array.shape[axis], size)
        low = np.floor(source).astype(int)
        high = np.minimum(low + 1, array.shape[axis] - 1)
        weight = (source - low).reshape([-1 if a == axis else 1 for a in range(array.ndim)])
        return (1 - weight) * np.take(array, low, axis) + weight * np.take(array, high, axis)

    return along(along(image.astype(np.float64), 0, height), 1, width)


def run(model: Any, frame: np.ndarray[Any, Any]) -> list[np.ndarray[Any, Any]]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return list(session.run(None, {FRAME: frame}))


def test_nearest_resize_scale_and_layout_match_numpy_exactly() -> None:
    frame = RNG.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    steps = FrameSteps(height=16, width=24, resize="nearest", scale=1 / 255)
    (tensor,) = run(steps.build("image"), frame)
    expected = resize_nearest(frame, 16, 24).astype(np.float32) * np.float32(1 / 255)
    assert tensor.shape == (1, 3, 16, 24) and tensor.dtype == np.float32
    np.testing.assert_allclose(tensor[0], expected.transpose(2, 0, 1), rtol=1e-6)


def test_bilinear_resize_bgr_and_mean_std_match_numpy() -> None:
    frame = RNG.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    mean, std = (123.7, 116.3, 103.5), (58.4, 57.1, 57.4)
    steps = FrameSteps(height=30, width=20, bgr=True, mean=mean, std=std, layout="nhwc")
    (tensor,) = run(steps.build("image"), frame)
    expected = (resize_linear(frame[:, :, ::-1], 30, 20) - mean) / std
    assert tensor.shape == (1, 30, 20, 3)
    np.testing.assert_allclose(tensor[0], expected, atol=1e-4)


def letterboxed(frame: np.ndarray[Any, Any], height: int, width: int, fill: float) -> Any:
    """The frame resized to fit, keeping its aspect ratio, centred on ``fill``; and the resized
    height and width and the padding above and to the left."""
    ratio = min(np.float32(height) / frame.shape[0], np.float32(width) / frame.shape[1])
    fitted = round(frame.shape[0] * ratio), round(frame.shape[1] * ratio)
    top, left = (height - fitted[0]) // 2, (width - fitted[1]) // 2
    canvas = np.full((height, width, frame.shape[2]), fill, np.float64)
    canvas[top : top + fitted[0], left : left + fitted[1]] = resize_linear(frame, *fitted)
    return canvas, fitted, (top, left)


@pytest.mark.parametrize("shape", [(37, 53), (60, 20), (32, 32)])
def test_letterbox_keeps_the_aspect_ratio_and_pads_evenly(shape: tuple[int, int]) -> None:
    frame = RNG.integers(0, 256, (*shape, 3), dtype=np.uint8)
    steps = FrameSteps(height=32, width=32, letterbox=True, pad_value=114, layout="nhwc")
    tensor, gain, offset = run(steps.build("image", box_transform=True), frame)
    expected, fitted, (top, left) = letterboxed(frame, 32, 32, 114)
    np.testing.assert_allclose(tensor[0], expected, atol=1e-3)
    # a point of the model's input maps back to where it came from in the frame
    scale_y, scale_x = shape[0] / fitted[0], shape[1] / fitted[1]
    np.testing.assert_allclose(gain, [scale_x, scale_y, scale_x, scale_y], rtol=1e-6)
    np.testing.assert_allclose(
        offset, [-left * scale_x, -top * scale_y, -left * scale_x, -top * scale_y], atol=1e-4
    )


def test_crop_takes_the_region_and_boxes_map_back_into_the_whole_frame() -> None:
    frame = RNG.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    steps = FrameSteps(height=10, width=20, resize="nearest", crop=(8, 4, 20, 40))
    tensor, gain, offset = run(steps.build("image", box_transform=True), frame)
    expected = resize_nearest(frame[8:28, 4:44], 10, 20)
    np.testing.assert_array_equal(tensor[0], expected.transpose(2, 0, 1))
    box = np.array([2.0, 1.0, 12.0, 9.0], np.float32)  # x1, y1, x2, y2 in the model's pixels
    np.testing.assert_allclose(box * gain + offset, [8.0, 10.0, 28.0, 26.0], rtol=1e-6)


def test_fused_with_a_model_the_frame_goes_in_and_the_models_outputs_come_out() -> None:
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["image"], ["pooled"])],
        "pool",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, [1, 3, 1, 1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    fused = Pipeline(FrameSteps(height=8, width=8, scale=1 / 255)).apply(model)
    assert [value.name for value in fused.graph.input] == [FRAME]
    assert [value.name for value in fused.graph.output] == ["pooled"]
    frame = RNG.integers(0, 256, (33, 21, 3), dtype=np.uint8)
    (pooled,) = run(fused, frame)
    expected = resize_linear(frame, 8, 8).mean(axis=(0, 1)) / 255
    np.testing.assert_allclose(pooled.reshape(3), expected, atol=1e-5)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"height": 0, "width": 4}, "positive"),
        ({"height": 4, "width": 4, "resize": "cubic"}, "resize must be one of"),
        ({"height": 4, "width": 4, "layout": "chw"}, "layout must be one of"),
        ({"height": 4, "width": 4, "mean": (1.0,)}, "one value per channel"),
        ({"height": 4, "width": 4, "std": (1.0, 0.0, 1.0)}, "must not be 0"),
        ({"height": 4, "width": 4, "channels": 1, "bgr": True}, "bgr needs 3 channels"),
        ({"height": 4, "width": 4, "crop": (0, 0, 4)}, "crop is"),
        ({"height": 4, "width": 4, "crop": (0, -1, 4, 4)}, "crop is"),
        ({"height": 4, "width": 4, "crop": (0, 0, 0, 4)}, "crop is"),
    ],
)
def test_bad_steps_are_refused_naming_the_setting(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FrameSteps(**settings)


def test_fusing_into_a_model_with_several_inputs_needs_the_input_named() -> None:
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["c"])],
        "add",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 3, 4, 4]) for n in "ab"],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 3, 4, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(ValueError, match="name the one the frame feeds"):
        Pipeline(FrameSteps(height=4, width=4)).apply(model)
    with pytest.raises(ValueError, match="has no input 'z'"):
        Pipeline(FrameSteps(height=4, width=4, input="z")).apply(model)
    fused = Pipeline(FrameSteps(height=4, width=4, input="a")).apply(model)
    assert sorted(value.name for value in fused.graph.input) == ["b", FRAME]


def softmax(logits: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("activation", ["softmax", "sigmoid", "none"])
def test_scores_and_classes_after_a_classifier_match_numpy(activation: str) -> None:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["logits"])],
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializer=[numpy_helper.from_array(RNG.standard_normal((6, 10), np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    scores = Postprocess(scores=ScoreSteps(activation=activation, top_k=3))
    fused = Pipeline(postprocess=scores).apply(model)
    assert [value.name for value in fused.graph.output] == ["scores", "classes"]
    x = RNG.standard_normal((4, 6), np.float32)
    session = ort.InferenceSession(fused.SerializeToString(), providers=["CPUExecutionProvider"])
    scores, classes = session.run(None, {"x": x})
    logits = x.astype(np.float64) @ numpy_helper.to_array(graph.initializer[0])
    probs = {"softmax": softmax, "sigmoid": lambda v: 1 / (1 + np.exp(-v)), "none": lambda v: v}
    expected = probs[activation](logits)
    best = np.argsort(-expected, axis=-1)[:, :3]
    np.testing.assert_array_equal(classes, best)
    np.testing.assert_allclose(scores, np.take_along_axis(expected, best, -1), rtol=1e-5)


def test_bad_score_steps_and_an_unnamed_output_of_several_are_refused() -> None:
    with pytest.raises(ValueError, match="activation must be one of"):
        ScoreSteps(activation="relu")
    with pytest.raises(ValueError, match="top_k must be at least 1"):
        ScoreSteps(top_k=0)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], [name]) for name in ("a", "b")],
        "two",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 4]) for name in ("a", "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(ValueError, match="postprocess takes exactly one"):
        Postprocess()
    with pytest.raises(ValueError, match=r"reads 1 model output\(s\): name them"):
        Pipeline(postprocess=Postprocess(scores=ScoreSteps())).apply(model)
    fused = Pipeline(postprocess=Postprocess(scores=ScoreSteps(), outputs=("b",))).apply(model)
    assert [value.name for value in fused.graph.output] == ["a", "scores", "classes"]


def test_crops_of_boxes_are_the_regions_resized_as_an_area_average_and_normalised() -> None:
    frame = RNG.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    steps = FrameSteps(height=8, width=6, bgr=True, scale=0.5, mean=(1.0, 2.0, 3.0))
    model = steps.build_crops()
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    boxes = np.array([[10, 5, 16, 13], [0, 0, 12, 16]], np.float32)  # x1, y1, x2, y2
    (crops,) = session.run(None, {FRAME: frame, "boxes": boxes})
    same_size = frame[5:13, 10:16].astype(np.float64)
    halved = frame[0:16, 0:12].astype(np.float64).reshape(8, 2, 6, 2, 3).mean(axis=(1, 3))
    for crop, region in zip(crops, (same_size, halved), strict=True):
        expected = region[:, :, ::-1] * 0.5 - (1.0, 2.0, 3.0)
        np.testing.assert_allclose(crop, expected.transpose(2, 0, 1), atol=1e-4)
    (none,) = session.run(None, {FRAME: frame, "boxes": np.zeros((0, 4), np.float32)})
    assert none.shape == (0, 3, 8, 6)
    with pytest.raises(ValueError, match="take no crop or letterbox"):
        FrameSteps(height=8, width=8, letterbox=True).build_crops()


def test_a_frame_that_ends_before_the_crop_is_padded_to_the_crops_size() -> None:
    frame = RNG.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    steps = FrameSteps(height=8, width=8, resize="nearest", crop=(4, 6, 8, 8), pad_value=7)
    (tensor,) = run(steps.build("image"), frame)
    expected = np.full((8, 8, 3), 7, np.uint8)
    expected[:8, :4] = frame[4:12, 6:10]
    np.testing.assert_array_equal(tensor[0], expected.transpose(2, 0, 1))
    (empty,) = run(steps.build("image"), np.zeros((1, 1, 3), np.uint8))  # a warm-up's frame
    np.testing.assert_array_equal(empty, np.full((1, 3, 8, 8), 7, np.float32))
