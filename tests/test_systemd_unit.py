"""The systemd unit and its companions in systemd/: valid for systemd, hardened, and in step with
the daemon (its CLI, its config defaults, the directories it uses) and with the shipped config."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edged.config import DaemonConfig, load_config
from tests.conftest import DaemonFactory

SYSTEMD = Path(__file__).resolve().parent.parent / "systemd"
UNIT = SYSTEMD / "edged.service"
SYSUSERS = SYSTEMD / "edged.sysusers"
TMPFILES = SYSTEMD / "edged.tmpfiles"
CONFIG = SYSTEMD / "edged.toml"
INSTALLED_BINARY = "/opt/edged/bin/edged"
INSTALLED_EDGECTL = "/opt/edged/bin/edgectl"
INSTALLED_CONFIG = "/etc/edged/edged.toml"
MAX_EXPOSURE = 2.0
ANALYZE = shutil.which("systemd-analyze") or ""
needs_analyze = pytest.mark.skipif(not ANALYZE, reason="systemd-analyze is not installed")


def _unit() -> dict[str, dict[str, list[str]]]:
    """section -> key -> every value assigned, in order (keys such as SystemCallFilter= repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _service(key: str) -> str:
    """The value in effect (the last assignment), "" when the key is not set."""
    values = _unit()["Service"].get(key, [])
    return values[-1] if values else ""


def _seconds(span: str) -> float:
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span)
    assert match and match[2] in units, f"unexpected time span {span!r}"
    return float(match[1]) * units[match[2]]


def _mib(size: str) -> float:
    units = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT])", size)
    assert match, f"unexpected memory size {size!r}"
    return float(match[1]) * units[match[2]]


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=False, capture_output=True, text=True, timeout=30)


def _edged_command() -> list[str]:
    script = Path(sys.executable).parent / "edged"  # the console script next to this Python
    return [str(script)] if script.exists() else [sys.executable, "-m", "edged"]


@needs_analyze
def test_unit_verifies(tmp_path: Path) -> None:
    # verify checks that the commands' binaries exist: check a copy whose ExecStart is this
    # environment's edged (or, without the console script, this Python) instead of the
    # installed /opt/edged/bin/edged, and whose ExecReload is its edgectl, everything else as is
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED_BINARY} " in text
    executable = _edged_command()[0]
    edgectl = Path(sys.executable).parent / "edgectl"
    text = text.replace(f"ExecStart={INSTALLED_BINARY} ", f"ExecStart={executable} ")
    copy = tmp_path / "edged.service"
    copy.write_text(text.replace(f"ExecReload={INSTALLED_EDGECTL} ", f"ExecReload={edgectl} "))
    done = _run([ANALYZE, "verify", str(copy)])
    ours = [line for line in (done.stdout + done.stderr).splitlines() if "edged.service" in line]
    assert done.returncode == 0 and not ours, done.stdout + done.stderr


@needs_analyze
def test_unit_exposure_at_most_2() -> None:
    done = _run([ANALYZE, "security", "--offline=true", "--no-pager", str(UNIT)])
    match = re.search(r"Overall exposure level for edged\.service: (\d+(?:\.\d+)?)", done.stdout)
    assert match, done.stdout + done.stderr
    assert float(match[1]) <= MAX_EXPOSURE, done.stdout


def test_unit_keeps_gpu_nodes_reachable() -> None:
    assert _service("PrivateDevices") not in ("yes", "true", "on", "1")
    assert _service("DevicePolicy") in ("", "auto")  # no device allow-list to fall out of date
    assert _service("PrivateUsers") in ("", "no", "false")
    groups = " ".join(_unit()["Service"].get("SupplementaryGroups", [])).split()
    assert {"video", "render"} <= set(groups)
    # a supplementary group that does not exist fails the start: sysusers creates them
    created = {line.split()[1] for line in _sysusers_lines() if line.split()[0] in ("g", "u")}
    assert set(groups) | {_service("User"), _service("Group")} <= created


def _sysusers_lines() -> list[str]:
    return [line for line in SYSUSERS.read_text().splitlines() if line.strip() and line[0] != "#"]


