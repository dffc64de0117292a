"""``promote``: make the candidate the active version (it is loaded: the flip is immediate)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edged.control.ops.swap import report_text
from edged.opunit import Op, arg
from edged.replies import ReplyTo
from edged.requests import ModelRequest

if TYPE_CHECKING:
    from edged.control.service import ControlService


def promote(control: ControlService, request: ModelRequest, reply: ReplyTo, peer: bytes) -> None:
    slot = control.registry.slot(request.model)
    control.run(request, reply, control.report(slot, control.swapper.promote(slot)))


OP = Op(
    "promote",
    ModelRequest,
    promote,
    long_running=True,
    help="make the candidate version the active one",
    args=(arg("model"),),
    format=report_text,
)
