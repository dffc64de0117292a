"""A model's declared pre- and post-processing, fused with it into one ONNX graph at load.

The steps are ONNX graphs (``frame``, ``scores``, ``boxes``) joined to the model
with ``onnx.compose``, so one onnxruntime session takes the camera's frame and gives scores or
boxes: nothing crosses Python between the steps, a GPU provider runs them too, and golden
vectors, swap validation, shadow and canary see the fused model as they would any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edged.steps.boxes import GAIN, OFFSET, BoxSteps
from edged.steps.frame import BOX_GAIN, BOX_OFFSET, FrameSteps
from edged.steps.graph import align_versions
from edged.steps.scores import ScoreSteps


def pipeline_path(model_path: str) -> Path:
    """Where a store version's own pipeline lives: beside its model file, as
    ``<stem>.pipeline.toml`` (``model.onnx`` -> ``model.pipeline.toml``)."""
    return Path(model_path).with_suffix(".pipeline.toml")


@dataclass(frozen=True)
class Postprocess:
    """One of a classifier's ``scores`` or a detector's ``boxes``, reading the model outputs
    named in ``outputs`` (in the steps' order), by default all of them."""

    scores: ScoreSteps | None = None
    boxes: BoxSteps | None = None
    outputs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if (self.scores is None) == (self.boxes is None):
            raise ValueError("postprocess takes exactly one of 'scores' or 'boxes'")

    @property
    def steps(self) -> ScoreSteps | BoxSteps:
        steps = self.scores or self.boxes
        assert steps is not None  # __post_init__ allows no other state
        return steps


@dataclass(frozen=True)
class Pipeline:
    preprocess: FrameSteps | None = None
    postprocess: Postprocess | None = None

    def __bool__(self) -> bool:
        return self.preprocess is not None or self.postprocess is not None

    def apply(self, model: Any) -> Any:
        """``model`` (an ``onnx.ModelProto``) with the steps around it, as one model."""
        from onnx import compose

        boxes = self.postprocess is not None and self.postprocess.boxes is not None
        if self.preprocess is not None:
            target = _model_input(model, self.preprocess.input)
            front = self.preprocess.build(target + "_pre", box_transform=boxes)
            front, model = align_versions(front, model)
            model = compose.merge_models(front, model, io_map=[(target + "_pre", target)])
        if self.postprocess is not None:
            model = self._append(model, self.postprocess)
        return model

    def _append(self, model: Any, post: Postprocess) -> Any:
        from onnx import compose

        transform = (BOX_GAIN, BOX_OFFSET)
        produced = [value.name for value in model.graph.output if value.name not in transform]
        steps = post.steps
        if isinstance(steps, BoxSteps):
            size = (self.preprocess.height, self.preprocess.width) if self.preprocess else None
            back = steps.build(input_size=size, mapped=self.preprocess is not None)
        else:
            back = steps.build()
        wanted = steps.inputs()
        sources = list(post.outputs) or produced
        if len(sources) != len(wanted) or not set(sources) <= set(produced):
            raise ValueError(
                f"postprocess reads {len(wanted)} model output(s): name them in 'outputs'; "
                f"the model gives {', '.join(produced)}"
            )
        renamed = _rename_clashes(model, back)
        io_map = [
            (renamed.get(name, name), step) for name, step in zip(sources, wanted, strict=True)
        ]
        if self.preprocess is not None and isinstance(steps, BoxSteps):
            io_map += list(zip(transform, (GAIN, OFFSET), strict=True))
        model, back = align_versions(model, back)
        return compose.merge_models(model, back, io_map=io_map)

    def describe(self) -> dict[str, Any]:
        """The declared steps, for ``describe``: which ones, not every setting."""
        fields: dict[str, Any] = {}
        if self.preprocess is not None:
            pre = self.preprocess
            fitting = "letterbox" if pre.letterbox else "resize"
            fields["preprocess"] = f"frame -> {fitting} {pre.height}x{pre.width} {pre.layout}"
        if self.postprocess is not None:
            fields["postprocess"] = "boxes" if self.postprocess.boxes else "scores"
        return fields


def _rename_clashes(model: Any, steps: Any) -> dict[str, str]:
    """Rename the model's tensors that the steps' graph also names (a detector whose raw
    outputs are called ``boxes`` and ``scores``, as the steps' results are): the steps' names
    are what a client gets. Returns old -> new for what was renamed."""
    graph = model.graph
    taken = {name for node in steps.graph.node for name in (*node.input, *node.output)}
    taken |= {value.name for value in (*steps.graph.input, *steps.graph.output)}
    inputs = {value.name for value in graph.input}
    edges = {name for node in graph.node for name in (*node.input, *node.output)}
    renamed = {name: f"model_{name}" for name in (edges - inputs) & taken}
    for node in graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]
        node.output[:] = [renamed.get(name, name) for name in node.output]
    for value in (*graph.output, *graph.value_info):
        value.name = renamed.get(value.name, value.name)
    return renamed


def _model_input(model: Any, name: str) -> str:
    initializers = {tensor.name for tensor in model.graph.initializer}
    inputs: list[str] = [v.name for v in model.graph.input if v.name not in initializers]
    if not name:
        if len(inputs) != 1:
            raise ValueError(
                f"the model takes {len(inputs)} inputs: name the one the frame feeds "
                f"('input' of preprocess)"
            )
        return inputs[0]
    if name not in inputs:
        raise ValueError(f"the model has no input {name!r}; it takes {', '.join(inputs)}")
    return name
