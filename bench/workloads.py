"""The two requests the benchmarks send, and the edged and bare-onnxruntime ways to send them.

A *caller* is a context manager ``caller(target, workload)`` yielding a ``Call``: the target is
whatever says where to send (an endpoint, an address, a model path). Callers are module-level
so the throughput benchmark can hand them to spawned worker processes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness import Call
from bench.session import open_session
from edged.client import Client
from edged.demo import DEMO_FEATURES, IMAGE_SHAPE, build_demo_model, build_image_model

#: generous: a slow box under 16-process load must not turn a slow reply into a failed run
CALL_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Workload:
    name: str
    #: the model's name in the daemon config
    model: str
    input_name: str
    shape: tuple[int, ...]
    build: Callable[[Path], Path]

    def inputs(self) -> dict[str, np.ndarray[Any, Any]]:
        """Deterministic float32 input, so every process sends the same bytes."""
        rng = np.random.default_rng(0)
        return {self.input_name: rng.standard_normal(self.shape, dtype=np.float32)}


Caller = Callable[[str, Workload], AbstractContextManager[Call]]
#: a caller and its target, e.g. ``(edged_caller, endpoint)``
Target = tuple[Caller, str]

TINY = Workload("tiny", "demo", "x", (1, DEMO_FEATURES), build_demo_model)
IMAGE = Workload("image", "image", "image", (1, *IMAGE_SHAPE), build_image_model)
WORKLOADS = (TINY, IMAGE)


def open_calls(
    stack: ExitStack, targets: Mapping[str, Target], workload: Workload
) -> dict[str, Call]:
    """Open every target's caller at once, closed with ``stack``, so the calls can take turns."""
    return {
        label: stack.enter_context(caller(target, workload))
        for label, (caller, target) in targets.items()
    }


@contextmanager
def edged_caller(endpoint: str, workload: Workload) -> Iterator[Call]:
    """Through edged's own blocking client, as a sensor process would call it."""
    inputs = workload.inputs()
    with Client(endpoint, timeout=CALL_TIMEOUT_S) as client:
        yield lambda: client.infer(workload.model, inputs)


@contextmanager
def region_caller(endpoint: str, workload: Workload) -> Iterator[Call]:
    """Through edged's client, the inputs in a shared-memory region: sent as references."""
    inputs = workload.inputs()
    with Client(endpoint, timeout=CALL_TIMEOUT_S) as client:
        region = client.region(sum(array.nbytes for array in inputs.values()), workload.name)
        placed, offset = {}, 0
        for name, array in inputs.items():
            placed[name] = region.array(array.shape, array.dtype, offset)
            placed[name][...] = array
            offset += array.nbytes
        yield lambda: client.infer(workload.model, placed)


@contextmanager
def ort_caller(model_path: str, workload: Workload) -> Iterator[Call]:
    """The model run alone, in this process: the compute part of edged's floor."""
    session = open_session(model_path)
    inputs = workload.inputs()
    yield lambda: session.run(None, inputs)
