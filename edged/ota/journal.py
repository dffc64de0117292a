"""The install journal, and what a restart does with an install it interrupted.

Before each step of an install begins, ``<state>/ota/journal.json`` says so, durably: a power
cut at any instant leaves a journal naming the step that was under way. At the next start, and
before any model loads, ``recover`` settles it: an install that had committed (its version
recorded as the one to serve) is completed; any other is rolled back, its staging directory
and any version it published removed, so the version committed before serves. Either way the
outcome goes into the history, and nothing is left half-applied.

The history (``history.jsonl``, one install per line) and the status file (``status.json``,
the install under way or the last one) are here too: fleet agents read them.

Imports nothing heavy: a daemon without OTA configured still recovers a journal left behind.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from edged import faults
from edged.collections import snapshots
from edged.store import ModelStore, fsync_dir, write_durably

log = logging.getLogger(__name__)

JOURNAL = "journal.json"
HISTORY = "history.jsonl"
STATUS = "status.json"
#: an install's steps, in order; each is journaled before it begins
STEPS = (
    "verifying",
    "verified",
    "publishing",
    "published",
    "swapping",
    "gating",
    "rolling_back",
    "committing",
    "committed",
)


@dataclass(frozen=True)
class Entry:
    """The install under way: what it installs and how far it got."""

    bundle: str
    step: str
    started: float
    staging: str
    model: str | None = None
    version: int | None = None
    #: whether ``version`` in the store is this install's (a resumed one found it there)
    owns_version: bool = False
    #: "model", or "collection": ``model`` then names a collection (``edged.ota.snapshot``)
    kind: str = "model"


class Journal:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.entry: Entry | None = None

    def begin(self, bundle: Path, staging: Path, kind: str = "model") -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._write(Entry(str(bundle), STEPS[0], time.time(), str(staging), kind=kind))

    def step(self, step: str, **fields: Any) -> None:
        """Durably mark ``step`` as begun (with what is known by now), then go on."""
        assert self.entry is not None and step in STEPS
        self._write(replace(self.entry, step=step, **fields))

    def end(self) -> None:
        """The install is settled (its outcome recorded): no journal left to recover."""
        self.entry = None
        (self.directory / JOURNAL).unlink(missing_ok=True)
        fsync_dir(self.directory)

    def _write(self, entry: Entry) -> None:
        self.entry = entry
        write_durably(self.directory / JOURNAL, json.dumps(asdict(entry), indent=2))
        self.record({**self._status_fields(entry), "outcome": "installing"}, history=False)
        faults.point(f"ota.{entry.step}")

    @staticmethod
    def _status_fields(entry: Entry) -> dict[str, Any]:
        return {
            "bundle": entry.bundle,
            "started": entry.started,
            entry.kind: entry.model,
            "version": entry.version,
            "step": entry.step,
        }

    def record(self, record: dict[str, Any], *, history: bool = True) -> None:
        """Write ``record`` as the status, and append it to the history when it is an
        outcome. A failure is logged: the install itself stands, only its record is lost."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            if history:
                with (self.directory / HISTORY).open("a") as lines:
                    lines.write(json.dumps(record) + "\n")
                    lines.flush()
                    os.fsync(lines.fileno())
            write_durably(self.directory / STATUS, json.dumps(record, indent=2))
        except OSError as exc:
            log.error("cannot record the install in %s: %s", self.directory, exc)

    def history(self, last: int = 20) -> list[dict[str, Any]]:
        path = self.directory / HISTORY
        if not path.exists():
            return []
        lines = path.read_text().splitlines()[-last:]
        return [json.loads(line) for line in lines if line.strip()]

    def recover(self, store: ModelStore, collections: Path) -> dict[str, Any] | None:
        """Settle an install a crash or power cut interrupted (blocking; before any model
        loads); returns the outcome recorded, or ``None`` when there was none. A collection
        snapshot left published but not committed goes when its collection opens
        (``edged.collections.snapshots.sweep``)."""
        try:
            entry = Entry(**json.loads((self.directory / JOURNAL).read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:  # torn by the crash: nothing to trust
            log.error("unreadable install journal (%s); removing it", exc)
            self.end()
            return None
        self.entry = entry
        shutil.rmtree(entry.staging, ignore_errors=True)
        committed = entry.model is not None and entry.version == (
            snapshots.installed(collections, entry.model).version
            if entry.kind == "collection"
            else store.current(entry.model)
        )
        record = {**self._status_fields(entry), "recovered": True}
        if entry.step in ("committing", "committed") and committed:
            record.update(outcome="installed")
        else:
            owned = entry.owns_version and entry.kind == "model"
            if owned and entry.model is not None and entry.version is not None:
                store.remove(entry.model, entry.version)
            reason = f"interrupted at step {entry.step!r} by a restart; rolled back"
            record.update(outcome="rolled_back", code="INTERRUPTED", reason=reason)
        log.warning(
            "install of %s version %s from %s was interrupted at %s: %s",
            entry.model,
            entry.version,
            entry.bundle,
            entry.step,
            record["outcome"],
        )
        record["seconds"] = round(time.time() - entry.started, 3)
        self.record(record)
        self.end()
        return record
