"""Installing a signed bundle: verify, extract, check, publish, swap, watch, commit or undo.

Steps, each journaled before it begins (``edged.ota.journal``: a restart settles an install a
power cut interrupted) and each leaving the daemon serving: the signature is checked against
the trusted keys; the bundle must suit this device and its version must be at least the newest
installed (unless a downgrade is authorised); the files are streamed into a staging directory
on the store's filesystem, each checked against the signed manifest; the staged version is
renamed into the store in one step; the model is hot swapped to it, which validates it
(interface, warm-up, golden vectors); live traffic on it passes the health gate
(``edged.ota.health``); and the version is committed: recorded as the one a restart serves.
A version that fails to swap in, or fails the gate (the previous version is swapped back), is
removed from the store again, and the reason recorded.

What a signed bundle may do is decided from its signed manifest, before a byte of model is
written (``Installer._plan``): a version older than the newest stored is a downgrade, refused
unless authorised, whether that older version is still stored or not (a replayed old bundle
must not take a device back: TUF's rollback attack); the version serving already is a no-op
(``already_installed``, no swap); the newest version stored byte for byte but not serving (an
install cut off before its swap, or pre-staged) goes on with the swap. Installs run one at a
time. Every outcome is appended to ``<state>/ota/history.jsonl``; ``<state>/ota/status.json``
holds the install under way or the last one, for fleet agents to read.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import stat
import time
from pathlib import Path
from typing import Any

from edged.collections.service import Collections
from edged.config import OtaConfig, read_pipeline
from edged.drift.reference import Reference
from edged.errors import BadBundle, ConfigError, EdgedError, Unhealthy
from edged.models.budget import MIB
from edged.models.loading import ModelLoader, in_fresh_thread
from edged.models.registry import ModelSlot, Registry, VersionSpec, as_edged_error
from edged.models.swap import Swapper
from edged.ota.bundle import Manifest, check_file_size, verified
from edged.ota.health import Baseline, HealthGate
from edged.ota.journal import Journal
from edged.ota.keys import TrustedKeys
from edged.ota.snapshot import SnapshotInstaller
from edged.ota.upload import Uploads
from edged.ota.verifying import Verifying
from edged.steps.pipeline import pipeline_path
from edged.store import ModelStore
from edged.tasks import TaskGroup

log = logging.getLogger(__name__)

#: inbox subdirectories: bundles being installed, installed, refused
INSTALLING, DONE, REJECTED = "installing", "done", "rejected"


class Plan(enum.Enum):
    """What installing a verified bundle means, given what is stored and serving."""

    #: a new version: extract, publish, swap
    PUBLISH = "publish"
    #: the version is stored byte for byte and is not serving: swap to it
    RESUME = "resume"
    #: the version is serving already: nothing to do
    SERVING = "serving"


class Installer(Verifying[Plan]):
    publish = Plan.PUBLISH

    def __init__(
        self,
        registry: Registry,
        loader: ModelLoader,
        swapper: Swapper,
        *,
        journal: Journal,
        config: OtaConfig,
        trusted: TrustedKeys,
        tasks: TaskGroup,
        collections: Collections,
    ) -> None:
        self.registry = registry
        self.loader = loader
        self.swapper = swapper
        self.journal = journal
        self.trusted = trusted
        self.gate = HealthGate(config)
        self.max_bytes = config.max_bundle_mb * MIB
        #: installs bundles of collection snapshots
        self.snapshots = SnapshotInstaller(collections, journal, trusted, self.max_bytes)
        self.keep_versions = config.keep_versions
        #: bundles pushed over the control socket, beside the install records
        self.uploads = Uploads(journal.directory / "uploads", self.max_bytes, tasks)
        self.tasks = tasks
        self._one_at_a_time = asyncio.Lock()
        self._inbox_task: asyncio.Task[None] | None = None
        #: inbox bundles that could not be moved out of the inbox, by (name, size, mtime):
        #: never installed (so never retried), and logged once
        self._unmovable: set[tuple[str, int, int]] = set()
        #: whether the inbox's bundles left by a previous run have been filed away
        self._swept = False

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
            log.info(
                "%s: %s version %d from %s",
                record["outcome"],
                record.get("model") or record.get("collection"),
                record["version"],
                bundle,
            )
            return record

    async def install_upload(self, sha256: str, *, allow_downgrade: bool) -> dict[str, Any]:
        """Install a finished upload; it goes either way: the history keeps the outcome."""
        bundle = self.uploads.completed(sha256)
        try:
            return await self.install(bundle, allow_downgrade=allow_downgrade)
        finally:
            self.uploads.remove(sha256)

    async def _install(self, bundle: Path, allow_downgrade: bool, record: dict[str, Any]) -> None:
        if await in_fresh_thread(self._kind, bundle) == "collection":
            await self.snapshots.install(bundle, allow_downgrade, record)
            return
        manifest, plan = await in_fresh_thread(self._stage, bundle, allow_downgrade)
        record.update(model=manifest.name, version=manifest.version)
        if plan is Plan.SERVING:
            reason = f"{manifest.name} version {manifest.version} is already serving; no change"
            record.update(outcome="already_installed", reason=reason)
            return
        record["resumed"] = plan is Plan.RESUME
        slot = self.registry.slot(manifest.name)
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
        monitors = self.loader.drift
        drift = None if monitors is None else monitors.get(slot.name)
        verdict = await self.gate.watch(runner, baseline, lambda: slot.runner is runner, drift)
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
        then renames). A bundle is moved to ``installing/`` before its install begins, then
        to ``done/``, or to ``rejected/`` with a ``.reason`` file beside it: whatever its
        install does (refused, or the daemon killed by it) it is never taken again by itself,
        so no bundle makes a restart loop. One that cannot be moved is never installed."""
        if self._inbox_task is not None and not self._inbox_task.done():
            return
        if not self._swept:
            self._swept = True
            _reject_interrupted(inbox)
        found = self._waiting(inbox)
        if found is not None:
            bundle, identity = found
            self._inbox_task = self.tasks.start(
                self._from_inbox(bundle, identity), f"inbox install {bundle.name}"
            )

    def _waiting(self, inbox: Path) -> tuple[Path, tuple[str, int, int]] | None:
        """The first bundle waiting in the inbox, and its identity (name, size, mtime)."""
        for path in sorted(inbox.glob("*.bundle")):
            with contextlib.suppress(OSError):
                info = path.stat()
                identity = (path.name, info.st_size, info.st_mtime_ns)
                if stat.S_ISREG(info.st_mode) and identity not in self._unmovable:
                    return path, identity
        return None

    async def _from_inbox(self, bundle: Path, identity: tuple[str, int, int]) -> None:
        claimed = _file_away(bundle, bundle.parent / INSTALLING, None)
        if claimed is None:  # installed in place, it could be taken again after any restart
            self._unmovable.add(identity)
            return
        try:
            await self.install(claimed)
        except EdgedError as exc:  # recorded by install; the reason also goes beside the file
            _file_away(claimed, bundle.parent / REJECTED, f"{exc.code}: {exc}\n")
        else:
            _file_away(claimed, bundle.parent / DONE, None)

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

    def _kind(self, bundle: Path) -> str:
        """What the bundle installs, as its verified manifest says (blocking)."""
        check_file_size(bundle, self.max_bytes)
        with verified(bundle, self.trusted) as opened:
            return opened.manifest.kind

    def _stage(self, bundle: Path, allow_downgrade: bool) -> tuple[Manifest, Plan]:
        """Verify, decide what the install means (``_plan``) and, for a new version, extract
        it into staging and publish it (blocking)."""
        check_file_size(bundle, self.max_bytes)
        with self.store.staging() as staging:
            manifest, plan = self._verify(bundle, staging, allow_downgrade)
            if plan is not Plan.PUBLISH:
                return manifest, plan
            golden, pipeline, model = manifest.golden, manifest.pipeline, manifest.model
            if golden is not None:  # where a swap looks for them: beside the model file
                (staging / golden.path).rename((staging / model.path).with_suffix(".golden.npz"))
            reference = manifest.reference
            if reference is not None:  # where the drift monitor looks: beside the model file
                shipped_reference = (staging / model.path).with_suffix(".reference.json")
                (staging / reference.path).rename(shipped_reference)
                try:
                    Reference.load(shipped_reference)
                except ValueError as exc:
                    raise BadBundle(f"the bundle's drift reference is not valid: {exc}") from None
            if pipeline is not None:  # checked now: a bad one is the bundle's fault
                shipped = pipeline_path(str(staging / model.path))
                (staging / pipeline.path).rename(shipped)
                try:
                    read_pipeline(shipped)
                except ConfigError as exc:
                    raise BadBundle(f"the bundle's pipeline is not valid: {exc}") from None
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
        return manifest, Plan.PUBLISH

    def _plan(self, manifest: Manifest, allow_downgrade: bool) -> Plan:
        """What installing the signed ``manifest`` means here. Refused: a version older than
        the newest stored, unless authorised, stored still or not (a replayed old bundle);
        and a stored version with other contents (a version's bytes never change)."""
        name, version = manifest.name, manifest.version
        slot = self.registry.slot(name)  # an undeclared model: refused before any write
        versions = self.store.versions(name)
        if version in versions:
            stored = self.store.manifest(name, version)
            if stored.sha256 != manifest.model.sha256:
                raise BadBundle(f"{name} version {version} is already installed, with other bytes")
            if slot.spec.config.path == str(self.store.model_path(stored)):
                return Plan.SERVING
        newest = max(versions, default=0)
        if version < newest and not allow_downgrade:
            raise BadBundle(
                f"{name} version {version} is older than the installed {newest}; a downgrade "
                f"must be authorised"
            )
        return Plan.RESUME if version in versions else Plan.PUBLISH

    def _settle(self, record: dict[str, Any], started: float) -> None:
        record["seconds"] = round(time.time() - started, 3)
        self.journal.record(record)
        if self.journal.entry is not None:
            self.journal.end()


