"""Classifier post-processing built as an ONNX graph, to be fused after a model.

A classifier's raw ``logits: float32[N, C]`` become ``scores: float32[N, k]`` and
``classes: int64[N, k]``, best first: an activation (softmax, sigmoid, or none) and the top k,
inside onnxruntime, so a client gets answers rather than a tensor to sort through. Standard ops
only (Softmax, Sigmoid, TopK); ``fuse_after`` joins them with a model (``onnx.compose``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edged.models.preprocess import OPSET, align_versions

ACTIVATIONS = ("softmax", "sigmoid", "none")
LOGITS = "post_logits"
SCORES = "scores"
CLASSES = "classes"


@dataclass(frozen=True)
class ScoreSteps:
    """``activation`` over the last axis, then the ``top_k`` best scores and their classes."""

    activation: str = "softmax"
    top_k: int = 1

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}")
        if self.top_k < 1:
            raise ValueError("top_k must be at least 1")

    def build(self) -> Any:
        """The steps as an ONNX model: ``post_logits: float32[N, C]`` -> ``scores``,
        ``classes``."""
        from onnx import TensorProto, helper, numpy_helper

        nodes: list[Any] = []
        current = LOGITS
        if self.activation == "softmax":
            nodes.append(helper.make_node("Softmax", [current], ["post_probs"], axis=-1))
            current = "post_probs"
        elif self.activation == "sigmoid":
            nodes.append(helper.make_node("Sigmoid", [current], ["post_probs"]))
            current = "post_probs"
        k = numpy_helper.from_array(np.array([self.top_k], np.int64), "post_k")
        nodes.append(
            helper.make_node(
                "TopK", [current, "post_k"], [SCORES, CLASSES], axis=-1, largest=1, sorted=1
            )
        )
        graph = helper.make_graph(
            nodes,
            "postprocess",
            [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["N", "C"])],
            [
                helper.make_tensor_value_info(SCORES, TensorProto.FLOAT, ["N", self.top_k]),
                helper.make_tensor_value_info(CLASSES, TensorProto.INT64, ["N", self.top_k]),
            ],
            initializer=[k],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = 8  # what every onnxruntime edged supports reads
        return model


def fuse_after(model: Any, steps: ScoreSteps, model_output: str | None = None) -> Any:
    """``model`` with ``steps`` after its output (its only one unless named): the model's
    inputs, and ``scores`` and ``classes`` in place of that output."""
    from onnx import compose

    outputs = [value.name for value in model.graph.output]
    target = model_output or (outputs[0] if len(outputs) == 1 else "")
    if target not in outputs:
        raise ValueError(
            f"name the output the scores come from; the model gives {', '.join(outputs)}"
        )
    back = steps.build()
    model, back = align_versions(model, back)
    return compose.merge_models(model, back, io_map=[(target, LOGITS)])
