"""Fuzzing a live daemon: mutated messages of every kind on both of its sockets. Each one gets
exactly one final reply (a result or a typed error), the daemon keeps serving, and its memory
and file descriptors stay where they were.

``make test`` sends a few thousand messages; ``make fuzz`` sends ``EDGED_FUZZ_MESSAGES``
(100 000) and writes the counts to ``EDGED_FUZZ_REPORT``.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import zmq

from edged import protocol
from edged.testing import DaemonProcess
from tests.conftest import Connect
from tests.messages import mutate, valid_requests

MESSAGES = int(os.environ.get("EDGED_FUZZ_MESSAGES", "4000"))
REPORT = os.environ.get("EDGED_FUZZ_REPORT")
SEED = int(os.environ.get("EDGED_FUZZ_SEED", "0"))
#: a reply later than this counts as missing; every message gets one in well under a millisecond
REPLY_TIMEOUT_MS = 5000
#: share of the messages sent to the control socket
CONTROL_SHARE = 0.2
#: RSS may move this much between the warm-up and the end: allocator noise, not a leak
RSS_NOISE = 1.05
RSS_NOISE_BYTES = 4 << 20
#: after the hostile burst (hundreds of MiB in flight) and a settle period, RSS is back within
#: this factor of the warm daemon's (plus the noise above): the burst's buffers went back
RSS_SETTLED = 1.10
SETTLE_S = 15.0
BURST_SOCKETS = 4
BURST_MESSAGES = 25


def final_reply(sock: zmq.Socket[Any]) -> dict[str, Any] | None:
    """The header of the next final reply (partial ones skipped); None if none came in time."""
    while sock.poll(REPLY_TIMEOUT_MS):
        frames = sock.recv_multipart()
        if frames and frames[0] == b"":  # the REQ delimiter a mutated message may have carried
            frames = frames[1:]
        header = msgpack.unpackb(frames[0])
        if not header.get("more"):
            return dict(header)
    return None


def test_a_live_daemon_answers_every_malformed_message_and_keeps_serving(
    demo_daemon: DaemonProcess, connect: Connect
) -> None:
    demo_infer = protocol.encode_request(
        1, "infer", model="demo", inputs={"x": np.ones((2, 16), np.float32)}
    )
    corpus = [*valid_requests(model="demo"), [bytes(memoryview(f)) for f in demo_infer]]
    sockets = {
        "infer": connect(demo_daemon.endpoint),
        "control": connect(demo_daemon.control_endpoint),
    }
    rng = random.Random(SEED)
    codes: Counter[str] = Counter()
    missing = 0
    warmup = min(1000, MESSAGES // 4)
    started = time.monotonic()
    for sent in range(MESSAGES):
        if sent == warmup:
            before = demo_daemon.footprint()
        target = "control" if rng.random() < CONTROL_SHARE else "infer"
        frames = mutate(rng, rng.choice(corpus)) or [b""]  # a message has at least one frame
        sockets[target].send_multipart(frames)
        header = final_reply(sockets[target])
        if header is None:
            missing += 1
        else:
            codes["ok" if header.get("ok") else header["error"]["code"]] += 1
    seconds = time.monotonic() - started
    after = demo_daemon.footprint()
    peak = hostile_burst(demo_daemon, connect)
    settled = settled_rss(demo_daemon, bound=int(before[0] * RSS_SETTLED + RSS_NOISE_BYTES))

    with demo_daemon.client() as client:
        result = client.infer("demo", {"x": np.zeros((1, 16), np.float32)})
    with demo_daemon.control() as control:
        state = control.command("status")
    report = {
        "messages": MESSAGES,
        "final_replies": sum(codes.values()),
        "missing": missing,
        "replies_by_code": dict(codes.most_common()),
        "messages_per_s": round(MESSAGES / seconds),
        "rss_bytes": {
            "after_warmup": before[0],
            "end": after[0],
            "burst_peak": peak,
            "settled_after_burst": settled,
        },
        "fds": {"after_warmup": before[1], "end": after[1]},
    }
    print(json.dumps(report, indent=2))
    if REPORT:
        Path(REPORT).write_text(json.dumps(report, indent=2) + "\n")
    assert missing == 0, report
    assert result["probs"].shape == (1, 4)
    assert state["state"] == "serving"
    assert len(codes) > 5, report  # the mutations reached many different refusals
    assert after[0] <= before[0] * RSS_NOISE + RSS_NOISE_BYTES, report
    assert after[1] == before[1], report
    assert settled <= before[0] * RSS_SETTLED + RSS_NOISE_BYTES, report


def hostile_burst(daemon: DaemonProcess, connect: Connect) -> int:
    """Frames over the size limit, near-limit frames, and 10 000-frame messages sent faster
    than they are answered from several connections (each gets its typed error); the daemon's
    resident size at the end, its peak."""
    header = msgpack.packb({"v": 1, "id": 7, "op": "infer", "model": "demo", "inputs": []})
    too_big = connect(daemon.endpoint)  # refused by the socket itself: the peer is dropped
    too_big.send_multipart([header, b"\0" * (65 << 20)])
    near_limit = connect(daemon.endpoint)
    near_limit.send_multipart([header, b"\0" * (60 << 20)])
    assert final_reply(near_limit) is not None
    flooders = [connect(daemon.endpoint) for _ in range(BURST_SOCKETS)]
    for _ in range(BURST_MESSAGES):
        for sock in flooders:
            sock.send_multipart([header] + [b"x" * 500] * 10_000)
    peak = daemon.footprint()[0]
    for sock in flooders:
        for _ in range(BURST_MESSAGES):
            reply = final_reply(sock)
            assert reply is not None and reply["error"]["code"] == "FRAME_MISMATCH", reply
    return max(peak, daemon.footprint()[0])


def settled_rss(daemon: DaemonProcess, bound: int) -> int:
    """The resident size once it is within ``bound`` (freed memory goes back on the daemon's
    once-a-second tick), or after ``SETTLE_S`` if it never gets there."""
    deadline = time.monotonic() + SETTLE_S
    while (rss := daemon.footprint()[0]) > bound and time.monotonic() < deadline:
        time.sleep(0.2)
    return rss
