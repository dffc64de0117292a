"""One named vector collection: its SQLite store, its ANN index, and the thread that writes both.

Writes (upsert, delete) run one at a time on the collection's own thread: the SQLite commit
first, durable when it returns, then the index; the caller's future resolves after both, so
an acknowledged write is on disk and found by the next search. Searches and lookups run on the
caller's thread (the event loop) against a read-only SQLite connection and the index, which a
lock shares with the writer in short holds.

A search with a metadata filter asks SQLite for the matching keys. Up to ``EXACT_LIMIT`` of them
are searched exactly (their vectors read back, distances in numpy); more are searched in the
index, fetching more neighbours until enough of them match. The index's hits are ranked again
by their exact distance to the float32 vectors in SQLite, the distances replied: the index keeps
f16 copies, half the memory, whose distances are close but not exact. (Re-ranking twice as many
candidates as asked for raised recall@10 on 100k clustered vectors from 0.997 to 0.998 only, for
a sixth more time per search.)
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edged.collections import snapshots
from edged.collections.index import VectorIndex
from edged.collections.store import SCAN_ROWS, Item, VectorStore, Written
from edged.errors import BadRequest, BusyError

log = logging.getLogger(__name__)

#: a filtered search with at most this many matching items is exact
EXACT_LIMIT = 20_000
#: vectors added to the index per hold of its lock: a search waits for one hold at most
ADD_CHUNK = 16
Array = np.ndarray[Any, Any]


@dataclass(frozen=True)
class Hit:
    id: str
    distance: float
    metadata: dict[str, Any]


def distances(metric: str, vectors: Array, query: Array) -> Array:
    """The index's distances, exactly: cosine 1 - cos, l2 squared, ip 1 - dot."""
    if metric == "l2":
        found: Array = ((vectors - query) ** 2).sum(axis=1)
        return found
    dots = vectors @ query
    if metric == "cosine":
        dots = dots / np.maximum(np.linalg.norm(vectors, axis=1) * np.linalg.norm(query), 1e-30)
    return 1.0 - dots


