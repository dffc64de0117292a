"""Detector post-processing built as an ONNX graph, to be fused after a model.

A detector's raw output (YOLOv8's ``[1, 4+C, N]``, YOLOv5's ``[1, N, 5+C]``, or separate boxes
and scores) becomes ``boxes: float32[K, 4]`` (x1, y1, x2, y2), ``scores: float32[K]`` and
``classes: int64[K]``, best first: box decode, non-maximum suppression and the overall top
``max_detections``, inside onnxruntime. Standard ops only (Slice, NonMaxSuppression, GatherND,
TopK, ...), so a GPU provider runs them beside the model and a client gets detections rather
than thousands of candidate rows to sort through.

Suppression is onnxruntime's NonMaxSuppression: a box takes part when its score is strictly
above ``score_threshold``; it is dropped when its IoU with a kept box of its class is strictly
above ``iou_threshold``; equal scores go lower box index first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edged.steps.graph import GraphBuilder
from edged.steps.scores import CLASSES, SCORES

LAYOUTS = ("yolov8", "yolov5", "boxes_scores")
BOX_FORMATS = ("cxcywh", "xyxy")
RAW = "post_raw"
RAW_BOXES = "post_boxes"
RAW_SCORES = "post_scores"
GAIN = "post_box_gain"
OFFSET = "post_box_offset"
BOXES = "boxes"
_END = np.iinfo(np.int64).max


@dataclass(frozen=True)
class BoxSteps:
    """How a detector's raw output becomes its detections.

    ``layout``: ``yolov8`` is one output ``[1, 4+C, N]`` (rows cx, cy, w, h, then C class
    scores); ``yolov5`` is one output ``[1, N, 5+C]`` (cx, cy, w, h, objectness, C class
    scores; a box's class score is objectness times class score); ``boxes_scores`` is two
    outputs, boxes ``[1, N, 4]`` in ``box_format`` and scores ``[1, N, C]``. The batch must be
    1: a sensor hands over one frame at a time. ``normalized`` boxes are fractions of the
    model input. ``classes`` keeps only those class ids (all when empty), which keep their
    meaning (an id the model lacks fails at run time). ``class_agnostic`` runs one suppression
    over all boxes, each labelled with its best class, so overlapping boxes of different
    classes do not both survive.
    """

    layout: str = "yolov8"
    box_format: str = "cxcywh"
    normalized: bool = False
    score_threshold: float = 0.25
    iou_threshold: float = 0.45
    max_detections: int = 100
    classes: tuple[int, ...] = ()
    class_agnostic: bool = False

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}")
        if self.box_format not in BOX_FORMATS:
            raise ValueError(f"box_format must be one of {', '.join(BOX_FORMATS)}")
        if self.layout != "boxes_scores" and self.box_format != "cxcywh":
            raise ValueError(f"the {self.layout} layout's boxes are cxcywh")
        for name in ("score_threshold", "iou_threshold"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be between 0 and 1")
        if self.max_detections < 1:
            raise ValueError("max_detections must be at least 1")
        if any(class_id < 0 for class_id in self.classes):
            raise ValueError("class ids must not be negative")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError("class ids must be unique")

    def inputs(self) -> tuple[str, ...]:
        """The graph's raw inputs, in the order the model's outputs feed them."""
        if self.layout == "boxes_scores":
            return (RAW_BOXES, RAW_SCORES)
        return (RAW,)

    def build(self, input_size: tuple[int, int] | None = None, mapped: bool = False) -> Any:
        """The steps as an ONNX model: ``self.inputs()`` -> ``boxes``, ``scores``, ``classes``.

        ``input_size`` is the model input's (height, width), which normalised boxes are scaled
        by. When ``mapped``, the preprocessing's ``post_box_gain`` and ``post_box_offset``
        (``float32[4]``) take the boxes from model-input pixels to the frame's:
        ``box * gain + offset`` per x1, y1, x2, y2.
        """
        from onnx import TensorProto, helper

        if input_size is not None and (len(input_size) != 2 or min(input_size) < 1):
            raise ValueError("input_size must be a positive (height, width)")
        if self.normalized and input_size is None:
            raise ValueError("normalized boxes need the model's input_size (height, width)")
        graph = GraphBuilder("post")
        boxes, scores = self._candidates(graph, input_size)
        self._select(graph, boxes, scores, mapped)
        inputs = [
            helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
            for name, shape in self._input_shapes().items()
        ]
        if mapped:
            inputs += [
                helper.make_tensor_value_info(n, TensorProto.FLOAT, [4]) for n in (GAIN, OFFSET)
            ]
        outputs = [
            helper.make_tensor_value_info(BOXES, TensorProto.FLOAT, ["K", 4]),
            helper.make_tensor_value_info(SCORES, TensorProto.FLOAT, ["K"]),
            helper.make_tensor_value_info(CLASSES, TensorProto.INT64, ["K"]),
        ]
        return graph.model(inputs, outputs)

    def _input_shapes(self) -> dict[str, list[int | str]]:
        if self.layout == "yolov8":
            return {RAW: [1, "4+C", "N"]}
        if self.layout == "yolov5":
            return {RAW: [1, "N", "5+C"]}
        return {RAW_BOXES: [1, "N", 4], RAW_SCORES: [1, "N", "C"]}

    def _candidates(
        self, graph: GraphBuilder, input_size: tuple[int, int] | None
    ) -> tuple[str, str]:
        """Every candidate box as x1, y1, x2, y2 in model-input pixels ``[N, 4]``, and its
        class scores ``[C, N]``, class-major as NonMaxSuppression takes them."""
        boxes, scores = self._split(graph)
        if self.normalized and input_size is not None:
            height, width = input_size
            scale = graph.constant(np.array([width, height, width, height], np.float32))
            boxes = graph.op("Mul", boxes, scale)
        if self.layout != "boxes_scores" or self.box_format == "cxcywh":
            centre = graph.slice(boxes, 0, 2, axis=1)
            half = graph.op(
                "Mul", graph.slice(boxes, 2, 4, axis=1), graph.constant(np.float32(0.5))
            )
            corners = [graph.op("Sub", centre, half), graph.op("Add", centre, half)]
            boxes = graph.op("Concat", *corners, axis=1)
        return boxes, scores

    def _split(self, graph: GraphBuilder) -> tuple[str, str]:
        """The layout's raw boxes ``[N, 4]`` and class scores ``[C, N]``."""
        batch = graph.constant([0])
        if self.layout == "boxes_scores":
            boxes = graph.op("Squeeze", RAW_BOXES, batch)
            scores = graph.op("Squeeze", RAW_SCORES, batch)
            return boxes, graph.op("Transpose", scores, perm=[1, 0])
        rows = graph.op("Squeeze", RAW, batch)
        if self.layout == "yolov8":
            boxes = graph.op("Transpose", graph.slice(rows, 0, 4, axis=0), perm=[1, 0])
            return boxes, graph.slice(rows, 4, _END, axis=0)
        objectness = graph.slice(rows, 4, 5, axis=1)
        scores = graph.op("Mul", objectness, graph.slice(rows, 5, _END, axis=1))
        return graph.slice(rows, 0, 4, axis=1), graph.op("Transpose", scores, perm=[1, 0])

    def _select(self, graph: GraphBuilder, boxes: str, scores: str, mapped: bool) -> None:
        """Suppression per class (or over all boxes), then the best ``max_detections``."""
        kept = graph.constant(list(self.classes)) if self.classes else ""
        if kept:
            scores = graph.op("Gather", scores, kept, axis=0)
        labels = graph.op("ArgMax", scores, axis=0, keepdims=0) if self.class_agnostic else ""
        if labels:
            scores = graph.op("ReduceMax", scores, graph.constant([0]))
        batch = graph.constant([0])
        limit = graph.constant([self.max_detections])
        selected = graph.op(
            "NonMaxSuppression",
            graph.op("Unsqueeze", boxes, batch),
            graph.op("Unsqueeze", scores, batch),
            limit,
            graph.constant(np.array([self.iou_threshold], np.float32)),
            graph.constant(np.array([self.score_threshold], np.float32)),
            center_point_box=0,
        )
        # selected rows are (batch, class, box): the class is a row of scores
        found = graph.op("GatherND", scores, graph.slice(selected, 1, 3, axis=1))
        box_index = graph.op("Gather", selected, graph.constant(2), axis=1)
        if labels:
            class_index = graph.op("Gather", labels, box_index)
        else:
            class_index = graph.op("Gather", selected, graph.constant(1), axis=1)
        count = graph.op("Min", graph.op("Shape", found), limit)
        order = graph.top(found, count, SCORES)
        picked = graph.op("Gather", boxes, graph.op("Gather", box_index, order))
        if mapped:
            picked = graph.op("Add", graph.op("Mul", picked, GAIN), OFFSET)
        graph.op("Identity", picked, output=BOXES)
        class_index = graph.op("Gather", class_index, order)
        if kept:
            class_index = graph.op("Gather", kept, class_index)
        graph.op("Identity", class_index, output=CLASSES)