def test_unit_has_what_the_daemon_depends_on() -> None:
    assert _service("Type") == "notify"
    assert _service("NotifyAccess") == "main"
    assert _seconds(_service("WatchdogSec")) >= 10  # the daemon pings from its 1 s tick
    assert _service("ExecStart") == f"{INSTALLED_BINARY} serve --config {INSTALLED_CONFIG}"
    # the reload goes through edgectl, which waits for the outcome (tested below)
    assert _service("ExecReload").startswith(f"{INSTALLED_EDGECTL} --control ipc://%t/edged/")
    assert _service("Restart") == "on-failure"
    assert "78" in _service("RestartPreventExitStatus").split()  # invalid config: no restart
    assert _service("KillMode") == "mixed"
    assert _service("RuntimeDirectory") == "edged"
    assert _service("StateDirectory") == "edged"
    assert _service("ConfigurationDirectory") == "edged"
    assert _service("User") == "edged"
    # the inference and region sockets are opened to the group edged once the daemon is ready
    assert _service("ExecStartPost") == "/bin/chmod 0660 %t/edged/infer.sock %t/edged/regions.sock"
    for key in ("ProtectSystem", "NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert _service(key) in ("strict", "yes"), key


def test_unit_timeouts_and_memory_fit_the_config() -> None:
    config = load_config(CONFIG)
    drain = max(config.daemon.drain_timeout_s, DaemonConfig().drain_timeout_s)
    assert _seconds(_service("TimeoutStopSec")) >= drain + 10
    assert _seconds(_service("TimeoutStartSec")) >= 5 * 60  # large models load at start
    budget = config.memory.budget_mb
    assert budget > 0
    high, limit = _mib(_service("MemoryHigh")), _mib(_service("MemoryMax"))
    assert budget + 512 <= high < limit


def test_serve_takes_the_config_flag() -> None:
    done = _run([*_edged_command(), "serve", "--help"])
    assert done.returncode == 0 and "--config" in done.stdout, done.stdout + done.stderr


def test_shipped_config_passes_config_check() -> None:
    done = _run([*_edged_command(), "config", "check", str(CONFIG)])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok" in done.stdout


def test_shipped_config_uses_the_units_directories() -> None:
    config = load_config(CONFIG)
    assert config.daemon.runtime_dir == "/run/" + _service("RuntimeDirectory")
    assert config.daemon.state_dir == "/var/lib/" + _service("StateDirectory")
    assert config.ota.trusted_keys == "/etc/edged/trusted"
    assert Path(config.ota.inbox).parent == Path(config.daemon.state_dir)
    assert not config.server.tcp and not config.control.tcp  # nothing on the network by default


def test_sysusers_and_tmpfiles_apply(tmp_path: Path) -> None:
    sysusers, tmpfiles = shutil.which("systemd-sysusers"), shutil.which("systemd-tmpfiles")
    if sysusers is None:
        pytest.skip("systemd-sysusers is not installed")
    (tmp_path / "etc").mkdir()
    done = _run([sysusers, f"--root={tmp_path}", str(SYSUSERS)])
    assert done.returncode == 0, done.stderr
    passwd = (tmp_path / "etc/passwd").read_text()
    assert re.search(r"^edged:x:\d+:\d+:.*:/:.*nologin$", passwd, re.M), passwd
    if tmpfiles is None or os.geteuid() != 0:
        return  # creating files owned by edged needs root
    done = _run([tmpfiles, f"--root={tmp_path}", "--create", str(TMPFILES)])
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "etc/edged/trusted").is_dir()
    inbox = tmp_path / "var/lib/edged/inbox"
    assert inbox.is_dir() and (inbox.parent.stat().st_mode & 0o777) == 0o700


def test_the_units_reload_command_fails_when_the_daemon_refuses_the_reload(
    start_daemon: DaemonFactory, models_dir: Path
) -> None:
    """``systemctl reload`` runs ExecReload and reports its exit status: it must say whether
    the daemon took the new config, not merely that a signal was sent."""
    daemon = start_daemon({"models": {"demo": {"path": str(models_dir / "demo.onnx")}}})
    edgectl = Path(sys.executable).parent / "edgectl"  # the console script next to this Python
    command = _service("ExecReload").replace(INSTALLED_EDGECTL, str(edgectl))
    argv = shlex.split(command.replace("%t/edged", str(daemon.runtime_dir)))
    assert _run(argv).returncode == 0  # the same file again: a reload that takes
    valid = daemon.config_path.read_text()
    daemon.config_path.write_text(valid + '\n[models.late]\npath = "missing.onnx"\n')
    partial = _run(argv)  # taken, but a model in it failed: the report says so, and so must systemd
    assert partial.returncode == 1 and "no file at" in partial.stdout, partial.stdout
    daemon.config_path.write_text(valid + "\n[models.demo\n")
    refused = _run(argv)
    assert refused.returncode == 1 and "CONFIG" in refused.stderr, refused.stderr
    with daemon.client() as client:  # nothing changed: still serving
        assert client.infer("demo", {"x": np.zeros((1, 16), np.float32)}).version == 1
