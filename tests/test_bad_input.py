"""Bad input against a live daemon: a specific error each time, and the daemon keeps serving."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from edged import protocol
from edged.errors import ClientTimeout, TooLarge
from edged.requests import ModelRequest
from edged.testing import DaemonProcess
from tests.bundles import signing_keys, start_ota_daemon
from tests.conftest import Connect, DaemonFactory
from tests.messages import EVERY_OP

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
    "infinite deadline": (
        [msgpack.packb(header(deadline_ms=float("inf"))), x_frame()],
        "BAD_REQUEST",
    ),
    "NaN deadline": ([msgpack.packb(header(deadline_ms=float("nan"))), x_frame()], "BAD_REQUEST"),
    "huge deadline": ([msgpack.packb(header(deadline_ms=1e308)), x_frame()], "BAD_REQUEST"),
    "deadline over a day": (
        [msgpack.packb(header(deadline_ms=86_400_001)), x_frame()],
        "BAD_REQUEST",
    ),
    "bool byte 2": (
        [msgpack.packb(header(inputs=[spec(dtype="bool", shape=[2])])), b"\1\2"],
        "BAD_REQUEST",
    ),
    "bool byte 255": (
        [msgpack.packb(header(inputs=[spec(dtype="bool", shape=[1])])), b"\xff"],
        "BAD_REQUEST",
    ),
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


#: numbers and strings no field takes: non-finite, huge, NUL bytes, a path too long for the OS
ABSURD_VALUES = [
    *(float("nan"), float("inf"), -float("inf"), 1e308, -1e308, 2**64 - 1, -(2**63)),
    *("a\0b", "\0", "x" * 5000),
]
#: the rest of a valid request of each op, so that the field under test is what fails
BASE_FIELDS: dict[str, dict[str, Any]] = {
    "infer": {"inputs": []},
    "generate": {"prompt": "hi"},
    "embed": {"input": "hi"},
    "cancel": {"target": 1},
    "upload": {"sha256": "0" * 64, "size": 3},
}
INFERENCE_OPS = frozenset({"ping", "describe", "infer", "generate", "embed", "cancel"})


def test_no_value_of_any_field_of_any_op_gets_internal(
    start_daemon: DaemonFactory, tmp_path: Path, connect: Connect
) -> None:
    """Every key of every op, on the socket that serves it, set to each absurd value: each
    gets a specific error (mostly BAD_REQUEST), never INTERNAL, and nothing is logged as a
    bug."""
    daemon = start_ota_daemon(start_daemon, tmp_path, signing_keys(tmp_path))
    sockets = {"infer": connect(daemon.endpoint), "control": connect(daemon.control_endpoint)}
    codes: Counter[str] = Counter()
    request_id = 100
    for op, unit in EVERY_OP.items():
        for key in sorted(unit.request.wire_keys()) or (["trace"] if op == "ping" else []):
            for value in ABSURD_VALUES:
                request_id += 1
                header = {"v": 1, "id": request_id, "op": op, **BASE_FIELDS.get(op, {})}
                if issubclass(unit.request, ModelRequest):
                    header["model"] = "m"
                header[key] = value
                sock = sockets["infer" if op in INFERENCE_OPS else "control"]
                sock.send(msgpack.packb(header))
                reply = reply_to(sock, request_id)
                code = "ok" if reply.get("ok") else reply["error"]["code"]
                assert code != "INTERNAL", (op, key, value, reply)
                codes[code] += 1
    assert codes["BAD_REQUEST"] > 100, codes
    assert "Traceback" not in daemon.log()


def reply_to(sock: zmq.Socket[Any], request_id: int) -> dict[str, Any]:
    """The first reply to ``request_id`` (replies to others, such as a logs follow, skipped)."""
    while True:
        assert sock.poll(10000), f"no reply to request {request_id}"
        header = msgpack.unpackb(sock.recv_multipart()[0])
        if header.get("id") == request_id:
            return dict(header)
