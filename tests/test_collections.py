"""Vector collections in process: SQLite as the source of truth, the usearch index derived
from it, searches with and without metadata filters, and a saved index repaired after a crash
or rebuilt when it does not read."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

from edged.collections.collection import EXACT_LIMIT, Collection, distances
from edged.collections.store import Item
from edged.errors import BadRequest

DIM = 16


def vectors(count: int, seed: int = 0) -> np.ndarray[Any, Any]:
    return np.random.default_rng(seed).standard_normal((count, DIM)).astype(np.float32)


def items(data: np.ndarray[Any, Any], prefix: str = "item") -> list[Item]:
    return [
        Item(f"{prefix}{i}", vector, {"shelf": i % 3, "kind": "even" if i % 2 == 0 else "odd"})
        for i, vector in enumerate(data)
    ]


def exact_ids(
    data: np.ndarray[Any, Any], query: np.ndarray[Any, Any], k: int, metric: str = "cosine"
) -> list[str]:
    order = np.argsort(distances(metric, data, query), kind="stable")[:k]
    return [f"item{i}" for i in order]


T = TypeVar("T")


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


@pytest.mark.parametrize("metric", ["cosine", "l2", "ip"])
def test_search_finds_the_nearest_and_follows_upserts_and_deletes(
    tmp_path: Path, metric: str
) -> None:
    data = vectors(500)
    collection = Collection.open("c", DIM, metric, tmp_path)
    run(collection.upsert(items(data)))
    query = vectors(1, seed=9)[0]
    hits = collection.search(query, 10)
    assert [hit.id for hit in hits] == exact_ids(data, query, 10, metric)
    np.testing.assert_allclose(
        [hit.distance for hit in hits],
        np.sort(distances(metric, data, query))[:10],
        rtol=1e-4,
        atol=1e-4,
    )
    nearest = hits[0].id
    moved = Item(nearest, -query, {"shelf": 9})  # replaced: now the farthest
    run(collection.upsert([moved]))
    assert collection.search(query, 1)[0].id != nearest
    assert collection.get([nearest])[0].metadata == {"shelf": 9}
    assert run(collection.delete(["item1", "nope"])) == 1
    assert collection.count() == 499 and collection.get(["item1"]) == []
    assert all(hit.id != "item1" for hit in collection.search(data[1], 500))
    collection.close()


def test_a_filter_keeps_only_matching_items_exactly(tmp_path: Path) -> None:
    data = vectors(300)
    collection = Collection.open("c", DIM, "cosine", tmp_path)
    run(collection.upsert(items(data)))
    query = vectors(1, seed=3)[0]
    hits = collection.search(query, 5, {"shelf": 1, "kind": "odd"})
    allowed = [i for i in range(300) if i % 3 == 1 and i % 2 == 1]
    order = np.argsort(distances("cosine", data[allowed], query), kind="stable")[:5]
    assert [hit.id for hit in hits] == [f"item{allowed[i]}" for i in order]
    assert all(hit.metadata == {"shelf": 1, "kind": "odd"} for hit in hits)
    assert collection.search(query, 5, {"shelf": 7}) == []
    with pytest.raises(BadRequest, match="filter field"):
        collection.search(query, 5, {"a.b": 1})
    collection.close()


def test_a_large_filtered_set_is_searched_in_the_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("edged.collections.collection.EXACT_LIMIT", 10)
    assert EXACT_LIMIT > 10
    data = vectors(400)
    collection = Collection.open("c", DIM, "cosine", tmp_path)
    run(collection.upsert(items(data)))
    query = vectors(1, seed=5)[0]
    hits = collection.search(query, 10, {"kind": "even"})
    assert len(hits) == 10 and all(hit.metadata["kind"] == "even" for hit in hits)
    evens = data[::2]
    best = np.sort(distances("cosine", evens, query))[:10]
    np.testing.assert_allclose([hit.distance for hit in hits], best, rtol=1e-3, atol=1e-3)
    collection.close()


def test_bad_vectors_are_refused(tmp_path: Path) -> None:
    collection = Collection.open("c", DIM, "cosine", tmp_path)
    for bad, message in (
        (np.zeros(DIM - 1, np.float32), "finite vectors of 16"),
        (np.full(DIM, np.nan, np.float32), "finite vectors of 16"),
        (np.zeros(DIM, np.float32), "zero vector"),
    ):
        with pytest.raises(BadRequest, match=message):
            run(collection.upsert([Item("x", bad, {})]))
    assert collection.count() == 0
    collection.close()


def test_a_saved_index_is_reused_and_repaired_after_a_crash(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = vectors(200)
    collection = Collection.open("c", DIM, "cosine", tmp_path)
    run(collection.upsert(items(data)))
    collection.close()  # saves the index at this generation
    caplog.set_level(logging.INFO, "edged.collections.collection")
    again = Collection.open("c", DIM, "cosine", tmp_path)
    assert "building its index" not in caplog.text and "repairing" not in caplog.text
    assert [hit.id for hit in again.search(data[7], 1)] == ["item7"]
    moved = vectors(3, seed=2)
    run(again.upsert(items(vectors(5, seed=1), prefix="new")))
    run(again.upsert([Item(f"item{i}", moved[i], {}) for i in range(3)]))  # replaced: new keys
    run(again.delete(["item10", "item11"]))
    again.store.close()  # a crash: the saved index misses the last writes
    reopened = Collection.open("c", DIM, "cosine", tmp_path)
    assert "repairing its saved index: 8 items to add, 5 to remove" in caplog.text
    assert "building its index" not in caplog.text
    assert reopened.indexed == reopened.count() == 203
    assert reopened.search(vectors(5, seed=1)[2], 1)[0].id == "new2"
    assert [reopened.search(moved[i], 1)[0].id for i in range(3)] == ["item0", "item1", "item2"]
    assert "item10" not in {hit.id for hit in reopened.search(data[10], 20)}
    reopened.close()
    (tmp_path / "c.usearch").write_bytes(b"torn")  # a saved index that does not read
    rebuilt = Collection.open("c", DIM, "cosine", tmp_path)
    assert "building its index from 203 items" in caplog.text
    assert rebuilt.search(data[7], 1)[0].id == "item7"
    rebuilt.close()
    with pytest.raises(ValueError, match="dim 16 and metric cosine, not 8 and cosine"):
        Collection.open("c", 8, "cosine", tmp_path)
