"""``unload``: unload a model's active version now; refused while it has requests or a swap."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edged.errors import BadRequest, SwapInProgress
from edged.opunit import Op, arg
from edged.replies import ReplyTo
from edged.requests import ModelRequest

if TYPE_CHECKING:
    from edged.control.service import ControlService


def unload(control: ControlService, request: ModelRequest, reply: ReplyTo, peer: bytes) -> None:
    slot = control.registry.slot(request.model)
    if slot.runner is None:
        raise BadRequest(f"model {slot.name!r} is not loaded")
    if slot.swapping or slot.runner.busy:
        raise SwapInProgress(f"model {slot.name!r} is busy; retry when it is idle")
    control.registry.unload(slot, "on request")
    reply.ok({"model": slot.name, "version": slot.version, "state": slot.state.value})


OP = Op(
    "unload",
    ModelRequest,
    unload,
    help="unload a model now (refused while it is busy)",
    args=(arg("model"),),
)
