"""Clients that misbehave: floods past the queues, a client that never reads its replies, clients
that vanish mid-request or mid-stream, and thousands of short-lived connections. The daemon keeps
answering everyone else, loses nothing it accepted, and its memory and file descriptors come back
to where they were."""

from __future__ import annotations

import itertools
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from edged import protocol
from edged.errors import BusyError
from edged.testing import DaemonProcess
from tests.conftest import Connect, DaemonFactory, llm_config, slow_config
from tests.models import SLOW_WIDTH

X = np.zeros((1, 16), np.float32)
#: RSS may differ this much between two quiet moments of a daemon: allocator noise, not a leak
RSS_NOISE_BYTES = 8 << 20


def settled_fds(daemon: DaemonProcess, expected: int, timeout: float = 10.0) -> int:
    """The daemon's fd count once it is back to ``expected`` or ``timeout`` has passed: libzmq
    closes a vanished peer's socket on its I/O thread, a moment after the peer has gone."""
    deadline = time.monotonic() + timeout
    while (fds := daemon.footprint()[1]) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return fds


def test_a_flood_gets_busy_replies_and_every_accepted_request_its_result(
    start_daemon: DaemonFactory, models_dir: Path, connect: Connect
) -> None:
    """400 requests at once at a model that holds 4 at a time: the rest are refused BUSY before
    the running batch ends, the accepted ones all get results, and the control socket answers
    all the while."""
    daemon = start_daemon(slow_config(models_dir, queue_depth=4, max_batch=1))
    sock = connect(daemon.endpoint)
    big, small = (np.ones((rows, SLOW_WIDTH), np.float32) for rows in (256, 1))
    for request_id in range(1, 401):  # a long run first, then small requests: quick to send
        x = big if request_id == 1 else small
        sock.send_multipart(
            protocol.encode_request(request_id, "infer", model="slow", inputs={"x": x})
        )
    with daemon.control(timeout=5) as control:
        statuses = [control.command("status")["state"] for _ in range(5)]
    replies = []
    while len(replies) < 400:
        assert sock.poll(30000), f"{len(replies)} of 400 replies"
        replies.append(protocol.decode_reply(sock.recv_multipart()))
    outcome = Counter(r.error.code if r.error else "ok" for r in replies)
    assert sorted(r.id for r in replies) == list(range(1, 401))
    assert set(outcome) == {"ok", "BUSY"}
    assert outcome["ok"] >= 5  # the first run and the queue behind it
    first_result = next(i for i, r in enumerate(replies) if r.error is None)
    assert first_result >= 0.9 * outcome["BUSY"], "BUSY replies waited for the run"
    assert statuses == ["serving"] * 5


def test_a_flood_cannot_lock_out_a_client_that_keeps_one_request_outstanding(
    start_daemon: DaemonFactory, models_dir: Path, connect: Connect
) -> None:
    """One connection keeps a slow model's queue full, refilling it after every BUSY; another
    sends one request at a time and is admitted every time: its fair share of the queue is
    made for it by refusing the flood's newest queued request."""
    daemon = start_daemon(slow_config(models_dir, queue_depth=8, max_batch=1))
    flood = connect(daemon.endpoint)
    heavy, light = (np.ones((rows, SLOW_WIDTH), np.float32) for rows in (32, 1))
    ids = itertools.count(1)
    replies: dict[int, protocol.Reply] = {}

    def read_flood() -> protocol.Reply:
        assert flood.poll(60000), "no reply to the flood"
        reply = protocol.decode_reply(flood.recv_multipart())
        assert reply.id is not None and reply.id not in replies
        replies[reply.id] = reply
        return reply

    with daemon.client(timeout=60) as client:
        for _ in range(10):
            for _ in range(16):  # twice the queue: full once a BUSY comes back
                request_id = next(ids)
                flood.send_multipart(
                    protocol.encode_request(request_id, "infer", model="slow", inputs={"x": heavy})
                )
            while not isinstance(read_flood().error, BusyError):
                pass
            assert client.infer("slow", {"x": light})["y"].shape == (1, SLOW_WIDTH)
    sent = next(ids) - 1
    while len(replies) < sent:
        read_flood()
    outcome = Counter(r.error.code if r.error else "ok" for r in replies.values())
    assert set(outcome) == {"ok", "BUSY"} and outcome["ok"] >= 10, outcome


@pytest.mark.gguf
def test_a_flood_of_generations_cannot_lock_out_another_client(
    start_daemon: DaemonFactory, gguf_models: dict[str, Path], connect: Connect
) -> None:
    """The same fair share on a language model's queue: a connection that fills it is refused
    while another connection's generation is admitted."""
    config = llm_config(gguf_models["q8"], queue_depth=4)
    daemon = start_daemon({"models": {"llm": config}})
    flood = connect(daemon.endpoint)
    for request_id in range(1, 9):
        header = {"v": 1, "id": request_id, "op": "generate", "model": "llm"}
        flood.send(msgpack.packb({**header, "prompt": "once", "max_tokens": 64}))
    finals: dict[int, dict[str, Any]] = {}
    while not any(not r.get("ok") for r in finals.values()):  # the queue is full
        assert flood.poll(30000), "no reply to the flood"
        reply = msgpack.unpackb(flood.recv())
        if not reply.get("more"):
            finals[reply["id"]] = reply
    with daemon.client(timeout=60) as client:
        done = client.generate("llm", "next", max_tokens=2).text()
    assert done.completion_tokens == 2
    while len(finals) < 8:
        assert flood.poll(30000), "no reply to the flood"
        reply = msgpack.unpackb(flood.recv())
        if not reply.get("more"):
            finals[reply["id"]] = reply
    codes = Counter("ok" if r.get("ok") else r["error"]["code"] for r in finals.values())
    assert codes["BUSY"] >= 4 and codes["ok"] >= 3, codes


