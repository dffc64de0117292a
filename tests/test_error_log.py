"""Every error reply leaves a log record with the fields the journal indexes (ERROR_CODE,
MODEL, TRACE_ID), at most one a second per model and code: a flood of BUSY cannot flood the
journal."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from edged import protocol
from edged.errors import UnknownModel
from edged.logsetup import ErrorReplyLog
from tests.conftest import Connect, DaemonFactory, slow_config
from tests.models import SLOW_WIDTH


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def recorded() -> tuple[ErrorReplyLog, Records, Clock]:
    logger = logging.getLogger("test.replies")
    logger.propagate = False
    handler = Records()
    logger.handlers = [handler]
    logger.setLevel(logging.INFO)
    clock = Clock()
    return ErrorReplyLog(logger, interval_s=1.0, clock=clock), handler, clock


def test_a_flood_of_one_error_is_one_record_a_second_and_says_how_many_were_left_out(
    recorded: tuple[ErrorReplyLog, Records, Clock],
) -> None:
    replies, handler, clock = recorded
    for request_id in range(1000):
        replies.log("BUSY", "queue full", model="m", trace=f"t{request_id}", request_id=request_id)
    replies.log("DEADLINE_EXCEEDED", "late", model="m", trace="d", request_id=5)
    replies.log("BUSY", "queue full", model="other", trace="o", request_id=6)
    assert [(r.code, r.model) for r in handler.records] == [  # type: ignore[attr-defined]
        ("BUSY", "m"),
        ("DEADLINE_EXCEEDED", "m"),
        ("BUSY", "other"),
    ]
    first = handler.records[0]
    assert first.levelno == logging.INFO and first.trace == "t0"  # type: ignore[attr-defined]
    assert "error reply BUSY to request 0 for model m: queue full" in first.getMessage()
    clock.now += 1.0
    replies.log("BUSY", "queue full", model="m", trace="later", request_id=1000)
    assert "(999 more like it left out)" in handler.records[-1].getMessage()
    replies.log("RUN_FAILED", "boom " * 1000, model="m", version=2, trace="r", request_id=7)
    failed = handler.records[-1]
    assert failed.levelno == logging.WARNING and failed.version == 2  # type: ignore[attr-defined]
    assert len(failed.getMessage()) < 500  # a client's long message is quoted in part


def flood_busy(sock: zmq.Socket[Any], count: int) -> float:
    """``count`` requests at once at a model that holds one at a time; the seconds it took to
    get every reply."""
    x = np.ones((64, SLOW_WIDTH), np.float32)
    started = time.monotonic()
    for request_id in range(1, count + 1):
        sock.send_multipart(
            protocol.encode_request(request_id, "infer", model="slow", inputs={"x": x})
        )
    busy = 0
    for _ in range(count):
        assert sock.poll(30000), "no reply"
        reply = protocol.decode_reply(sock.recv_multipart())
        busy += reply.error is not None and reply.error.code == "BUSY"
    assert busy >= 0.9 * count  # all but the few that ran or waited behind a run
    return time.monotonic() - started


def test_a_thousand_busy_replies_make_a_few_records(
    start_daemon: DaemonFactory, models_dir: Path, connect: Connect
) -> None:
    daemon = start_daemon(slow_config(models_dir, queue_depth=1, max_batch=1))
    seconds = flood_busy(connect(daemon.endpoint), 1000)
    with daemon.client() as client, pytest.raises(UnknownModel):
        client.infer("nope", {"x": np.ones((1, SLOW_WIDTH), np.float32)}, trace="lost-1")
    lines = daemon.log().splitlines()
    busy = [line for line in lines if "error reply BUSY" in line]
    assert 1 <= len(busy) <= math.ceil(seconds) + 1, busy
    assert any("more like it left out" in line for line in busy[1:]) or len(busy) == 1
    unknown = [line for line in lines if "error reply UNKNOWN_MODEL" in line]
    assert len(unknown) == 1 and "[trace lost-1]" in unknown[0]
