"""The on-disk model store: ``<state>/models/<name>/<version>/`` with a manifest per version.

A version appears only complete: files are written and fsynced in a staging directory, then the
directory is renamed into place, so a power cut leaves either nothing or the whole version (a
staging leftover is never read as a version, and a later add removes it once it is an hour
old).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edged import faults
from edged.errors import StoreError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STAGING = ".staging"
#: names of directories a removal renames a version to, inside STAGING
REMOVING = "removing-"
#: per model: the version an install committed, which a restart serves
CURRENT = "current"
FORMATS = ("onnx", "gguf")
_VERSION_DIR = re.compile(r"[1-9][0-9]*")
_CHUNK = 1 << 20
STALE_STAGING_S = 3600


@dataclass(frozen=True)
class Manifest:
    name: str
    version: int
    format: str
    #: the model file, relative to the version directory
    file: str
    size: int
    sha256: str
    #: ISO 8601, UTC
    created: str

    @classmethod
    def parse(cls, data: Any, where: Path) -> Manifest:
        fields = {
            "name": str,
            "version": int,
            "format": str,
            "file": str,
            "size": int,
            "sha256": str,
            "created": str,
        }
        if not isinstance(data, dict) or set(data) != set(fields):
            raise StoreError(f"{where}: a manifest needs exactly {', '.join(fields)}")
        for key, kind in fields.items():
            if type(data[key]) is not kind:
                raise StoreError(f"{where}: '{key}' must be {kind.__name__}")
        if data["format"] not in FORMATS or "/" in data["file"] or data["file"] in ("", ".", ".."):
            raise StoreError(f"{where}: bad format or file name")
        return cls(**data)


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def versions(self, name: str) -> list[int]:
        """Installed versions of ``name``, oldest first."""
        directory = self.root / name
        if not directory.is_dir():
            return []
        found = [
            int(entry.name)
            for entry in directory.iterdir()
            if _VERSION_DIR.fullmatch(entry.name) and (entry / MANIFEST).is_file()
        ]
        return sorted(found)

    def latest(self, name: str) -> Manifest | None:
        versions = self.versions(name)
        return self.manifest(name, versions[-1]) if versions else None

    def current(self, name: str) -> int | None:
        """The version last committed for ``name`` (``set_current``), if it is still stored."""
        try:
            version = int((self.root / name / CURRENT).read_text())
        except (OSError, ValueError):
            return None
        if version not in self.versions(name):
            log.warning("model %s: committed version %d is no longer stored", name, version)
            return None
        return version

    def set_current(self, name: str, version: int | None) -> None:
        """Record ``version`` as the one to serve after a restart (``None``: no record);
        atomic, and durable on return."""
        pointer = self.root / name / CURRENT
        if version is None:
            if pointer.exists():
                pointer.unlink()
                fsync_dir(pointer.parent)
            return
        pointer.parent.mkdir(parents=True, exist_ok=True)
        write_durably(pointer, f"{version}\n")

    def manifest(self, name: str, version: int) -> Manifest:
        path = self.root / name / str(version) / MANIFEST
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise StoreError(f"{path}: cannot read the manifest: {exc}") from None
        manifest = Manifest.parse(data, path)
        if (manifest.name, manifest.version) != (name, version):
            raise StoreError(f"{path}: says {manifest.name} v{manifest.version}")
        return manifest

    def model_path(self, manifest: Manifest) -> Path:
        return self.root / manifest.name / str(manifest.version) / manifest.file

    def _next_version(self, name: str) -> int:
        """One past every version directory, complete or not, so none is ever reused."""
        directory = self.root / name
        taken = [
            int(entry.name)
            for entry in (directory.iterdir() if directory.is_dir() else ())
            if _VERSION_DIR.fullmatch(entry.name)
        ]
        return max(taken, default=0) + 1

    def add(self, name: str, source: Path, fmt: str, golden: Path | None = None) -> Manifest:
        """Install ``source`` as the next version of ``name``, with the golden vectors a swap
        checks it against when given (``edged.models.validation``); returns its manifest."""
        with self.staging() as staging:
            target = staging / source.name
            _, digest = _copy_hashing(source, target)
            if golden is not None:
                _copy_hashing(golden, target.with_suffix(".golden.npz"))
            version = self._next_version(name)
            return self.publish(staging, name, version, fmt, source.name, sha256=digest)

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """An empty directory on the store's filesystem (so ``publish`` can rename it into
        place); removed on the way out unless it was published."""
        staging_root = self.root / STAGING
        staging_root.mkdir(parents=True, exist_ok=True)
        _remove_stale(staging_root)
        staging = Path(tempfile.mkdtemp(dir=staging_root))
        try:
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone already when published

    def publish(
        self,
        staging: Path,
        name: str,
        version: int,
        fmt: str,
        file: str,
        *,
        sha256: str | None = None,
    ) -> Manifest:
        """Make a staged directory (its files written and fsynced) version ``version`` of
        ``name``: the manifest is written, then the directory renamed into place in one step.
        ``sha256`` is the model file's, when already known (else it is read again)."""
        if fmt not in FORMATS:
            raise StoreError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
        if version in self.versions(name) or (self.root / name / str(version)).exists():
            raise StoreError(f"model {name!r} already has a version {version} in the store")
        model = staging / file
        size, digest = model.stat().st_size, sha256 or sha256_of(model)
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        manifest = Manifest(name, version, fmt, file, size, digest, created)
        _write_synced(staging / MANIFEST, json.dumps(asdict(manifest), indent=2).encode())
        fsync_dir(staging)
        final = self.root / name / str(version)
        final.parent.mkdir(parents=True, exist_ok=True)
        faults.point("store.publishing")
        staging.rename(final)
        fsync_dir(final.parent)
        log.info("stored %s version %d (%d bytes, sha256 %s)", name, version, size, digest[:12])
        return manifest

    def remove(self, name: str, version: int) -> None:
        """Delete a version (one that failed to install): renamed aside first, so a power cut
        never leaves a version directory half-deleted with its manifest still in place."""
        directory = self.root / name / str(version)
        if not directory.exists():
            return
        staging_root = self.root / STAGING
        staging_root.mkdir(parents=True, exist_ok=True)
        aside = Path(tempfile.mkdtemp(prefix=REMOVING, dir=staging_root))
        directory.rename(aside / "removed")
        fsync_dir(directory.parent)
        faults.point("store.removing")
        shutil.rmtree(aside, ignore_errors=True)

    def sweep(self) -> None:
        """Remove what removals cut off by a crash left behind (blocking); at start."""
        staging_root = self.root / STAGING
        for leftover in staging_root.glob(f"{REMOVING}*") if staging_root.is_dir() else ():
            shutil.rmtree(leftover, ignore_errors=True)


def _remove_stale(staging_root: Path) -> None:
    """Staging left by adds that a power cut or a crash interrupted; a recent one may belong
    to an add still running in another process."""
    cutoff = time.time() - STALE_STAGING_S
    for entry in staging_root.iterdir():
        with contextlib.suppress(OSError):
            if entry.stat().st_mtime < cutoff:
                shutil.rmtree(entry, ignore_errors=True)


def sha256_of(path: Path) -> str:
    import hashlib  # see _copy_hashing

    digest = hashlib.sha256()
    with path.open("rb") as data:
        while chunk := data.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _copy_hashing(source: Path, target: Path) -> tuple[int, str]:
    import hashlib  # here, not at the top: it maps OpenSSL (~3 MB) into a daemon that only
    # hashes while storing a model

    digest = hashlib.sha256()
    size = 0
    with source.open("rb") as src, target.open("wb") as dst:
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
            dst.write(chunk)
            size += len(chunk)
        dst.flush()
        os.fsync(dst.fileno())
    return size, digest.hexdigest()


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one step, on disk when this returns."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    tmp.replace(path)
    fsync_dir(path.parent)
