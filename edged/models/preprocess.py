"""Camera-frame preprocessing built as an ONNX graph, to be fused in front of a model.

A sensor process hands over a raw ``uint8[H, W, C]`` frame; these steps turn it into the
model's ``float32[1, C, h, w]`` (or ``[1, h, w, C]``) input inside onnxruntime: channel order,
resize, scaling or mean/std normalisation, layout. Built from standard ops (Cast, Resize,
Sub, Div, Transpose, Unsqueeze), so a GPU provider runs them beside the model and nothing
crosses Python between the steps. ``fuse`` joins them with a model (``onnx.compose``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: the opset the steps are built with: Resize's current form (antialias, keep_aspect_ratio)
OPSET = 18
FRAME = "frame"
RESIZE_MODES = ("linear", "nearest")
LAYOUTS = ("nchw", "nhwc")


@dataclass(frozen=True)
class FrameSteps:
    """What turns a frame into the model's input: resized to ``height`` x ``width`` (half-pixel
    sampling, as OpenCV's ``resize``), channels reversed when ``bgr`` (a BGR camera, an RGB
    model), then ``(x * scale - mean) / std`` per channel, in ``layout``."""

    height: int
    width: int
    channels: int = 3
    resize: str = "linear"
    bgr: bool = False
    scale: float = 1.0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    layout: str = "nchw"

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1 or self.channels < 1:
            raise ValueError("height, width and channels must be positive")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}")
        for name, values in (("mean", self.mean), ("std", self.std)):
            if values and len(values) != self.channels:
                raise ValueError(f"{name} needs one value per channel ({self.channels})")
        if any(value == 0 for value in self.std):
            raise ValueError("std values must not be 0")
        if self.bgr and self.channels != 3:
            raise ValueError("bgr needs 3 channels")

    def build(self, output: str) -> Any:
        """The steps as an ONNX model: ``frame: uint8[?, ?, C]`` -> ``output: float32[...]``."""
        from onnx import TensorProto, helper, numpy_helper

        nodes: list[Any] = []
        constants: list[Any] = []

        def constant(name: str, value: np.ndarray[Any, Any]) -> str:
            constants.append(numpy_helper.from_array(value, name))
            return name

        current = "pre_float"
        nodes.append(helper.make_node("Cast", [FRAME], [current], to=TensorProto.FLOAT))
        if self.bgr:
            order = constant("pre_rgb_order", np.array([2, 1, 0], np.int64))
            nodes.append(helper.make_node("Gather", [current, order], ["pre_rgb"], axis=2))
            current = "pre_rgb"
        sizes = constant("pre_sizes", np.array([self.height, self.width], np.int64))
        nodes.append(
            helper.make_node(
                "Resize",
                [current, "", "", sizes],
                ["pre_resized"],
                axes=[0, 1],
                mode=self.resize,
                coordinate_transformation_mode="half_pixel",
                nearest_mode="round_prefer_ceil",
            )
        )
        current = "pre_resized"
        if self.scale != 1.0:
            factor = constant("pre_scale", np.array(self.scale, np.float32))
            nodes.append(helper.make_node("Mul", [current, factor], ["pre_scaled"]))
            current = "pre_scaled"
        if self.mean:
            mean = constant("pre_mean", np.array(self.mean, np.float32))
            nodes.append(helper.make_node("Sub", [current, mean], ["pre_centred"]))
            current = "pre_centred"
        if self.std:
            std = constant("pre_std", np.array(self.std, np.float32))
            nodes.append(helper.make_node("Div", [current, std], ["pre_normal"]))
            current = "pre_normal"
        if self.layout == "nchw":
            nodes.append(helper.make_node("Transpose", [current], ["pre_chw"], perm=[2, 0, 1]))
            current = "pre_chw"
        batch = constant("pre_batch_axis", np.array([0], np.int64))
        nodes.append(helper.make_node("Unsqueeze", [current, batch], [output]))
        shape = [1, self.channels, self.height, self.width]
        if self.layout == "nhwc":
            shape = [1, self.height, self.width, self.channels]
        graph = helper.make_graph(
            nodes,
            "preprocess",
            [helper.make_tensor_value_info(FRAME, TensorProto.UINT8, ["H", "W", self.channels])],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, shape)],
            initializer=constants,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = 8  # what every onnxruntime edged supports reads
        return model


def fuse(steps: FrameSteps, model: Any, model_input: str | None = None) -> Any:
    """``model`` with ``steps`` in front of its input (its only one unless named): one graph,
    whose input is the frame and whose outputs are the model's."""
    from onnx import compose

    inputs = [value.name for value in model.graph.input]
    initializers = {tensor.name for tensor in model.graph.initializer}
    inputs = [name for name in inputs if name not in initializers]
    target = model_input or _only(inputs)
    if target not in inputs:
        raise ValueError(f"the model has no input {target!r}; it takes {', '.join(inputs)}")
    front, model = align_versions(steps.build(target + "_pre"), model)
    return compose.merge_models(front, model, io_map=[(target + "_pre", target)])


def align_versions(first: Any, second: Any) -> tuple[Any, Any]:
    """The two models at one opset and IR version, as ``onnx.compose`` needs: an older model
    is converted up to ``OPSET`` (the steps are built there)."""
    from onnx import version_converter

    models = [first, second]
    for index, model in enumerate(models):
        if _default_opset(model) < OPSET:
            models[index] = version_converter.convert_version(model, OPSET)
    ir_version = max(model.ir_version for model in models)
    for model in models:
        model.ir_version = ir_version
    return models[0], models[1]


def _only(names: Sequence[str]) -> str:
    if len(names) != 1:
        raise ValueError(f"the model takes {len(names)} inputs: name the one the frame feeds")
    return names[0]


def _default_opset(model: Any) -> int:
    return next(
        (entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 1
    )
