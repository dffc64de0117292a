"""What every step graph is built with: a small node builder, and the opset and IR alignment
``onnx.compose`` needs to join a step with a model."""

from __future__ import annotations

from typing import Any

import numpy as np

#: the opset the steps are built with: Resize's current form (antialias, keep_aspect_ratio)
OPSET = 18
#: the IR version the steps are written in: what every onnxruntime edged supports reads
IR_VERSION = 8


class GraphBuilder:
    """Nodes and constants of one step graph, each tensor named ``<prefix>_<n>`` so that the
    graph joins a model without clashing with its names: the steps read as a sequence of
    operations rather than of name bookkeeping."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.nodes: list[Any] = []
        self.constants: list[Any] = []

    def _name(self) -> str:
        return f"{self.prefix}_{len(self.nodes) + len(self.constants)}"

    def constant(self, value: Any, dtype: Any = None) -> str:
        """``value`` as an initializer; integers are int64, as ONNX's index inputs are."""
        from onnx import numpy_helper

        array = np.asarray(value, dtype)
        if array.dtype.kind in "iu" and dtype is None:
            array = array.astype(np.int64)
        name = self._name()
        self.constants.append(numpy_helper.from_array(array, name))
        return name

    def op(self, kind: str, *inputs: str, output: str = "", **attributes: Any) -> str:
        from onnx import helper

        name = output or self._name()
        self.nodes.append(helper.make_node(kind, list(inputs), [name], **attributes))
        return name

    def slice(self, data: str, start: int, end: int, axis: int) -> str:
        return self.op(
            "Slice", data, self.constant([start]), self.constant([end]), self.constant([axis])
        )

    def top(self, values: str, count: str, output: str) -> str:
        """The ``count`` largest ``values`` into ``output``, best first (equal values in their
        order); returns their positions."""
        from onnx import helper

        order = self._name()
        self.nodes.append(
            helper.make_node("TopK", [values, count], [output, order], largest=1, sorted=1)
        )
        return order

    def model(self, inputs: list[Any], outputs: list[Any]) -> Any:
        """The steps as a model at ``OPSET``."""
        from onnx import helper

        graph = helper.make_graph(
            self.nodes, self.prefix, inputs, outputs, initializer=self.constants
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = IR_VERSION
        return model


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


def _default_opset(model: Any) -> int:
    return next(
        (entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 1
    )
