"""The inference ops (ping, describe, infer): decoded requests in, replies out.

Errors are raised, not replied: the endpoint turns them into error replies in one place.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from edged import __version__, protocol
from edged.errors import ShuttingDown
from edged.models.registry import Registry
from edged.models.runner import Job, ModelRunner, ReplySink
from edged.protocol import Request


class InferenceService:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.accepting = True
        self._pending: set[ModelRunner] = set()
        self._ops: dict[str, Callable[[Request, ReplySink], None]] = {
            "ping": self._ping,
            "describe": self._describe,
            "infer": self._infer,
        }

    def handle(self, request: Request, send: ReplySink) -> None:
        self._ops[request.op](request, send)

    def pump(self) -> None:
        """Start runs for what was admitted since the last pump (batches form in between)."""
        pending, self._pending = self._pending, set()
        for runner in pending:
            runner.pump()

    def _ping(self, request: Request, send: ReplySink) -> None:
        state = "serving" if self.accepting else "draining"
        fields = {
            "server": "edged",
            "edged_version": __version__,
            "pid": os.getpid(),
            "state": state,
            "models": [runner.name for runner in self.registry],
        }
        send(protocol.encode_reply(request.id, _with_trace(fields, request)))

    def _describe(self, request: Request, send: ReplySink) -> None:
        runner = self.registry.get(str(request.model), request.version)
        signature = runner.backend.signature
        fields = {
            "model": runner.name,
            "version": runner.version,
            "signature": {
                "inputs": [spec.describe() for spec in signature.inputs],
                "outputs": [spec.describe() for spec in signature.outputs],
            },
            "max_batch": runner.config.max_batch if runner.batching else 1,
        }
        send(protocol.encode_reply(request.id, _with_trace(fields, request)))

    def _infer(self, request: Request, send: ReplySink) -> None:
        if not self.accepting:
            raise ShuttingDown("the daemon is shutting down; retry against its successor")
        model = str(request.model)
        runner = self.registry.get(model, request.version)
        runner.backend.signature.check(model, request.inputs)
        now = time.monotonic_ns()
        deadline = request.deadline_ms
        deadline_ns = None if deadline is None else now + int(deadline * 1e6)
        job = Job(request.id, request.trace, request.inputs, send, now, deadline_ns)
        runner.submit(job)
        self._pending.add(runner)


def _with_trace(fields: dict[str, Any], request: Request) -> dict[str, Any]:
    if request.trace is not None:
        fields["trace"] = request.trace
    return fields
