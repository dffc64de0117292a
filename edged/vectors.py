"""A client's handle on one vector collection (``Client.collection(name)``): the collection ops
of PROTOCOL.md §4.5 as methods. Vectors go as float32 tensor frames; texts go as strings, for
the collection's model to embed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from edged.client import Client

Array = np.ndarray[Any, Any]


class CollectionClient:
    def __init__(self, client: Client, name: str) -> None:
        self._client = client
        self.name = name

    def upsert(
        self,
        ids: Sequence[str],
        vectors: Array | None = None,
        *,
        texts: Sequence[str] | None = None,
        metadata: Sequence[Mapping[str, Any]] | None = None,
        timeout: float | None = None,
    ) -> int:
        """Store items by id (replacing those that exist), from ``vectors`` [n, dim] or from
        ``texts``; returns once they are on disk, with the collection's write generation."""
        inputs = None if vectors is None else {"vectors": np.asarray(vectors, np.float32)}
        reply = self._client.exchange(
            "upsert",
            inputs=inputs,
            timeout=timeout,
            collection=self.name,
            ids=list(ids),
            texts=None if texts is None else list(texts),
            metadata=None if metadata is None else [dict(m) for m in metadata],
        )
        return int(reply.fields["generation"])

    def search(
        self,
        vector: Array | None = None,
        *,
        text: str | None = None,
        k: int = 10,
        where: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> list[dict[str, Any]]:
        """The ``k`` nearest items as ``{id, distance, metadata}``, nearest first."""
        inputs = None if vector is None else {"vector": np.asarray(vector, np.float32)}
        reply = self._client.exchange(
            "search",
            inputs=inputs,
            timeout=timeout,
            collection=self.name,
            text=text,
            k=k,
            where=None if where is None else dict(where),
        )
        hits: list[dict[str, Any]] = reply.fields["hits"]
        return hits

    def delete(self, ids: Sequence[str], timeout: float | None = None) -> int:
        """Remove items by id; how many there were."""
        reply = self._client.exchange(
            "delete", timeout=timeout, collection=self.name, ids=list(ids)
        )
        return int(reply.fields["deleted"])

    def get(
        self, ids: Sequence[str], timeout: float | None = None
    ) -> tuple[list[dict[str, Any]], Array]:
        """The items of ``ids`` that exist, as ``{id, metadata}``, and their vectors."""
        reply = self._client.exchange("get", timeout=timeout, collection=self.name, ids=list(ids))
        items: list[dict[str, Any]] = reply.fields["items"]
        vectors = reply.tensors.get("vectors", np.empty((0, 0), np.float32))
        return items, vectors

    def count(self, timeout: float | None = None) -> int:
        reply = self._client.exchange("count", timeout=timeout, collection=self.name)
        return int(reply.fields["count"])
