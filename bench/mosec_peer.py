"""mosec, a model server with a Rust HTTP front and Python workers, as a peer of edged.

``python -m bench.mosec_peer MODEL`` serves ``POST /inference`` in mosec's msgpack mode on a free
localhost port, announced once a real inference has been answered. One worker, no batching: the
per-request path edged takes for a single client, with the session set up as edged's.

Tensors travel as ``{name: {"data": raw bytes, "shape": [...], "dtype": "<f4"}}`` both ways, not
as nested lists: msgpack packs bytes with one copy but every float of a list as its own
float64, so lists would measure number encoding in Python, not the server. Raw bytes described
by a header are also what edged's own frames carry, so both sides move the same information.
"""

from __future__ import annotations

import http.client
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import msgpack
import numpy as np
from mosec import Server, Worker
from mosec.log import MOSEC_LOG_NAME
from mosec.mixin import MsgpackMixin

from bench.harness import START_TIMEOUT_S, Call, announce_ready
from bench.session import open_session
from bench.workloads import CALL_TIMEOUT_S, Workload

ROUTE = "/inference"
MSGPACK_HEADERS = {"Content-Type": "application/msgpack"}
#: how the model path reaches the worker, which mosec starts with no arguments
MODEL_ENV = "EDGED_BENCH_MOSEC_MODEL"
POLL_INTERVAL_S = 0.05
ORPHAN_POLL_S = 0.5

Arrays = Mapping[str, np.ndarray[Any, Any]]
Tensors = dict[str, dict[str, Any]]


def pack(arrays: Arrays) -> Tensors:
    return {
        name: {"data": array.tobytes(), "shape": list(array.shape), "dtype": array.dtype.str}
        for name, array in arrays.items()
    }


def unpack(tensors: Mapping[str, Mapping[str, Any]]) -> dict[str, np.ndarray[Any, Any]]:
    return {
        name: np.frombuffer(t["data"], dtype=t["dtype"]).reshape(t["shape"])
        for name, t in tensors.items()
    }


def stop_group_when_orphaned(parent: int) -> None:
    """Kill this process group once mosec's main process is gone.

    mosec stops its Rust server and its worker on SIGTERM, but a SIGKILL (``ServerProcess``'s
    last resort) would leave both running, the port held.
    """
    while os.getppid() == parent:
        time.sleep(ORPHAN_POLL_S)
    os.killpg(0, signal.SIGKILL)


class OnnxWorker(MsgpackMixin, Worker):
    """The model's session, opened in mosec's worker process."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        threading.Thread(target=stop_group_when_orphaned, args=(os.getppid(),), daemon=True).start()
        self.session = open_session(os.environ[MODEL_ENV])
        self.output_names = [output.name for output in self.session.get_outputs()]

    def forward(self, data: Any) -> Any:
        outputs = self.session.run(self.output_names, unpack(data))
        return pack(dict(zip(self.output_names, outputs, strict=True)))


def free_port() -> int:
    """A port free now; mosec binds it itself, a moment later."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        port: int = sock.getsockname()[1]
    return port


def infer(conn: http.client.HTTPConnection, body: bytes) -> Tensors:
    conn.request("POST", ROUTE, body=body, headers=MSGPACK_HEADERS)
    response = conn.getresponse()
    payload = response.read()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {payload[:200]!r}")
    outputs: Tensors = msgpack.unpackb(payload)
    return outputs


def probe_body(model_path: str) -> bytes:
    """Zeros for every input, as float32 like every benchmark input; free dimensions as 1."""
    inputs = open_session(model_path).get_inputs()
    zeros = {
        i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], np.float32)
        for i in inputs
    }
    return msgpack.packb(pack(zeros))


def announce_when_serving(address: str, model_path: str) -> None:
    """Announce once an inference succeeds: the HTTP port opens before the worker is up."""
    body = probe_body(model_path)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection(address, timeout=CALL_TIMEOUT_S)
        try:
            infer(conn, body)
        except (OSError, http.client.HTTPException, RuntimeError):
            time.sleep(POLL_INTERVAL_S)
            continue
        finally:
            conn.close()
        announce_ready(address)
        return


def serve(model_path: str) -> None:
    """Run mosec until SIGTERM or SIGINT, on which it stops its Rust server and its worker."""
    os.setpgrp()  # the group stop_group_when_orphaned kills: this process and mosec's
    port = free_port()
    # mosec reads its settings from the command line or MOSEC_* variables; ours is the model.
    # Its log level was read on import, so this process's logger is quietened by hand.
    os.environ.update(MOSEC_ADDRESS="127.0.0.1", MOSEC_PORT=str(port), MOSEC_LOG_LEVEL="warning")
    logging.getLogger(MOSEC_LOG_NAME).setLevel(logging.WARNING)
    # mosec is typed but leaves these (and Worker.__init__) unannotated
    server = Server()  # type: ignore[no-untyped-call]
    server.append_worker(OnnxWorker, num=1, max_batch_size=1, env=[{MODEL_ENV: model_path}])
    address = f"127.0.0.1:{port}"
    threading.Thread(target=announce_when_serving, args=(address, model_path), daemon=True).start()
    server.run()  # type: ignore[no-untyped-call]


@contextmanager
def mosec_caller(address: str, workload: Workload) -> Iterator[Call]:
    """One keep-alive connection; msgpack both ways and arrays back, like edged's client returns."""
    inputs = workload.inputs()
    conn = http.client.HTTPConnection(address, timeout=CALL_TIMEOUT_S)

    def call() -> dict[str, np.ndarray[Any, Any]]:
        return unpack(infer(conn, msgpack.packb(pack(inputs))))

    try:
        yield call
    finally:
        conn.close()


if __name__ == "__main__":
    serve(sys.argv[1])
