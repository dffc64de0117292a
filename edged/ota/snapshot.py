"""Installing a collection snapshot (a gallery) from a signed bundle, by the rules of a model's.

The bundle's signature is checked against the trusted keys, and its version weighed against the
collection's installed snapshot before a byte is written: the one serving is a no-op
(``already_installed``); an older one than the newest ever installed is a downgrade, refused
unless authorised; the same version with other bytes is refused. The database streams into a
staging directory beside the collection's files and must pass SQLite's ``integrity_check`` and
match the collection's declaration (dim, metric, every vector's length, metadata as JSON).
Published under its own name, it is opened and indexed while the collection serves what it
served, then committed in one step (``edged.collections.snapshots``) and served; a snapshot
that fails any step is removed and the collection goes on as it was. Each step is journaled,
so a restart settles an install a power cut interrupted.
"""

from __future__ import annotations

import enum
import shutil
import tempfile
from pathlib import Path
from typing import Any

from edged.collections import snapshots
from edged.collections.service import Collections
from edged.errors import BadBundle, UnknownCollection
from edged.models.loading import in_fresh_thread
from edged.ota.bundle import Manifest, check_file_size
from edged.ota.journal import Journal
from edged.ota.keys import TrustedKeys
from edged.ota.verifying import Verifying
from edged.store import fsync_dir


class Plan(enum.Enum):
    #: a new snapshot: extract, check, publish, switch
    PUBLISH = "publish"
    #: the snapshot serving already
    SERVING = "serving"


class SnapshotInstaller(Verifying[Plan]):
    publish = Plan.PUBLISH

    def __init__(
        self, collections: Collections, journal: Journal, trusted: TrustedKeys, max_bytes: int
    ) -> None:
        self.collections = collections
        self.journal = journal
        self.trusted = trusted
        self.max_bytes = max_bytes

    async def install(self, bundle: Path, allow_downgrade: bool, record: dict[str, Any]) -> None:
        manifest, plan, count = await in_fresh_thread(self._stage, bundle, allow_downgrade)
        record.update(collection=manifest.name, version=manifest.version)
        if plan is Plan.SERVING:
            reason = f"collection {manifest.name} version {manifest.version} is already serving"
            record.update(outcome="already_installed", reason=f"{reason}; no change")
            return
        await in_fresh_thread(self.journal.step, "swapping")
        try:
            prepared = await self.collections.prepare(manifest.name, manifest.version, count)
        except BaseException:
            directory = self.collections.directory
            await in_fresh_thread(snapshots.discard, directory, manifest.name, manifest.version)
            raise
        await in_fresh_thread(self.journal.step, "committing")
        await self.collections.switch(prepared, manifest.model.sha256)
        await in_fresh_thread(self.journal.step, "committed")
        record.update(outcome="installed", items=count)

    def _stage(self, bundle: Path, allow_downgrade: bool) -> tuple[Manifest, Plan, int]:
        """Verify, decide, and for a new snapshot extract, check and publish it (blocking)."""
        check_file_size(bundle, self.max_bytes)
        directory = self.collections.directory
        directory.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=directory))
        try:
            manifest, plan = self._verify(bundle, staging, allow_downgrade, kind="collection")
            if plan is Plan.SERVING:
                return manifest, plan, 0
            config = self.collections.configs[manifest.name]
            shipped = staging / manifest.model.path
            count = snapshots.check(shipped, config.dim, config.metric)
            self.journal.step("publishing", owns_version=True)
            snapshots.discard(directory, manifest.name, manifest.version)
            shipped.replace(snapshots.database(directory, manifest.name, manifest.version))
            fsync_dir(directory)
            self.journal.step("published")
            return manifest, plan, count
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _plan(self, manifest: Manifest, allow_downgrade: bool) -> Plan:
        name, version = manifest.name, manifest.version
        if name not in self.collections.configs:
            declared = ", ".join(sorted(self.collections.configs)) or "none"
            raise UnknownCollection(f"unknown collection {name!r}; declared: {declared}")
        installed = snapshots.installed(self.collections.directory, name)
        if version == installed.version:
            if installed.sha256 != manifest.model.sha256:
                raise BadBundle(
                    f"collection {name} version {version} is already installed, with other bytes"
                )
            return Plan.SERVING
        if version < installed.newest and not allow_downgrade:
            raise BadBundle(
                f"collection {name} version {version} is older than the installed "
                f"{installed.newest}; a downgrade must be authorised"
            )
        return Plan.PUBLISH
