"""Read-only diagnostics on the control socket: ``status``, ``sysinfo``, ``logs``, ``config``,
``stack`` and ``selftest``.

Each handler's docstring is its help. ``logs`` with ``follow`` streams: one partial reply
(``more: true``) per batch of new records, until the client cancels it (``cancel`` with the
logs request's id) or goes away.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import time
from collections.abc import Callable
from typing import Any

import psutil

from edged import __version__
from edged.config import Config
from edged.control.logring import LogRing, Record
from edged.control.metrics import loaded_runners, runner_errors
from edged.control.stack import task_stacks, thread_stacks
from edged.control.sysinfo import sysinfo
from edged.errors import BadRequest
from edged.models.registry import Registry, SlotStatistics, as_edged_error
from edged.protocol import Request
from edged.replies import ReplyTo
from edged.service import Handler, InferenceService
from edged.tasks import TaskGroup

#: config keys whose values are not shown (key material, credentials)
SECRET = re.compile(r"secret|password|token|_key$")
REDACTED = "<redacted>"
MAX_LOG_RECORDS = 10_000


class Diagnostics:
    def __init__(
        self,
        config: Callable[[], Config],
        registry: Registry,
        service: InferenceService,
        logs: LogRing,
        state_dir: str,
        *,
        tasks: TaskGroup,
    ) -> None:
        #: the configuration in effect now: reloads change it
        self.config = config
        self.registry = registry
        self.service = service
        self.logs = logs
        self.state_dir = state_dir
        self.started = time.time()
        self._process = psutil.Process()
        self._process.cpu_percent(None)  # primes the measurement: the first call reads 0
        psutil.cpu_percent(percpu=True)
        self._follows: dict[tuple[bytes, int], Any] = {}
        self._tasks = tasks
        self.ops: dict[str, Handler] = {
            "status": self._status,
            "sysinfo": self._sysinfo,
            "logs": self._logs,
            "config": self._config,
            "stack": self._stack,
            "selftest": self._selftest,
        }

    def cancel(self, peer: bytes, target: int) -> bool:
        """Stop a ``logs`` follow; ``False`` when there is none by that id."""
        stop = self._follows.pop((peer, target), None)
        if stop is None:
            return False
        stop()
        return True

    def _status(self, request: Request, reply: ReplyTo, peer: bytes) -> None:
        """The daemon at a glance: version, uptime, process, memory budget, models, errors."""
        budget = self.registry.budget
        with self._process.oneshot():
            process = {
                "rss_bytes": self._process.memory_info().rss,
                "cpu_percent": self._process.cpu_percent(None),
                "threads": self._process.num_threads(),
            }
        models = {slot.name: _model_status(slot.statistics()) for slot in self.registry}
        fields = {
            "edged_version": __version__,
            "pid": os.getpid(),
            "state": "serving" if self.service.accepting else "draining",
            "uptime_s": round(time.time() - self.started, 1),
            "process": process,
            "memory": {
                "budget_bytes": budget.capacity,
                "used_bytes": budget.used,
                "free_bytes": budget.free(),
                "reserve_bytes": budget.reserve,
            },
            "models": models,
            "errors": sum(self.service.errors.values())
            + sum(
                sum(runner_errors(runner).values()) for _, runner in loaded_runners(self.registry)
            ),
            "last_errors": self.logs.last_errors()[-5:],
        }
        reply.ok(fields)

    def _errors(self) -> int:
        """Error replies so far: refused ones and those the models' runners answered."""
        answered = (runner_errors(runner) for _, runner in loaded_runners(self.registry))
        return sum(self.service.errors.values()) + sum(sum(e.values()) for e in answered)

    def _sysinfo(self, request: Request, reply: ReplyTo, peer: bytes) -> None:
        """CPU, load, memory, disks, temperatures; GPU load, power rails, nvpmodel on Jetson."""
        fields = {"sysinfo": sysinfo([self.state_dir])}
        reply.ok(fields)

    def _logs(self, request: Request, reply: ReplyTo, peer: bytes) -> None:
        """The last ``last`` records at ``level`` or worse; with ``follow``, then every new one
        as it is logged (partial replies) until cancelled."""
        args = request.args
        last = args.get("last", 100)
        level = args.get("level")
        if type(last) is not int or not 0 <= last <= MAX_LOG_RECORDS:
            raise BadRequest(f"'last' must be an integer from 0 to {MAX_LOG_RECORDS}")
        if level is not None and not isinstance(level, str):
            raise BadRequest("'level' must be a level name such as WARNING")
        follow = args.get("follow", False)
        pending: list[Record] = []
        backlog_seq = 0

        def forward(record: Record) -> None:
            if record["seq"] <= backlog_seq or not _at_least(record, level):
                return
            if not reply.ok({"more": True, "records": [record]}):
                self.cancel(peer, request.id)  # the client has gone

        if follow:
            self._follows[peer, request.id] = self.logs.follow(forward)
        try:
            pending = self.logs.records(last, level=level)
        except ValueError as exc:
            self.cancel(peer, request.id)
            raise BadRequest(str(exc)) from None
        backlog_seq = pending[-1]["seq"] if pending else 0
        fields: dict[str, Any] = {"records": pending}
        if follow:
            fields["more"] = True
        reply.ok(fields)

    def _config(self, request: Request, reply: ReplyTo, peer: bytes) -> None:
        """The configuration in effect (as the last reload left it), every default filled in,
        secrets redacted."""
        config = self.config()
        fields = {
            "source": config.source,
            "config": _redacted(dataclasses.asdict(config)),
        }
        reply.ok(fields)

    def _stack(self, request: Request, reply: ReplyTo, peer: bytes) -> None:
        """Every thread's stack and every asyncio task's, for a hung or busy daemon."""
        fields = {
            "threads": thread_stacks(),
            "tasks": task_stacks(asyncio.get_running_loop()),
        }
        reply.ok(fields)

    def _selftest(self, request: Request, reply: ReplyTo, peer: bytes) -> None:
        """Run every loaded model once (its golden vectors when it ships them); per model
        "ok" or the error. The reply's ``ok_all`` says whether all passed."""

        async def run() -> None:
            results: dict[str, str] = {}
            for slot in self.registry:
                runner = slot.runner
                if runner is None:
                    continue
                try:
                    await runner.probe()
                    results[slot.name] = "ok"
                except Exception as exc:  # the result names what failed
                    error = as_edged_error(exc, "the self-test failed unexpectedly; see the log")
                    results[slot.name] = f"{error.code}: {error}"
            fields = {"results": results, "ok_all": all(r == "ok" for r in results.values())}
            reply.ok(fields)

        self._tasks.start(run(), f"selftest {request.id}")


def _model_status(stats: SlotStatistics) -> dict[str, Any]:
    """A model in ``status``: its active version and state; for a failed one, why, and when
    the next load is tried."""
    entry: dict[str, Any] = {"version": stats.version, "state": stats.state}
    if stats.error is not None:
        code, message = stats.error
        entry["error"] = {"code": code, "message": message}
        entry["failed_loads"] = stats.failed_loads
        entry["retry_in_s"] = stats.retry_in_s
    return entry


def _at_least(record: Record, level: str | None) -> bool:
    if level is None:
        return True
    threshold = logging.getLevelName(level.upper())
    return bool(logging.getLevelName(record["level"]) >= threshold)


def _redacted(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _redacted(v, k) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redacted(v) for v in value]
    if value and SECRET.search(key):
        return REDACTED
    return value
