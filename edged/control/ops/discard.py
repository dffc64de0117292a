"""``discard``: end the candidate's trial and unload it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edged.opunit import Op, arg
from edged.replies import ReplyTo
from edged.requests import ModelRequest

if TYPE_CHECKING:
    from edged.control.service import ControlService


def discard(control: ControlService, request: ModelRequest, reply: ReplyTo, peer: bytes) -> None:
    slot = control.registry.slot(request.model)
    control.run(request, reply, control.swapper.discard(slot))


OP = Op(
    "discard",
    ModelRequest,
    discard,
    long_running=True,
    help="end the candidate's trial and unload it",
    args=(arg("model"),),
)
