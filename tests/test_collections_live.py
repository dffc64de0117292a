"""Vector collections through a live daemon: texts embedded by an ONNX text encoder and found
by a text query, vectors as tensor frames, metadata filters, clear errors, and every
acknowledged write still there after a restart."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edged.collections import snapshots
from edged.errors import BadRequest, BudgetExceeded, UnknownCollection
from edged.tinybert import build_tiny_bert
from tests.conftest import EDGECTL, DaemonFactory, edgectl_json

DOCS = {
    "motor": "the motor is hot and fast",
    "camera": "a red camera on the tree",
    "moon": "the moon and the sun",
    "dog": "the cat and the dog in the house",
}


@pytest.fixture
def config(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    encoder = build_tiny_bert(tmp_path_factory.mktemp("bert") / "encoder.onnx")
    return {
        "models": {"bert": {"path": str(encoder), "embed": {"normalize": True}}},
        "collections": {
            "docs": {"dim": 32, "metric": "cosine", "model": "bert"},
            "points": {"dim": 4, "metric": "l2"},
        },
    }


def test_texts_embedded_by_an_onnx_encoder_are_found_by_a_text_query(
    start_daemon: DaemonFactory, config: dict[str, object]
) -> None:
    daemon = start_daemon(config)
    with daemon.client(timeout=30) as client:
        docs = client.collection("docs")
        kinds = [{"kind": "machine" if i < 2 else "nature"} for i in range(len(DOCS))]
        docs.upsert(list(DOCS), texts=list(DOCS.values()), metadata=kinds)
        assert docs.count() == 4
        for name, text in DOCS.items():  # each text is its own nearest neighbour
            hits = docs.search(text=text, k=2)
            assert hits[0]["id"] == name and hits[0]["distance"] == pytest.approx(0, abs=1e-5)
        own = client.embed("bert", ["a hot motor"])[0]
        by_vector = docs.search(own, k=4)
        assert [h["id"] for h in docs.search(text="a hot motor", k=4)] == [
            h["id"] for h in by_vector
        ]
        nature = docs.search(own, k=4, where={"kind": "nature"})
        assert {h["id"] for h in nature} == {"moon", "dog"}
        items, vectors = docs.get(["camera", "nope"])
        assert items == [{"id": "camera", "metadata": {"kind": "machine"}}]
        np.testing.assert_allclose(vectors[0], client.embed("bert", DOCS["camera"])[0], rtol=1e-6)
        assert docs.delete(["camera", "nope"]) == 1
        assert "camera" not in {h["id"] for h in docs.search(text=DOCS["camera"], k=4)}


def test_bad_collection_requests_get_clear_errors(
    start_daemon: DaemonFactory, config: dict[str, object]
) -> None:
    daemon = start_daemon(config)
    with daemon.client(timeout=30) as client:
        points = client.collection("points")
        cases = [
            (lambda: client.collection("nope").count(), UnknownCollection, "unknown collection"),
            (lambda: points.upsert(["a"], np.ones((1, 3))), BadRequest, "finite vectors of 4"),
            (lambda: points.upsert(["a", "b"], np.ones((1, 4))), BadRequest, r"\[2, dim\]"),
            (lambda: points.upsert(["a", "a"], np.ones((2, 4))), BadRequest, "must not repeat"),
            (lambda: points.upsert(["a"], texts=["x"]), BadRequest, "no model to embed"),
            (lambda: points.upsert(["a"]), BadRequest, "'vectors' tensor or 'texts'"),
            (lambda: points.search(np.ones(4), k=0), BadRequest, "'k' must be"),
            (lambda: points.search(np.ones(4), where={"a b": 1}), BadRequest, "filter field"),
            (
                lambda: points.upsert(["a"], np.full((1, 4), np.inf)),
                BadRequest,
                "finite vectors",
            ),
        ]
        for call, error, message in cases:
            with pytest.raises(error, match=message):
                call()
        assert points.count() == 0
        points.upsert(["a"], np.ones((1, 4)))
        assert points.search(np.ones(4))[0]["id"] == "a"  # still serving


def test_acknowledged_writes_survive_a_kill_and_a_clean_restart(
    start_daemon: DaemonFactory, config: dict[str, object], tmp_path: Path
) -> None:
    rng = np.random.default_rng(0)
    data = rng.standard_normal((300, 4)).astype(np.float32)
    ids = [f"p{i}" for i in range(300)]
    workdir = tmp_path / "d"
    daemon = start_daemon(config, workdir=workdir)
    with daemon.client(timeout=30) as client:
        points = client.collection("points")
        for start in range(0, 300, 50):
            points.upsert(ids[start : start + 50], data[start : start + 50])
        points.delete(["p0"])
    daemon.kill()  # no index saved: the next start rebuilds it from SQLite
    again = start_daemon(config, workdir=workdir)
    with again.client(timeout=30) as client:
        points = client.collection("points")
        assert points.count() == 299
        items, vectors = points.get(ids[1:])
        assert [item["id"] for item in items] == ids[1:]
        np.testing.assert_array_equal(vectors, data[1:])
        assert points.search(data[7], k=1)[0]["id"] == "p7"
    assert "building its index from 299 items" in again.log()
    again.stop()
    third = start_daemon(config, workdir=workdir)  # a clean stop saved the index: read back
    with third.client(timeout=30) as client:
        assert client.collection("points").search(data[9], k=1)[0]["id"] == "p9"
    # the one rebuild in the shared log is the second start's
    assert third.log().count("building its index from 299") == 1


UPSERT_STREAM = """
import sys
import numpy as np
from edged.client import Client
client = Client(sys.argv[1], timeout=5)  # the daemon is killed: the last one times out
points = client.collection("points")
start = int(sys.argv[2])
for batch in range(start, start + 10_000):
    ids = [f"b{batch}-{i}" for i in range(10)]
    vectors = np.random.default_rng(batch).standard_normal((10, 4)).astype(np.float32)
    points.upsert(ids, vectors)
    print(batch, flush=True)  # acknowledged: on disk
