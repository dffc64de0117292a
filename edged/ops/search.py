"""``search``: the nearest items of a collection to a vector or a text, optionally only those
whose metadata matches."""

from __future__ import annotations

from typing import Any

from edged.collections.calls import Array, Search
from edged.collections.collection import Collection
from edged.errors import BadRequest
from edged.opunit import Op
from edged.replies import ReplyTo
from edged.service import InferenceService


def search(service: InferenceService, request: Search, reply: ReplyTo, peer: bytes) -> None:
    collections = service.collections
    ready = collections.ready(request.collection)
    if ready is not None and request.vector is not None:  # the common case: answered at once
        reply.ok(found(ready, request.vector, request))
        return

    async def work() -> dict[str, Any]:
        collection = await collections.get(request.collection)
        vector = request.vector
        if vector is None:
            if request.text is None:
                raise BadRequest("'search' needs a 'vector' tensor or a 'text'")
            vector = (await collections.embed(request.collection, (request.text,)))[0]
        return found(collection, vector, request)

    collections.run(request, reply, work())


def found(collection: Collection, vector: Array, request: Search) -> dict[str, Any]:
    hits = collection.search(vector, request.k, request.where)
    return {
        "collection": collection.name,
        "hits": [
            {"id": hit.id, "distance": hit.distance, "metadata": hit.metadata} for hit in hits
        ],
    }


OP = Op("search", Search, search)
