"""Classifier post-processing built as an ONNX graph, to be fused after a model.

A classifier's raw ``logits: float32[N, C]`` become ``scores: float32[N, k]`` and
``classes: int64[N, k]``, best first: an activation (softmax, sigmoid, or none) and the top k,
inside onnxruntime, so a client gets answers rather than a tensor to sort through. Standard ops
only (Softmax, Sigmoid, TopK); ``edged.steps.pipeline`` joins them with a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edged.steps.graph import GraphBuilder

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

    def inputs(self) -> tuple[str, ...]:
        """The graph's inputs, which model outputs feed."""
        return (LOGITS,)

    def build(self) -> Any:
        """The steps as an ONNX model: ``post_logits: float32[N, C]`` -> ``scores``,
        ``classes``."""
        from onnx import TensorProto, helper

        g = GraphBuilder("post")
        probabilities = LOGITS
        if self.activation == "softmax":
            probabilities = g.op("Softmax", LOGITS, axis=-1)
        elif self.activation == "sigmoid":
            probabilities = g.op("Sigmoid", LOGITS)
        order = g.top(probabilities, g.constant([self.top_k]), SCORES)
        g.op("Identity", order, output=CLASSES)
        return g.model(
            [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["N", "C"])],
            [
                helper.make_tensor_value_info(SCORES, TensorProto.FLOAT, ["N", self.top_k]),
                helper.make_tensor_value_info(CLASSES, TensorProto.INT64, ["N", self.top_k]),
            ],
        )
