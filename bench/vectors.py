"""Vector collections: search and upsert through the daemon against the index and SQLite used
in this process.

The data are clustered (Gaussian points around 1000 centres, normalised), as embeddings of
real texts or images are; uniformly random vectors have no near neighbours worth finding and
make any ANN index look bad. The collection's files are written in this process (SQLite in
1024-item transactions, the index built on both cores) and the daemon serves them, so the
benchmark measures serving, not a 100k-item load through the socket.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from bench.harness import Settings, medians_s, p50s_us, timed
from edged.client import Client
from edged.collections.collection import Collection
from edged.collections.index import VectorIndex
from edged.collections.store import Item, VectorStore, connect
from edged.testing import DaemonProcess

DIM = 384
COUNT = 100_000
CENTRES = 1000
QUERIES = 200
K = 10
NAME = "bench"
Array = np.ndarray[Any, Any]


def clustered(count: int, seed: int) -> Array:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).standard_normal((CENTRES, DIM)).astype(np.float32)
    points = centres[rng.integers(0, CENTRES, count)] + 0.5 * rng.standard_normal((count, DIM))
    points = points.astype(np.float32)
    normalised: Array = points / np.linalg.norm(points, axis=1, keepdims=True)
    return normalised


def build(directory: Path, data: Array) -> None:
    """The collection's SQLite file and saved index, as the daemon keeps them."""
    directory.mkdir(parents=True, exist_ok=True)
    store = VectorStore(directory / f"{NAME}.sqlite3", DIM, "cosine")
    for start in range(0, len(data), 1024):
        chunk = data[start : start + 1024]
        store.upsert([Item(f"v{start + i}", vector, {}) for i, vector in enumerate(chunk)])
    store.close()
    collection = Collection.open(NAME, DIM, "cosine", directory)  # builds the index
    collection.close()  # and saves it


def exact(data: Array, queries: Array) -> list[set[str]]:
    scores = queries @ data.T
    top = np.argpartition(-scores, K, axis=1)[:, :K]
    return [{f"v{i}" for i in row} for row in top]


@contextmanager
def served(workdir: Path, data: Array) -> Iterator[DaemonProcess]:
    state = workdir / "state"
    build(state / "collections", data)
    config = {
        "daemon": {"state_dir": str(state)},
        "collections": {NAME: {"dim": DIM, "metric": "cosine"}},
    }
    with DaemonProcess(workdir, config) as daemon:
        yield daemon


def search_rows(workdir: Path, settings: Settings) -> dict[str, float]:
    """Recall@10 through the daemon, p50 search round trip, the index's own search in this
    process, and the daemon's RSS with the collection against without it."""
    data = clustered(COUNT, seed=1)
    queries = clustered(QUERIES, seed=2)
    truth = exact(data, queries)
    index = None
    with served(workdir, data) as daemon, Client(daemon.endpoint, timeout=60) as client:
        collection = client.collection(NAME)
        found = [{hit["id"] for hit in collection.search(q, k=K)} for q in queries]
        recall = statistics.mean(len(f & t) / K for f, t in zip(found, truth, strict=True))
        index = VectorIndex.load(
            workdir / "state" / "collections" / f"{NAME}.usearch", DIM, "cosine"
        )
        if index is None:
            raise RuntimeError("the saved index did not load")
        turn = iter(range(10**9))
        # a search in the daemon starts from an idle CPU (it waited for the request), the
        # in-process baseline from a busy one: searching after an idle gap as long as a
        # trivial round trip shows how much of the ratio that is
        gap_s = p50s_us({"count": collection.count}, settings)["count"] / 1e6

        def index_after_idle() -> float:
            time.sleep(gap_s)
            started = time.perf_counter()
            index.search(queries[next(turn) % QUERIES], K)
            return time.perf_counter() - started

        samples: dict[str, Callable[[], float]] = {
            "edged": timed(lambda: collection.search(queries[next(turn) % QUERIES], k=K)),
            "index": timed(lambda: index.search(queries[next(turn) % QUERIES], K)),
            "index_idle": index_after_idle,
        }
        p50 = {label: span * 1e6 for label, span in medians_s(samples, settings).items()}
        time.sleep(settings.idle_s)
        rss = psutil.Process(daemon.pid).memory_info().rss
    with DaemonProcess(workdir / "empty", {}) as empty:
        time.sleep(settings.idle_s)
        bare = psutil.Process(empty.pid).memory_info().rss
    return {"recall": recall, **p50, "rss": rss, "bare_rss": bare}


def upsert_rates(workdir: Path, settings: Settings, batch: int) -> dict[str, float]:
    """Acknowledged upserts/s of ``batch`` items each through the daemon (each committed to
    disk before its reply) against SQLite committing the same rows in this process."""
    data = clustered(20_000, seed=3)
    config = {"collections": {NAME: {"dim": DIM, "metric": "cosine"}}}
    rows = iter(range(10**9))

    def next_rows() -> tuple[list[str], Array]:
        start = next(rows) * batch % (len(data) - batch)
        return [f"u{start + i}" for i in range(batch)], data[start : start + batch]

    with (
        DaemonProcess(workdir / f"upsert-{batch}", config) as daemon,
        Client(daemon.endpoint, timeout=60) as client,
    ):
        collection = client.collection(NAME)
        edged = p50s_us({"edged": lambda: collection.upsert(*next_rows())}, settings)
    db = connect(workdir / f"plain-{batch}.sqlite3")
    db.execute("CREATE TABLE items (id TEXT PRIMARY KEY, vector BLOB, metadata TEXT)")

    def commit() -> None:
        ids, vectors = next_rows()
        db.execute("BEGIN IMMEDIATE")
        db.executemany(
            "INSERT OR REPLACE INTO items VALUES (?, ?, '{}')",
            [(i, v.tobytes()) for i, v in zip(ids, vectors, strict=True)],
        )
        db.execute("COMMIT")

    plain = p50s_us({"sqlite": commit}, settings)
    db.close()
    return {"edged": batch / (edged["edged"] / 1e6), "sqlite": batch / (plain["sqlite"] / 1e6)}
