"""Fleet updates through Mender: the real Mender client (``mender install``, ``commit``,
``rollback``, standalone) installs Artifacts made by the real ``mender-artifact write
module-image -T edged-bundle`` through the ``edged-bundle`` update module into a live daemon.

Each ``mender`` runs in a mount namespace of its own, where the test's update module directory
and ``/etc/mender`` are bound over the system's, so nothing outside the test is touched."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edged.faults import ENV
from edged.testing import DaemonProcess
from tests.bundles import history
from tests.conftest import DaemonFactory
from tests.fleet import Device, serving, traffic

MODULES = Path("/usr/share/mender/modules/v3")
DEVICE = "edged-test"

pytestmark = pytest.mark.skipif(
    not (shutil.which("mender") and shutil.which("mender-artifact") and MODULES.is_dir())
    or os.geteuid() != 0,
    reason="needs root and Debian's mender-client and mender-artifact (make installs them)",
)


class Mender:
    """A standalone Mender client with its own data directory, update modules and
    ``/etc/mender``, speaking to ``daemon``'s control socket through the module."""

    def __init__(self, work: Path, daemon: DaemonProcess) -> None:
        self.work = work
        self.daemon = daemon
        for directory in ("data", "etc", "modules"):
            (work / directory).mkdir(parents=True, exist_ok=True)
        (work / "data" / "device_type").write_text(f"device_type={DEVICE}\n")
        (work / "etc" / "artifact_info").write_text("artifact_name=factory\n")
        (work / "mender.conf").write_text("{}\n")
        module = work / "modules" / "edged-bundle"
        module.write_text(f'#!/bin/sh\nexec {sys.executable} -m edged.mender_module "$@"\n')
        module.chmod(0o755)

    def command(self, *args: str) -> list[str]:
        work = self.work
        mender = (
            f"mender --config {work / 'mender.conf'} --data {work / 'data'} --no-syslog "
            + " ".join(args)
        )
        script = (
            f"mount --bind {work / 'etc'} /etc/mender && "
            f"mount --bind {work / 'modules'} {MODULES} && exec {mender}"
        )
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "EDGED_CONTROL": self.daemon.control_endpoint}
        command = self.command(*args)
        return subprocess.run(
            command, check=False, env=env, capture_output=True, text=True, timeout=300
        )

    def start(self, *args: str) -> subprocess.Popen[str]:
        """The command in the background, in a process group of its own (to kill it whole)."""
        env = {**os.environ, "EDGED_CONTROL": self.daemon.control_endpoint}
        return subprocess.Popen(
            self.command(*args),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )

    def artifact(self) -> str:
        return self.run("show-artifact").stdout.strip()


def artifact(tmp_path: Path, source: Path, name: str) -> Path:
    """``mender-artifact write module-image -T edged-bundle`` of one bundle."""
    out = tmp_path / f"{name}.mender"
    subprocess.run(
        [
            *("mender-artifact", "write", "module-image", "-T", "edged-bundle", "-n", name),
            *("-t", DEVICE, "-o", str(out), "-f", str(source)),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return out


def update(device: Device, version: int, layers: int, key: str = "private") -> Path:
    """The Mender Artifact of ``device.bundle``."""
    return artifact(
        device.tmp, device.bundle(version, layers, key), f"edged-m-{version}-{layers}-{key}"
    )


def test_mender_installs_an_edged_bundle_and_commits_it(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    device = Device(start_daemon, tmp_path)
    daemon, mender = device.daemon, Mender(tmp_path / "mender", device.daemon)
    with traffic(daemon) as tally:
        done = mender.run("install", str(update(device, 2, layers=2)))
        assert done.returncode == 0, done.stderr
        assert serving(daemon) == 2  # installed, past edged's health gate
        committed = mender.run("commit")
        assert committed.returncode == 0, committed.stderr
    assert tally["failures"] == 0 and tally["seen"] <= {1, 2}
    assert mender.artifact() == "edged-m-2-2-private"
    assert history(daemon)[-1]["outcome"] == "installed"
    # a second update, rolled back by Mender after its install: edged's rollback
    assert mender.run("install", str(update(device, 3, layers=3))).returncode == 0
    assert serving(daemon) == 3
    rolled = mender.run("rollback")
    assert rolled.returncode == 0, rolled.stderr
    assert serving(daemon) == 2 and mender.artifact() == "edged-m-2-2-private"


def test_a_bundle_failing_the_health_gate_fails_the_mender_install(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    device = Device(start_daemon, tmp_path)
    daemon, mender = device.daemon, Mender(tmp_path / "mender", device.daemon)
    slow = update(device, 2, layers=200)
    with traffic(daemon) as tally:
        while 1 not in tally["seen"] or tally["requests"] < 50:  # a latency baseline
            time.sleep(0.01)
        done = mender.run("install", str(slow))
    assert done.returncode != 0 and "UNHEALTHY" in done.stderr, done.stderr
    assert tally["failures"] == 0  # slow, rolled back, and no request failed
    assert serving(daemon) == 1 and mender.artifact() == "factory"
    assert history(daemon)[-1]["outcome"] == "rolled_back"


def test_tampered_artifacts_and_untrusted_bundles_are_refused(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    device = Device(start_daemon, tmp_path)
    daemon, mender = device.daemon, Mender(tmp_path / "mender", device.daemon)
    untrusted = mender.run("install", str(update(device, 2, layers=2, key="stranger")))
    assert untrusted.returncode != 0 and "BAD_SIGNATURE" in untrusted.stderr, untrusted.stderr
    with daemon.control() as control:
        assert control.command("history")["installs"] == []  # refused before the daemon installs
    raw = bytearray(update(device, 2, layers=2).read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # inside the payload: its checksum in the Artifact no longer holds
    tampered = tmp_path / "tampered.mender"
    tampered.write_bytes(bytes(raw))
    refused = mender.run("install", str(tampered))
    assert refused.returncode != 0
    assert serving(daemon) == 1 and mender.artifact() == "factory"


def test_a_power_cut_mid_install_leaves_mender_and_edged_agreeing(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    device = Device(start_daemon, tmp_path, env={ENV: "ota.gating"})
    doomed, mender = device.daemon, Mender(tmp_path / "mender", device.daemon)
    second = update(device, 2, layers=2)
    installing = mender.start("install", str(second))
    try:
        assert doomed.wait(120) == -9, doomed.log()  # the power cut: the daemon dies ...
    finally:
        os.killpg(installing.pid, signal.SIGKILL)  # ... and the Mender client with it
        installing.wait()
    daemon = start_daemon(device.config, workdir=tmp_path / "d")
    mender.daemon = daemon
    last = history(daemon)[-1]
    assert last["recovered"] is True and last["outcome"] == "rolled_back"
    assert serving(daemon) == 1
    # Mender never committed: what it reports, and what a rollback or commit now does, agree
    assert mender.artifact() == "factory"
    mender.run("rollback")  # settles an update Mender had in progress, if any
    assert mender.artifact() == "factory" and serving(daemon) == 1
    assert mender.run("install", str(second)).returncode == 0  # the retry takes
    assert mender.run("commit").returncode == 0
    assert mender.artifact() == "edged-m-2-2-private" and serving(daemon) == 2
