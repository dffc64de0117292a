"""Bad input against a live daemon: a specific error each time, and the daemon keeps serving."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from edged import protocol
from edged.errors import ClientTimeout, TooLarge
from edged.testing import DaemonProcess
from tests.conftest import Connect, DaemonFactory

LIMIT = 64 * 1024
X = np.zeros((1, 16), np.float32)


@pytest.fixture
def limited_daemon(start_daemon: DaemonFactory, models_dir: Path) -> DaemonProcess:
    return start_daemon(
        {
            "server": {"max_message_bytes": LIMIT},
            "models": {"demo": {"path": str(models_dir / "demo.onnx")}},
        }
    )


@pytest.fixture
def raw(limited_daemon: DaemonProcess, connect: Connect) -> zmq.Socket[Any]:
    return connect(limited_daemon.endpoint)


def header(**overrides: Any) -> dict[str, Any]:
    base = {"v": 1, "id": 11, "op": "infer", "model": "demo"}
    base["inputs"] = [{"name": "x", "dtype": "float32", "shape": [1, 16]}]
    base.update(overrides)
    return base


def x_frame(dtype: str = "float32", shape: tuple[int, ...] = (1, 16)) -> bytes:
    return np.zeros(shape, dtype).tobytes()


def spec(name: str = "x", dtype: str = "float32", shape: list[int] | None = None) -> dict[str, Any]:
    return {"name": name, "dtype": dtype, "shape": shape or [1, 16]}


BAD_MESSAGES = {
    "not msgpack": ([b"\xc1\xc1"], "BAD_REQUEST"),
    "header not a map": ([msgpack.packb("hello")], "BAD_REQUEST"),
    "wrong protocol version": ([msgpack.packb(header(v=9)), x_frame()], "UNSUPPORTED_VERSION"),
    "unknown op": ([msgpack.packb(header(op="train")), x_frame()], "UNKNOWN_OP"),
    "unknown model": ([msgpack.packb(header(model="nope")), x_frame()], "UNKNOWN_MODEL"),
    "missing input": ([msgpack.packb(header(inputs=[]))], "INPUT_MISMATCH"),
    "extra input": (
        [msgpack.packb(header(inputs=[spec(), spec("y")])), x_frame(), x_frame()],
        "INPUT_MISMATCH",
    ),
    "wrong dtype": (
        [msgpack.packb(header(inputs=[spec(dtype="float64")])), x_frame("float64")],
        "DTYPE_MISMATCH",
    ),
    "wrong shape": (
        [msgpack.packb(header(inputs=[spec(shape=[1, 15])])), x_frame(shape=(1, 15))],
        "SHAPE_MISMATCH",
    ),
    "shape vs byte length": ([msgpack.packb(header()), b"\0" * 60], "FRAME_MISMATCH"),
    "more frames than declared": ([msgpack.packb(header()), x_frame(), b"extra"], "FRAME_MISMATCH"),
    "empty message": ([b""], "BAD_REQUEST"),
    "frames over the limit together": (
        [msgpack.packb(header()), *([b"\0" * (LIMIT // 2)] * 3)],
        "TOO_LARGE",
    ),
}


@pytest.mark.parametrize("case", BAD_MESSAGES)
def test_bad_message_gets_its_error_and_daemon_keeps_serving(
    case: str, raw: zmq.Socket[Any], limited_daemon: DaemonProcess
) -> None:
    frames, code = BAD_MESSAGES[case]
    raw.send_multipart(frames)
    assert raw.poll(10000), f"no reply to {case}"
    parts = raw.recv_multipart()
    if parts[0] == b"":  # an empty first frame reads as a REQ delimiter, echoed back
        parts = parts[1:]
    reply = protocol.decode_reply(parts)
    assert reply.error is not None, case
    assert reply.error.code == code, reply.error.message
    assert reply.error.message
    with limited_daemon.client() as client:
        assert client.infer("demo", {"x": X})["probs"].shape == (1, 4)


def test_frame_over_the_socket_limit_is_refused_without_harm(limited_daemon: DaemonProcess) -> None:
    with limited_daemon.client(timeout=1.0) as client:
        with pytest.raises(ClientTimeout, match="size limit"):
            client.infer("demo", {"x": np.zeros((1, LIMIT), np.float32)})
        assert client.infer("demo", {"x": X})["probs"].shape == (1, 4)


def test_client_that_vanishes_before_its_reply(
    limited_daemon: DaemonProcess, connect: Connect
) -> None:
    for _ in range(20):
        sock = connect(limited_daemon.endpoint)
        sock.send_multipart(protocol.encode_request(1, "infer", model="demo", inputs={"x": X}))
        sock.close(linger=100)  # the request goes out, then the client is gone
    with limited_daemon.client() as client:
        assert client.infer("demo", {"x": X})["probs"].shape == (1, 4)


def test_too_large_is_typed_on_the_client(limited_daemon: DaemonProcess) -> None:
    inputs = {
        "a": np.zeros(LIMIT // 8, np.float32),
        "b": np.zeros(LIMIT // 8, np.float32),
        "c": np.zeros(LIMIT // 8, np.float32),
    }
    with limited_daemon.client() as client, pytest.raises(TooLarge):
        client.infer("demo", inputs)
