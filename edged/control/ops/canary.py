"""``canary``: serve a share of a model's requests with another version, beside the active one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from edged.control.ops.swap import TARGET_ARGS, VersionTarget
from edged.errors import BadRequest
from edged.opunit import Op, arg
from edged.protocol import is_number
from edged.replies import ReplyTo

if TYPE_CHECKING:
    from edged.control.service import ControlService


@dataclass(frozen=True, kw_only=True)
class Canary(VersionTarget):
    #: the share of requests the candidate serves
    fraction: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (is_number(self.fraction) and 0 < self.fraction <= 1):
            raise BadRequest("'fraction' must be a number above 0 and at most 1")
        object.__setattr__(self, "fraction", float(self.fraction))


def canary(control: ControlService, request: Canary, reply: ReplyTo, peer: bytes) -> None:
    slot, target = request.target(control)
    trial = control.swapper.try_out(slot, target, "canary", request.fraction, request.force)
    control.run(request, reply, trial)


OP = Op(
    "canary",
    Canary,
    canary,
    long_running=True,
    help="serve a share of the model's requests with another version",
    args=(*TARGET_ARGS, arg("--fraction", type=float, default=0.1, help="share of requests")),
)
