"""Closed-loop load from CLIENTS processes: each sends one request, waits, sends the next.

Processes rather than threads, as real sensor processes are, so client-side Python is not
serialised on one GIL. The same workers load the targets in turn, in slices, so a noisy
neighbour hits all targets alike; a barrier starts each slice in all of them at once.
"""

from __future__ import annotations

import multiprocessing
import queue
import time
from collections import Counter
from collections.abc import Mapping
from contextlib import ExitStack
from multiprocessing.context import SpawnProcess
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from typing import TypeAlias

from bench.harness import Settings, repeat_for
from bench.workloads import Target, Workload, open_calls

CLIENTS = 16
#: spawning 16 interpreters that import numpy and zmq takes a while on a slow 2-core box
BARRIER_TIMEOUT_S = 120.0
JOIN_TIMEOUT_S = 5.0
ERROR = "error"

#: what a worker reports per target: (label, request count), or (ERROR, message)
Results: TypeAlias = "Queue[tuple[str, int | str]]"  # not subscriptable at run time


def closed_loop_rates(
    targets: Mapping[str, Target], workload: Workload, settings: Settings
) -> dict[str, float]:
    """Requests per second for each target, with all CLIENTS processes loading it at once."""
    # spawn, not fork: no ZeroMQ context or onnxruntime thread pool is inherited half-alive
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(CLIENTS)
    results: Results = context.Queue()
    workers = [
        context.Process(target=_worker, args=(targets, workload, settings, barrier, results))
        for _ in range(CLIENTS)
    ]
    for worker in workers:
        worker.start()
    try:
        counts = _collect(results, CLIENTS * len(targets) * settings.load_rounds, settings)
    finally:
        _stop(workers)
    return {label: counts[label] / settings.load_s for label in targets}


def _collect(results: Results, expected: int, settings: Settings) -> Counter[str]:
    counts: Counter[str] = Counter()
    timeout = BARRIER_TIMEOUT_S + settings.load_s
    for _ in range(expected):
        try:
            label, count = results.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"a load worker sent nothing for {timeout:.0f} s") from None
        if isinstance(count, str):
            raise RuntimeError(f"a load worker failed: {count}")
        counts[label] += count
    return counts


def _worker(
    targets: Mapping[str, Target],
    workload: Workload,
    settings: Settings,
    barrier: Barrier,
    results: Results,
) -> None:
    slice_s = settings.load_s / settings.load_rounds
    try:
        with ExitStack() as stack:
            calls = open_calls(stack, targets, workload)
            for call in calls.values():
                repeat_for(call, settings.warmup_s, at_least=3)
            for _ in range(settings.load_rounds):
                for label, call in calls.items():
                    barrier.wait(BARRIER_TIMEOUT_S)
                    results.put((label, len(repeat_for(call, slice_s, at_least=1))))
    except Exception as exc:  # reported to the parent, which fails the benchmark with it
        results.put((ERROR, f"{type(exc).__name__}: {exc}"))
        barrier.abort()  # release the others at once instead of after BARRIER_TIMEOUT_S


def _stop(workers: list[SpawnProcess]) -> None:
    """Workers end by themselves after the last slice; kill whatever has not by the deadline."""
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))
        if worker.is_alive():
            worker.kill()
            worker.join()