def test_a_client_that_never_reads_does_not_hold_up_others_or_grow_memory(
    demo_daemon: DaemonProcess, connect: Connect
) -> None:
    """A client sends 20 000 requests and reads none of the replies: they fill the queues between
    the daemon and it (the high-water marks), and beyond them the daemon drops its replies rather
    than buffer them. Another client, one request at a time, is served throughout (its fair
    share of the model's queue is always there), and the daemon's memory stays flat."""
    request = protocol.encode_request(1, "infer", model="demo", inputs={"x": X})
    with demo_daemon.client() as client:
        client.infer("demo", {"x": X})
        rss_before, fds_before = demo_daemon.footprint()
        deaf = connect(demo_daemon.endpoint)
        for _ in range(20_000 // 32):
            for _ in range(32):  # a burst, within the model's queue
                deaf.send_multipart(request)
            assert client.infer("demo", {"x": X})["probs"].shape == (1, 4)
        rss_during = demo_daemon.footprint()[0]
        queued = 0
        while deaf.poll(500):  # what reached the deaf client's queue before the marks were hit
            deaf.recv_multipart()
            queued += 1
        deaf.close(linger=0)
        assert client.infer("demo", {"x": X})["probs"].shape == (1, 4)
    assert 1000 <= queued < 10_000, queued
    assert rss_during < rss_before + RSS_NOISE_BYTES, (rss_before, rss_during)
    assert settled_fds(demo_daemon, fds_before) <= fds_before


def test_clients_vanishing_mid_request_leave_nothing_behind(
    start_daemon: DaemonFactory, models_dir: Path, connect: Connect
) -> None:
    """200 clients each send a slow request and close before its reply: the replies to nobody
    are dropped, and the daemon's fds and memory are as before."""
    daemon = start_daemon(slow_config(models_dir, queue_depth=256))
    x = np.ones((4, SLOW_WIDTH), np.float32)
    with daemon.client(timeout=60) as client:
        client.infer("slow", {"x": x})
        rss_before, fds_before = daemon.footprint()
        for _ in range(200):
            sock = connect(daemon.endpoint)
            sock.send_multipart(protocol.encode_request(1, "infer", model="slow", inputs={"x": x}))
            sock.close(linger=100)  # the request goes out, then the client is gone
        assert client.infer("slow", {"x": x})["y"].shape == (4, SLOW_WIDTH)  # after all of them
    assert settled_fds(daemon, fds_before) <= fds_before
    assert daemon.footprint()[0] < rss_before + RSS_NOISE_BYTES


def test_thousands_of_short_lived_connections_leave_nothing_behind(
    demo_daemon: DaemonProcess,
) -> None:
    """3000 connections, each a request, its reply and a close: fds back where they were,
    memory flat between the first hundreds and the end."""
    context: zmq.Context[Any] = zmq.Context()
    request = protocol.encode_request(1, "infer", model="demo", inputs={"x": X})

    def one_connection() -> None:
        sock = context.socket(zmq.DEALER)
        try:
            sock.connect(demo_daemon.endpoint)
            sock.send_multipart(request)
            assert sock.poll(10000), "no reply"
            assert protocol.decode_reply(sock.recv_multipart()).error is None
        finally:
            sock.close(linger=0)

    try:
        for _ in range(300):
            one_connection()
        rss_before, fds_before = demo_daemon.footprint()
        for _ in range(2700):
            one_connection()
    finally:
        context.term()
    assert settled_fds(demo_daemon, fds_before) <= fds_before
    assert demo_daemon.footprint()[0] < rss_before + RSS_NOISE_BYTES


VANISH_MID_STREAM = """
import sys
from edged.client import Client
client = Client(sys.argv[1], timeout=30)
stream = client.generate("llm", "once upon a time", max_tokens=400)
next(iter(stream))
print("streaming", flush=True)
sys.stdin.read()
"""


def test_clients_vanishing_mid_stream_free_the_model_each_time(
    start_daemon: DaemonFactory, gguf_models: dict[str, Path]
) -> None:
    """Ten client processes each start a long generation and are killed mid-stream: each
    generation stops, the next client is served at once, and no fd is left behind."""
    daemon = start_daemon({"models": {"llm": llm_config(gguf_models["q8"])}})
    with daemon.client(timeout=60) as client:
        client.generate("llm", "warm", max_tokens=4).text()
        fds_before = daemon.footprint()[1]
        for _ in range(10):
            with subprocess.Popen(
                [sys.executable, "-c", VANISH_MID_STREAM, daemon.endpoint],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            ) as proc:
                assert proc.stdout is not None and proc.stdout.readline() == "streaming\n"
                proc.kill()
            done = client.generate("llm", "next", max_tokens=4).text()
            assert done.finish_reason == "length" and done.completion_tokens == 4
    assert daemon.log().count("has gone; stopping") == 10
    assert settled_fds(daemon, fds_before) <= fds_before
