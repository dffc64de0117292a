"""``logs``: the last ``last`` records at ``level`` or worse; with ``follow``, then every new
one as it is logged (partial replies, ``more: true``) until the client cancels it (``cancel``
with this request's id) or goes away."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edged.errors import BadRequest
from edged.opunit import Op, arg
from edged.protocol import Request
from edged.replies import ReplyTo

if TYPE_CHECKING:
    from edged.control.logring import Record
    from edged.control.service import ControlService

MAX_LOG_RECORDS = 10_000


@dataclass(frozen=True, kw_only=True)
class Logs(Request):
    last: int = 100
    level: str | None = None
    follow: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if type(self.last) is not int or not 0 <= self.last <= MAX_LOG_RECORDS:
            raise BadRequest(f"'last' must be an integer from 0 to {MAX_LOG_RECORDS}")
        if self.level is not None and not isinstance(self.level, str):
            raise BadRequest("'level' must be a level name such as WARNING")
        # any truthy value follows (clients must send a bool; PROTOCOL.md §10.15)
        object.__setattr__(self, "follow", bool(self.follow))


def logs(control: ControlService, request: Logs, reply: ReplyTo, peer: bytes) -> None:
    level = request.level
    backlog_seq = 0

    def forward(record: Record) -> None:
        if record["seq"] <= backlog_seq or not _at_least(record, level):
            return
        if not reply.ok({"more": True, "records": [record]}):
            control.stop_follow(peer, request.id)  # the client has gone

    if request.follow:
        control.follows[peer, request.id] = control.logs.follow(forward)
    try:
        pending = control.logs.records(request.last, level=level)
    except ValueError as exc:
        control.stop_follow(peer, request.id)
        raise BadRequest(str(exc)) from None
    backlog_seq = pending[-1]["seq"] if pending else 0
    fields: dict[str, Any] = {"records": pending}
    if request.follow:
        fields["more"] = True
    reply.ok(fields)


def _at_least(record: Record, level: str | None) -> bool:
    if level is None:
        return True
    threshold = logging.getLevelName(level.upper())
    return bool(logging.getLevelName(record["level"]) >= threshold)


def log_line(record: dict[str, Any]) -> str:
    """A record as one line of text, as a log file has it."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record["time"]))
    trace = record.get("trace")
    trace = f" [trace {trace}]" if trace and f"[trace {trace}]" not in record["message"] else ""
    return f"{stamp} {record['level']} {record['logger']}: {record['message']}{trace}"


OP = Op(
    "logs",
    Logs,
    logs,
    help="the daemon's recent log records; --follow for new ones as they come",
    args=(
        arg("-n", "--last", type=int, default=50, help="how many (default 50)"),
        arg("--level", help="this level or worse, e.g. WARNING"),
        arg("-f", "--follow", action="store_true", help="then every new record"),
    ),
)
