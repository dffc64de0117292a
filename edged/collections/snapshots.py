"""Which database a collection serves: the one it grew itself, or a snapshot a bundle installed.

A collection that no bundle replaced keeps its files under its name (``NAME.sqlite3``, its index
``NAME.usearch``). Installing a snapshot (version V of collection NAME, from a signed bundle)
publishes the database as ``NAME@V.sqlite3``, opens it and builds its index while the old one
keeps serving, then commits by writing ``NAME@installed.json`` (the version and its sha256) in
one step; only then are the old files removed. A power cut before the commit leaves the pointer
naming the old database, and the next open removes the uncommitted one; after it, the new one
serves. "@" cannot occur in a collection's name, so no collection's files are another's.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path

from edged.errors import BadBundle
from edged.store import write_durably

log = logging.getLogger(__name__)

POINTER = "@installed.json"
#: what each stem's files end with: the database and its WAL, the index and its generation
SUFFIXES = (".sqlite3", ".sqlite3-wal", ".sqlite3-shm", ".usearch", ".usearch.partial", ".json")


@dataclass(frozen=True)
class Installed:
    """The snapshot a collection serves (version 0: the collection's own database), and the
    newest ever installed: an older one is a downgrade even after an authorised one."""

    version: int = 0
    sha256: str = ""
    newest: int = 0

    def after(self, version: int, sha256: str) -> Installed:
        return Installed(version, sha256, max(self.newest, version))


def installed(directory: Path, name: str) -> Installed:
    try:
        data = json.loads((directory / f"{name}{POINTER}").read_text())
    except FileNotFoundError:
        return Installed()
    return Installed(int(data["version"]), str(data["sha256"]), int(data["newest"]))


def stem(name: str, version: int) -> str:
    """What the files of ``name``'s database ``version`` are called, less their suffix."""
    return name if version == 0 else f"{name}@{version}"


def database(directory: Path, name: str, version: int) -> Path:
    return directory / f"{stem(name, version)}.sqlite3"


def commit(directory: Path, name: str, now: Installed) -> None:
    """Make ``now`` the database a restart serves, in one step."""
    write_durably(directory / f"{name}{POINTER}", json.dumps(asdict(now)))


def discard(directory: Path, name: str, version: int) -> None:
    """Remove the files of ``name``'s database ``version`` (before publishing it anew: an old
    WAL beside a new database would be replayed into it)."""
    _remove(directory, stem(name, version))


def sweep(directory: Path, name: str) -> None:
    """Remove the files of every database of ``name`` but the installed one: snapshots an
    install published and did not commit, and what one that committed had still to remove."""
    serving = stem(name, installed(directory, name).version)
    versions = {path.name[len(name) + 1 :].split(".")[0] for path in directory.glob(f"{name}@*")}
    stems = {f"{name}@{version}" for version in versions if version.isdigit()}
    for found in stems | {name}:
        if found != serving:
            _remove(directory, found)


def _remove(directory: Path, found: str) -> None:
    for suffix in SUFFIXES:
        path = directory / f"{found}{suffix}"
        if path.exists():
            log.info("removing %s: not the collection's installed database", path.name)
            path.unlink()


def check(path: Path, dim: int, metric: str) -> int:
    """Refuse a file that is not a sound snapshot of a collection of ``dim`` and ``metric``
    (``BAD_BUNDLE``); how many items it holds."""
    try:
        db = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
    except sqlite3.Error as exc:
        raise BadBundle(f"the collection snapshot does not open: {exc}") from None
    try:
        problems = [row[0] for row in db.execute("PRAGMA integrity_check")]
        if problems != ["ok"]:
            raise BadBundle(f"the collection snapshot is damaged: {'; '.join(problems[:3])}")
        meta = dict(db.execute("SELECT key, value FROM meta"))
        if (meta.get("dim"), meta.get("metric")) != (str(dim), metric):
            raise BadBundle(
                f"the snapshot holds vectors of dim {meta.get('dim')} and metric "
                f"{meta.get('metric')}; the collection is declared with {dim} and {metric}"
            )
        bad = db.execute(
            "SELECT count(*) FROM items WHERE length(vector) != ? OR NOT json_valid(metadata)",
            (4 * dim,),
        ).fetchone()[0]
        if bad:
            raise BadBundle(f"{bad} of the snapshot's items have a wrong vector or metadata")
        return int(db.execute("SELECT count(*) FROM items").fetchone()[0])
    except sqlite3.Error as exc:
        raise BadBundle(f"the file is not a collection snapshot: {exc}") from None
    finally:
        db.close()
