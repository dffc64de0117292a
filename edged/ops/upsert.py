"""``upsert``: store items in a collection by id (vectors, or texts its model embeds), with
metadata; acknowledged once on disk."""

from __future__ import annotations

from typing import Any

from edged.collections.calls import Upsert
from edged.collections.store import Item
from edged.errors import BadRequest
from edged.opunit import Op
from edged.replies import ReplyTo
from edged.service import InferenceService


def upsert(service: InferenceService, request: Upsert, reply: ReplyTo, peer: bytes) -> None:
    collections = service.collections

    async def work() -> dict[str, Any]:
        collection = await collections.get(request.collection)
        vectors = request.vectors
        if vectors is None:
            if request.texts is None:
                raise BadRequest("'upsert' needs a 'vectors' tensor or 'texts'")
            vectors = await collections.embed(request.collection, request.texts)
        metadata = request.metadata or tuple({} for _ in request.ids)
        items = [
            Item(id, vector, dict(fields))
            for id, vector, fields in zip(request.ids, vectors, metadata, strict=True)
        ]
        generation = await collections.upsert(collection, items)
        return {"collection": collection.name, "upserted": len(items), "generation": generation}

    collections.run(request, reply, work())


OP = Op("upsert", Upsert, upsert)
