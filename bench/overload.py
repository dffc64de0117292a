"""Overload: how long a request waits to be told BUSY while its model is saturated.

``python -m bench.overload ENDPOINT`` is the flood: one process keeping more requests in flight
at the image model than its queue holds, each a batch of FLOOD_ROWS images so that a slot frees
only once per long run, and resending as each reply comes, so the queue is full again at once.
Meanwhile ``busy_spans`` times single-image requests from this process; the ones refused BUSY
show how fast a full queue says so (the few that slip into a freed slot are counted, not timed).
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np
import zmq

from bench.harness import announce_ready
from bench.workloads import CALL_TIMEOUT_S, IMAGE
from edged import protocol

QUEUE_DEPTH = 4
#: the run, a full queue, and one more, refused and resent at once to take a slot as it frees
IN_FLIGHT = QUEUE_DEPTH + 2
FLOOD_ROWS = 4


def declaration(path: str) -> dict[str, object]:
    """The image model with a short queue, each request run on its own."""
    return {"path": path, "preload": True, "queue_depth": QUEUE_DEPTH, "max_batch": 1}


def flood(endpoint: str) -> None:
    images = np.repeat(IMAGE.inputs()[IMAGE.input_name], FLOOD_ROWS, axis=0)
    frames = protocol.encode_request(
        1, "infer", model=IMAGE.model, inputs={IMAGE.input_name: images}
    )
    sock: zmq.Socket[bytes] = zmq.Context().socket(zmq.DEALER)
    sock.connect(endpoint)
    for _ in range(IN_FLIGHT):
        sock.send_multipart(frames, copy=False)
    sock.recv_multipart()
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

    def p99_us(self) -> float:
        return statistics.quantiles(self.spans, n=100, method="inclusive")[98] * 1e6


def busy_spans(endpoint: str, requests: int) -> BusySpans:
    frames = protocol.encode_request(1, "infer", model=IMAGE.model, inputs=IMAGE.inputs())
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.rcvtimeo = int(CALL_TIMEOUT_S * 1000)
    sock.connect(endpoint)
    spans: list[float] = []
    admitted = 0
    try:
        for _ in range(requests):
            started = time.perf_counter()
            sock.send_multipart(frames, copy=False)
            reply = protocol.decode_reply(sock.recv_multipart())
            span = time.perf_counter() - started
            if reply.error is not None and reply.error.code == "BUSY":
                spans.append(span)
            else:
                admitted += 1
    finally:
        sock.close()
    return BusySpans(spans, admitted)


if __name__ == "__main__":
    flood(sys.argv[1])
