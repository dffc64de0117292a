"""The plain HTTP/JSON server edged is meant to beat, and its keep-alive client.

``python -m bench.httpjson MODEL`` serves ``POST /infer`` with ``{"inputs": {name: nested
lists}}`` -> ``{"outputs": {name: nested lists}}`` on a free localhost port it announces. This is
the obvious way to put a model behind a network API, so it is the honest thing to compare with.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from aiohttp import web

from bench.harness import Call, announce_ready
from bench.session import open_session
from bench.workloads import CALL_TIMEOUT_S, Workload

#: aiohttp refuses bodies over 1 MiB by default; an image as JSON is a few MB
MAX_BODY_BYTES = 64 * 1024 * 1024
JSON_HEADERS = {"Content-Type": "application/json"}


def make_app(model_path: str) -> web.Application:
    session = open_session(model_path)
    output_names = [output.name for output in session.get_outputs()]

    async def infer(request: web.Request) -> web.Response:
        body = await request.json()
        # every benchmark input is float32, as the models declare
        inputs = {name: np.asarray(v, dtype=np.float32) for name, v in body["inputs"].items()}
        outputs = session.run(output_names, inputs)
        return web.json_response(
            {
                "outputs": {
                    name: out.tolist() for name, out in zip(output_names, outputs, strict=True)
                }
            }
        )

    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app.router.add_post("/infer", infer)
    return app


async def serve(model_path: str) -> None:
    runner = web.AppRunner(make_app(model_path), access_log=None)
    await runner.setup()
    sock = socket.create_server(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    announce_ready(f"127.0.0.1:{sock.getsockname()[1]}")
    await asyncio.Event().wait()  # until SIGTERM


@contextmanager
def http_caller(address: str, workload: Workload) -> Iterator[Call]:
    """One keep-alive connection; JSON both ways and arrays back, like edged's client returns."""
    inputs = workload.inputs()
    conn = http.client.HTTPConnection(address, timeout=CALL_TIMEOUT_S)

    def call() -> dict[str, np.ndarray[Any, Any]]:
        body = json.dumps({"inputs": {name: array.tolist() for name, array in inputs.items()}})
        conn.request("POST", "/infer", body=body, headers=JSON_HEADERS)
        response = conn.getresponse()
        payload = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {payload[:200]!r}")
        outputs = json.loads(payload)["outputs"]
        return {name: np.asarray(v, dtype=np.float32) for name, v in outputs.items()}

    try:
        yield call
    finally:
        conn.close()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1]))
