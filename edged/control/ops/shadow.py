"""``shadow``: run every request on another version too and compare the outputs (the
candidate's are never sent)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edged.control.ops.swap import TARGET_ARGS, VersionTarget
from edged.opunit import Op
from edged.replies import ReplyTo

if TYPE_CHECKING:
    from edged.control.service import ControlService


def shadow(control: ControlService, request: VersionTarget, reply: ReplyTo, peer: bytes) -> None:
    slot, target = request.target(control)
    trial = control.swapper.try_out(slot, target, "shadow", 1.0, request.force)
    control.run(request, reply, trial)


OP = Op(
    "shadow",
    VersionTarget,
    shadow,
    long_running=True,
    help="run requests on another version too and compare outputs",
    args=TARGET_ARGS,
)
