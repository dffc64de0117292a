"""The control socket over TCP: CurveZMQ with an allow-list, and refusals that are logged."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from edged.client import Client, CurveKeys
from edged.config import parse_config
from edged.edgectl import main as edgectl_main
from edged.errors import ClientTimeout, ConfigError
from edged.testing import DaemonProcess
from tests.conftest import EDGECTL, DaemonFactory, free_port


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    """server, client (allowed) and stranger (not allowed) key pairs made by edgectl."""
    for name in ("server", "client", "stranger"):
        assert edgectl_main(["keys", "curve", name, "--dir", str(tmp_path / "keys"), "--json"]) == 0
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "client.key").write_bytes((tmp_path / "keys" / "client.key").read_bytes())
    return tmp_path


@pytest.fixture
def remote(start_daemon: DaemonFactory, keys: Path, models_dir: Path) -> tuple[DaemonProcess, str]:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    control = {
        "tcp": [endpoint],
        "server_key": str(keys / "keys" / "server.key_secret"),
        "authorized_keys": str(keys / "allowed"),
    }
    daemon = start_daemon(
        {"control": control, "models": {"demo": {"path": str(models_dir / "demo.onnx")}}}
    )
    return daemon, endpoint


def wait_for_log(daemon: DaemonProcess, text: str) -> None:
    deadline = time.monotonic() + 10
    while text not in daemon.log():
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{daemon.log()}"
        time.sleep(0.05)


def test_an_allowed_key_controls_the_daemon_remotely(
    remote: tuple[DaemonProcess, str], keys: Path
) -> None:
    daemon, endpoint = remote
    (keys / "allowed" / "broken.key").write_text("not a key file")  # skipped, never fatal
    curve = CurveKeys.load(
        str(keys / "keys" / "server.key"), str(keys / "keys" / "client.key_secret")
    )
    with Client(endpoint, timeout=10, curve=curve) as client:
        assert client.command("models")["models"]["demo"]["version"] == 1
    command = [
        *EDGECTL,
        "--remote",
        endpoint,
        "--server-key",
        str(keys / "keys" / "server.key"),
        "--client-key",
        str(keys / "keys" / "client.key_secret"),
        "--json",
        "models",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
    assert list(json.loads(done.stdout)["models"]) == ["demo"]
    wait_for_log(daemon, "accepted")
    assert "skipping" in daemon.log() and "broken.key" in daemon.log()


@pytest.mark.parametrize(
    "server_key, client_key, logged",
    [
        ("server.key", "stranger.key_secret", "refused a client whose key"),  # not allowed
        ("stranger.key", "client.key_secret", "handshake failed"),  # the wrong server key
        (None, None, "handshake failed"),  # no CurveZMQ at all
    ],
)
def test_refused_clients_get_nothing_and_are_logged(
    remote: tuple[DaemonProcess, str],
    keys: Path,
    server_key: str | None,
    client_key: str | None,
    logged: str,
) -> None:
    daemon, endpoint = remote
    curve = None
    if server_key and client_key:
        curve = CurveKeys.load(str(keys / "keys" / server_key), str(keys / "keys" / client_key))
    with Client(endpoint, timeout=1.0, curve=curve) as client, pytest.raises(ClientTimeout):
        client.command("models")
    wait_for_log(daemon, logged)
    with daemon.client() as local:  # the daemon is unharmed
        assert local.ping()["state"] == "serving"


def test_tcp_control_without_curve_is_refused_unless_insecure(
    start_daemon: DaemonFactory, models_dir: Path
) -> None:
    plain: dict[str, Any] = {"control": {"tcp": ["tcp://127.0.0.1:5599"]}}
    with pytest.raises(ConfigError, match="needs CurveZMQ"):
        parse_config(plain, "edged.toml", Path())
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    daemon = start_daemon(
        {
            "control": {"tcp": [endpoint], "insecure": True},
            "models": {"demo": {"path": str(models_dir / "demo.onnx")}},
        }
    )
    with Client(endpoint, timeout=10) as client:
        assert "demo" in client.command("models")["models"]
    assert "accepts ANY client" in daemon.log()


def test_diagnostics_work_remotely(remote: tuple[DaemonProcess, str], keys: Path) -> None:
    _, endpoint = remote
    key_dir = keys / "keys"
    base = [*EDGECTL, "--remote", endpoint, "--server-key", str(key_dir / "server.key")]
    base += ["--client-key", str(key_dir / "client.key_secret"), "--json"]
    replies = {
        name: json.loads(
            subprocess.run(
                [*base, name], capture_output=True, text=True, timeout=60, check=True
            ).stdout
        )
        for name in ("status", "models", "metrics", "sysinfo", "config", "stack", "selftest")
    }
    assert replies["status"]["state"] == "serving"
    assert "edged_uptime_seconds" in replies["metrics"]["text"]
    assert replies["sysinfo"]["sysinfo"]["cpu"]["count"] >= 1
    assert replies["selftest"]["ok_all"] is True
    assert replies["models"]["models"]["demo"]["version"] == 1
    assert replies["config"]["config"]["control"]["server_key"] == "<redacted>"
    assert any(thread["name"] == "MainThread" for thread in replies["stack"]["threads"])
    logs = subprocess.run(
        [*base, "logs", "-n", "3"], capture_output=True, text=True, timeout=60, check=True
    )
    assert len(logs.stdout.splitlines()) == 3
