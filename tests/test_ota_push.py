"""Pushing bundles over the control socket: chunked uploads that resume after a lost
connection, bounded in size and number, verified, then installed like any bundle."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edged import protocol
from edged.client import Client
from edged.control.ops.upload import Upload
from edged.errors import BadBundle, BadRequest, FrameMismatch, TooLarge
from edged.testing import DaemonProcess
from tests.bundles import WIDTH, make, serving, signing_keys, start_ota_daemon
from tests.conftest import EDGECTL, DaemonFactory, edgectl_json
from tests.messages import decode_request

CHUNK = 4096
Ota = tuple[DaemonProcess, dict[str, Path]]


def start_ota(start_daemon: DaemonFactory, tmp_path: Path, width: int = WIDTH, **ota: Any) -> Ota:
    """A daemon that trusts fresh signing keys and serves "m" version 1 (``width`` wide) from
    its store; installs commit at once (no health window)."""
    keys = signing_keys(tmp_path)
    return start_ota_daemon(start_daemon, tmp_path, keys, width, health_window_s=0, **ota), keys


@pytest.fixture
def ota(start_daemon: DaemonFactory, tmp_path: Path) -> Ota:
    return start_ota(start_daemon, tmp_path)


def upload(
    control: Client, bundle: bytes, chunk: slice | None = None, **declared: Any
) -> dict[str, Any]:
    """One ``upload`` request for ``bundle``: the bytes of ``chunk`` at its start, or without
    one a question of progress; ``declared`` overrides the sha256 or size sent."""
    fields = {"sha256": sha256(bundle), "size": len(bundle), **declared}
    if chunk is None:
        return control.command("upload", **fields)
    return control.command("upload", offset=chunk.start, data=bundle[chunk], **fields)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def uploads_dir(daemon: DaemonProcess) -> Path:
    return daemon.workdir / "state" / "ota" / "uploads"


def kept(daemon: DaemonProcess) -> list[str]:
    return sorted(path.name for path in uploads_dir(daemon).iterdir())


def test_a_chunk_travels_as_one_raw_frame_after_the_header() -> None:
    fields = {"sha256": "a" * 64, "size": 3, "offset": 0}
    frames = protocol.encode_request(1, "upload", fields=fields, data=b"\0\xff\n")
    request = decode_request(frames, protocol.Limits())
    assert isinstance(request, Upload)
    assert request.data is not None and bytes(request.data) == b"\0\xff\n"
    assert (request.sha256, request.size, request.offset) == ("a" * 64, 3, 0)
    with pytest.raises(protocol.RequestRejected, match="one data frame at most") as refused:
        decode_request([*frames, b"more"], protocol.Limits())
    assert isinstance(refused.value.error, FrameMismatch)


def test_edgectl_push_uploads_in_chunks_installs_and_serves(ota: Ota, tmp_path: Path) -> None:
    daemon, keys = ota
    path = make(tmp_path, keys, 2)
    assert path.stat().st_size > 3 * CHUNK  # several chunks
    record = edgectl_json(daemon, "push", str(path), "--chunk-kib", str(CHUNK // 1024))
    assert record["outcome"] == "installed" and record["version"] == 2
    assert record["bundle"] == str(uploads_dir(daemon) / f"{sha256(path.read_bytes())}.bundle")
    assert serving(daemon) == 2
    assert kept(daemon) == []  # installed: the uploaded bundle is gone


def test_an_upload_cut_off_halfway_resumes_from_the_reported_offset(
    ota: Ota, tmp_path: Path
) -> None:
    daemon, keys = ota
    bundle = make(tmp_path, keys, 2).read_bytes()
    half = len(bundle) // 2
    with daemon.control() as control:
        assert upload(control, bundle)["received"] == 0
        assert upload(control, bundle, slice(0, CHUNK))["received"] == CHUNK
        reply = upload(control, bundle, slice(CHUNK, half))
        assert (reply["received"], reply["size"], reply["complete"]) == (half, len(bundle), False)
    with daemon.control() as control:  # a new connection asks where to go on
        assert upload(control, bundle)["received"] == half
        reply = upload(control, bundle, slice(half, len(bundle)))
        assert reply["received"] == len(bundle) and reply["complete"] is True
        assert kept(daemon) == [f"{sha256(bundle)}.bundle"]
        record = control.command("install", upload=sha256(bundle), timeout=120)
    assert record["outcome"] == "installed" and record["version"] == 2
    assert serving(daemon) == 2 and kept(daemon) == []


def test_edgectl_push_reconnects_and_resumes_when_the_daemon_stops_answering(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    wide = 512  # a bundle of about 1 MiB: a push of 1 KiB chunks takes a while
    daemon, keys = start_ota(start_daemon, tmp_path, wide)
    path = make(tmp_path, keys, 2, width=wide)
    command = [*EDGECTL, "--control", daemon.control_endpoint, "--timeout", "1", "--json"]
    command += ["push", str(path), "--chunk-kib", "1"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as push:
        stopped_at = wait_for_upload_bytes(daemon)
        os.kill(daemon.pid, signal.SIGSTOP)  # requests go unanswered: edgectl times out
        try:
            time.sleep(2)
        finally:
            os.kill(daemon.pid, signal.SIGCONT)
        out, err = push.communicate(timeout=120)
    assert push.returncode == 0, err.decode()
    assert 0 < stopped_at < path.stat().st_size
    assert b"resuming the upload" in err
    assert json.loads(out)["version"] == 2
    with daemon.client() as client:
        assert client.infer("m", {"x": np.ones((1, wide), np.float32)}).version == 2


def wait_for_upload_bytes(daemon: DaemonProcess) -> int:
    """Once a partial upload has some bytes: how many."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for part in uploads_dir(daemon).glob("*.part"):
            with contextlib.suppress(FileNotFoundError):
                if size := part.stat().st_size:
                    return size
        time.sleep(0.001)
    raise AssertionError("no upload began")


