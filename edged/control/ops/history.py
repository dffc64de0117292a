"""``history``: the last bundle installs, newest last: outcome, version, reason, swap report."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edged.opunit import Op
from edged.protocol import Request
from edged.replies import ReplyTo

if TYPE_CHECKING:
    from edged.control.service import ControlService


def history(control: ControlService, request: Request, reply: ReplyTo, peer: bytes) -> None:
    reply.ok({"installs": control.ota().history()})


OP = Op("history", Request, history, help="the last bundle installs: outcome, version, reason")
