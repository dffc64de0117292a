"""Under systemd the log goes to the journal with searchable fields: a real socket at the
journal's path receives the native protocol that systemd-python speaks."""

from __future__ import annotations

import importlib.util
import shutil
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edged.errors import RunFailed
from edged.testing import DaemonProcess
from tests.bundles import WIDTH
from tests.conftest import DaemonFactory
from tests.models import build_one_row_model

JOURNAL = Path("/run/systemd/journal/socket")


def parse(datagram: bytes) -> dict[str, str]:
    """One entry of the journal's native protocol: KEY=value lines, or KEY, a 64-bit
    little-endian length and the raw value for values that hold newlines."""
    fields, rest = {}, datagram
    while rest:
        line, _, after = rest.partition(b"\n")
        if b"=" in line:
            key, _, value = line.partition(b"=")
            rest = after
        else:
            key, (size,) = line, struct.unpack("<Q", after[:8])
            value, rest = after[8 : 8 + size], after[8 + size + 1 :]
        fields[key.decode()] = value.decode(errors="replace")
    return fields


@pytest.fixture
def journal() -> Iterator[socket.socket]:
    if importlib.util.find_spec("systemd") is None:
        pytest.skip("needs systemd-python (the systemd extra): pip install 'edged[systemd]'")
    if JOURNAL.exists():
        pytest.skip("a real journald owns the journal socket here")
    created = [p for p in (JOURNAL.parent.parent, JOURNAL.parent) if not p.exists()]
    JOURNAL.parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(JOURNAL))
    sock.settimeout(0.2)
    yield sock
    sock.close()
    JOURNAL.unlink()
    for directory in created:
        shutil.rmtree(directory, ignore_errors=True)


def entries(sock: socket.socket) -> list[dict[str, str]]:
    found = []
    while True:
        try:
            found.append(parse(sock.recv(1 << 16)))
        except TimeoutError:
            return found


def test_under_systemd_the_log_carries_model_version_trace_and_error_code(
    start_daemon: DaemonFactory, tmp_path: Path, journal: socket.socket
) -> None:
    model = build_one_row_model(tmp_path / "one-row.onnx", WIDTH)
    workdir = tmp_path / "d"
    workdir.mkdir()
    stderr = workdir / "edged.log"  # DaemonProcess appends the daemon's stderr here
    stderr.touch()
    stat = stderr.stat()
    env = {"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"}
    config = {"models": {"m": {"path": str(model), "preload": True}}}
    daemon: DaemonProcess = start_daemon(config, workdir=workdir, env=env)
    with daemon.client() as client, pytest.raises(RunFailed):
        client.infer("m", {"x": np.ones((2, WIDTH), np.float32)}, trace="cafe0001")
    logged = entries(journal)
    loaded = [e for e in logged if "model m version 1 loaded" in e["MESSAGE"]]
    assert loaded and loaded[0]["MODEL"] == "m" and loaded[0]["VERSION"] == "1"
    assert loaded[0]["SYSLOG_IDENTIFIER"] == "edged" and loaded[0]["PRIORITY"] == "6"
    failed = [e for e in logged if e.get("TRACE_ID") == "cafe0001"]
    assert failed and failed[0]["ERROR_CODE"] == "RUN_FAILED" and failed[0]["PRIORITY"] == "4"
    assert failed[0]["MODEL"] == "m"
    assert "error reply RUN_FAILED" not in stderr.read_text()  # the journal has it, not stderr
