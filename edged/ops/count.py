"""``count``: how many items a collection holds."""

from __future__ import annotations

from typing import Any

from edged.collections.calls import Count
from edged.opunit import Op
from edged.replies import ReplyTo
from edged.service import InferenceService


def count(service: InferenceService, request: Count, reply: ReplyTo, peer: bytes) -> None:
    collections = service.collections

    async def work() -> dict[str, Any]:
        collection = await collections.get(request.collection)
        return {"collection": collection.name, "count": collection.count()}

    collections.run(request, reply, work())


OP = Op("count", Count, count)
