"""Serving language models: parallel streams from one model, and edged against llama-cpp-python's
own OpenAI server on the same GGUF.

Rates are tokens over the time from sending a request to its last token; every request starts
with another word (``llm.prompts``), so no side serves a prompt from a cache the other lacks.
HTTP sides are read by one small SSE reader over ``http.client``, the same for both servers, so
the client's cost is alike.
"""

from __future__ import annotations

import http.client
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness import Settings
from bench.llm import prompt
from edged.client import Client
from edged.config import GgufOptions

SERVER_START_S = 120.0


@dataclass(frozen=True)
class Stream:
    """One streamed generation: seconds to its first text and to its end, and its tokens."""

    ttft_s: float
    total_s: float
    tokens: int


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def stream_edged(client: Client, model: str, text: str, max_tokens: int) -> Stream:
    started = time.perf_counter()
    stream = client.generate(model, text, max_tokens=max_tokens, temperature=0.0)
    first = 0.0
    for _ in stream:
        first = first or time.perf_counter() - started
    total = time.perf_counter() - started
    return Stream(first, total, stream.completion.completion_tokens)


def stream_http(port: int, model: str, text: str, max_tokens: int) -> Stream:
    """A streamed ``/v1/completions``, greedy with no penalty; tokens are the chunks with text
    (one per token on both servers, the last one aside)."""
    body = {
        "model": model,
        "prompt": text,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "repeat_penalty": 1.0,  # llama-cpp-python's server would apply 1.1
        "stream": True,
    }
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    started = time.perf_counter()
    connection.request(
        "POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"}
    )
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
    first, finish = 0.0, None
    for line in response:
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        choice = json.loads(line[6:])["choices"][0]
        if choice.get("text"):
            first = first or time.perf_counter() - started
        finish = choice.get("finish_reason") or finish
    total = time.perf_counter() - started
    connection.close()
    if finish != "length":
        raise RuntimeError(f"a generation ended with {finish!r}, not 'length'")
    return Stream(first, total, max_tokens)


@contextmanager
def llama_server(path: Path, options: GgufOptions) -> Iterator[int]:
    """llama-cpp-python's OpenAI server on ``path`` with the daemon's context settings; its
    port once it answers."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(path),
        "--model_alias",
        "llm",
        "--n_ctx",
        str(options.n_ctx),
        "--n_batch",
        str(options.n_batch),
        "--n_threads",
        str(options.n_threads),
        "--n_threads_batch",
        str(options.n_threads),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_http(port, proc)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def wait_http(port: int, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Until ``GET /v1/models`` answers 200 on ``port``."""
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/v1/models")
            if connection.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"nothing answered on port {port}")


def concurrent_streams(
    endpoint: str, model: str, streams: int, lead: int, tokens: int
) -> tuple[float, list[float]]:
    """``streams`` generations sent at once from as many clients: aggregate tokens/s from the
    first send to the last token, and each stream's seconds to its first text."""
    results: list[Stream] = []
    lock = threading.Lock()
    barrier = threading.Barrier(streams)

    def run(index: int) -> None:
        with Client(endpoint, timeout=120) as client:
            barrier.wait()
            done = stream_edged(client, model, prompt(lead + index, 8), tokens)
        with lock:
            results.append(done)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if sum(r.tokens for r in results) != streams * tokens:
        raise RuntimeError("a stream ended early")
    return streams * tokens / wall, [r.ttft_s for r in results]


def parallel_rates(
    endpoint: str, model: str, streams: int, tokens: int, settings: Settings
) -> dict[str, float]:
    """Median aggregate tokens/s and p50 TTFT (ms) with 1 stream and with ``streams`` at once,
    rounds of each taking turns."""
    single: list[float] = []
    many: list[float] = []
    ttft_single: list[float] = []
    ttft_many: list[float] = []
    lead = 0
    for _ in range(max(settings.rounds, 3)):
        with Client(endpoint, timeout=120) as client:
            done = stream_edged(client, model, prompt(lead, 8), tokens)
        single.append(tokens / done.total_s)
        ttft_single.append(done.ttft_s)
        rate, ttfts = concurrent_streams(endpoint, model, streams, lead + 1, tokens)
        many.append(rate)
        ttft_many += ttfts
        lead += streams + 1
    return {
        "single": statistics.median(single),
        "many": statistics.median(many),
        "ttft_single_ms": statistics.median(ttft_single) * 1e3,
        "ttft_many_ms": statistics.median(ttft_many) * 1e3,
    }


def side_by_side(sides: dict[str, Any], tokens: int, settings: Settings) -> dict[str, Stream]:
    """Each side's median stream: ``sides`` maps a label to a function of (prompt text) that
    streams one generation; rounds of each take turns."""
    spans: dict[str, list[Stream]] = {label: [] for label in sides}
    lead = 0
    for _ in range(max(settings.rounds, 3)):
        for _ in range(3):
            for label, run in sides.items():
                spans[label].append(run(prompt(lead, 8)))
                lead += 1
    return {
        label: Stream(
            statistics.median(s.ttft_s for s in found),
            statistics.median(s.total_s for s in found),
            tokens,
        )
        for label, found in spans.items()
    }
