"""``get``: a collection's items by id: ids and metadata, and their vectors as a tensor."""

from __future__ import annotations

from typing import Any

import numpy as np

from edged.collections.calls import Get
from edged.opunit import Op
from edged.replies import ReplyTo
from edged.service import InferenceService


def get(service: InferenceService, request: Get, reply: ReplyTo, peer: bytes) -> None:
    collections = service.collections

    async def work() -> dict[str, Any]:
        collection = await collections.get(request.collection)
        items = collection.get(request.ids)
        vectors = np.stack([item.vector for item in items]) if items else None
        return {
            "collection": collection.name,
            "items": [{"id": item.id, "metadata": item.metadata} for item in items],
            "tensors": {"vectors": vectors} if vectors is not None else None,
        }

    collections.run(request, reply, work())


OP = Op("get", Get, get)
