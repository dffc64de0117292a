"""``make soak``: ``python -m bench.soak [--minutes M]`` runs one daemon under mixed load for a
while (default 10 minutes) and reports whether it stayed whole.

The load: INFER_CLIENTS processes inferring the demo model in a closed loop (each output checked
against the version its reply names), one process streaming generations from a tiny llama GGUF,
one process sending bad messages that must each get their own error code, and this process
swapping the demo model between its two stored versions every SWAP_PERIOD_S. Memory and file
descriptors are read after a warm-up and at the end; the rows (failed requests against served,
RSS and fds at the end against after the warm-up) are merged into bench/results.json.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from bench.harness import Row, format_table, merge_results
from bench.swap import Expected, checked_caller, expected_outputs
from bench.workloads import TINY
from edged import protocol
from edged.client import Client
from edged.demo import build_demo_model
from edged.errors import EdgedError
from edged.store import ModelStore
from edged.testing import DaemonProcess

RESULTS_PATH = Path(__file__).resolve().parent / "results.json"
MIB = 1024 * 1024
INFER_CLIENTS = 3
SWAP_PERIOD_S = 10.0
BAD_PERIOD_S = 0.05
WARMUP_S = 10.0
PROGRESS_PERIOD_S = 60.0
LLM = "llm"
MAX_TOKENS = 16
STOP_TIMEOUT_S = 30.0
#: (what is wrong, the request's frames, the code it must get)
BadMessage = tuple[str, list[Any], str]


def bad_messages() -> list[BadMessage]:
    """One of each kind of mistake a sensor process makes, with the error it must get."""
    x = np.zeros((1, 16), np.float32)
    infer = protocol.encode_request(1, "infer", model=TINY.model, inputs={"x": x})
    return [
        ("not msgpack", [b"\xc1garbage"], "BAD_REQUEST"),
        (
            "unknown model",
            protocol.encode_request(1, "infer", model="nope", inputs={"x": x}),
            "UNKNOWN_MODEL",
        ),
        (
            "wrong shape",
            protocol.encode_request(1, "infer", model=TINY.model, inputs={"x": x[:, :15]}),
            "SHAPE_MISMATCH",
        ),
        ("short tensor frame", [infer[0], bytes(infer[1])[:-4]], "FRAME_MISMATCH"),
        (
            "generate on ONNX",
            protocol.encode_request(1, "generate", model=TINY.model, fields={"prompt": "hi"}),
            "OP_NOT_SUPPORTED",
        ),
        (
            "prompt past n_ctx",
            protocol.encode_request(
                1, "generate", model=LLM, fields={"prompt": "hi", "max_tokens": 100_000}
            ),
            "CONTEXT_OVERFLOW",
        ),
    ]


def infer_worker(endpoint: str, expected: Expected, stop: Event, results: Queue[Any]) -> None:
    served, failed = 0, Counter[str]()
    with checked_caller(endpoint, TINY, expected) as call:
        while not stop.is_set():
            error = call()
            if isinstance(error, str):
                failed[error] += 1
            else:
                served += 1
    results.put(("infer", served, dict(failed)))


def generate_worker(endpoint: str, stop: Event, results: Queue[Any]) -> None:
    served, failed = 0, Counter[str]()
    with Client(endpoint, timeout=30) as client:
        while not stop.is_set():
            try:
                done = client.generate(LLM, "the soak", max_tokens=MAX_TOKENS).text()
            except EdgedError as exc:
                failed[f"{exc.code}: {exc}"] += 1
                continue
            if done.completion_tokens == MAX_TOKENS:
                served += 1
            else:
                failed[f"{done.completion_tokens} tokens, finish {done.finish_reason}"] += 1
    results.put(("generate", served, dict(failed)))


def bad_worker(endpoint: str, stop: Event, results: Queue[Any]) -> None:
    """Bad messages, in turn; each must get its own error code, and any other reply fails."""
    messages = bad_messages()
    answered, failed = 0, Counter[str]()
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(endpoint)
    try:
        while not stop.wait(BAD_PERIOD_S):
            what, frames, code = messages[answered % len(messages)]
            sock.send_multipart(frames)
            if not sock.poll(30_000):
                failed[f"{what}: no reply"] += 1
                continue
            reply = protocol.decode_reply(sock.recv_multipart())
            got = reply.error.code if reply.error else "ok"
            if got != code:
                failed[f"{what}: {got} instead of {code}"] += 1
            answered += 1
    finally:
        sock.close(linger=0)
    results.put(("bad", answered, dict(failed)))


def build_models(workdir: Path) -> tuple[dict[str, Any], Expected]:
    """The daemon's config (demo versions 1 and 2 in its store, the tiny llama) and each demo
    version's expected outputs."""
    from edged.tinyllama import build_tiny_llama

    versions = [build_demo_model(workdir / f"demo-{seed}.onnx", seed=seed) for seed in (0, 1)]
    store = ModelStore(workdir / "state" / "models")
    for path in versions:
        store.add(TINY.model, path, "onnx")
    llm = build_tiny_llama(workdir / "llm.gguf", quantize="Q8_0")
    models = {
        TINY.model: {"path": "", "version": 1, "preload": True, "max_batch": 8},
        LLM: {"path": str(llm), "preload": True, "gguf": {"n_ctx": 512, "n_threads": 1}},
    }
    expected = {n: expected_outputs(path, TINY) for n, path in enumerate(versions, 1)}
    return {"models": models}, expected


