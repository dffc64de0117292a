"""Under systemd, error replies reach the journal with ERROR_CODE, MODEL and TRACE_ID (the
journal's socket faked as in test_journald)."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest

from edged.errors import UnknownModel
from tests.conftest import Connect, DaemonFactory, slow_config
from tests.models import SLOW_WIDTH
from tests.test_error_log import flood_busy
from tests.test_journald import entries, journal  # noqa: F401 (a fixture)


def test_under_systemd_error_replies_carry_error_code_and_model(
    start_daemon: DaemonFactory,
    models_dir: Path,
    tmp_path: Path,
    journal: socket.socket,  # noqa: F811 (the fixture imported above)
    connect: Connect,
) -> None:
    """What the README's ``journalctl -u edged MODEL=slow ERROR_CODE=BUSY`` finds."""
    workdir = tmp_path / "d"
    workdir.mkdir()
    stderr = workdir / "edged.log"
    stderr.touch()
    stat = stderr.stat()
    env = {"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"}
    config = slow_config(models_dir, queue_depth=1, max_batch=1)
    daemon = start_daemon(config, workdir=workdir, env=env)
    flood_busy(connect(daemon.endpoint), 50)
    with daemon.client() as client, pytest.raises(UnknownModel):
        client.infer("nope", {"x": np.ones((1, SLOW_WIDTH), np.float32)}, trace="lost-2")
    logged = entries(journal)
    busy = [e for e in logged if e.get("ERROR_CODE") == "BUSY"]
    assert busy and busy[0]["MODEL"] == "slow" and busy[0]["PRIORITY"] == "6"
    assert busy[0]["TRACE_ID"]
    unknown = [e for e in logged if e.get("ERROR_CODE") == "UNKNOWN_MODEL"]
    assert len(unknown) == 1 and unknown[0]["TRACE_ID"] == "lost-2"
