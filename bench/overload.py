"""Overload: how long a request waits to be told BUSY while its model is saturated.

``python -m bench.overload ENDPOINT WORKLOAD`` is the flood: one process keeping its share of
the model's queue full (each connection may queue only its fair share, FLOOD_SHARE of the
QUEUE_DEPTH here) plus the run, each request a batch of FLOOD_ROWS rows so that a slot frees
only once per long run, and resending as each reply comes. Meanwhile ``busy_spans`` holds this
process's own share with requests of its own and times one-row requests sent beyond it: the
daemon refuses those at once, and that refusal is what is timed (spans during which a held
request came back and was re-sent are left out; requests that found room are counted, not
timed). Two workloads: camera frames (the image model, 600 KB a request) and a sensor vector (a
slow model taking 2 KB), so the transport of a large frame does not hide the refusal.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq

from bench.harness import announce_ready
from bench.workloads import CALL_TIMEOUT_S, IMAGE, Workload
from edged import protocol
from tests.models import SLOW_WIDTH, build_slow_model

QUEUE_DEPTH = 4
#: each of the two connections' share of the queue (runner.FairShare: depth / connections)
FLOOD_SHARE = QUEUE_DEPTH // 2
#: the flood's run and its share; a reply makes room, and the resend right behind it takes the
#: slot again (more in flight would spin on BUSY replies, and measure a box with no idle core)
IN_FLIGHT = FLOOD_SHARE + 1
#: request ids of the timed requests and of the ones that hold the timing connection's share
TIMED_ID, HELD_ID = 1, 2
SENSOR = Workload("sensor", "slow", "x", (1, SLOW_WIDTH), build_slow_model)
WORKLOADS = {w.name: w for w in (IMAGE, SENSOR)}
#: rows per flood request: each run a few tens of milliseconds here
FLOOD_ROWS = {IMAGE.name: 4, SENSOR.name: 64}


def declaration(path: str) -> dict[str, object]:
    """The model with a short queue, each request run on its own, on one onnxruntime thread: on
    a 2-core box the default (all cores) leaves the event loop no core to answer from."""
    return {
        "path": path,
        "preload": True,
        "queue_depth": QUEUE_DEPTH,
        "max_batch": 1,
        "onnx": {"intra_op_threads": 1},
    }


def flood_frames(workload: Workload, request_id: int) -> list[Any]:
    """One flood request: FLOOD_ROWS rows, a run of a few tens of milliseconds."""
    rows = np.repeat(workload.inputs()[workload.input_name], FLOOD_ROWS[workload.name], axis=0)
    return protocol.encode_request(
        request_id, "infer", model=workload.model, inputs={workload.input_name: rows}
    )


def flood(endpoint: str, workload: Workload) -> None:
    frames = flood_frames(workload, 1)
    sock: zmq.Socket[bytes] = zmq.Context().socket(zmq.DEALER)
    sock.connect(endpoint)
    for _ in range(IN_FLIGHT):
        sock.send_multipart(frames, copy=False)
    announce_ready()
    while True:
        sock.recv_multipart()
        sock.send_multipart(frames, copy=False)


@dataclass(frozen=True)
class BusySpans:
    #: seconds from send to a BUSY reply, one per refused request
    spans: list[float]
    #: requests that found room in the queue after all
    admitted: int


def busy_spans(endpoint: str, workload: Workload, requests: int) -> BusySpans:
    frames = protocol.encode_request(
        TIMED_ID, "infer", model=workload.model, inputs=workload.inputs()
    )
    held = flood_frames(workload, HELD_ID)
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.rcvtimeo = int(CALL_TIMEOUT_S * 1000)
    sock.connect(endpoint)
    spans: list[float] = []
    admitted = 0
    try:
        for _ in range(
            FLOOD_SHARE
        ):  # this connection's share, held: what it sends beyond is refused
            sock.send_multipart(held, copy=False)
        for _ in range(requests):
            started = time.perf_counter()
            sock.send_multipart(frames, copy=False)
            disturbed = False
            while (reply := protocol.decode_reply(sock.recv_multipart())).id != TIMED_ID:
                sock.send_multipart(held, copy=False)  # a held request ended: hold its place again
                disturbed = True
            span = time.perf_counter() - started
            if reply.error is None or reply.error.code != "BUSY":
                admitted += 1
            elif not disturbed:
                spans.append(span)
    finally:
        sock.close()
    return BusySpans(spans, admitted)


if __name__ == "__main__":
    flood(sys.argv[1], WORKLOADS[sys.argv[2]])