def test_an_upload_over_the_size_limit_is_refused_naming_the_limit(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    daemon, _ = start_ota(start_daemon, tmp_path, max_bundle_mb=1)
    with daemon.control() as control:
        with pytest.raises(TooLarge, match=r"limit of 1048576 bytes \(ota.max_bundle_mb = 1\)"):
            control.command("upload", sha256="a" * 64, size=2**20 + 1)
        assert upload(control, b"x" * 2**20)["received"] == 0  # at the limit: accepted
    assert kept(daemon) == [f"{sha256(b'x' * 2**20)}-{2**20}.part"]


def test_a_chunk_at_the_wrong_offset_or_past_the_size_is_refused(ota: Ota) -> None:
    daemon, _ = ota
    bundle = os.urandom(3 * CHUNK)
    with daemon.control() as control:
        upload(control, bundle, slice(0, CHUNK))
        with pytest.raises(BadRequest, match=f"goes at offset {CHUNK}, not 0"):
            upload(control, bundle, slice(0, CHUNK))
        with pytest.raises(BadRequest, match=f"goes at offset {CHUNK}, not {2 * CHUNK}"):
            upload(control, bundle, slice(2 * CHUNK, 3 * CHUNK))
        with pytest.raises(BadRequest, match="past the declared size"):
            control.command(
                "upload", sha256=sha256(bundle), size=len(bundle), offset=CHUNK, data=bundle
            )
        with pytest.raises(BadRequest, match="64 lower-case hex digits"):
            upload(control, bundle, sha256="../" + sha256(bundle)[3:])
        assert upload(control, bundle)["received"] == CHUNK  # nothing refused was written


def test_an_upload_that_does_not_hash_to_its_sha256_is_refused_and_dropped(ota: Ota) -> None:
    daemon, _ = ota
    bundle, claimed = os.urandom(2 * CHUNK), sha256(b"another bundle")
    with daemon.control() as control:
        upload(control, bundle, slice(0, CHUNK), sha256=claimed)
        with pytest.raises(BadBundle, match=f"hash to {sha256(bundle)}, not {claimed}"):
            upload(control, bundle, slice(CHUNK, 2 * CHUNK), sha256=claimed)
        assert kept(daemon) == []
        assert upload(control, bundle, sha256=claimed)["received"] == 0  # it starts over
        with pytest.raises(BadRequest, match="no finished upload"):
            control.command("install", upload=claimed)


def test_bad_pushed_bundles_are_rejected_and_the_model_keeps_serving(
    ota: Ota, tmp_path: Path
) -> None:
    daemon, keys = ota
    tampered = make(tmp_path, keys, 3, seed=3)
    raw = bytearray(tampered.read_bytes())
    model = (tmp_path / "model-3-64-3.onnx").read_bytes()
    raw[raw.index(model) + len(model) // 2] ^= 0xFF  # one bit of the weights, after signing
    tampered.write_bytes(raw)
    cases = [(make(tmp_path, keys, 2, key="stranger"), "BAD_SIGNATURE"), (tampered, "BAD_BUNDLE")]
    for path, code in cases:
        command = [*EDGECTL, "--control", daemon.control_endpoint, "push", str(path)]
        done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=60)
        assert done.returncode == 1 and f"edgectl: {code}: " in done.stderr
        assert serving(daemon) == 1
        assert kept(daemon) == []  # refused: the uploaded bundle is gone too


def test_uploads_are_bounded_and_abandoned_ones_removed_at_start(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    directory = tmp_path / "d" / "state" / "ota" / "uploads"
    directory.mkdir(parents=True)
    old, recent = directory / f"{'0' * 64}-100.part", directory / f"{'1' * 64}-100.part"
    for path, age_s in ((old, 2 * 86400), (recent, 60)):
        path.write_bytes(b"x" * 10)
        os.utime(path, (time.time() - age_s, time.time() - age_s))
    daemon, _ = start_ota(start_daemon, tmp_path)
    assert kept(daemon) == [recent.name]  # a day old: removed at start
    with daemon.control() as control:
        assert control.command("upload", sha256="1" * 64, size=100)["received"] == 10
        for digit in "2345":  # a fifth upload drops the least recently written one
            control.command("upload", sha256=digit * 64, size=100)
    assert kept(daemon) == [f"{digit * 64}-100.part" for digit in "2345"]


def test_uploads_need_ota(demo_daemon: DaemonProcess) -> None:
    with demo_daemon.control() as control, pytest.raises(BadRequest, match=r"ota\.trusted_keys"):
        control.command("upload", sha256="a" * 64, size=1)
