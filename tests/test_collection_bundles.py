"""Collection snapshots (galleries) in signed bundles: built with ``edged bundle build
--collection``, installed by a live daemon with a model's signature, version and rollback rules,
switched to while searches go on, kept across restarts, and settled after a power cut at any
step."""

from __future__ import annotations

import json
import subprocess
import sys
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edged.collections import snapshots
from edged.collections.store import Item, VectorStore
from edged.errors import BadBundle, EdgedError
from edged.faults import ENV
from edged.ota import bundle
from edged.testing import DaemonProcess
from tests.bundles import calling, history, install, killed_during, signing_keys
from tests.conftest import DaemonFactory, edgectl_json

DIM = 4


def gallery(tmp_path: Path, prefix: str, count: int, dim: int = DIM, seed: int = 0) -> Path:
    """A snapshot of a collection of ``count`` items "PREFIX0".. (l2, ``dim``), as
    ``edgectl collections snapshot`` writes one."""
    path = tmp_path / f"{prefix}-{count}-{dim}-{seed}.sqlite3"
    store = VectorStore(path, dim, "l2")
    data = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    store.upsert([Item(f"{prefix}{i}", data[i], {"n": i}) for i in range(count)])
    store.close()
    return path


def gallery_bundle(
    tmp_path: Path, keys: dict[str, Path], version: int, snapshot: Path, name: str = "gallery"
) -> Path:
    out = tmp_path / f"{name}-{version}-{snapshot.stem}.bundle"
    built = subprocess.run(
        [
            *(sys.executable, "-m", "edged", "bundle", "build", str(snapshot), "--collection"),
            *("-o", str(out), "--name", name, "--version", str(version)),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(built.stdout)["version"] == version
    bundle.sign(out, keys["private"])
    return out


def config(keys: dict[str, Path]) -> dict[str, Any]:
    return {
        "ota": {"trusted_keys": str(keys["trusted"])},
        "collections": {"gallery": {"dim": DIM, "metric": "l2"}},
    }


def ids(daemon: DaemonProcess) -> set[str]:
    with daemon.client(timeout=30) as client:
        hits = client.collection("gallery").search(np.zeros(DIM), k=1000)
    return {hit["id"] for hit in hits}


def files(daemon: DaemonProcess) -> list[str]:
    """The collections directory, less SQLite's WAL files of the open database."""
    found = (daemon.workdir / "state" / "collections").iterdir()
    return sorted(path.name for path in found if not path.name.endswith(("-wal", "-shm")))


def searching(daemon: DaemonProcess) -> AbstractContextManager[dict[str, Any]]:
    """A client searching the gallery all along (``calling``); the id prefixes it found."""
    return calling(
        daemon,
        lambda client: (
            client.collection("gallery").search(np.zeros(DIM), k=1)[0]["id"].rstrip("0123456789")
        ),
    )


def test_collection_manifests_follow_their_own_rules(tmp_path: Path) -> None:
    snapshot = gallery(tmp_path, "g", 3)
    out = tmp_path / "g.bundle"
    manifest = bundle.build(out, "gallery", 1, snapshot, kind="collection")
    assert (manifest.kind, manifest.backend, manifest.model.role) == (
        "collection",
        "sqlite",
        "collection",
    )
    assert bundle.inspect(out)["manifest"]["kind"] == "collection"
    model = bundle.Manifest.parse(manifest.to_bytes()).model
    assert model.sha256 == manifest.model.sha256
    # a model bundle's manifest has no "kind": an edged that knows none reads it still
    as_model = bundle.build(tmp_path / "m.bundle", "m", 1, snapshot, backend="onnx")
    assert "kind" not in json.loads(as_model.to_bytes())
    with pytest.raises(BadBundle, match="snapshot and nothing else"):
        bundle.build(
            tmp_path / "x.bundle", "gallery", 1, snapshot, golden=snapshot, kind="collection"
        )
    data = json.loads(manifest.to_bytes())
    for change, message in [
        ({"backend": "onnx"}, "a collection bundle's backend 'onnx' is not one of sqlite"),
        ({"kind": "thing"}, "kind 'thing' is not one of model, collection"),
        ({"files": [data["files"][0] | {"role": "model"}]}, "bad role"),
        ({"files": []}, "exactly one collection file"),
    ]:
        with pytest.raises(BadBundle, match=message):
            bundle.Manifest.parse(json.dumps(data | change).encode())


def test_a_snapshot_is_checked_before_it_is_published(tmp_path: Path) -> None:
    snapshot = gallery(tmp_path, "g", 50)
    assert snapshots.check(snapshot, DIM, "l2") == 50
    with pytest.raises(BadBundle, match="dim 4 and metric l2; the collection is declared with 8"):
        snapshots.check(snapshot, 8, "l2")
    with pytest.raises(BadBundle, match="declared with 4 and cosine"):
        snapshots.check(snapshot, DIM, "cosine")
    text = tmp_path / "text.sqlite3"
    text.write_text("not a database at all, " * 100)
    with pytest.raises(BadBundle, match="not a collection snapshot"):
        snapshots.check(text, DIM, "l2")
    damaged = tmp_path / "damaged.sqlite3"
    raw = bytearray(snapshot.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 64] = bytes(range(64))  # inside a b-tree page
    damaged.write_bytes(bytes(raw))
    with pytest.raises(BadBundle, match=r"damaged|not a collection snapshot"):
        snapshots.check(damaged, DIM, "l2")
    short = VectorStore(tmp_path / "short.sqlite3", DIM, "l2")  # a vector of the wrong length
    short.upsert([Item("a", np.ones(3, np.float32), {})])
    short.close()
    with pytest.raises(BadBundle, match="1 of the snapshot's items have a wrong vector"):
        snapshots.check(tmp_path / "short.sqlite3", DIM, "l2")


def test_a_gallery_bundle_replaces_the_collection_while_searches_go_on(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    keys = signing_keys(tmp_path)
    daemon = start_daemon(config(keys), workdir=tmp_path / "d")
    with daemon.client(timeout=30) as client:
        local = np.random.default_rng(9).standard_normal((20, DIM)).astype(np.float32)
        client.collection("gallery").upsert([f"local{i}" for i in range(20)], local)
    first = gallery_bundle(tmp_path, keys, 1, gallery(tmp_path, "one", 2000))
    with searching(daemon) as tally:
        done = install(daemon, first)
    assert done["outcome"] == "installed" and done["items"] == 2000, done
    assert done["collection"] == "gallery" and done["version"] == 1
    assert tally["failures"] == 0 and tally["requests"] > 0
    found = ids(daemon)
    assert len(found) == 1000 and all(name.startswith("one") for name in found)
    with daemon.client(timeout=30) as client:
        shelf = client.collection("gallery")
        assert shelf.count() == 2000 and shelf.get(["local0"])[0] == []
        items, _ = shelf.get(["one7"])
        assert items == [{"id": "one7", "metadata": {"n": 7}}]
        shelf.upsert(["added"], np.full((1, DIM), 50, np.float32))  # it takes writes, as before
    listed = edgectl_json(daemon, "collections")["collections"][0]
    assert (listed["version"], listed["count"]) == (1, 2001)
    assert install(daemon, first)["outcome"] == "already_installed"
    second = gallery_bundle(tmp_path, keys, 2, gallery(tmp_path, "two", 300, seed=1))
    with searching(daemon) as tally:
        assert install(daemon, second)["outcome"] == "installed"
    assert tally["failures"] == 0 and "two" in tally["seen"]
    assert files(daemon) == [
        "gallery@2.json",
        "gallery@2.sqlite3",
        "gallery@2.usearch",
        "gallery@installed.json",
    ]
    daemon.stop()
    again = start_daemon(config(keys), workdir=tmp_path / "d")
    with again.client(timeout=30) as client:
        assert client.collection("gallery").count() == 300
    assert edgectl_json(again, "collections")["collections"][0]["version"] == 2
    # built once, at the install, and saved then: the restart read it back
    assert again.log().count("building its index from 300 items") == 1
    assert [record["outcome"] for record in history(again)] == [
        "installed",
        "already_installed",
        "installed",
    ]


def test_bad_gallery_bundles_are_refused_and_the_collection_keeps_serving(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    keys = signing_keys(tmp_path)
    daemon = start_daemon(config(keys), workdir=tmp_path / "d")
    assert (
        install(daemon, gallery_bundle(tmp_path, keys, 3, gallery(tmp_path, "three", 40)))[
            "outcome"
        ]
        == "installed"
    )
    before = files(daemon)
    older = gallery_bundle(tmp_path, keys, 2, gallery(tmp_path, "two", 10))
    unsigned = tmp_path / "unsigned.bundle"
    bundle.build(unsigned, "gallery", 4, gallery(tmp_path, "x", 5), kind="collection")
    wide = gallery_bundle(tmp_path, keys, 5, gallery(tmp_path, "wide", 5, dim=8))
    text = tmp_path / "text.sqlite3"
    text.write_text("no database " * 200)
    cases = [
        (older, "BAD_BUNDLE", "older than the installed 3; a downgrade must be authorised"),
        (
            gallery_bundle(tmp_path, keys, 3, gallery(tmp_path, "other", 7)),
            "BAD_BUNDLE",
            "with other bytes",
        ),
        (unsigned, "BAD_SIGNATURE", "not signed"),
        (wide, "BAD_BUNDLE", "dim 8 and metric l2; the collection is declared with 4"),
        (gallery_bundle(tmp_path, keys, 6, text), "BAD_BUNDLE", "not a collection snapshot"),
        (
            gallery_bundle(tmp_path, keys, 7, gallery(tmp_path, "y", 5), name="nope"),
            "UNKNOWN_COLLECTION",
            "unknown collection 'nope'",
        ),
    ]
    for path, code, message in cases:
        with daemon.control(timeout=120) as control, pytest.raises(EdgedError) as refused:
            control.command("install", path=str(path))
        assert refused.value.code == code and message in str(refused.value), refused.value
        assert ids(daemon) == {f"three{i}" for i in range(40)}
        assert files(daemon) == before
    # an authorised downgrade takes; a replay of the newer one is then an upgrade again
    assert install(daemon, older, allow_downgrade=True)["outcome"] == "installed"
    assert ids(daemon) == {f"two{i}" for i in range(10)}
    assert [r["outcome"] for r in history(daemon)][-1] == "installed"


def test_a_gallery_over_the_memory_budget_is_refused(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    keys = signing_keys(tmp_path)
    tight = config(keys) | {"memory": {"budget_mb": 16, "reserve_mb": 0}}
    tight["collections"]["gallery"]["dim"] = 256
    daemon = start_daemon(tight, workdir=tmp_path / "d")
    big = gallery_bundle(tmp_path, keys, 1, gallery(tmp_path, "big", 8000, dim=256))
    with daemon.control(timeout=120) as control, pytest.raises(EdgedError) as refused:
        control.command("install", path=str(big))
    assert refused.value.code == "BUDGET_EXCEEDED", refused.value
    assert files(daemon) == ["gallery.sqlite3"]
    assert edgectl_json(daemon, "collections")["collections"][0]["version"] == 0


#: fault points before the commit (the old collection serves after a restart) and after it
BEFORE_COMMIT = ["ota.verified", "ota.published", "ota.swapping", "ota.committing"]
AFTER_COMMIT = ["collections.committed", "ota.committed"]


@pytest.mark.parametrize("fault", BEFORE_COMMIT + AFTER_COMMIT)
def test_a_power_cut_during_a_gallery_install_settles_at_restart(
    start_daemon: DaemonFactory, tmp_path: Path, fault: str
) -> None:
    keys = signing_keys(tmp_path)
    workdir = tmp_path / "d"
    old = gallery_bundle(tmp_path, keys, 1, gallery(tmp_path, "old", 30))
    new = gallery_bundle(tmp_path, keys, 2, gallery(tmp_path, "new", 60, seed=1))
    first = start_daemon(config(keys), workdir=workdir)
    assert install(first, old)["outcome"] == "installed"
    first.stop()
    doomed = start_daemon(config(keys), workdir=workdir, env={ENV: fault})
    killed_during(doomed, new)
    daemon = start_daemon(config(keys), workdir=workdir)
    last = history(daemon)[-1]
    assert last["recovered"] is True and last["collection"] == "gallery"
    if fault in BEFORE_COMMIT:
        assert last["outcome"] == "rolled_back" and last["code"] == "INTERRUPTED"
        assert ids(daemon) == {f"old{i}" for i in range(30)}
        assert files(daemon) == [
            "gallery@1.json",
            "gallery@1.sqlite3",
            "gallery@1.usearch",
            "gallery@installed.json",
        ]
        assert install(daemon, new)["outcome"] == "installed"  # the retry takes
    else:
        assert last["outcome"] == "installed"
        assert install(daemon, new)["outcome"] == "already_installed"
    assert ids(daemon) == {f"new{i}" for i in range(60)}
    assert not [name for name in files(daemon) if name.startswith(("gallery@1", ".staging"))]
