"""Installing a signed bundle: verify, extract, check, publish, swap, watch, commit or undo.

Steps, each journaled before it begins (``edged.ota.journal``: a restart settles an install a
power cut interrupted) and each leaving the daemon serving: the signature is checked against
the trusted keys and the files are streamed into a staging directory on the store's
filesystem, each checked against the signed manifest; the bundle must suit this device and its
version must exceed every one installed (unless a downgrade is authorised); the staged version
is renamed into the store in one step; the model is hot swapped to it, which validates it
(interface, warm-up, golden vectors); live traffic on it passes the health gate
(``edged.ota.health``); and the version is committed: recorded as the one a restart serves.
A version that fails to swap in, or fails the gate (the previous version is swapped back), is
removed from the store again, and the reason recorded. A retry of an install whose version is
already stored byte for byte (say, pre-staged) goes on with the swap. Installs run one at a
time. Every outcome is appended to ``<state>/ota/history.jsonl``; ``<state>/ota/status.json``
holds the install under way or the last one, for fleet agents to read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from edged.config import OtaConfig
from edged.errors import BadBundle, EdgedError, Unhealthy
from edged.models.budget import MIB
from edged.models.loading import ModelLoader, in_fresh_thread
from edged.models.registry import ModelSlot, Registry, VersionSpec, as_edged_error
from edged.models.swap import Swapper
from edged.ota.bundle import Manifest, extract
from edged.ota.health import Baseline, HealthGate
from edged.ota.journal import Journal
from edged.ota.keys import TrustedKeys
from edged.ota.upload import Uploads
from edged.store import ModelStore

log = logging.getLogger(__name__)


class Installer:
    def __init__(
        self,
        registry: Registry,
        loader: ModelLoader,
        swapper: Swapper,
        *,
        journal: Journal,
        config: OtaConfig,
        trusted: TrustedKeys,
    ) -> None:
        self.registry = registry
        self.loader = loader
        self.swapper = swapper
        self.journal = journal
        self.trusted = trusted
        self.gate = HealthGate(config)
        self.max_bytes = config.max_bundle_mb * MIB
        self.keep_versions = config.keep_versions
        #: bundles pushed over the control socket, beside the install records
        self.uploads = Uploads(journal.directory / "uploads", self.max_bytes)
        self._one_at_a_time = asyncio.Lock()
        self._inbox_task: asyncio.Task[None] | None = None

    @property
    def store(self) -> ModelStore:
        return self.loader.store

    async def install(self, bundle: Path, *, allow_downgrade: bool = False) -> dict[str, Any]:
        """Install ``bundle`` and make it the model's committed version; the outcome either
        way is recorded, and an error raised when it did not take."""
        async with self._one_at_a_time:
            started = time.time()
            record: dict[str, Any] = {"bundle": str(bundle), "started": started}
            try:
                await self._install(bundle, allow_downgrade, record)
            except Exception as exc:  # recorded, then the command's error reply
                error = as_edged_error(exc, "the install failed unexpectedly; see the log")
                outcome = "rolled_back" if isinstance(error, Unhealthy) else "rejected"
                record.update(outcome=outcome, code=error.code, reason=str(error))
                self._settle(record, started)
                log.warning("install of %s %s: %s: %s", bundle, outcome, error.code, error)
                raise error from None
            self._settle(record, started)
            log.info("installed %s version %d from %s", record["model"], record["version"], bundle)
            return record

    async def install_upload(self, sha256: str, *, allow_downgrade: bool) -> dict[str, Any]:
        """Install a finished upload; it goes either way: the history keeps the outcome."""
        bundle = self.uploads.completed(sha256)
        try:
            return await self.install(bundle, allow_downgrade=allow_downgrade)
        finally:
            self.uploads.remove(sha256)

    async def _install(self, bundle: Path, allow_downgrade: bool, record: dict[str, Any]) -> None:
        manifest, resumed = await in_fresh_thread(self._stage, bundle, allow_downgrade)
        record.update(model=manifest.name, version=manifest.version, resumed=resumed)
        slot = self.registry.slot(manifest.name)
        if resumed and slot.version == manifest.version:
            raise BadBundle(f"{manifest.name} version {manifest.version} is already serving")
        await in_fresh_thread(self.journal.step, "swapping")
        previous, baseline = slot.spec, Baseline.of(slot.runner)
        # what a restart serves until this install commits
        await in_fresh_thread(self.loader.commit, slot.name, previous)
        target = self.loader.stored(slot.name, slot.config, manifest.version)
        try:
            record["swap"] = (await self.swapper.swap(slot, target)).fields()
            await in_fresh_thread(self.journal.step, "gating")
            await self._gate(slot, target, previous, baseline, record)
        except BaseException:
            if self.journal.entry is not None and self.journal.entry.owns_version:
                self.store.remove(manifest.name, manifest.version)  # never left installed
            raise
        await in_fresh_thread(self.journal.step, "committing")
        await in_fresh_thread(self.loader.commit, slot.name, target)
        await in_fresh_thread(self.journal.step, "committed")
        record.update(outcome="installed", pruned=self._prune(slot))

    async def _gate(
        self,
        slot: ModelSlot,
        target: VersionSpec,
        previous: VersionSpec,
        baseline: Baseline,
        record: dict[str, Any],
    ) -> None:
        """Watch the new version on live traffic; swap the previous one back if it fails."""
        runner = slot.runner
        if runner is None or self.gate.window_s == 0:
            return
        verdict = await self.gate.watch(runner, baseline, lambda: slot.runner is runner)
        record["health"] = verdict.fields()
        if verdict.healthy:
            return
        await in_fresh_thread(self.journal.step, "rolling_back")
        log.warning(
            "model %s version %d failed its health gate (%s); rolling back to version %d",
            slot.name,
            target.version,
            verdict.reason,
            previous.version,
        )
        if slot.runner is runner:
            await self.swapper.swap(slot, previous, force=True)
        raise Unhealthy(
            f"{slot.name} version {target.version} failed its health gate: {verdict.reason}; "
            f"rolled back to version {previous.version}"
        )

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
        return self.journal.history(last)

    def _stage(self, bundle: Path, allow_downgrade: bool) -> tuple[Manifest, bool]:
        """Verify and extract into staging, check it suits this device, publish it (blocking).
        ``True`` with the manifest when this very version is already stored, byte for byte:
        the install goes on from there."""
        with self.store.staging() as staging:
            self.journal.begin(bundle, staging)
            manifest = extract(bundle, self.trusted, staging, self.max_bytes)
            manifest.check_device()
            self.journal.step("verified", model=manifest.name, version=manifest.version)
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
            self.journal.step("publishing", owns_version=True)
            self.store.publish(
                staging,
                manifest.name,
                manifest.version,
                manifest.backend,
                model.path,
                sha256=model.sha256,
            )
        self.journal.step("published")
        return manifest, False

    def _settle(self, record: dict[str, Any], started: float) -> None:
        record["seconds"] = round(time.time() - started, 3)
        self.journal.record(record)
        if self.journal.entry is not None:
            self.journal.end()


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
