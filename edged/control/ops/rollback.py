"""``rollback``: go back to the version that served before the last swap (no interface check:
it served before)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edged.control.ops.swap import report_text
from edged.errors import BadRequest
from edged.opunit import Op, arg
from edged.replies import ReplyTo
from edged.requests import ModelRequest

if TYPE_CHECKING:
    from edged.control.service import ControlService


def rollback(control: ControlService, request: ModelRequest, reply: ReplyTo, peer: bytes) -> None:
    slot = control.registry.slot(request.model)
    if slot.previous is None:
        raise BadRequest(f"model {slot.name!r} has no previous version to roll back to")
    work = control.swapper.swap(slot, slot.previous, force=True)
    control.run(request, reply, control.report(slot, work))


OP = Op(
    "rollback",
    ModelRequest,
    rollback,
    long_running=True,
    help="go back to the version before the last swap",
    args=(arg("model"),),
    format=report_text,
)