"""


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_daemon_killed_during_upsert_streams_keeps_every_acknowledged_write(
    start_daemon: DaemonFactory, config: dict[str, object], tmp_path: Path, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    workdir = tmp_path / "d"
    daemon = start_daemon(config, workdir=workdir)
    writer = subprocess.Popen(
        [sys.executable, "-c", UPSERT_STREAM, daemon.endpoint, "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert writer.stdout is not None
    assert writer.stdout.readline()  # writes are flowing
    time.sleep(rng.uniform(0.05, 0.6))
    daemon.kill()
    acknowledged = [int(line) for line in [writer.stdout.readline(), *writer.stdout] if line]
    writer.wait(timeout=60)
    writer.stdout.close()
    acknowledged.insert(0, 0)
    again = start_daemon(config, workdir=workdir)
    with again.client(timeout=60) as client:
        points = client.collection("points")
        last = max(acknowledged)
        for batch in range(last + 2):  # the acknowledged, and the one in flight at the kill
            ids = [f"b{batch}-{i}" for i in range(10)]
            items, vectors = points.get(ids)
            if batch in acknowledged:
                expected = np.random.default_rng(batch).standard_normal((10, 4))
                assert [item["id"] for item in items] == ids
                np.testing.assert_array_equal(vectors, expected.astype(np.float32))
            else:
                assert len(items) in (0, 10), f"batch {batch} is half there"
        assert points.count() in (10 * (last + 1), 10 * (last + 2))
        assert points.search(np.ones(4), k=1)  # the index was rebuilt and serves


def test_a_collections_index_is_charged_to_the_memory_budget(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    config = {
        "memory": {"budget_mb": 24, "reserve_mb": 0},
        "collections": {"wide": {"dim": 1024, "metric": "l2"}},
    }
    daemon = start_daemon(config)
    rng = np.random.default_rng(0)
    stored = 0
    with daemon.client(timeout=30) as client:
        wide = client.collection("wide")
        with pytest.raises(BudgetExceeded, match="collection 'wide': 250 more items need"):
            while stored < 10_000:  # 40 MB of vectors: far beyond the budget
                ids = [f"v{i}" for i in range(stored, stored + 250)]
                wide.upsert(ids, rng.standard_normal((250, 1024)))
                stored += 250
        assert stored >= 250 and wide.count() == stored  # the refused write changed nothing
        charged = client.ping()["memory"]["models"]["collection:wide"]["charged_bytes"]
        assert charged >= 4 * 1024 * stored  # at least the vectors themselves


def test_edgectl_lists_compacts_and_snapshots_collections(
    start_daemon: DaemonFactory, config: dict[str, object], tmp_path: Path
) -> None:
    import sqlite3

    daemon = start_daemon(config)
    with daemon.client(timeout=30) as client:
        points = client.collection("points")
        points.upsert([f"p{i}" for i in range(100)], np.ones((100, 4)) + np.arange(100)[:, None])
        points.delete([f"p{i}" for i in range(50)])
    listed = {c["name"]: c for c in edgectl_json(daemon, "collections")["collections"]}
    assert listed["points"]["count"] == 50 and listed["points"]["dim"] == 4
    assert listed["docs"] | {"count": 0} == listed["docs"] and listed["docs"]["model"] == "bert"
    compacted = edgectl_json(daemon, "collections", "compact", "points")["collection"]
    assert compacted["file_bytes"] <= listed["points"]["file_bytes"]
    out = tmp_path / "points-snapshot.sqlite3"
    edgectl_json(daemon, "collections", "snapshot", "points", "--out", str(out))
    with sqlite3.connect(out) as copy:
        assert copy.execute("SELECT count(*) FROM items").fetchone()[0] == 50
    assert snapshots.check(out, 4, "l2") == 50  # what a collection bundle may carry
    stat = edgectl_json(daemon, "collections", "stat", "points")
    assert stat["action"] == "stat" and stat["collection"]["count"] == 50
    assert stat["collection"]["version"] == 0
    done = subprocess.run(
        [*EDGECTL, "--control", daemon.control_endpoint, "collections", "compact", "nope"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1 and "UNKNOWN_COLLECTION" in done.stderr
