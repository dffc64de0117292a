"""``sysinfo``: CPU, load, memory, disks, temperatures; GPU load, power rails and nvpmodel on a
Jetson."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edged.control.sysinfo import sysinfo
from edged.opunit import Op
from edged.protocol import Request
from edged.replies import ReplyTo

if TYPE_CHECKING:
    from edged.control.service import ControlService


def system(control: ControlService, request: Request, reply: ReplyTo, peer: bytes) -> None:
    reply.ok({"sysinfo": sysinfo([control.state_dir])})


OP = Op(
    "sysinfo",
    Request,
    system,
    help="CPU, memory, disks, temperatures (GPU, power rails on a Jetson)",
)
