"""Small ONNX models built from code: the first-start demo, and test, bench and example models.

Built with the onnx helper API, and the classifiers quantized with onnxruntime's static
quantizer (QDQ, int8 weights, uint8 activations, calibrated on deterministic random data), so
no model is ever downloaded.
``onnx`` and the quantizer are imported only when a model is actually built.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

DEMO_FEATURES = 16
DEMO_CLASSES = 4
IMAGE_SHAPE = (3, 224, 224)
IMAGE_CLASSES = 10


def build_demo_model(path: Path, seed: int = 0) -> Path:
    """An MLP classifier: x float32[batch, 16] -> probs float32[batch, 4]."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((DEMO_FEATURES, 32)).astype(np.float32) * 0.5
    b1 = rng.standard_normal(32).astype(np.float32) * 0.1
    w2 = rng.standard_normal((32, DEMO_CLASSES)).astype(np.float32) * 0.5
    b2 = rng.standard_normal(DEMO_CLASSES).astype(np.float32) * 0.1
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["l0"]),
        helper.make_node("Add", ["l0", "b2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "edged-demo",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", DEMO_FEATURES])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", DEMO_CLASSES])],
        initializer=[_tensor(n, a) for n, a in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2))],
    )
    calibration = rng.standard_normal((32, DEMO_FEATURES)).astype(np.float32)
    return _quantize_to(path, graph, "x", calibration)


def build_image_model(path: Path, seed: int = 0) -> Path:
    """A small CNN: image float32[batch, 3, 224, 224] -> logits float32[batch, 10]."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    conv = rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.2
    fc = rng.standard_normal((8, IMAGE_CLASSES)).astype(np.float32) * 0.5
    nodes = [
        helper.make_node("Conv", ["image", "conv"], ["c"], strides=[4, 4]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("MatMul", ["f", "fc"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "edged-image",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", *IMAGE_SHAPE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", IMAGE_CLASSES])],
        initializer=[_tensor("conv", conv), _tensor("fc", fc)],
    )
    calibration = rng.standard_normal((4, *IMAGE_SHAPE)).astype(np.float32)
    return _quantize_to(path, graph, "image", calibration)


#: the bright-square detector's input size and its candidate boxes' grid
SQUARES_SIZE, SQUARES_CELL = 64, 16


def build_squares_detector(path: Path) -> Path:
    """image float32[1, 3, 64, 64] -> boxes [1, 16, 4] (x1, y1, x2, y2), scores [1, 16, 1]: a
    detector of bright squares on a grid of 16x16 cells, each cell's score its mean
    brightness (a MatMul with an averaging matrix), so a test or an example knows what it
    must find. Not quantized: its scores are what a test compares."""
    import onnx
    from onnx import TensorProto, helper

    cells = SQUARES_SIZE // SQUARES_CELL
    boxes, average = [], np.zeros((3, SQUARES_SIZE, SQUARES_SIZE, cells * cells), np.float32)
    for row in range(cells):
        for col in range(cells):
            y, x = row * SQUARES_CELL, col * SQUARES_CELL
            boxes.append([x, y, x + SQUARES_CELL, y + SQUARES_CELL])
            average[:, y : y + SQUARES_CELL, x : x + SQUARES_CELL, row * cells + col] = 1.0
    average /= 3 * SQUARES_CELL * SQUARES_CELL
    initializers = [
        _tensor("average", average.reshape(-1, cells * cells)),
        _tensor("candidates", np.array([boxes], np.float32)),
        _tensor("score_shape", np.array([1, -1, 1], np.int64)),
    ]
    nodes = [
        helper.make_node("Flatten", ["image"], ["flat"]),
        helper.make_node("MatMul", ["flat", "average"], ["brightness"]),
        helper.make_node("Reshape", ["brightness", "score_shape"], ["scores"]),
        helper.make_node("Identity", ["candidates"], ["boxes"]),
    ]
    count = cells * cells
    graph = helper.make_graph(
        nodes,
        "squares",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 64, 64])],
        [
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, count, 4]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, count, 1]),
        ],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _tensor(name: str, array: np.ndarray[Any, Any]) -> Any:
    from onnx import numpy_helper

    return numpy_helper.from_array(array, name)


def _quantize_to(
    path: Path, graph: Any, input_name: str, calibration: np.ndarray[Any, Any]
) -> Path:
    """Quantize the float graph and move the result to ``path`` atomically."""
    import onnx
    from onnx import helper
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._rows: Iterator[np.ndarray[Any, Any]] = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray[Any, Any]] | None:
            row = next(self._rows, None)
            return None if row is None else {input_name: row[np.newaxis]}

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        float_path = Path(tmp) / "float.onnx"
        quant_path = Path(tmp) / "model.onnx"
        onnx.save(model, float_path)
        logging.disable(logging.WARNING)  # the quantizer advises pre-processing on the root logger
        try:
            quantize_static(
                str(float_path),
                str(quant_path),
                Reader(),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
            )
        finally:
            logging.disable(logging.NOTSET)
        with quant_path.open("rb") as fh:
            os.fsync(fh.fileno())
        quant_path.replace(path)
    return path
