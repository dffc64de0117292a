"""``cancel``: stop a ``generate`` or ``embed`` sent earlier on the same connection."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edged.errors import UnknownRequest
from edged.opunit import Op
from edged.replies import ReplyTo
from edged.requests import Cancel

if TYPE_CHECKING:
    from edged.service import InferenceService


def cancel(service: InferenceService, request: Cancel, reply: ReplyTo, peer: bytes) -> None:
    if not service.cancel(peer, request.target):
        raise UnknownRequest(
            f"no generate or embed request with id {request.target} is queued or running for "
            f"this connection"
        )
    reply.ok({"cancelled": request.target})


OP = Op("cancel", Cancel, cancel)
