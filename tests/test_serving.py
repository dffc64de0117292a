"""Serving through a real daemon process: results, batching, admission, deadlines, transports."""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import zmq
from onnx import TensorProto, helper, numpy_helper

from edged import protocol
from edged.client import AsyncClient, Client
from edged.errors import BusyError, DeadlineExceeded, UnknownModel
from edged.testing import DaemonProcess
from tests.conftest import Connect, DaemonFactory, slow_config
from tests.models import SLOW_WIDTH


def direct_run(model: Path, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return session.run(None, inputs)


def test_outputs_equal_direct_onnxruntime(demo_daemon: DaemonProcess, models_dir: Path) -> None:
    x = np.random.default_rng(3).standard_normal((5, 16)).astype(np.float32)
    with demo_daemon.client() as client:
        result = client.infer("demo", {"x": x}, trace="trace-1")
    np.testing.assert_array_equal(
        result["probs"], direct_run(models_dir / "demo.onnx", {"x": x})[0]
    )
    assert (result.model, result.version, result.trace) == ("demo", 1, "trace-1")
    assert {"queue_us", "run_us", "batch", "rtt_us"} <= set(result.timing)


def test_image_sized_request(start_daemon: DaemonFactory, models_dir: Path) -> None:
    daemon = start_daemon({"models": {"image": {"path": str(models_dir / "image.onnx")}}})
    image = np.random.default_rng(4).standard_normal((1, 3, 224, 224)).astype(np.float32)
    with daemon.client() as client:
        logits = client.infer("image", {"image": image})["logits"]
    np.testing.assert_array_equal(
        logits, direct_run(models_dir / "image.onnx", {"image": image})[0]
    )


def test_describe_and_ping(demo_daemon: DaemonProcess) -> None:
    with demo_daemon.client() as client:
        described = client.describe("demo")
        ping = client.ping()
    assert described["signature"]["inputs"] == [
        {"name": "x", "dtype": "float32", "shape": [None, 16]}
    ]
    assert described["signature"]["outputs"][0]["name"] == "probs"
    assert (
        ping["state"] == "serving" and ping["models"] == ["demo"] and ping["pid"] == demo_daemon.pid
    )


def test_unknown_model_and_version_pin(demo_daemon: DaemonProcess) -> None:
    x = np.zeros((1, 16), np.float32)
    with demo_daemon.client() as client:
        with pytest.raises(UnknownModel, match="no model named 'nope'; serving: demo"):
            client.infer("nope", {"x": x})
        with pytest.raises(UnknownModel, match="no version 7"):
            client.infer("demo", {"x": x}, version=7)
        assert client.infer("demo", {"x": x}, version=1).version == 1


def test_concurrent_requests_are_batched_and_split_back(
    start_daemon: DaemonFactory, models_dir: Path
) -> None:
    config = {"path": str(models_dir / "demo.onnx"), "max_batch": 16, "max_delay_us": 20000}
    daemon = start_daemon({"models": {"demo": config}})
    rng = np.random.default_rng(5)
    inputs = [rng.standard_normal((1 + i % 3, 16)).astype(np.float32) for i in range(12)]

    async def send_all() -> list[Any]:
        async with AsyncClient(daemon.endpoint, timeout=10) as client:
            return await asyncio.gather(*(client.infer("demo", {"x": x}) for x in inputs))

    results = asyncio.run(send_all())
    expected = direct_run(models_dir / "demo.onnx", {"x": np.concatenate(inputs)})[0]
    offset = 0
    for x, result in zip(inputs, results, strict=True):
        np.testing.assert_allclose(result["probs"], expected[offset : offset + len(x)], atol=1e-6)
        offset += len(x)
    assert max(result.timing["batch"] for result in results) > 1


def send_raw(sock: zmq.Socket[Any], request_id: int, x: np.ndarray, **header: Any) -> None:
    sock.send_multipart(
        protocol.encode_request(request_id, "infer", model="slow", inputs={"x": x}, **header)
    )


def recv_reply(sock: zmq.Socket[Any], timeout_ms: int = 30000) -> protocol.Reply:
    assert sock.poll(timeout_ms), "no reply"
    return protocol.decode_reply(sock.recv_multipart())


def test_full_queue_answers_busy_at_once_and_loses_nothing(
    start_daemon: DaemonFactory, models_dir: Path, connect: Connect
) -> None:
    daemon = start_daemon(slow_config(models_dir, queue_depth=2))
    sock = connect(daemon.endpoint)
    x = np.ones((256, SLOW_WIDTH), np.float32)
    for request_id in range(1, 9):  # one runs, two queue, the rest are refused
        send_raw(sock, request_id, x)
    replies = [recv_reply(sock) for _ in range(8)]
    busy = [r for r in replies if isinstance(r.error, BusyError)]
    served = [r for r in replies if r.error is None]
    assert len(busy) >= 4 and len(served) >= 2
    assert len(busy) + len(served) == 8
    assert sorted(r.id for r in replies) == list(range(1, 9))
    # BUSY replies come before the running batch finishes
    assert all(replies.index(r) < replies.index(served[0]) for r in busy)
    assert "queue_depth 2" in str(busy[0].error)


def test_deadline_expired_in_queue(
    start_daemon: DaemonFactory, models_dir: Path, connect: Connect
) -> None:
    daemon = start_daemon(slow_config(models_dir))
    sock = connect(daemon.endpoint)
    x = np.ones((256, SLOW_WIDTH), np.float32)
    send_raw(sock, 1, x)
    send_raw(sock, 2, x[:1], deadline_ms=1)
    send_raw(sock, 3, x[:1], deadline_ms=60000)
    replies = {r.id: r for r in (recv_reply(sock) for _ in range(3))}
    assert replies[1].error is None and replies[3].error is None
    assert isinstance(replies[2].error, DeadlineExceeded)


def test_slow_model_does_not_block_another_model(
    start_daemon: DaemonFactory, models_dir: Path, connect: Connect
) -> None:
    config = slow_config(models_dir)
    config["models"]["demo"] = {"path": str(models_dir / "demo.onnx")}
    daemon = start_daemon(config)
    sock = connect(daemon.endpoint)
    x = np.ones((512, SLOW_WIDTH), np.float32)
    for request_id in range(1, 4):
        send_raw(sock, request_id, x)
    with daemon.client() as client:
        client.infer("demo", {"x": np.zeros((1, 16), np.float32)})
        still_running = sock.poll(0) == 0
    assert still_running, "the demo reply should overtake the slow model's queue"
    assert {recv_reply(sock).id for _ in range(3)} == {1, 2, 3}


def test_async_client_many_in_flight(demo_daemon: DaemonProcess) -> None:
    async def run() -> list[float]:
        async with AsyncClient(demo_daemon.endpoint) as client:
            xs = [np.full((1, 16), i, np.float32) for i in range(50)]
            results = await asyncio.gather(*(client.infer("demo", {"x": x}) for x in xs))
            return [float(r["probs"][0, 0]) for r in results]

    firsts = asyncio.run(run())
    with demo_daemon.client() as client:
        expected = [
            float(client.infer("demo", {"x": np.full((1, 16), i, np.float32)})["probs"][0, 0])
            for i in range(50)
        ]
    assert firsts == expected


def test_threads_each_with_a_client(demo_daemon: DaemonProcess) -> None:
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            with demo_daemon.client() as client:
                for _ in range(50):
                    x = np.random.default_rng(seed).standard_normal((2, 16)).astype(np.float32)
                    assert client.infer("demo", {"x": x})["probs"].shape == (2, 4)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_optional_tcp_endpoint(start_daemon: DaemonFactory, models_dir: Path) -> None:
    endpoint = f"tcp://127.0.0.1:{free_tcp_port()}"
    daemon = start_daemon(
        {"server": {"tcp": [endpoint]}, "models": {"demo": {"path": str(models_dir / "demo.onnx")}}}
    )
    with Client(endpoint) as tcp, daemon.client() as ipc:
        x = np.ones((1, 16), np.float32)
        np.testing.assert_array_equal(
            tcp.infer("demo", {"x": x})["probs"], ipc.infer("demo", {"x": x})["probs"]
        )


def test_req_socket_client(demo_daemon: DaemonProcess, connect: Connect) -> None:
    sock = connect(demo_daemon.endpoint, zmq.REQ)
    sock.send_multipart(
        protocol.encode_request(
            5, "infer", model="demo", inputs={"x": np.zeros((1, 16), np.float32)}
        )
    )
    reply = recv_reply(sock, 10000)
    assert reply.error is None and reply.id == 5 and reply.tensors["probs"].shape == (1, 4)


def test_deadline_shorter_than_the_batch_delay_runs_in_time(
    start_daemon: DaemonFactory, models_dir: Path
) -> None:
    config = {"path": str(models_dir / "demo.onnx"), "max_batch": 16, "max_delay_us": 2_000_000}
    daemon = start_daemon({"models": {"demo": config}})
    with daemon.client() as client:
        result = client.infer("demo", {"x": np.zeros((1, 16), np.float32)}, deadline_ms=50)
    assert result.timing["queue_us"] < 2_000_000


def build_row_sum_model(path: Path, width: int) -> Path:
    """x float32[batch, width] -> y float32[batch]: a ReduceSum over each row, whose vector
    kernel adds in an order that depends on where the row starts in memory."""
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=0)],
        "row_sum",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch"])],
        initializer=[axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_results_do_not_depend_on_where_a_frame_lands_in_memory(
    start_daemon: DaemonFactory, tmp_path: Path, connect: Connect
) -> None:
    """The same request with headers of different lengths (a longer trace) puts its tensor
    frame at different addresses: the result is the same to the bit."""
    model = build_row_sum_model(tmp_path / "row_sum.onnx", 1000)
    daemon = start_daemon({"models": {"sum": {"path": str(model), "preload": True}}})
    x = np.random.default_rng(6).standard_normal((1, 1000)).astype(np.float32)
    sock = connect(daemon.endpoint)
    results = set()
    for pad in range(64):
        request = protocol.encode_request(
            pad + 1, "infer", model="sum", inputs={"x": x}, trace="t" * (pad + 1)
        )
        sock.send_multipart(request)
        reply = recv_reply(sock, 10000)
        assert reply.error is None, reply.error
        results.add(reply.tensors["y"].tobytes())
    assert len(results) == 1
