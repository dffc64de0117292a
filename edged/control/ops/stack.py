"""``stack``: every thread's stack and every asyncio task's, for a hung or busy daemon."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from edged.control.stack import task_stacks, thread_stacks
from edged.opunit import Fields, Op
from edged.protocol import Request
from edged.replies import ReplyTo

if TYPE_CHECKING:
    from edged.control.service import ControlService


def stack(control: ControlService, request: Request, reply: ReplyTo, peer: bytes) -> None:
    reply.ok({"threads": thread_stacks(), "tasks": task_stacks(asyncio.get_running_loop())})


def text(fields: Fields) -> str:
    lines = []
    for kind in ("threads", "tasks"):
        for entry in fields[kind]:
            lines.append(f"{kind[:-1]} {entry['name']}:")
            lines += [f"    {frame}" for frame in entry["stack"]]
    return "\n".join(lines)


OP = Op(
    "stack",
    Request,
    stack,
    help="every thread's and asyncio task's stack (a hung or busy daemon)",
    format=text,
)
