"""The inference socket's ops, one module each (PROTOCOL.md): a new op is a module that
declares its ``Op`` and a line here."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edged.ops import (
    cancel,
    chat,
    count,
    delete,
    describe,
    embed,
    generate,
    get,
    infer,
    ping,
    search,
    upsert,
)
from edged.opunit import Op

if TYPE_CHECKING:
    from edged.service import InferenceService

DATA_OPS: dict[str, Op[InferenceService, Any]] = {
    "ping": ping.OP,
    "describe": describe.OP,
    "infer": infer.OP,
    "generate": generate.OP,
    "chat": chat.OP,
    "embed": embed.OP,
    "cancel": cancel.OP,
    "upsert": upsert.OP,
    "search": search.OP,
    "delete": delete.OP,
    "get": get.OP,
    "count": count.OP,
}