class Collection:
    def __init__(
        self, name: str, store: VectorStore, index: VectorIndex, metric: str, version: int = 0
    ) -> None:
        self.name = name
        #: the installed snapshot it serves (``edged.collections.snapshots``); 0: its own
        self.version = version
        self.store = store
        self.dim = store.dim
        self.metric = metric
        self._index = index
        self._lock = threading.Lock()
        self._index_path = store.path.with_suffix(".usearch")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix=f"collection-{name}")
        #: replaced by an installed snapshot: writes go to the collection serving now
        self._retired = False

    @classmethod
    def open(
        cls, name: str, dim: int, metric: str, directory: Path, version: int | None = None
    ) -> Collection:
        """Open (or create) the collection's files (of snapshot ``version``; by default the
        installed one); the saved index if it holds exactly the committed writes, else one
        rebuilt from SQLite (blocking)."""
        directory.mkdir(parents=True, exist_ok=True)
        if version is None:
            version = snapshots.installed(directory, name).version
        store = VectorStore(snapshots.database(directory, name, version), dim, metric)
        index_path = store.path.with_suffix(".usearch")
        saved = _saved_generation(index_path)
        index = VectorIndex.load(index_path, dim, metric)
        if index is None:
            log.info("collection %s: building its index from %d items", name, store.count())
            index = VectorIndex.new(dim, metric)
            for keys, vectors in store.scan():
                index.add(keys, vectors, threads=0)
        elif saved != store.generation:
            _repair(name, index, store)
        return cls(name, store, index, metric, version)

    # -- writes, on the collection's thread -------------------------------------------------

    async def upsert(self, items: Sequence[Item]) -> int:
        """Store ``items`` (replacing those with the same ids); the generation it made."""
        for item in items:
            self.check_vector(item.vector)
        written = await self._write(self.store.upsert, items)
        return written.generation

    async def delete(self, ids: Sequence[str]) -> int:
        """Remove ``ids``; how many there were."""
        written = await self._write(self.store.delete, ids)
        return len(written.removed)

    async def _write(self, write: Any, argument: Any) -> Written:
        if self._retired:
            raise BusyError(
                f"collection {self.name!r} was replaced by an installed snapshot while this "
                f"write waited; send it again"
            )
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._writer, self._commit, write, argument)

    def _commit(self, write: Any, argument: Any) -> Written:
        written: Written = write(argument)
        with self._lock:
            self._index.remove(written.removed)
        if written.added:
            added = np.asarray(written.added, np.int64)
            vectors = np.stack([item.vector for item in argument]).astype(np.float32)
            for start in range(0, len(added), ADD_CHUNK):
                with self._lock:
                    self._index.add(
                        added[start : start + ADD_CHUNK], vectors[start : start + ADD_CHUNK]
                    )
        return written

    # -- reads, on the caller's thread -----------------------------------------------------

    def check_vector(self, vector: Array) -> None:
        if vector.shape != (self.dim,) or not np.isfinite(vector).all():
            raise BadRequest(
                f"collection {self.name!r} takes finite vectors of {self.dim} numbers, "
                f"got shape {list(vector.shape)}"
            )
        if self.metric == "cosine" and not np.any(vector):
            raise BadRequest(f"collection {self.name!r} is cosine: a zero vector has no direction")

    def search(self, query: Array, k: int, where: Mapping[str, Any] | None = None) -> list[Hit]:
        """The ``k`` nearest items to ``query`` whose metadata matches ``where``."""
        self.check_vector(query)
        query = query.astype(np.float32)
        if where:
            allowed = self.store.matching(where)
            if len(allowed) <= EXACT_LIMIT:
                return self._exact(query, k, allowed)
            keys = self._filtered(query, k, allowed)
        else:
            with self._lock:
                keys, _ = self._index.search(query, k)
        return self._hits(keys, query, k)

    def _exact(self, query: Array, k: int, allowed: Array) -> list[Hit]:
        if not len(allowed):
            return []
        keys, vectors = self.store.vectors(allowed)
        order = np.argsort(distances(self.metric, vectors, query), kind="stable")[:k]
        return self._hits(keys[order], query, k)

    def _filtered(self, query: Array, k: int, allowed: Array) -> Array:
        """Neighbours from the index, fetched in growing numbers until enough are allowed."""
        wanted = 4 * k
        while True:
            with self._lock:
                keys, _ = self._index.search(query, wanted)
                total = len(self._index)
            keep = np.isin(keys, allowed)
            if keep.sum() >= k or wanted >= total:
                found: Array = keys[keep][:k]
                return found
            wanted *= 4

    def _hits(self, keys: Array, query: Array, k: int) -> list[Hit]:
        """The ``k`` nearest of the candidates ``keys``, ranked by their exact distance to the
        float32 vectors SQLite holds (the index stores f16 copies)."""
        if not len(keys):
            return []
        ids, metadata, vectors = self.store.by_keys(keys.tolist())
        exact = distances(self.metric, vectors, query)
        order = np.argsort(exact, kind="stable")[:k]
        parsed = json.loads(f"[{','.join(metadata)}]")  # one parse: a tenth of the time of ten
        return [Hit(ids[i], float(exact[i]), parsed[i]) for i in order]

    def get(self, ids: Sequence[str]) -> list[Item]:
        return self.store.get(ids)

    def count(self) -> int:
        return self.store.count()

    @property
    def indexed(self) -> int:
        """Items in the index: the committed count, without a scan of SQLite (for the budget,
        on every upsert)."""
        with self._lock:
            return len(self._index)

    @property
    def memory_bytes(self) -> int:
        with self._lock:
            return self._index.memory_bytes

    # -- housekeeping ----------------------------------------------------------------------

    def stat(self) -> dict[str, Any]:
        files = [self.store.path, self.store.path.with_name(self.store.path.name + "-wal")]
        return {
            "version": self.version,
            "count": self.count(),
            "generation": self.store.generation,
            "index_bytes": self.memory_bytes,
            "file_bytes": sum(path.stat().st_size for path in files if path.exists()),
        }

    async def compact(self) -> None:
        """Reclaim deleted items' space in SQLite, then save the index (on the writer)."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._writer, self.store.compact)
        await self.save_index()

    async def snapshot(self, dest: Path) -> None:
        """A consistent copy of the database at ``dest`` (on the writer: between writes)."""
        await asyncio.get_running_loop().run_in_executor(self._writer, self.store.snapshot, dest)

    async def save_index(self) -> None:
        """Save the index with the generation it holds (on the writer: no write in between)."""
        await asyncio.get_running_loop().run_in_executor(self._writer, self._save)

    def _save(self) -> None:
        generation = self.store.generation
        self._index.save(self._index_path)
        marker = self._index_path.with_suffix(".json")
        partial = marker.with_suffix(".json.partial")
        partial.write_text(json.dumps({"generation": generation}))
        partial.replace(marker)

    def retire(self) -> None:
        """Take no more writes (on the event loop: before ``close``, when replaced)."""
        self._retired = True

    def close(self, save: bool = True) -> None:
        """Finish the writes under way, save the index (unless the collection is being
        replaced or discarded) and close the files (blocking)."""
        if save:
            self._writer.submit(self._save).result()
        self._writer.shutdown()
        self.store.close()


def _repair(name: str, index: VectorIndex, store: VectorStore) -> None:
    """Bring a saved index up to SQLite's writes since (those a crash kept it from saving):
    keys are never reused, so the keys it lacks are the items to add, and its keys SQLite
    lacks the items to remove; everything else is already right."""
    stored, indexed = store.matching({}), index.keys()
    gone, missing = np.setdiff1d(indexed, stored), np.setdiff1d(stored, indexed)
    log.info(
        "collection %s: repairing its saved index: %d items to add, %d to remove",
        name,
        len(missing),
        len(gone),
    )
    index.remove(gone.tolist())
    for start in range(0, len(missing), SCAN_ROWS):
        keys, vectors = store.vectors(missing[start : start + SCAN_ROWS])
        index.add(keys, vectors, threads=0)


def _saved_generation(index_path: Path) -> int | None:
    try:
        return int(json.loads(index_path.with_suffix(".json").read_text())["generation"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
