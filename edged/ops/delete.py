"""``delete``: remove items from a collection by id."""

from __future__ import annotations

from typing import Any

from edged.collections.calls import Delete
from edged.opunit import Op
from edged.replies import ReplyTo
from edged.service import InferenceService


def delete(service: InferenceService, request: Delete, reply: ReplyTo, peer: bytes) -> None:
    collections = service.collections

    async def work() -> dict[str, Any]:
        collection = await collections.get(request.collection)
        return {"collection": collection.name, "deleted": await collection.delete(request.ids)}

    collections.run(request, reply, work())


OP = Op("delete", Delete, delete)
