"""A collection's source of truth: one SQLite file holding every item's id, vector and metadata.

WAL journal and ``synchronous = FULL``: a write is on disk when its commit returns, so an
acknowledged upsert survives a power cut, and readers (searches, on the event loop) never wait
for the writer (the collection's own thread). Each item also has an integer ``key``, the
label the ANN index knows it by: AUTOINCREMENT never hands a key out twice, so an upsert that
replaces an item gives it a fresh key and the index only ever adds and removes. ``generation``
counts committed writes; a saved index records the generation it holds, which tells at start
whether it still matches.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edged.errors import BadRequest

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    key INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    vector BLOB NOT NULL,
    metadata TEXT NOT NULL
);
"""
#: metadata keys a filter may name: they go into a JSON path
FIELD = re.compile(r"[A-Za-z0-9_\-]{1,64}")
#: rows read per query when the index is rebuilt
SCAN_ROWS = 4096
Array = np.ndarray[Any, Any]


@dataclass(frozen=True)
class Item:
    id: str
    vector: Array
    metadata: dict[str, Any]


@dataclass(frozen=True)
class Written:
    """What a write changed, for the index: keys gone and keys (with vectors) added."""

    removed: list[int]
    added: list[int]
    generation: int


def connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    uri = f"file:{path}?mode=ro" if readonly else f"file:{path}"
    connection = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    connection.execute("PRAGMA synchronous = FULL")
    if not readonly:
        connection.execute("PRAGMA journal_mode = WAL")
    return connection


