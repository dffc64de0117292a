"""``reload``: re-read the config file and the store, and serve what they say now."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edged.opunit import Fields, Op
from edged.protocol import Request
from edged.replies import ReplyTo

if TYPE_CHECKING:
    from edged.control.service import ControlService


def reload(control: ControlService, request: Request, reply: ReplyTo, peer: bytes) -> None:
    control.run(request, reply, control.reloader.reload())


def failed(fields: Fields) -> bool:
    """A model it could not apply (what ``systemctl reload`` must report)."""
    return bool(fields.get("failed"))


OP = Op(
    "reload",
    Request,
    reload,
    long_running=True,
    help="serve what the config file and the store say now",
    failed=failed,
)
