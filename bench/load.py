"""Closed-loop load from client processes: each sends one request, waits, sends the next.

Processes rather than threads, as real sensor processes are, so client-side Python is not
serialised on one GIL. The same workers load the targets in turn, in slices, so a noisy
neighbour hits all targets alike; a barrier starts each slice in all of them at once, and in
this process, which can act on the daemon while a slice runs (see ``closed_loop``).
"""

from __future__ import annotations

import multiprocessing
import queue
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from multiprocessing.context import SpawnProcess
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from typing import Any, Generic, TypeAlias, TypeVar

from bench.harness import Call, Settings, repeat_for
from bench.workloads import Target, Workload, open_calls

CLIENTS = 16
#: spawning 16 interpreters that import numpy and zmq takes a while on a slow 2-core box
BARRIER_TIMEOUT_S = 120.0
JOIN_TIMEOUT_S = 5.0
ERROR = "error"

T = TypeVar("T")
#: what a worker reports per slice: (label, what ``Load.measure`` returned), or (ERROR, message)
Results: TypeAlias = "Queue[tuple[str, Any]]"  # not subscriptable at run time


@dataclass(frozen=True)
class Load(Generic[T]):
    """``clients`` processes calling every target in turn, ``rounds`` slices of each.

    Everything here reaches the spawned workers pickled: callers and ``measure`` are
    module-level functions (or partials of them).
    """

    targets: Mapping[str, Target]
    workload: Workload
    #: one worker's slice: the target's call and the slice's seconds in, the measurement out
    measure: Callable[[Call, float], T]
    #: per target, over all its slices
    seconds: float
    rounds: int
    warmup_s: float
    clients: int = CLIENTS

    @property
    def slice_s(self) -> float:
        return self.seconds / self.rounds


def count_calls(call: Call, seconds: float) -> int:
    """Requests answered in a slice."""
    return len(repeat_for(call, seconds, at_least=1))


def closed_loop_rates(
    targets: Mapping[str, Target], workload: Workload, settings: Settings
) -> dict[str, float]:
    """Requests per second for each target, with all CLIENTS processes loading it at once."""
    load = Load(
        targets, workload, count_calls, settings.load_s, settings.load_rounds, settings.warmup_s
    )
    counts = closed_loop(load)
    return {label: sum(counts[label]) / settings.load_s for label in targets}


def _idle(label: str, seconds: float) -> None:
    """Nothing to do while a slice runs."""


def closed_loop(load: Load[T], during: Callable[[str, float], None] = _idle) -> dict[str, list[T]]:
    """Every worker's measurement of every slice, by target label.

    ``during(label, seconds)`` runs in this process from the start of each slice of ``label``;
    the next slice starts once it has returned and every worker has finished this one.
    """
    # spawn, not fork: no ZeroMQ context or onnxruntime thread pool is inherited half-alive
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(load.clients + 1)  # the workers and this process
    results: Results = context.Queue()
    workers = [
        context.Process(target=_worker, args=(load, barrier, results)) for _ in range(load.clients)
    ]
    for worker in workers:
        worker.start()
    try:
        try:
            for _ in range(load.rounds):
                for label in load.targets:
                    barrier.wait(BARRIER_TIMEOUT_S)
                    during(label, load.slice_s)
        except threading.BrokenBarrierError:
            pass  # a worker failed; _collect raises with its reason
        return _collect(results, load.clients * len(load.targets) * load.rounds, load)
    finally:
        barrier.abort()  # workers waiting for a slice that will not come give up at once
        _stop(workers)


def _collect(results: Results, expected: int, load: Load[T]) -> dict[str, list[T]]:
    measured: dict[str, list[T]] = {label: [] for label in load.targets}
    timeout = BARRIER_TIMEOUT_S + load.seconds
    for _ in range(expected):
        try:
            label, measurement = results.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"a load worker sent nothing for {timeout:.0f} s") from None
        if label == ERROR:
            raise RuntimeError(f"a load worker failed: {measurement}")
        measured[label].append(measurement)
    return measured


def _worker(load: Load[T], barrier: Barrier, results: Results) -> None:
    try:
        with ExitStack() as stack:
            calls = open_calls(stack, load.targets, load.workload)
            for call in calls.values():
                repeat_for(call, load.warmup_s, at_least=3)
            for _ in range(load.rounds):
                for label, call in calls.items():
                    barrier.wait(BARRIER_TIMEOUT_S)
                    results.put((label, load.measure(call, load.slice_s)))
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
