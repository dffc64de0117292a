"""``metrics``: every metric in the Prometheus text format (``text``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edged.opunit import Fields, Op
from edged.protocol import Request
from edged.replies import ReplyTo

if TYPE_CHECKING:
    from edged.control.service import ControlService


def metrics(control: ControlService, request: Request, reply: ReplyTo, peer: bytes) -> None:
    reply.ok({"text": control.metrics.exposition().decode()})


def text(fields: Fields) -> str:
    return str(fields["text"]).rstrip("\n")


OP = Op(
    "metrics",
    Request,
    metrics,
    help="every metric in the Prometheus text format",
    format=text,
)
