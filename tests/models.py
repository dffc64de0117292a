"""ONNX models the tests build for themselves (besides edged.demo's)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, save

SLOW_WIDTH = 512


def build_slow_model(path: Path, layers: int = 24) -> Path:
    """x float32[batch, 512] -> y: a chain of MatMul+Tanh, slow enough to hold a queue."""
    rng = np.random.default_rng(1)
    weight = (rng.standard_normal((SLOW_WIDTH, SLOW_WIDTH)) / SLOW_WIDTH).astype(np.float32)
    nodes, previous = [], "x"
    for i in range(layers):
        nodes.append(helper.make_node("MatMul", [previous, "w"], [f"m{i}"]))
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"t{i}"]))
        previous = f"t{i}"
    nodes.append(helper.make_node("Identity", [previous], ["y"]))
    save(_square_model("slow", nodes, weight), path)
    return path


def wide_model(width: int = 2048, seed: int = 0) -> onnx.ModelProto:
    """x float32[batch, width] -> y: one MatMul whose weight is width*width*4 bytes."""
    weight = np.random.default_rng(seed).standard_normal((width, width), dtype=np.float32)
    return _square_model("wide", [helper.make_node("MatMul", ["x", "w"], ["y"])], weight)


def build_wide_model(path: Path, width: int = 2048, seed: int = 0) -> Path:
    save(wide_model(width, seed), path)
    return path


def _square_model(name: str, nodes: list[onnx.NodeProto], weight: np.ndarray) -> onnx.ModelProto:
    """x float32[batch, n] -> y float32[batch, n], with one initializer "w"."""
    width = weight.shape[0]
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        initializer=[numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def build_one_row_model(path: Path, width: int, seed: int = 0) -> Path:
    """Declares x float32[batch, width] like ``wide_model`` and passes a one-row warm-up, but
    fails on any batch of two or more rows: a version that breaks only on live traffic."""
    weight = np.random.default_rng(seed).standard_normal((width, width), dtype=np.float32)
    shape = numpy_helper.from_array(np.array([1, width], np.int64), "one_row")
    nodes = [
        helper.make_node("Constant", [], ["shape"], value=shape),
        helper.make_node("Reshape", ["x", "shape"], ["row"]),
        helper.make_node("MatMul", ["row", "w"], ["y"]),
    ]
    save(_square_model("one_row", nodes, weight), path)
    return path
