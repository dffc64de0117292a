"""Raw ZeroMQ echo, the transport part of edged's floor.

``python -m bench.echo ENDPOINT`` serves; ``echo_caller`` sends the exact frames an edged client
sends, encoded once up front, so only socket and copy costs remain in its round trip.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import zmq

from bench.harness import Call, announce_ready
from bench.workloads import CALL_TIMEOUT_S, Workload
from edged import protocol


def serve(endpoint: str) -> None:
    """A synchronous ROUTER loop: no event loop, no decoding, the cheapest server there is."""
    sock = zmq.Context().socket(zmq.ROUTER)
    sock.bind(endpoint)
    announce_ready()
    while True:
        sock.send_multipart(sock.recv_multipart(copy=False), copy=False)


@contextmanager
def echo_caller(endpoint: str, workload: Workload) -> Iterator[Call]:
    frames = protocol.encode_request(1, "infer", model=workload.model, inputs=workload.inputs())
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.rcvtimeo = int(CALL_TIMEOUT_S * 1000)  # a dead echo server fails the run, not hangs it
    sock.connect(endpoint)

    def call() -> list[bytes]:
        sock.send_multipart(frames, copy=False)
        return sock.recv_multipart()

    try:
        yield call
    finally:
        sock.close()


if __name__ == "__main__":
    serve(sys.argv[1])