def _file_away(bundle: Path, directory: Path, reason: str | None) -> Path | None:
    """Move a bundle into ``directory`` (with its ``reason`` beside it, if any); where it is
    now, or ``None`` when it could not be moved (logged)."""
    target = directory / bundle.name
    try:
        directory.mkdir(exist_ok=True)
        bundle.replace(target)
    except OSError as exc:
        log.error("cannot move %s to %s: %s", bundle, directory, exc)
        return None
    if reason is not None:
        try:
            (directory / f"{bundle.name}.reason").write_text(reason)
        except OSError as exc:
            log.error("cannot write why %s was refused: %s", target, exc)
    return target


def _reject_interrupted(inbox: Path) -> None:
    """Bundles whose install a previous run did not settle (a crash, a power cut, a stop, or
    the bundle itself killing the daemon) go to ``rejected/``: retried only when put back."""
    directory = inbox / INSTALLING
    if not directory.is_dir():
        return
    for bundle in sorted(directory.glob("*.bundle")):
        reason = (
            "INTERRUPTED: the daemon stopped before this install was settled (see edgectl "
            "history); put the bundle in the inbox again to retry\n"
        )
        log.warning("inbox bundle %s was being installed when the daemon stopped", bundle.name)
        _file_away(bundle, inbox / REJECTED, reason)
