"""The inference ops (ping, describe, infer): decoded requests in, replies out.

``handle`` is the one place where errors become replies: the ops raise, ``handle`` answers, and
a request that waited for its model to load comes back through ``handle`` too.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from edged import __version__, protocol
from edged.errors import EdgedError, InternalError, ShuttingDown
from edged.models.registry import Registry
from edged.models.runner import Job, ModelRunner, ReplySink
from edged.protocol import Request

log = logging.getLogger(__name__)


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
        try:
            self._ops[request.op](request, send)
        except EdgedError as exc:
            send(protocol.encode_error(request.id, exc, request.trace))
        except Exception:  # a bug becomes INTERNAL; the traceback stays in the log
            log.exception("request %s (op %s) failed", request.id, request.op)
            error = InternalError("internal error; the daemon log has the details")
            send(protocol.encode_error(request.id, error, request.trace))

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
            "models": [slot.name for slot in self.registry],
            "loaded": [slot.name for slot in self.registry if slot.runner is not None],
        }
        send(protocol.encode_reply(request.id, _with_trace(fields, request)))

    def _describe(self, request: Request, send: ReplySink) -> None:
        runner = self._loaded(request, send)
        if runner is None:
            return
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
        runner = self._loaded(request, send)
        if runner is None:
            return
        runner.backend.signature.check(runner.name, request.inputs)
        now = time.monotonic_ns()
        deadline = request.deadline_ms
        deadline_ns = None if deadline is None else now + int(deadline * 1e6)
        job = Job(request.id, request.trace, request.inputs, send, now, deadline_ns)
        runner.submit(job)
        self._pending.add(runner)

    def _loaded(self, request: Request, send: ReplySink) -> ModelRunner | None:
        """The model's runner, or ``None`` after parking the request until the model loads."""
        slot = self.registry.slot(str(request.model), request.version)
        if slot.runner is not None:
            slot.last_used_ns = time.monotonic_ns()
            return slot.runner

        def resume(error: EdgedError | None) -> None:
            if error is not None:
                send(protocol.encode_error(request.id, error, request.trace))
                return
            self.handle(request, send)
            self.pump()

        slot.when_ready(resume)
        return None


def _with_trace(fields: dict[str, Any], request: Request) -> dict[str, Any]:
    if request.trace is not None:
        fields["trace"] = request.trace
    return fields
