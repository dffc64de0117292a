"""The Mender update module ``edged-bundle``: a Mender client installs signed edged bundles
through the daemon, with Mender's states mapped onto edged's install (docs/OTA.md#mender).

The client runs the module as ``edged-bundle STATE FILES`` for each state of an update
(Mender's update module protocol, version 3); ``FILES`` is the payload's working tree, and its
``tmp/`` lasts for the whole update. Mender's Artifact is a plain ``module-image`` of type
``edged-bundle`` whose one file is the bundle.

- ``Download``: the module reads the bundle from Mender's stream itself, so it checks the edged
  signature (against the daemon's ``ota.trusted_keys``) before any later state: a bundle
  edged would refuse fails the update here, nothing installed.
- ``ArtifactInstall``: the bundle is pushed to the daemon over the control socket and installed,
  and the state ends when edged has settled it: committed after its health gate, or refused
  or rolled back (the state then fails, and the old version serves).
- ``NeedsArtifactReboot``: No. ``SupportsRollback``: Yes for a model (edged keeps the version
  before), No for a collection snapshot.
- ``ArtifactCommit``: edged committed at install; the state checks that the version serves.
- ``ArtifactRollback``: edged's ``rollback`` of the model, when this update had installed it.
- ``ArtifactFailure``, ``Cleanup``: nothing left to undo: a failed edged install leaves the old
  version serving, and Mender removes the working tree.

The daemon is reached at ``$EDGED_CONTROL`` (default: the local control socket), as edgectl
does. Errors go to stderr, which Mender logs, and fail the state.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edged.client import Client
from edged.errors import EdgedError
from edged.ota.bundle import Manifest, verify
from edged.ota.keys import TrustedKeys
from edged.paths import default_control_endpoint
from edged.pushing import PROBE_EVERY_S, push

#: what Mender calls this module, and the Artifact's payload type
MODULE = "edged-bundle"
#: seconds a control request waits; an install waits out the health gate
TIMEOUT_S = 30.0
INSTALL_TIMEOUT_S = 3600.0
CHUNK_BYTES = 1 << 20
BUNDLE = "edged.bundle"
STATE_FILE = "edged-update.json"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print(f"usage: {MODULE} STATE FILES (run by the Mender client)", file=sys.stderr)
        return 2
    state, files = args[0], Path(args[1])
    handler = STATES.get(state)
    if handler is None:  # states this module has nothing to do in (the reboot ones)
        return 0
    try:
        handler(Update(files))
    except (EdgedError, OSError, ValueError) as exc:
        code = getattr(exc, "code", None)
        print(f"{MODULE} {state}: {f'{code}: ' if code else ''}{exc}", file=sys.stderr)
        return 1
    return 0


class Update:
    """One update's working tree and what the module recorded in it between states."""

    def __init__(self, files: Path) -> None:
        self.files = files
        self.bundle = files / "tmp" / BUNDLE
        self._state = files / "tmp" / STATE_FILE

    def recorded(self) -> dict[str, Any]:
        try:
            found: dict[str, Any] = json.loads(self._state.read_text())
        except FileNotFoundError:
            return {}
        return found

    def record(self, **fields: Any) -> None:
        tmp = self._state.with_suffix(".partial")
        tmp.write_text(json.dumps({**self.recorded(), **fields}))
        tmp.replace(self._state)


def control() -> Client:
    return Client(os.environ.get("EDGED_CONTROL") or default_control_endpoint(), timeout=TIMEOUT_S)


def download(update: Update) -> None:
    """Take the bundle from Mender's stream and check its signature before anything else."""
    update.bundle.parent.mkdir(parents=True, exist_ok=True)
    taken = 0
    while stream := (update.files / "stream-next").read_text().strip():
        with (update.files / stream).open("rb") as source, update.bundle.open("wb") as out:
            shutil.copyfileobj(source, out, CHUNK_BYTES)
        taken += 1
    if taken != 1:
        raise ValueError(f"an {MODULE} Artifact carries one file, the bundle; this one has {taken}")
    with control() as client:
        config = client.command("config")["config"]
    keys = config.get("ota", {}).get("trusted_keys")
    if not keys:
        raise ValueError("the daemon has no ota.trusted_keys: it installs no bundle")
    manifest = verify(update.bundle, TrustedKeys(Path(keys)))
    update.record(manifest=json.loads(manifest.to_bytes()))


def install(update: Update) -> None:
    """Push the bundle and install it; done when edged has committed it."""
    with control() as client:
        sha256 = push(
            client,
            update.bundle,
            chunk_bytes=CHUNK_BYTES,
            timeout=TIMEOUT_S,
            patience=INSTALL_TIMEOUT_S,
        )
        record = client.command(
            "install", upload=sha256, timeout=INSTALL_TIMEOUT_S, probe_every=PROBE_EVERY_S
        )
    update.record(installed=record)
    print(f"{MODULE}: {record['outcome']}: {json.dumps(record)}")


def needs_reboot(update: Update) -> None:
    print("No")


def supports_rollback(update: Update) -> None:
    print("Yes" if _manifest(update).kind == "model" else "No")


def commit(update: Update) -> None:
    """The version edged committed at install must be the one serving."""
    manifest = _manifest(update)
    if manifest.kind != "model":
        return
    with control() as client:
        model = client.command("models")["models"].get(manifest.name, {})
    if model.get("version") != manifest.version:
        raise EdgedError(
            f"{manifest.name} serves version {model.get('version')}, not the installed "
            f"{manifest.version}: it was swapped or rolled back since"
        )


def rollback(update: Update) -> None:
    """Undo this update's install, if it installed anything: edged's rollback of the model."""
    installed = update.recorded().get("installed")
    if not installed or installed.get("outcome") != "installed":
        return  # refused, rolled back by edged, or already installed before: nothing to undo
    manifest = _manifest(update)
    with control() as client:
        swapped = client.command("rollback", model=manifest.name, timeout=INSTALL_TIMEOUT_S)
    print(f"{MODULE}: {manifest.name} rolled back to version {swapped.get('version')}")


def _manifest(update: Update) -> Manifest:
    recorded = update.recorded().get("manifest")
    if recorded is None:
        raise ValueError("no verified bundle in this update (its Download state did not run)")
    return Manifest.parse(json.dumps(recorded).encode())


STATES = {
    "Download": download,
    "ArtifactInstall": install,
    "NeedsArtifactReboot": needs_reboot,
    "SupportsRollback": supports_rollback,
    "ArtifactCommit": commit,
    "ArtifactRollback": rollback,
}


if __name__ == "__main__":
    sys.exit(main())