class VectorStore:
    """The SQLite side of one collection. The writer methods run on one thread at a time (the
    collection's); ``reader`` is a second connection for lookups from the event loop."""

    def __init__(self, path: Path, dim: int, metric: str) -> None:
        self.path = path
        self.dim = dim
        self._db = connect(path)
        self._db.executescript(SCHEMA)
        self._check_meta(dim, metric)
        self.reader = connect(path, readonly=True)

    def _check_meta(self, dim: int, metric: str) -> None:
        found = dict(self._db.execute("SELECT key, value FROM meta"))
        if not found:
            rows = [("dim", str(dim)), ("metric", metric), ("generation", "0")]
            self._db.executemany("INSERT INTO meta VALUES (?, ?)", rows)
            return
        if (found["dim"], found["metric"]) != (str(dim), metric):
            raise ValueError(
                f"{self.path} holds a collection of dim {found['dim']} and metric "
                f"{found['metric']}, not {dim} and {metric}"
            )

    @property
    def generation(self) -> int:
        row = self.reader.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        return int(row[0])

    def upsert(self, items: Sequence[Item]) -> Written:
        """Insert or replace ``items`` in one transaction, durable once this returns."""
        ids = [item.id for item in items]
        with self._transaction() as db:
            removed = self._delete(db, ids)
            added = [
                db.execute(
                    "INSERT INTO items (id, vector, metadata) VALUES (?, ?, ?) RETURNING key",
                    (item.id, item.vector.astype("<f4").tobytes(), json.dumps(item.metadata)),
                ).fetchone()[0]
                for item in items
            ]
            generation = self._bump(db)
        return Written(removed, added, generation)

    def delete(self, ids: Sequence[str]) -> Written:
        with self._transaction() as db:
            removed = self._delete(db, ids)
            generation = self._bump(db) if removed else self.generation
        return Written(removed, [], generation)

    @staticmethod
    def _delete(db: sqlite3.Connection, ids: Sequence[str]) -> list[int]:
        marks = ",".join("?" * len(ids))
        return [
            row[0]
            for row in db.execute(f"DELETE FROM items WHERE id IN ({marks}) RETURNING key", ids)
        ]

    @staticmethod
    def _bump(db: sqlite3.Connection) -> int:
        row = db.execute(
            "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation' "
            "RETURNING value"
        ).fetchone()
        return int(row[0])

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    def scan(self) -> Iterator[tuple[Array, Array]]:
        """Every item's key and vector, in chunks: what the index is rebuilt from."""
        last = -1
        while True:
            rows = self._db.execute(
                "SELECT key, vector FROM items WHERE key > ? ORDER BY key LIMIT ?",
                (last, SCAN_ROWS),
            ).fetchall()
            if not rows:
                return
            keys = np.fromiter((row[0] for row in rows), np.int64, len(rows))
            vectors = np.frombuffer(b"".join(row[1] for row in rows), "<f4")
            yield keys, vectors.reshape(len(rows), self.dim)
            last = int(keys[-1])

    def count(self) -> int:
        return int(self.reader.execute("SELECT count(*) FROM items").fetchone()[0])

    def get(self, ids: Sequence[str]) -> list[Item]:
        """The items of ``ids`` that exist, in the order asked."""
        marks = ",".join("?" * len(ids))
        rows = self.reader.execute(
            f"SELECT id, vector, metadata FROM items WHERE id IN ({marks})", ids
        ).fetchall()
        found = {row[0]: self._item(row) for row in rows}
        return [found[i] for i in ids if i in found]

    def by_keys(self, keys: Sequence[int]) -> tuple[list[str], list[str], Array]:
        """The id, metadata (JSON text) and vector of each key still present (a key the index
        returns may have been replaced since), in one pass over SQLite."""
        marks = ",".join("?" * len(keys))
        rows = self.reader.execute(
            f"SELECT id, metadata, vector FROM items WHERE key IN ({marks})", list(keys)
        ).fetchall()
        vectors = np.frombuffer(b"".join(row[2] for row in rows), "<f4")
        return [row[0] for row in rows], [row[1] for row in rows], vectors.reshape(-1, self.dim)

    def matching(self, where: Mapping[str, Any]) -> Array:
        """The keys of items whose metadata has every field of ``where`` equal."""
        clauses, values = [], []
        for field, value in where.items():
            if not FIELD.fullmatch(field):
                raise BadRequest(f"filter field {field!r} must be 1-64 letters, digits, '_' or '-'")
            if not isinstance(value, (str, int, float, bool)):
                raise BadRequest(f"filter field {field!r} must equal a string, number or boolean")
            clauses.append(f"json_extract(metadata, '$.\"{field}\"') = ?")
            values.append(value)
        query = "SELECT key FROM items" + (" WHERE " + " AND ".join(clauses) if clauses else "")
        keys = [row[0] for row in self.reader.execute(query, values)]
        return np.asarray(keys, np.int64)

    def vectors(self, keys: Array) -> tuple[Array, Array]:
        """The keys of ``keys`` still present, sorted, and their vectors in that order."""
        marks = ",".join("?" * len(keys))
        rows = self.reader.execute(
            f"SELECT key, vector FROM items WHERE key IN ({marks}) ORDER BY key", keys.tolist()
        ).fetchall()
        found = np.fromiter((row[0] for row in rows), np.int64, len(rows))
        vectors = np.frombuffer(b"".join(row[1] for row in rows), "<f4")
        return found, vectors.reshape(len(rows), self.dim)

    def snapshot(self, dest: Path) -> None:
        """A consistent copy of the whole file at ``dest`` (SQLite's online backup)."""
        target = sqlite3.connect(dest)
        try:
            self._db.backup(target)
        finally:
            target.close()

    def compact(self) -> None:
        self._db.execute("VACUUM")
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _item(self, row: tuple[str, bytes, str]) -> Item:
        vector = np.frombuffer(row[1], "<f4")
        return Item(row[0], vector, json.loads(row[2]))

    def close(self) -> None:
        self.reader.close()
        self._db.close()


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` on an exception."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> sqlite3.Connection:
        self._db.execute("BEGIN IMMEDIATE")
        return self._db

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        self._db.execute("COMMIT" if kind is None else "ROLLBACK")