def soak(seconds: float, workdir: Path) -> list[Row]:
    config, expected = build_models(workdir)
    spawn = multiprocessing.get_context("spawn")
    stop = spawn.Event()
    results: Queue[Any] = spawn.Queue()
    with DaemonProcess(workdir, config) as daemon:
        workers: list[Callable[[], None]] = [
            *[partial(infer_worker, daemon.endpoint, expected, stop, results)] * INFER_CLIENTS,
            partial(generate_worker, daemon.endpoint, stop, results),
            partial(bad_worker, daemon.endpoint, stop, results),
        ]
        processes = [spawn.Process(target=worker) for worker in workers]
        for process in processes:
            process.start()
        swaps = 0
        try:
            with daemon.control() as control:
                time.sleep(WARMUP_S)
                start = daemon.footprint()
                began = last_swap = last_progress = time.monotonic()
                version = 1
                while (now := time.monotonic()) < began + seconds:
                    if now >= last_swap + SWAP_PERIOD_S:
                        version = 3 - version
                        control.command("swap", model=TINY.model, version=version, policy="overlap")
                        swaps, last_swap = swaps + 1, now
                    if now >= last_progress + PROGRESS_PERIOD_S:
                        rss, fds = daemon.footprint()
                        progress = f"RSS {rss / MIB:.1f} MiB, {fds} fds, {swaps} swaps"
                        print(f"soak: {now - began:.0f} s, {progress}", file=sys.stderr, flush=True)
                        last_progress = now
                    time.sleep(0.2)
                end = daemon.footprint()
        finally:
            stop.set()
            reports = [results.get(timeout=STOP_TIMEOUT_S) for _ in processes]
            for process in processes:
                process.join(STOP_TIMEOUT_S)
    return summarize(reports, swaps, start, end, seconds)


def summarize(
    reports: Sequence[tuple[str, int, dict[str, int]]],
    swaps: int,
    start: tuple[int, int],
    end: tuple[int, int],
    seconds: float,
) -> list[Row]:
    served = Counter[str]()
    failures = Counter[str]()
    for kind, count, failed_by_reason in reports:
        served[kind] += count
        failures.update(failed_by_reason)
    failed = sum(failures.values())
    print(
        f"soak: {seconds / 60:.1f} min, {swaps} swaps; served {dict(served)} "
        f"(bad messages: each answered with its own error code); failed {failed}",
        file=sys.stderr,
    )
    for message, count in failures.most_common(10):
        print(f"soak:   {count} x {message}", file=sys.stderr)
    total = float(sum(served.values()) + failed)
    return [
        Row("soak_failed", "failed", "requests", float(failed), "requests sent", total),
        Row("soak_rss", "rss_end", "MiB", end[0] / MIB, "rss after warm-up", start[0] / MIB),
        Row("soak_fds", "fds_end", "fds", float(end[1]), "fds after warm-up", float(start[1])),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0, help="how long (default 10)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="edged-soak-", dir="/tmp") as workdir:
        rows = soak(args.minutes * 60, Path(workdir))
    merge_results(rows, RESULTS_PATH)
    print(format_table(rows))
    return 0 if rows[0].value == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
