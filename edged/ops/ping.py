"""``ping``: is the daemon up, and what does it serve (PROTOCOL.md §5.1)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from edged import __version__
from edged.models.registry import Registry
from edged.opunit import Op
from edged.protocol import Request
from edged.replies import ReplyTo

if TYPE_CHECKING:
    from edged.service import InferenceService


def ping(service: InferenceService, request: Request, reply: ReplyTo, peer: bytes) -> None:
    registry = service.registry
    fields = {
        "server": "edged",
        "edged_version": __version__,
        "pid": os.getpid(),
        "state": "serving" if service.accepting else "draining",
        "models": [slot.name for slot in registry],
        "loaded": [slot.name for slot in registry if slot.runner is not None],
        "memory": _memory(registry),
    }
    reply.ok(fields)


def _memory(registry: Registry) -> dict[str, Any]:
    stats = registry.budget.statistics()
    per_model = {
        name: {
            "charged_bytes": stats.charged_bytes.get(name),
            "estimated_bytes": stats.estimated_bytes.get(name),
            "measured_bytes": stats.measured_bytes.get(name),
            "returned_bytes": stats.returned_bytes.get(name),
        }
        for name in sorted({*stats.estimated_bytes, *stats.returned_bytes})
    }
    return {
        "budget_bytes": stats.capacity_bytes,
        "reserve_bytes": stats.reserve_bytes,
        "used_bytes": stats.used_bytes,
        "models": per_model,
    }


OP = Op("ping", Request, ping)
