"""Fleet updates through SWUpdate: the real ``swupdate`` (Debian's, built for signed images)
installs a ``.swu`` made by ``swugenerator`` from the shipped example (examples/swupdate/): its
file handler writes the bundle and its script pushes it to a live daemon, whose refusal or
failed health gate fails the update."""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edged.testing import DaemonProcess
from tests.bundles import history
from tests.conftest import DaemonFactory
from tests.fleet import Device, serving, traffic

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "swupdate"
SWUGENERATOR = shutil.which("swugenerator") or str(Path(sys.executable).parent / "swugenerator")
HARDWARE = "edged-test:1.0"

pytestmark = pytest.mark.skipif(
    shutil.which("swupdate") is None or not Path(SWUGENERATOR).exists(),
    reason="needs Debian's swupdate and swugenerator (make installs them)",
)


def signer(directory: Path) -> tuple[Path, Path]:
    """An RSA key and a self-signed certificate for signing images, as SWUpdate checks them
    (its default purpose: email protection)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edged fleet")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), True
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), False)
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = directory / "swu.key", directory / "swu.crt"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


class Swupdate:
    """The example image, built here with the bundle written under ``work`` rather than
    /var/lib/edged, and ``swupdate -i`` run against ``daemon``."""

    def __init__(self, work: Path, daemon: DaemonProcess) -> None:
        self.work = work
        self.daemon = daemon
        work.mkdir(parents=True)
        self.key, self.cert = signer(work)
        self.edgectl = work / "edgectl"  # what the script runs, as tests.conftest.EDGECTL
        code = "from edged.edgectl import main; raise SystemExit(main())"
        self.edgectl.write_text(f"#!/bin/sh\nexec {sys.executable} -c '{code}' \"$@\"\n")
        self.edgectl.chmod(0o755)

    def image(self, bundle: Path, name: str) -> Path:
        source = self.work / name
        source.mkdir()
        written = str(self.work / "var" / "edged.bundle")
        for example in ("sw-description", "edged-install.sh"):
            text = (EXAMPLE / example).read_text()
            (source / example).write_text(
                text.replace("/var/lib/edged/swupdate/edged.bundle", written)
            )
        (source / "edged-install.sh").chmod(0o755)
        shutil.copy(bundle, source / "edged.bundle")
        out = self.work / f"{name}.swu"
        subprocess.run(
            [
                *(SWUGENERATOR, "-s", str(source / "sw-description"), "-a", str(source)),
                *("-k", f"CMS,{self.key},{self.cert}", "-o", str(out), "create"),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        return out

    def install(self, image: Path) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            "EDGED_CONTROL": self.daemon.control_endpoint,
            "EDGECTL": str(self.edgectl),
        }
        command = ["swupdate", "-v", "-H", HARDWARE, "-k", str(self.cert), "-i", str(image)]
        return subprocess.run(
            command, check=False, env=env, capture_output=True, text=True, timeout=600
        )


def test_swupdate_installs_an_edged_bundle(start_daemon: DaemonFactory, tmp_path: Path) -> None:
    device = Device(start_daemon, tmp_path)
    daemon = device.daemon
    swupdate = Swupdate(tmp_path / "swu", daemon)
    image = swupdate.image(device.bundle(2, layers=2), "v2")
    with traffic(daemon) as tally:
        done = swupdate.install(image)
    assert done.returncode == 0, done.stdout + done.stderr
    assert serving(daemon) == 2 and tally["failures"] == 0
    assert history(daemon)[-1]["outcome"] == "installed"
    assert not (tmp_path / "swu" / "var" / "edged.bundle").exists()  # the script removed it


def test_a_failed_health_gate_or_a_refused_bundle_fails_the_update(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    device = Device(start_daemon, tmp_path)
    daemon = device.daemon
    swupdate = Swupdate(tmp_path / "swu", daemon)
    slow = swupdate.image(device.bundle(2, layers=200), "slow")
    with traffic(daemon) as tally:
        while 1 not in tally["seen"] or tally["requests"] < 50:  # a latency baseline
            time.sleep(0.01)
        failed = swupdate.install(slow)
    assert failed.returncode != 0 and "UNHEALTHY" in failed.stdout + failed.stderr
    assert serving(daemon) == 1 and tally["failures"] == 0
    untrusted = swupdate.image(device.bundle(3, layers=2, key="stranger"), "stranger")
    refused = swupdate.install(untrusted)
    assert refused.returncode != 0 and "BAD_SIGNATURE" in refused.stdout + refused.stderr
    assert serving(daemon) == 1
    assert [record["outcome"] for record in history(daemon)] == ["rolled_back", "rejected"]


def test_a_tampered_or_foreign_image_is_refused_before_anything_runs(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    device = Device(start_daemon, tmp_path)
    swupdate = Swupdate(tmp_path / "swu", device.daemon)
    image = swupdate.image(device.bundle(2, layers=2), "v2")
    raw = bytearray(image.read_bytes())
    raw[-4096] ^= 0xFF  # inside the bundle or the script: its sha256 in sw-description fails
    tampered = tmp_path / "tampered.swu"
    tampered.write_bytes(bytes(raw))
    assert swupdate.install(tampered).returncode != 0
    other = Swupdate(tmp_path / "other", device.daemon)  # signed with another key
    foreign = other.image(device.bundle(2, layers=2), "v2")
    assert swupdate.install(foreign).returncode != 0
    assert serving(device.daemon) == 1 and history(device.daemon) == []
