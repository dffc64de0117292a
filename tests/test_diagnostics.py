"""Operator diagnostics through edgectl against a live daemon: every command, follow, stack."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edged.client import Client
from edged.errors import BusyError
from edged.testing import DaemonProcess
from tests.conftest import EDGECTL, DaemonFactory, slow_config


def edgectl(daemon: DaemonProcess, *args: str, check: bool = True) -> Any:
    command = [*EDGECTL, "--control", daemon.control_endpoint, "--json", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=check)
    return json.loads(done.stdout) if done.returncode == 0 else done


@pytest.fixture
def daemon(start_daemon: DaemonFactory, models_dir: Path) -> DaemonProcess:
    demo = {"path": str(models_dir / "demo.onnx"), "preload": True}
    return start_daemon({"models": {"demo": demo}})


def test_every_read_only_command_answers_with_its_documented_keys(daemon: DaemonProcess) -> None:
    status = edgectl(daemon, "status")
    assert status["state"] == "serving" and status["pid"] == daemon.pid
    assert status["models"] == {"demo": {"version": 1, "state": "ready"}}
    assert status["process"]["rss_bytes"] > 0 and status["memory"]["used_bytes"] > 0
    assert edgectl(daemon, "models")["models"]["demo"]["loaded"] == [1]
    assert "edged_uptime_seconds" in edgectl(daemon, "metrics")["text"]
    info = edgectl(daemon, "sysinfo")["sysinfo"]
    assert info["cpu"]["count"] >= 1 and info["memory"]["total"] > 0
    config = edgectl(daemon, "config")
    assert config["source"] == str(daemon.config_path)
    assert config["config"]["models"]["demo"]["preload"] is True
    assert edgectl(daemon, "selftest") == {"ok_all": True, "results": {"demo": "ok"}}
    records = [json.loads(line) for line in _lines(daemon, "logs", "-n", "5")]
    assert len(records) == 5 and all({"seq", "level", "message"} <= r.keys() for r in records)


def _lines(daemon: DaemonProcess, *args: str) -> list[str]:
    command = [*EDGECTL, "--control", daemon.control_endpoint, "--json", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
    return done.stdout.splitlines()


def test_load_unload_and_a_failing_selftest_exit_nonzero(
    start_daemon: DaemonFactory, models_dir: Path, tmp_path: Path
) -> None:
    golden = tmp_path / "demo.golden.npz"  # wrong on purpose: the self-test must fail
    x = np.zeros((1, 16), np.float32)
    np.savez(golden, **{"input.x": x, "output.probs": np.ones((1, 4), np.float32)})
    (tmp_path / "demo.onnx").write_bytes((models_dir / "demo.onnx").read_bytes())
    daemon = start_daemon({"models": {"demo": {"path": str(tmp_path / "demo.onnx")}}})
    assert edgectl(daemon, "load", "demo")["state"] == "ready"
    failed = edgectl(daemon, "selftest", check=False)
    assert failed.returncode == 1 and "golden vectors" in failed.stdout
    assert edgectl(daemon, "unload", "demo")["state"] == "unloaded"
    refused = edgectl(daemon, "unload", "demo", check=False)
    assert refused.returncode == 1 and "is not loaded" in refused.stderr


def test_logs_follow_streams_new_records_until_cancelled(daemon: DaemonProcess) -> None:
    with daemon.control() as control:
        replies = control.stream("logs", last=0, follow=True, timeout=20)
        assert next(replies)["records"] == []  # the (empty) backlog comes first
        with daemon.control() as other:
            other.command("unload", model="demo")  # logs "unloading model demo ..."
        found: list[str] = []
        for reply in replies:
            found += [record["message"] for record in reply["records"]]
            if any("unloading model demo" in message for message in found):
                break
        replies.close()  # cancels the follow in the daemon
        assert control.command("models")["models"]["demo"]["loaded"] == []


def test_stack_shows_the_event_loop_and_a_model_thread_while_busy(
    start_daemon: DaemonFactory, models_dir: Path
) -> None:
    daemon = start_daemon(slow_config(models_dir))
    stop = threading.Event()

    def load() -> None:
        with Client(daemon.endpoint, timeout=30) as client:
            while not stop.is_set():
                client.infer("slow", {"x": np.ones((8, 512), np.float32)})

    worker = threading.Thread(target=load)
    worker.start()
    try:
        with daemon.control() as control:
            stacks = control.command("stack")
    finally:
        stop.set()
        worker.join(30)
    threads = {thread["name"]: "\n".join(thread["stack"]) for thread in stacks["threads"]}
    assert "base_events.py" in threads["MainThread"]  # the event loop, answering this command
    assert "runner.py" in threads["run-slow"]  # the model's run thread
    assert any("main_loop" in "\n".join(task["stack"]) for task in stacks["tasks"])


def test_control_answers_while_the_inference_socket_is_saturated(
    start_daemon: DaemonFactory, models_dir: Path
) -> None:
    daemon = start_daemon(slow_config(models_dir, queue_depth=2))
    flood = subprocess.Popen([sys.executable, "-c", FLOOD, daemon.endpoint], stdout=subprocess.PIPE)
    try:  # 16 requests always in flight against room for 3: BUSY is certain
        assert flood.stdout is not None and flood.stdout.readline() == b"busy\n"
        with daemon.control(timeout=5) as control:
            for _ in range(20):
                assert control.command("status")["state"] == "serving"
    finally:
        flood.kill()
        flood.communicate()  # reaps it and closes its pipe


FLOOD = f"""
import asyncio, sys, numpy as np
from edged.client import AsyncClient
from edged.errors import {BusyError.__name__}
told = False

async def keep_sending(client):
    global told
    while True:
        try:
            await client.infer("slow", {{"x": np.ones((8, 512), np.float32)}})
        except {BusyError.__name__}:
            if not told:
                print("busy", flush=True)
                told = True

async def main():
    async with AsyncClient(sys.argv[1], timeout=30) as client:
        await asyncio.gather(*(keep_sending(client) for _ in range(16)))

asyncio.run(main())
"""
