"""Model layer units: signature checks, provider fallback, batching merge/split."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edged.config import ModelConfig, OnnxOptions
from edged.errors import DtypeMismatch, InputMismatch, ShapeMismatch
from edged.models import batching
from edged.models import onnx as onnx_backend
from edged.models.backend import Signature, TensorSpec
from edged.models.calls import Infer
from edged.models.onnx import OnnxBackend, choose_providers, with_provider_options
from edged.models.runner import ModelRunner
from edged.replies import ReplyTo

SIGNATURE = Signature(
    inputs=(TensorSpec("x", np.dtype("float32"), (None, 16)),),
    outputs=(TensorSpec("probs", np.dtype("float32"), (None, 4)),),
)


def test_signature_accepts_matching_inputs_and_any_dynamic_dim() -> None:
    SIGNATURE.check("m", {"x": np.zeros((5, 16), np.float32)})


@pytest.mark.parametrize(
    ("inputs", "error", "message"),
    [
        ({}, InputMismatch, "missing input 'x'; it takes x: float32[?, 16]"),
        (
            {"x": np.zeros((1, 16), np.float32), "y": np.zeros(1)},
            InputMismatch,
            "unexpected input 'y'",
        ),
        ({"x": np.zeros((1, 16), np.float64)}, DtypeMismatch, "expected float32, got float64"),
        (
            {"x": np.zeros((1, 15), np.float32)},
            ShapeMismatch,
            "expected shape [?, 16], got [1, 15]",
        ),
        ({"x": np.zeros(16, np.float32)}, ShapeMismatch, "got [16]"),
    ],
)
def test_signature_mismatch_names_input_and_shapes(
    inputs: dict[str, np.ndarray], error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as info:
        SIGNATURE.check("m", inputs)
    assert "model 'm'" in str(info.value)
    assert message in str(info.value)


def test_batchable_needs_a_dynamic_leading_dim_everywhere() -> None:
    assert SIGNATURE.batchable
    fixed = Signature(SIGNATURE.inputs, (TensorSpec("p", np.dtype("float32"), (1, 4)),))
    assert not fixed.batchable


def test_provider_preference_falls_back_to_what_is_available(
    caplog: pytest.LogCaptureFixture,
) -> None:
    available = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with caplog.at_level(logging.DEBUG):
        chosen = choose_providers(("tensorrt", "cuda", "cpu"), available)
    assert chosen == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert "TensorrtExecutionProvider is not available" in caplog.text
    assert choose_providers(("tensorrt",), ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]


def test_tensorrt_builds_fp16_engines_into_the_cache_directory(tmp_path: Path) -> None:
    chosen = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    trt, *rest = with_provider_options(chosen, OnnxOptions(), tmp_path)
    engines = str(tmp_path / "tensorrt")
    assert trt == (
        "TensorrtExecutionProvider",
        {
            "trt_fp16_enable": True,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": engines,
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": engines,
        },
    )
    assert rest == chosen[1:]
    fp32 = with_provider_options(chosen[:1], OnnxOptions(tensorrt_fp16=False), None)
    assert fp32 == [("TensorrtExecutionProvider", {"trt_fp16_enable": False})]


def test_onnx_backend_reports_signature_and_runs(models_dir: Path) -> None:
    backend = OnnxBackend.load(models_dir / "demo.onnx", OnnxOptions(providers=("cuda", "cpu")))
    assert backend.providers == ["CPUExecutionProvider"]
    assert [str(s) for s in backend.signature.inputs] == ["x: float32[?, 16]"]
    probs = backend.run({"x": np.ones((3, 16), np.float32)})["probs"]
    assert probs.shape == (3, 4)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=0.02)


def test_merge_and_split_round_trip_per_request_rows() -> None:
    requests = [{"x": np.full((n, 2), n, np.float32)} for n in (1, 3, 2)]
    merged = batching.merge(requests)
    assert merged["x"].shape == (6, 2)
    parts = batching.split({"y": merged["x"] * 10}, [1, 3, 2])
    for request, part in zip(requests, parts, strict=True):
        np.testing.assert_array_equal(part["y"], request["x"] * 10)


def test_split_refuses_outputs_that_lost_the_batch_dim() -> None:
    with pytest.raises(ValueError, match="rows for a batch of 3"):
        batching.split({"y": np.zeros((2, 1))}, [1, 2])


def test_batch_key_separates_shapes_and_refuses_ragged_leading_dims() -> None:
    a = {"x": np.zeros((1, 16)), "m": np.zeros((1, 2))}
    b = {"x": np.zeros((4, 16)), "m": np.zeros((4, 2))}
    c = {"x": np.zeros((1, 8)), "m": np.zeros((1, 2))}
    assert batching.batch_key(a) == batching.batch_key(b) != batching.batch_key(c)
    assert batching.batch_key({"x": np.zeros((1, 16)), "m": np.zeros((2, 2))}) is None


def test_the_priming_model_is_one_identity_node() -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "prime",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    model.ClearField("producer_name")
    model.ClearField("producer_version")
    onnx.checker.check_model(model)
    assert model.SerializeToString() == onnx_backend.PRIME_MODEL
    onnx_backend.OnnxBackend.prime()


def test_inputs_reach_the_model_64_byte_aligned_and_large_aligned_ones_are_not_copied() -> None:
    def at_offset(nbytes: int, offset: int) -> np.ndarray[Any, Any]:
        raw = np.zeros(nbytes + 128, np.uint8)
        start = -raw.ctypes.data % batching.ALIGNMENT + offset
        return raw[start : start + nbytes].view(np.float32)

    for nbytes in (64, batching.ASK_ABOVE_BYTES * 4):
        misaligned = at_offset(nbytes, 4)
        misaligned[:] = np.arange(misaligned.size)
        copy = batching.aligned(misaligned)
        assert copy.ctypes.data % batching.ALIGNMENT == 0
        np.testing.assert_array_equal(copy, misaligned)
    large = at_offset(batching.ASK_ABOVE_BYTES * 4, 0)
    assert batching.aligned(large) is large
    merged = batching.merge([{"x": at_offset(64, 8).reshape(1, 16)}] * 3)
    assert merged["x"].shape == (3, 16) and merged["x"].ctypes.data % batching.ALIGNMENT == 0


def test_small_inputs_reuse_kept_aligned_buffers_within_a_bound() -> None:
    buffers = batching.AlignedBuffers()
    first = batching.merge([{"x": np.arange(16, dtype=np.float32).reshape(1, 16)}], buffers)
    again = batching.merge([{"x": np.ones((1, 16), np.float32)}], buffers)
    assert again["x"] is first["x"] and again["x"].ctypes.data % batching.ALIGNMENT == 0
    np.testing.assert_array_equal(again["x"], np.ones((1, 16)))  # the new request's values
    for rows in range(2, 2 + 2 * batching.AlignedBuffers.MAX_KEPT):
        batching.merge([{"x": np.ones((rows, 16), np.float32)}], buffers)
    assert len(buffers._kept) == batching.AlignedBuffers.MAX_KEPT
    large = np.ones((1, batching.ASK_ABOVE_BYTES), np.float32)  # misaligned or not: not kept
    batching.merge([{"y": large[:, 1:]}], buffers)
    assert all(name == "x" for name, _, _ in buffers._kept)


def test_a_slow_hand_off_to_the_models_thread_is_not_run_time(models_dir: Path) -> None:
    """The first run goes to the model's thread; while the loop holds the interpreter that
    thread cannot start it. The wait is queueing, so the model, fast as it is, runs inline
    next (counted as run time, it would keep the model on its thread for good)."""

    async def main() -> None:
        path = models_dir / "demo.onnx"
        backend = OnnxBackend.load(path, OnnxOptions())
        config = ModelConfig(path=str(path), inline_max_us=3000)
        runner = ModelRunner("demo", 1, backend, config, asyncio.get_running_loop())
        runner.start()
        replies: list[Any] = []
        x = np.ones((1, 16), np.float32)

        def infer() -> None:
            request = Infer(id=len(replies), op="infer", model="demo", inputs={"x": x})
            runner.submit(request, ReplyTo(lambda f: replies.append(f) or True, 1, None), b"p")
            runner.pump()

        interval = sys.getswitchinterval()
        sys.setswitchinterval(0.05)  # the thread waits for the loop's busy spell to end
        try:
            infer()
            until = time.monotonic() + 0.02
            while time.monotonic() < until:  # holds the interpreter: the hand-off waits
                pass
        finally:
            sys.setswitchinterval(interval)
        await runner.drained()
        infer()
        stats = runner.statistics()
        runner.close()
        assert (stats.threaded_runs, stats.inline_runs) == (1, 1), stats
        assert stats.recent_run_us is not None and stats.recent_run_us < 3000

    asyncio.run(main())
