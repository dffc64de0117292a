"""``status``: the daemon at a glance: version, uptime, process, memory budget, models, and the
errors answered so far."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from edged import __version__
from edged.control.metrics import loaded_runners, runner_errors
from edged.control.ops.logs import log_line
from edged.opunit import Fields, Op
from edged.protocol import Request
from edged.replies import ReplyTo

if TYPE_CHECKING:
    from edged.control.service import ControlService
    from edged.models.registry import SlotStatistics


def status(control: ControlService, request: Request, reply: ReplyTo, peer: bytes) -> None:
    budget = control.registry.budget
    process = control.process
    with process.oneshot():
        usage = {
            "rss_bytes": process.memory_info().rss,
            "cpu_percent": process.cpu_percent(None),
            "threads": process.num_threads(),
        }
    # refused requests are counted centrally, the rest by the runner that answered them
    answered = (runner_errors(runner) for _, runner in loaded_runners(control.registry))
    fields = {
        "edged_version": __version__,
        "pid": os.getpid(),
        "state": "serving" if control.service.accepting else "draining",
        "uptime_s": round(time.time() - control.started, 1),
        "process": usage,
        "memory": {
            "budget_bytes": budget.capacity,
            "used_bytes": budget.used,
            "free_bytes": budget.free(),
            "reserve_bytes": budget.reserve,
        },
        "models": {slot.name: _model(slot.statistics()) for slot in control.registry},
        "errors": sum(control.service.errors.values()) + sum(sum(e.values()) for e in answered),
        "last_errors": control.logs.last_errors()[-5:],
    }
    reply.ok(fields)


def _model(stats: SlotStatistics) -> dict[str, Any]:
    """A model's active version and state; for a failed one, why, and when the next load is
    tried."""
    entry: dict[str, Any] = {"version": stats.version, "state": stats.state}
    if stats.error is not None:
        code, message = stats.error
        entry["error"] = {"code": code, "message": message}
        entry["failed_loads"] = stats.failed_loads
        entry["retry_in_s"] = stats.retry_in_s
    return entry


def text(fields: Fields) -> str:
    memory, process = fields["memory"], fields["process"]
    budget = memory["budget_bytes"]
    limit = f"of {budget / 2**20:.0f} MiB" if budget else "(no budget)"
    lines = [
        f"edged {fields['edged_version']} pid {fields['pid']}: {fields['state']}, "
        f"up {fields['uptime_s']:.0f} s",
        f"process: {process['rss_bytes'] / 2**20:.1f} MiB RSS, {process['cpu_percent']:.0f}% CPU",
        f"models: {memory['used_bytes'] / 2**20:.1f} MiB {limit}, "
        f"{memory['free_bytes'] / 2**20:.0f} MiB free",
    ]
    for name, m in fields["models"].items():
        lines.append(f"  {name}: v{m['version']} {m['state']}")
        if "error" in m:
            lines.append(
                f"    {m['error']['code']}: {m['error']['message']} ({m['failed_loads']} failed "
                f"loads; next attempt in {m['retry_in_s']:.0f} s, or now with edgectl load)"
            )
    lines.append(f"errors answered: {fields['errors']}")
    lines += [f"  {log_line(record)}" for record in fields["last_errors"]]
    return "\n".join(lines)


OP = Op(
    "status",
    Request,
    status,
    help="the daemon at a glance: version, uptime, memory, models, recent errors",
    format=text,
)
