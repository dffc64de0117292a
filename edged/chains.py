"""Chains: models run one after the other for one request, where fusing their graphs is not
possible (a detector whose crops feed a classifier, an embedding model after a detector).

A client infers on a chain as on a model. Each step is an ordinary ``infer`` on its model,
handed to the inference service with the request's id, peer and what is left of its deadline,
so it queues, batches, loads and is charged to the budget as any other request of that model.
Between steps the daemon cuts the
request's frame at the previous step's boxes (an ONNX RoiAlign session, off the event loop) or
passes outputs on by name; the reply comes once, with every step's outputs as
``<model>.<output>``.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from edged.config import ChainConfig, ChainStep
from edged.errors import BadRequest, DeadlineExceeded, EdgedError
from edged.models.calls import Infer
from edged.protocol import Request
from edged.replies import ReplyTo
from edged.steps.frame import BOXES, FRAME
from edged.tasks import TaskGroup

if TYPE_CHECKING:
    from edged.service import InferenceService

Arrays = dict[str, np.ndarray[Any, Any]]


class StepReply(ReplyTo):
    """Where a step's reply goes: the chain awaiting it, not a socket."""

    __slots__ = ("_future",)

    def __init__(self, future: asyncio.Future[Arrays], request: Request) -> None:
        super().__init__(lambda _: False, request.id, request.trace)
        self._future = future

    def ok(self, fields: dict[str, Any], outputs: Any = None) -> bool:
        if not self._future.done():
            self._future.set_result(dict(outputs or {}))
        return True

    def fail(self, error: EdgedError) -> bool:
        if not self._future.done():
            self._future.set_exception(error)
        return True


class Chain:
    def __init__(
        self, name: str, config: ChainConfig, service: InferenceService, tasks: TaskGroup
    ) -> None:
        self.name = name
        self.steps = config.steps
        self._service = service
        self._tasks = tasks
        self._crops: dict[int, Any] = {}  # step index -> its crop session, made at first use
        self._executor: ThreadPoolExecutor | None = None

    def submit(self, request: Infer, reply: ReplyTo, peer: bytes) -> None:
        self._tasks.start(self._run(request, reply, peer), f"chain {self.name}")

    async def _run(self, request: Infer, reply: ReplyTo, peer: bytes) -> None:
        started = time.monotonic()
        outputs: Arrays = {}
        previous: Arrays = {}
        done: list[str] = []
        for index, step in enumerate(self.steps):
            try:
                inputs = await self._inputs(index, step, request, previous)
                if inputs is None:  # no boxes to crop: the later steps have nothing to run on
                    break
                previous = await self._call(step, request, inputs, peer, started)
            except EdgedError as exc:
                error = type(exc)(f"chain {self.name!r} step {index + 1} ({step.model}): {exc}")
                reply.fail(error)
                return
            outputs.update({f"{step.model}.{name}": array for name, array in previous.items()})
            done.append(step.model)
        took_us = int((time.monotonic() - started) * 1e6)
        fields = {"model": self.name, "version": 0, "steps": done, "timing": {"run_us": took_us}}
        reply.ok(fields, outputs)

    async def _inputs(
        self, index: int, step: ChainStep, request: Infer, previous: Arrays
    ) -> Arrays | None:
        if index == 0:
            return dict(request.inputs)
        if step.crops is None:
            missing = sorted(set(step.inputs.values()) - previous.keys())
            if missing:
                raise BadRequest(f"the previous step gave no {', '.join(map(repr, missing))}")
            return {name: previous[source] for name, source in step.inputs.items()}
        frame, boxes = request.inputs.get(FRAME), previous.get(BOXES)
        if frame is None or boxes is None:
            raise BadRequest(
                f"crops need the request's {FRAME!r} and the previous step's {BOXES!r}"
            )
        if len(boxes) == 0:
            return None
        session = self._crop_session(index, step)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"chain-{self.name}")
        feed = {FRAME: frame, BOXES: boxes}
        loop = asyncio.get_running_loop()
        (crops,) = await loop.run_in_executor(self._executor, session.run, None, feed)
        return {step.crops.input: crops}

    def _crop_session(self, index: int, step: ChainStep) -> Any:
        session = self._crops.get(index)
        if session is None:
            import onnxruntime as ort

            assert step.crops is not None  # the config checked that a cropping step has them
            model = step.crops.build_crops().SerializeToString()
            session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
            self._crops[index] = session
        return session

    async def _call(
        self,
        step: ChainStep,
        request: Infer,
        inputs: Arrays,
        peer: bytes,
        started: float,
    ) -> Arrays:
        """One step as an ``infer`` of the request's own id and peer, with what is left of the
        request's deadline."""
        deadline_ms = request.deadline_ms
        if deadline_ms is not None:
            deadline_ms -= (time.monotonic() - started) * 1000
            if deadline_ms <= 0:
                raise DeadlineExceeded("the deadline passed before this step")
        call = Infer(
            id=request.id,
            op="infer",
            trace=request.trace,
            model=step.model,
            deadline_ms=deadline_ms,
            inputs=inputs,
        )
        future: asyncio.Future[Arrays] = asyncio.get_running_loop().create_future()
        self._service.handle(call, StepReply(future, call), peer)
        self._service.pump()
        return await future
