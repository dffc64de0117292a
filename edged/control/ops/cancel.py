"""``cancel`` on the control socket: stop a ``logs`` follow sent on the same connection."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edged.errors import UnknownRequest
from edged.opunit import Op
from edged.replies import ReplyTo
from edged.requests import Cancel

if TYPE_CHECKING:
    from edged.control.service import ControlService


def cancel(control: ControlService, request: Cancel, reply: ReplyTo, peer: bytes) -> None:
    if not control.stop_follow(peer, request.target):
        raise UnknownRequest(f"no logs follow with id {request.target} on this connection")
    reply.ok({"cancelled": request.target})


OP = Op("cancel", Cancel, cancel)
