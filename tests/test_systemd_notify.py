"""sd_notify against a real datagram socket standing in for systemd: READY once serving,
STATUS kept current, WATCHDOG pings only while healthy, RELOADING around SIGHUP, STOPPING on
SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edged.faults import AFTER_ENV, ENV
from edged.sdnotify import _send_datagram
from edged.testing import DaemonProcess
from tests.conftest import DaemonFactory
from tests.models import SLOW_WIDTH, build_slow_model

WATCHDOG_USEC = "2000000"  # pings due every second


class FakeSystemd:
    """The NOTIFY_SOCKET end: every datagram, with when it came."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append((time.monotonic(), fields))

    def wait_for(self, key: str, value: str | None = None, after: float = 0.0) -> dict[str, str]:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for when, fields in list(self.messages):
                if when >= after and key in fields and value in (None, fields[key]):
                    return fields
            time.sleep(0.02)
        raise AssertionError(f"no {key} from the daemon; got {self.messages}")

    def pings_around(self, moment: float) -> tuple[float, float]:
        """When the last ping before ``moment`` and the first one after it came."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pings = [when for when, f in list(self.messages) if "WATCHDOG" in f]
            earlier = [when for when in pings if when < moment]
            later = [when for when in pings if when > moment]
            if earlier and later:
                return earlier[-1], later[0]
            time.sleep(0.05)
        raise AssertionError(f"no pings around {moment}: {self.messages}")

    def pings(self, since: float, until: float) -> int:
        return sum(1 for when, f in self.messages if since <= when < until and "WATCHDOG" in f)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[FakeSystemd]:
    fake = FakeSystemd(tmp_path / "notify.sock")
    yield fake
    fake.close()


def start(
    start_daemon: DaemonFactory,
    tmp_path: Path,
    systemd: FakeSystemd,
    layers: int = 24,
    **settings: Any,
) -> DaemonProcess:
    env = {"NOTIFY_SOCKET": str(systemd.path), "WATCHDOG_USEC": WATCHDOG_USEC}
    env.update(settings.pop("env", {}))
    model = {"path": str(build_slow_model(tmp_path / "slow.onnx", layers)), "preload": True}
    config = {"models": {"m": model}, **settings}
    return start_daemon(config, env=env)


def test_ready_status_watchdog_reloading_and_stopping(
    start_daemon: DaemonFactory, tmp_path: Path, systemd: FakeSystemd
) -> None:
    daemon = start(start_daemon, tmp_path, systemd)
    ready = systemd.wait_for("READY", "1")
    assert ready["STATUS"].startswith("serving m v1;")  # the preloaded model was serving
    with daemon.client() as client:
        client.infer("m", {"x": np.ones((1, SLOW_WIDTH), np.float32)})
    started = time.monotonic()
    systemd.wait_for("STATUS", after=started)  # the rate changed: the status line followed
    time.sleep(3)
    assert systemd.pings(started, time.monotonic()) >= 2

    hup = time.monotonic()
    os.kill(daemon.pid, signal.SIGHUP)
    reloading = systemd.wait_for("RELOADING", "1", after=hup)
    assert int(reloading["MONOTONIC_USEC"]) > 0
    systemd.wait_for("READY", "1", after=hup)

    term = time.monotonic()
    assert daemon.stop() == 0
    systemd.wait_for("STOPPING", "1", after=term)


def test_a_blocked_event_loop_stops_the_watchdog_pings(
    start_daemon: DaemonFactory, tmp_path: Path, systemd: FakeSystemd
) -> None:
    env = {ENV: "daemon.tick:hang", AFTER_ENV: "3"}
    daemon = start(start_daemon, tmp_path, systemd, env=env)
    systemd.wait_for("WATCHDOG", "1")
    deadline = time.monotonic() + 30
    while "hang at daemon.tick" not in daemon.log():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    hung = time.monotonic()
    time.sleep(3)
    assert systemd.pings(hung, time.monotonic()) == 0
    assert daemon.proc is not None and daemon.proc.poll() is None  # alive, but wedged
    daemon.kill()  # what systemd does once WatchdogSec passes without a ping


def test_a_stuck_model_run_holds_back_the_pings_until_it_ends(
    start_daemon: DaemonFactory, tmp_path: Path, systemd: FakeSystemd
) -> None:
    daemon = start(start_daemon, tmp_path, systemd, layers=400, daemon={"stuck_run_s": 1.0})
    systemd.wait_for("WATCHDOG", "1")
    rows = np.ones((2000, SLOW_WIDTH), np.float32)  # seconds of work in one run
    with daemon.client(timeout=120) as client:
        done = threading.Thread(target=client.infer, args=("m", {"x": rows}))
        done.start()
        stuck = systemd.wait_for("STATUS", after=time.monotonic())
        while not stuck["STATUS"].startswith("stuck"):
            stuck = systemd.wait_for("STATUS", after=time.monotonic())
        said_stuck = time.monotonic()
        done.join()
    assert "model m version 1" in stuck["STATUS"]
    # pings come every second while healthy; none from the run's first second to its end
    before, after = systemd.pings_around(said_stuck)
    assert after - before > 2.0
    statuses = [f["STATUS"] for when, f in systemd.messages if when > said_stuck and "STATUS" in f]
    assert statuses[-1].startswith("serving")  # the status line says so again
    # said once for the whole stuck spell, not once a tick
    assert daemon.log().count("no longer pinging the watchdog") == 1, daemon.log()


def test_without_systemd_python_the_datagram_is_sent_by_hand(
    tmp_path: Path, systemd: FakeSystemd, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(systemd.path))
    assert _send_datagram("READY=1\nSTATUS=by hand")
    assert systemd.wait_for("STATUS") == {"READY": "1", "STATUS": "by hand"}
