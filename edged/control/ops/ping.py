"""``ping`` on the control socket: is the daemon up (edgectl asks first, within --timeout)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edged.opunit import Op
from edged.protocol import Request
from edged.replies import ReplyTo

if TYPE_CHECKING:
    from edged.control.service import ControlService


def ping(control: ControlService, request: Request, reply: ReplyTo, peer: bytes) -> None:
    reply.ok({"server": "edged", "socket": "control"})


OP = Op("ping", Request, ping)
