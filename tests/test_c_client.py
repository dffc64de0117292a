"""The C sensor clients (examples/c-client, libzmq and msgpack-c only, written from
docs/PROTOCOL.md) against a live daemon: the same inputs give the same outputs as the Python
client, bit for bit, whether sent in frames or in a shared-memory region, and error replies
arrive as their codes."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from edged.testing import DaemonProcess
from tests.conftest import DaemonFactory

SOURCE = Path(__file__).parent.parent / "examples" / "c-client"


@dataclass
class Output:
    name: str
    array: np.ndarray


@dataclass
class Answer:
    code: int
    header: str
    outputs: list[Output]
    stderr: str


@pytest.fixture(scope="session")
def c_client() -> Path:
    """Build the examples with their own Makefile, as a C developer would."""
    subprocess.run(["make", "-s", "-C", str(SOURCE)], check=True, capture_output=True)
    return SOURCE / "edged_infer"


@pytest.fixture(scope="session")
def shm_client(c_client: Path) -> Path:
    """The shared-memory example, built by the same make."""
    return c_client.with_name("shm_client")


def tensor_arg(tmp_path: Path, name: str, array: np.ndarray) -> str:
    """NAME=DTYPE:SHAPE:FILE, the raw little-endian bytes written to FILE."""
    file = tmp_path / f"{name}.bin"
    file.write_bytes(np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes())
    return f"{name}={array.dtype.name}:{'x'.join(map(str, array.shape))}:{file}"


def run_c(
    client: Path,
    endpoint: str,
    model: str,
    *args: str,
    timeout_ms: int = 5000,
    options: Sequence[str] = (),
) -> Answer:
    done = subprocess.run(
        [str(client), "-e", endpoint, "-t", str(timeout_ms), *options, model, *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,  # the exit status is part of what the tests check
    )
    lines = done.stdout.splitlines()
    outputs = []
    for described, values in zip(lines[1::2], lines[2::2], strict=True):
        _, name, dtype, shape = described.split(" ")
        dims = [int(d) for d in shape.split("x")] if shape else []
        flat = np.array(values.split()).astype(dtype)  # from text: exact for every dtype
        outputs.append(Output(name, flat.reshape(dims)))
    return Answer(done.returncode, lines[0] if lines else "", outputs, done.stderr)


def test_c_client_matches_the_python_client_on_the_demo_model(
    c_client: Path, demo_daemon: DaemonProcess, tmp_path: Path
) -> None:
    x = np.random.default_rng(7).standard_normal((3, 16)).astype(np.float32)
    answer = run_c(c_client, demo_daemon.endpoint, "demo", tensor_arg(tmp_path, "x", x))
    assert answer.code == 0, answer.stderr
    with demo_daemon.client() as client:
        expected = client.infer("demo", {"x": x})
    assert answer.header.startswith(f"model demo version {expected.version} trace ")
    assert [o.name for o in answer.outputs] == ["probs"]
    np.testing.assert_array_equal(answer.outputs[0].array, expected["probs"])


def test_c_client_speaks_several_inputs_outputs_and_a_scalar(
    c_client: Path, start_daemon: DaemonFactory, silero_model: Path, tmp_path: Path
) -> None:
    """silero-vad: float32 audio, a float32 state tensor and an int64 0-d sample rate in; a
    probability and the next state out."""
    daemon = start_daemon({"models": {"vad": {"path": str(silero_model)}}})
    rng = np.random.default_rng(3)
    inputs = {
        "input": rng.uniform(-0.5, 0.5, (1, 512)).astype(np.float32),
        "state": rng.uniform(-0.1, 0.1, (2, 1, 128)).astype(np.float32),
        "sr": np.array(16000, dtype=np.int64),
    }
    args = [tensor_arg(tmp_path, name, array) for name, array in inputs.items()]
    answer = run_c(c_client, daemon.endpoint, "vad", *args)
    assert answer.code == 0, answer.stderr
    with daemon.client() as client:
        expected = client.infer("vad", inputs)
    assert [o.name for o in answer.outputs] == list(expected.outputs)
    for output in answer.outputs:
        np.testing.assert_array_equal(output.array, expected[output.name])


def test_c_client_reports_error_replies_by_code(
    c_client: Path, demo_daemon: DaemonProcess, tmp_path: Path
) -> None:
    for model, shape, code in [
        ("demo", (1, 15), "SHAPE_MISMATCH"),
        ("nope", (1, 16), "UNKNOWN_MODEL"),
    ]:
        x = np.zeros(shape, np.float32)
        answer = run_c(c_client, demo_daemon.endpoint, model, tensor_arg(tmp_path, "x", x))
        assert answer.code == 3
        assert answer.stderr.startswith(f"{code}: ")
        assert answer.outputs == []


def test_c_client_times_out_without_a_daemon(c_client: Path, tmp_path: Path) -> None:
    x = np.zeros((1, 16), np.float32)
    endpoint = f"ipc://{tmp_path}/none.sock"
    answer = run_c(c_client, endpoint, "demo", tensor_arg(tmp_path, "x", x), timeout_ms=200)
    assert answer.code == 1
    assert "no reply" in answer.stderr


def test_c_client_refuses_a_file_that_does_not_fit_the_shape(
    c_client: Path, tmp_path: Path
) -> None:
    arg = tensor_arg(tmp_path, "x", np.zeros((1, 15), np.float32)).replace(":1x15:", ":1x16:")
    answer = run_c(c_client, "ipc:///nonexistent", "demo", arg)
    assert answer.code == 2
    assert "the shape needs 64" in answer.stderr


def test_shm_client_sends_its_inputs_in_a_region(
    shm_client: Path, demo_daemon: DaemonProcess, tmp_path: Path
) -> None:
    """Inputs by reference; one output in a frame, then the same written into the region."""
    x = np.random.default_rng(11).standard_normal((3, 16)).astype(np.float32)
    with demo_daemon.client() as client:
        expected = client.infer("demo", {"x": x})["probs"]
    arg = tensor_arg(tmp_path, "x", x)
    for options, in_region in [((), False), (("-o", f"probs:{expected.nbytes}"), True)]:
        answer = run_c(shm_client, demo_daemon.endpoint, "demo", arg, options=options)
        assert answer.code == 0, answer.stderr
        assert answer.header.startswith("model demo version 1 trace ")
        assert [o.name for o in answer.outputs] == ["probs"]
        np.testing.assert_array_equal(answer.outputs[0].array, expected)
        assert ("output probs came in the region" in answer.stderr) is in_region


def test_shm_client_reports_error_replies_and_a_region_too_small(
    shm_client: Path, demo_daemon: DaemonProcess, tmp_path: Path
) -> None:
    arg = tensor_arg(tmp_path, "x", np.zeros((1, 16), np.float32))
    answer = run_c(shm_client, demo_daemon.endpoint, "demo", arg, options=["-o", "probs:8"])
    assert answer.code == 3
    assert answer.stderr.startswith("BAD_REGION: output 'probs'")
    answer = run_c(shm_client, demo_daemon.endpoint, "nope", arg)
    assert (answer.code, answer.stderr.split(":")[0]) == (3, "UNKNOWN_MODEL")
    answer = run_c(shm_client, "tcp://127.0.0.1:1", "demo", arg)
    assert answer.code == 2 and "regions need an ipc:// endpoint" in answer.stderr
    with demo_daemon.client() as client:
        assert client.ping()["state"] == "serving"
