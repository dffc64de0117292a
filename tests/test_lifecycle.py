"""Lifecycle: first start on defaults, drain on SIGTERM, one daemon per socket, restarts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from edged import protocol
from edged.client import Client
from edged.errors import ShuttingDown
from edged.testing import DaemonExited, DaemonProcess
from tests.conftest import Connect, DaemonFactory, slow_config
from tests.models import SLOW_WIDTH


def test_first_start_on_defaults_builds_and_serves_the_demo(tmp_path: Path) -> None:
    """`edged serve` with no config: demo model built under ./var/edged, sockets under $XDG."""
    runtime = tmp_path / "xdg"
    runtime.mkdir()
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
    env.pop("EDGED_CONFIG", None)
    env.pop("EDGED_HOME", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "edged", "serve"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        endpoint = f"ipc://{runtime / 'edged' / 'infer.sock'}"
        daemon = DaemonProcess(tmp_path)
        daemon.proc = proc  # only for readiness polling against the default endpoint
        with Client(endpoint, timeout=0.25) as client:
            _wait_ping(client, proc)
        infer = subprocess.run(
            [sys.executable, "-m", "edged", "infer", "demo", "--random", "--json"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert infer.returncode == 0, infer.stderr
        report = json.loads(infer.stdout)
        probs = np.array(report["outputs"]["probs"]["data"])
        assert probs.shape == (1, 4) and abs(probs.sum() - 1) < 0.05
        assert {"rtt_us", "run_us", "queue_us"} <= set(report["timing"])
        assert (tmp_path / "var" / "edged" / "models" / "demo" / "1" / "model.onnx").is_file()
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert "edged infer demo --random" in output  # tells the newcomer how to send a request
    assert not (runtime / "edged" / "infer.sock").exists()


def _wait_ping(client: Client, proc: subprocess.Popen[str]) -> None:
    from edged.errors import ClientTimeout, NoDaemon

    for _ in range(240):
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited: {proc.communicate()[0]}")
        try:
            client.ping()
            return
        except NoDaemon:  # answered at once while the socket is not bound yet
            time.sleep(client.timeout)  # as long as a ping would have waited
        except ClientTimeout:
            continue
    raise AssertionError("daemon never answered")


def send_admitted(sock: zmq.Socket[Any], x: np.ndarray, count: int) -> list[protocol.Reply]:
    """Send ``count`` requests, then a ping on the same connection: ZeroMQ keeps the order, so
    once the ping is answered every request before it has been admitted. Returns the replies
    that arrived meanwhile (the ping's excluded)."""
    for request_id in range(1, count + 1):
        sock.send_multipart(
            protocol.encode_request(request_id, "infer", model="slow", inputs={"x": x})
        )
    sock.send_multipart(protocol.encode_request(0, "ping"))
    early = []
    while True:
        assert sock.poll(30000), "no reply to the admission ping"
        reply = protocol.decode_reply(sock.recv_multipart())
        if reply.id == 0:
            return early
        early.append(reply)


def test_sigterm_drains_in_flight_requests_then_exits_zero(
    start_daemon: DaemonFactory, models_dir: Path, connect: Connect
) -> None:
    daemon = start_daemon(slow_config(models_dir))
    sock = connect(daemon.endpoint)
    x = np.ones((256, SLOW_WIDTH), np.float32)
    replies = send_admitted(sock, x, 4)
    os.kill(daemon.pid, signal.SIGTERM)
    for _ in range(4 - len(replies)):
        assert sock.poll(30000)
        replies.append(protocol.decode_reply(sock.recv_multipart()))
    assert sorted(r.id for r in replies) == [1, 2, 3, 4]
    assert all(r.error is None and r.tensors["y"].shape == x.shape for r in replies)
    assert daemon.wait() == 0
    assert not daemon.runtime_dir.joinpath("infer.sock").exists()
    assert "draining" in daemon.log()


def test_requests_during_drain_are_refused_not_lost(
    start_daemon: DaemonFactory, models_dir: Path, connect: Connect
) -> None:
    daemon = start_daemon(slow_config(models_dir))
    sock = connect(daemon.endpoint)
    big = np.ones((1024, SLOW_WIDTH), np.float32)
    early = send_admitted(sock, big, 8)  # seconds of queued work keep the daemon draining
    with daemon.client() as client:
        os.kill(daemon.pid, signal.SIGTERM)
        state = "serving"
        while state == "serving":
            state = client.ping()["state"]
        assert state == "draining"
        with pytest.raises(ShuttingDown):
            client.infer("slow", {"x": big[:1]})
    assert all(reply.error is None for reply in early)
    for _ in range(8 - len(early)):
        assert sock.poll(30000)
        assert protocol.decode_reply(sock.recv_multipart()).error is None
    assert daemon.wait() == 0


def test_drain_timeout_answers_what_is_left(
    start_daemon: DaemonFactory, models_dir: Path, connect: Connect
) -> None:
    daemon = start_daemon(
        {
            "daemon": {"drain_timeout_s": 0.0},
            **slow_config(models_dir),
        }
    )
    sock = connect(daemon.endpoint)
    x = np.ones((1024, SLOW_WIDTH), np.float32)
    assert send_admitted(sock, x, 2) == []
    assert daemon.stop() == 0
    codes = []
    while sock.poll(2000):
        codes.append(protocol.decode_reply(sock.recv_multipart()).error)
    assert len(codes) == 2  # exactly one reply each, even though the runs did not finish
    assert all(isinstance(code, ShuttingDown) for code in codes)


def test_a_second_sigterm_skips_the_drain_and_answers_what_is_left(
    start_daemon: DaemonFactory, models_dir: Path, connect: Connect
) -> None:
    daemon = start_daemon({"daemon": {"drain_timeout_s": 600.0}, **slow_config(models_dir)})
    sock = connect(daemon.endpoint)
    x = np.ones((1024, SLOW_WIDTH), np.float32)
    count = 40  # far more queued work than the test waits for
    replies = send_admitted(sock, x, count)
    os.kill(daemon.pid, signal.SIGTERM)
    with daemon.client() as client:
        while client.ping()["state"] == "serving":
            pass
    os.kill(daemon.pid, signal.SIGTERM)
    assert daemon.wait() == 0
    while len(replies) < count and sock.poll(10000):
        replies.append(protocol.decode_reply(sock.recv_multipart()))
    assert sorted(r.id for r in replies) == list(range(1, count + 1))  # one reply each
    shut = [r for r in replies if isinstance(r.error, ShuttingDown)]
    assert shut and all(r.error is None for r in replies if r not in shut)
    assert "second stop request" in daemon.log()


def test_second_daemon_on_the_same_socket_fails_clearly(
    demo_daemon: DaemonProcess, models_dir: Path
) -> None:
    second = DaemonProcess(demo_daemon.workdir, demo_daemon.config, name="second")
    second.config_path.parent.mkdir(exist_ok=True)
    with pytest.raises(DaemonExited) as info:
        second.start()
    assert "already serving" in str(info.value) and f"pid {demo_daemon.pid}" in str(info.value)
    assert second.proc is not None and second.proc.returncode == 1
    with demo_daemon.client() as client:
        assert client.infer("demo", {"x": np.zeros((1, 16), np.float32)})["probs"].shape == (1, 4)


def test_client_survives_a_daemon_restart(demo_daemon: DaemonProcess) -> None:
    x = np.zeros((1, 16), np.float32)
    with demo_daemon.client(timeout=5) as client:
        before = client.infer("demo", {"x": x})["probs"]
        assert demo_daemon.stop() == 0
        demo_daemon.start()
        after = client.infer("demo", {"x": x})["probs"]
    np.testing.assert_array_equal(before, after)


def test_missing_model_file_fails_start_with_a_clear_message(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    with pytest.raises(DaemonExited) as info:
        start_daemon({"models": {"m": {"path": str(tmp_path / "absent.onnx")}}})
    assert "model 'm': no file at" in str(info.value)


def test_corrupt_model_file_fails_start_with_a_clear_message(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"definitely not onnx")
    with pytest.raises(DaemonExited) as info:
        start_daemon({"models": {"m": {"path": str(bad), "preload": True}}})
    assert "model 'm': cannot load" in str(info.value)


def test_daemon_keeps_openssl_out_of_its_memory(demo_daemon: DaemonProcess) -> None:
    """The default asyncio loop runs without the ssl module (~4 MB of RSS saved)."""
    maps = Path(f"/proc/{demo_daemon.pid}/maps").read_text()
    assert "_ssl" not in maps and "libssl" not in maps
