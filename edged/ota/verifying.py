"""What every install does before it writes a byte, whatever the bundle installs."""

from __future__ import annotations

import abc
import enum
from pathlib import Path
from typing import Generic, TypeVar

from edged.ota.bundle import Manifest, verified
from edged.ota.journal import Journal
from edged.ota.keys import TrustedKeys

P = TypeVar("P", bound=enum.Enum)


class Verifying(abc.ABC, Generic[P]):
    """An installer of one kind of bundle: its plan for a bundle is decided from the signed
    manifest, and the files are extracted only under the plan that publishes them."""

    journal: Journal
    trusted: TrustedKeys
    max_bytes: int
    #: the plan whose install extracts the bundle's files
    publish: P

    @abc.abstractmethod
    def _plan(self, manifest: Manifest, allow_downgrade: bool) -> P:
        """What installing the signed ``manifest`` means here; raises when it is refused."""

    def _verify(
        self, bundle: Path, staging: Path, allow_downgrade: bool, kind: str = "model"
    ) -> tuple[Manifest, P]:
        """Journal the install, check the signature and that the bundle suits this device,
        decide its plan, and for a publishing one extract its files into ``staging``."""
        self.journal.begin(bundle, staging, kind)
        with verified(bundle, self.trusted) as opened:
            manifest = opened.manifest
            manifest.check_device()
            plan = self._plan(manifest, allow_downgrade)
            if plan is self.publish:
                opened.extract(staging, self.max_bytes)
        self.journal.step("verified", model=manifest.name, version=manifest.version)
        return manifest, plan
