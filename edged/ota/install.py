"""Installing a signed bundle: verify, extract, check, publish into the store, swap, keep or undo.

Steps, each leaving the daemon serving: the signature is checked against the trusted keys and
the files are streamed into a staging directory on the store's filesystem, each checked against
the signed manifest; the bundle must suit this device and its version must exceed every one
installed (unless a downgrade is authorised); the staged version is renamed into the store in
one step; the model is hot swapped to it, which validates it (interface, warm-up, golden
vectors). A version that fails to swap in is removed from the store again, and the reason
recorded. A retry of an install cut off between publishing and swapping (a power cut) finds
its version in the store, byte for byte, and goes on with the swap. Every install's outcome
is appended to ``<state>/ota/history.jsonl``, and the last
one written to ``<state>/ota/status.json`` for fleet agents to read.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from edged.errors import BadBundle, EdgedError
from edged.models.loading import ModelLoader, in_fresh_thread
from edged.models.registry import ModelSlot, Registry, as_edged_error
from edged.models.swap import Swapper
from edged.ota.bundle import Manifest, extract
from edged.ota.keys import TrustedKeys
from edged.store import ModelStore

log = logging.getLogger(__name__)


class Installer:
    def __init__(
        self,
        registry: Registry,
        loader: ModelLoader,
        swapper: Swapper,
        *,
        trusted: TrustedKeys,
        state: Path,
        max_bytes: int,
        keep_versions: int,
    ) -> None:
        self.registry = registry
        self.loader = loader
        self.swapper = swapper
        self.trusted = trusted
        self.directory = state / "ota"
        self.max_bytes = max_bytes
        self.keep_versions = keep_versions
        self._inbox_task: asyncio.Task[None] | None = None

    @property
    def store(self) -> ModelStore:
        return self.loader.store

    async def install(self, bundle: Path, *, allow_downgrade: bool = False) -> dict[str, Any]:
        """Install ``bundle`` and make it the model's active version; the outcome either way
        is recorded, and an error raised when it did not take."""
        started = time.time()
        record: dict[str, Any] = {"bundle": str(bundle), "started": started}
        try:
            manifest, resumed = await in_fresh_thread(self._stage, bundle, allow_downgrade)
            record.update(model=manifest.name, version=manifest.version, resumed=resumed)
            slot = self.registry.slot(manifest.name)
            if resumed and slot.version == manifest.version:
                raise BadBundle(f"{manifest.name} version {manifest.version} is already serving")
            target = self.loader.stored(slot.name, slot.config, manifest.version)
            try:
                report = await self.swapper.swap(slot, target)
            except BaseException:
                self.store.remove(manifest.name, manifest.version)  # never left installed
                raise
        except Exception as exc:  # recorded, then the command's error reply
            error = as_edged_error(exc, "the install failed unexpectedly; see the log")
            record.update(outcome="rejected", code=error.code, reason=str(error))
            self._record(record, started)
            log.warning("install of %s rejected: %s: %s", bundle, error.code, error)
            raise error from None
        record.update(outcome="installed", swap=report.fields(), pruned=self._prune(slot))
        self._record(record, started)
        log.info("installed %s version %d from %s", manifest.name, manifest.version, bundle)
        return record

    def poll(self, inbox: Path) -> None:
        """From the daemon's tick: install the next bundle in ``inbox``, if any and if no
        install runs. Names starting with "." are files still being written (an agent writes,
        then renames); a finished bundle moves to ``done/``, a refused one to ``rejected/``
        with a ``.reason`` file beside it."""
        if self._inbox_task is not None and not self._inbox_task.done():
            return
        waiting = sorted(p for p in inbox.glob("*.bundle") if p.is_file())
        if waiting:
            self._inbox_task = asyncio.get_running_loop().create_task(self._from_inbox(waiting[0]))

    async def _from_inbox(self, bundle: Path) -> None:
        try:
            await self.install(bundle)
        except EdgedError as exc:  # recorded by install; the reason also goes beside the file
            _file_away(bundle, "rejected", f"{exc.code}: {exc}\n")
        else:
            _file_away(bundle, "done", None)

    def _prune(self, slot: ModelSlot) -> list[int]:
        """Remove stored versions beyond the newest ``keep_versions``, except any loaded one
        and the rollback target; returns what went."""
        versions = self.store.versions(slot.name)
        keep = set(versions[-self.keep_versions :]) | set(slot.loaded_versions())
        if slot.previous is not None:
            keep.add(slot.previous.version)
        pruned = [version for version in versions if version not in keep]
        for version in pruned:
            self.store.remove(slot.name, version)
        return pruned

    def history(self, last: int = 20) -> list[dict[str, Any]]:
        path = self.directory / "history.jsonl"
        if not path.exists():
            return []
        lines = path.read_text().splitlines()[-last:]
        return [json.loads(line) for line in lines if line.strip()]

    def _stage(self, bundle: Path, allow_downgrade: bool) -> tuple[Manifest, bool]:
        """Verify and extract into staging, check it suits this device, publish it (blocking).
        ``True`` with the manifest when this very version was published by an install that
        was interrupted before its swap: the retry goes on from there."""
        with self.store.staging() as staging:
            manifest = extract(bundle, self.trusted, staging, self.max_bytes)
            manifest.check_device()
            installed = self.store.versions(manifest.name)
            newest = max(installed, default=0)
            if manifest.version in installed:
                stored = self.store.manifest(manifest.name, manifest.version)
                if stored.sha256 == manifest.model.sha256:
                    return manifest, True
                raise BadBundle(f"{manifest.name} version {manifest.version} is already installed")
            if manifest.version < newest and not allow_downgrade:
                raise BadBundle(
                    f"{manifest.name} version {manifest.version} is older than the installed "
                    f"{newest}; a downgrade must be authorised"
                )
            golden = manifest.golden
            model = manifest.model
            if golden is not None:  # where a swap looks for them: beside the model file
                (staging / golden.path).rename((staging / model.path).with_suffix(".golden.npz"))
            self.store.publish(
                staging,
                manifest.name,
                manifest.version,
                manifest.backend,
                model.path,
                sha256=model.sha256,
            )
        return manifest, False

    def _record(self, record: dict[str, Any], started: float) -> None:
        record["seconds"] = round(time.time() - started, 3)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with (self.directory / "history.jsonl").open("a") as history:
                history.write(json.dumps(record) + "\n")
                history.flush()
                os.fsync(history.fileno())
            status = self.directory / "status.json"
            tmp = status.with_suffix(".tmp")
            tmp.write_text(json.dumps(record, indent=2))
            tmp.replace(status)
        except OSError as exc:  # the install itself stands; only its record is lost
            log.error("cannot record the install in %s: %s", self.directory, exc)


def _file_away(bundle: Path, outcome: str, reason: str | None) -> None:
    """Move a processed bundle out of the inbox, so it is never installed twice."""
    target = bundle.parent / outcome
    try:
        target.mkdir(exist_ok=True)
        bundle.replace(target / bundle.name)
        if reason is not None:
            (target / f"{bundle.name}.reason").write_text(reason)
    except OSError as exc:
        log.error("cannot move %s to %s: %s", bundle, target, exc)
