"""Vector collections through a live daemon: texts embedded by an ONNX text encoder and found
by a text query, vectors as tensor frames, metadata filters, clear errors, and every
acknowledged write still there after a restart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edged.errors import BadRequest, UnknownCollection
from edged.tinybert import build_tiny_bert
from tests.conftest import DaemonFactory

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
    assert "building its index from 299 stored items" in again.log()
    again.stop()
    third = start_daemon(config, workdir=workdir)  # a clean stop saved the index: read back
    with third.client(timeout=30) as client:
        assert client.collection("points").search(data[9], k=1)[0]["id"] == "p9"
    # the one rebuild in the shared log is the second start's
    assert third.log().count("building its index from 299") == 1
