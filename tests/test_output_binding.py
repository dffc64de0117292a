"""Outputs a request placed in shared memory are written there by the run itself (an
onnxruntime IO binding) when their shape is known before the run; others are returned as usual
and copied by the reply."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edged.config import ModelConfig, OnnxOptions
from edged.models.calls import Infer
from edged.models.onnx import OnnxBackend
from edged.models.runner import ModelRunner
from edged.replies import OutputShape, ReplyTo
from tests.conftest import DaemonFactory


def test_a_bound_output_is_written_into_the_given_array(models_dir: Path) -> None:
    backend = OnnxBackend.load(models_dir / "image.onnx", OnnxOptions())
    x = np.random.default_rng(1).standard_normal((2, 3, 224, 224)).astype(np.float32)
    (expected,) = backend.run({"image": x}).values()
    target = np.full((2, 10), np.nan, np.float32)
    outputs = backend.run({"image": x}, into={"logits": target})
    assert outputs["logits"] is target
    np.testing.assert_array_equal(target, expected)


class PlacingReply(ReplyTo):
    """Places every output of a known shape in arrays of its own; keeps what ``ok`` got."""

    __slots__ = ("asked", "buffers", "got")
    places_outputs = True

    def __init__(self) -> None:
        super().__init__(lambda _: True, 1, None)
        self.buffers: dict[str, np.ndarray[Any, Any]] = {}
        self.asked: dict[str, OutputShape] = {}
        self.got: dict[str, np.ndarray[Any, Any]] = {}

    def place(self, outputs: Mapping[str, OutputShape]) -> dict[str, np.ndarray[Any, Any]]:
        self.asked = dict(outputs)
        self.buffers = {name: np.zeros(dims, dtype) for name, (dtype, dims) in outputs.items()}
        return self.buffers

    def ok(self, fields: dict[str, Any], outputs: Any = None) -> bool:
        self.got = dict(outputs or {})
        return True


def test_a_request_running_alone_has_its_placed_outputs_written_by_the_run(
    models_dir: Path,
) -> None:
    x = np.random.default_rng(2).standard_normal((3, 3, 224, 224)).astype(np.float32)
    backend = OnnxBackend.load(models_dir / "image.onnx", OnnxOptions())
    (expected,) = backend.run({"image": x}).values()

    async def main() -> PlacingReply:
        config = ModelConfig(path=str(models_dir / "image.onnx"), inline_max_us=0)
        runner = ModelRunner("image", 1, backend, config, asyncio.get_running_loop())
        runner.start()
        reply = PlacingReply()
        runner.submit(Infer(id=1, op="infer", model="image", inputs={"image": x}), reply, b"p")
        runner.pump()
        await runner.drained()
        runner.close()
        return reply

    reply = asyncio.run(main())
    assert reply.asked == {"logits": (np.dtype(np.float32), (3, 10))}  # rows known beforehand
    assert reply.got["logits"] is reply.buffers["logits"]
    np.testing.assert_array_equal(reply.buffers["logits"], expected)


def test_a_placed_output_is_written_all_or_nothing_with_the_others(
    start_daemon: DaemonFactory, models_dir: Path
) -> None:
    from edged.errors import BadRequest

    daemon = start_daemon({"models": {"image": {"path": str(models_dir / "image.onnx")}}})
    x = np.random.default_rng(3).standard_normal((1, 3, 224, 224)).astype(np.float32)
    with daemon.client() as client:
        expected = client.infer("image", {"image": x})["logits"]
        region = client.region(4096)
        logits = region.array((1, 10), np.float32)
        other = region.array((1, 10), np.float32, offset=1024)
        logits[...] = -1.0
        placed = {"logits": logits, "probs": other}
        with pytest.raises(BadRequest, match="'probs'"):
            client.infer("image", {"image": x}, outputs_to=placed)
        np.testing.assert_array_equal(logits, -1.0)  # nothing was written
        client.infer("image", {"image": x}, outputs_to={"logits": logits})
        np.testing.assert_array_equal(logits, expected)
