"""Receiving bundles over the control socket: in chunks, resumable, bounded.

An upload is named by the sha256 of the bundle it carries, so a client that lost its
connection, or a daemon that restarted, finds the partial upload again by that name and goes on
where its bytes end: the files are the only state. A partial upload is
``<dir>/<sha256>-<size>.part``; once every byte is in, its hash is checked, and the verified
bundle, fsynced, becomes ``<dir>/<sha256>.bundle`` for ``install`` to take. Abandoned uploads
cannot fill the disk: at most ``MAX_UPLOADS`` are kept (a new one drops the oldest) and those
older than ``STALE_S`` are removed at start.

Chunks are appended on the event loop (a page-cache write each, and one request at a time per
upload that way); hashing and fsync run in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from edged.errors import BadBundle, BadRequest, TooLarge
from edged.models.loading import in_fresh_thread
from edged.protocol import Buffer
from edged.store import fsync_dir, sha256_of
from edged.tasks import TaskGroup

log = logging.getLogger(__name__)

#: uploads kept, partial or complete: a new one beyond this drops the oldest
MAX_UPLOADS = 4
#: uploads older than this (seconds) are removed at start
STALE_S = 24 * 3600
_SHA256 = re.compile(r"[0-9a-f]{64}")
_KINDS = (".part", ".bundle")


class Uploads:
    def __init__(self, directory: Path, max_bytes: int, tasks: TaskGroup) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self._tasks = tasks
        #: sha256 -> the verification of its fully received upload, while it runs
        self._completing: dict[str, asyncio.Task[None]] = {}
        directory.mkdir(parents=True, exist_ok=True)
        self._drop_stale()

    async def receive(
        self, sha256: str, size: int, chunk: tuple[int, Buffer] | None = None
    ) -> dict[str, Any]:
        """One ``upload`` request: append ``chunk`` (offset, data) if given, then say how far
        the upload is; the request that finds every byte in waits for the verification."""
        received = self.offer(sha256, size)
        if chunk is not None:
            received = self._write(sha256, size, received, *chunk)
        if received == size:
            await self._complete(sha256, size)
        return {"received": received, "size": size, "complete": received == size}

    def offer(self, sha256: str, size: int) -> int:
        """How many bytes of this bundle have arrived. A new upload is created (room made
        first); a partial one declared with another size starts over."""
        _check_name(sha256)
        if size > self.max_bytes:
            raise TooLarge(
                f"a bundle of {size} bytes is over this device's limit of {self.max_bytes} "
                f"bytes (ota.max_bundle_mb = {self.max_bytes >> 20})"
            )
        if sha256 in self._completing or self._bundle(sha256).exists():
            return size
        part = self._part(sha256, size)
        if not part.exists():
            for other in self.directory.glob(f"{sha256}-*.part"):
                log.info("upload %s: declared with another size now; starting over", sha256)
                other.unlink(missing_ok=True)
            self._make_room()
            part.touch()
        return part.stat().st_size

    def completed(self, sha256: str) -> Path:
        """The verified bundle of a finished upload, for ``install``."""
        _check_name(sha256)
        bundle = self._bundle(sha256)
        if not bundle.is_file():
            raise BadRequest(f"no finished upload {sha256}: upload every byte of it first")
        return bundle

    def remove(self, sha256: str) -> None:
        """A finished upload, once installed or refused."""
        _check_name(sha256)
        self._bundle(sha256).unlink(missing_ok=True)

    def _write(self, sha256: str, size: int, received: int, offset: int, data: Buffer) -> int:
        """Append ``data``, which must start where the upload ends and stay within its size."""
        if offset != received:
            raise BadRequest(
                f"upload {sha256} has {received} bytes: the next chunk goes at offset "
                f"{received}, not {offset}"
            )
        if offset + len(data) > size:
            raise BadRequest(
                f"{len(data)} bytes at offset {offset} go past the declared size {size}"
            )
        if len(data):
            with self._part(sha256, size).open("ab") as part:
                part.write(data)
        return offset + len(data)

    async def _complete(self, sha256: str, size: int) -> None:
        """Verify a fully received upload and make it a bundle ready to install; once,
        however many requests ask for it."""
        bundle = self._bundle(sha256)
        if bundle.exists():
            return
        task = self._completing.get(sha256)
        if task is None:
            task = self._tasks.start(
                in_fresh_thread(_verify, self._part(sha256, size), sha256, bundle),
                f"verify upload {sha256[:12]}",
            )
            self._completing[sha256] = task
            task.add_done_callback(lambda _: self._completing.pop(sha256, None))
        await task

    def _make_room(self) -> None:
        """Drop the oldest uploads so that one more keeps at most ``MAX_UPLOADS``."""
        uploads = self._uploads()
        for _, path in uploads[: max(0, len(uploads) - MAX_UPLOADS + 1)]:
            log.warning("upload %s dropped to make room for a new one", path.name)
            path.unlink(missing_ok=True)

    def _drop_stale(self) -> None:
        """At start: uploads nobody finished or installed within ``STALE_S``."""
        cutoff = time.time() - STALE_S
        for mtime, path in self._uploads():
            if mtime < cutoff:
                log.info("upload %s abandoned; removed", path.name)
                path.unlink(missing_ok=True)

    def _uploads(self) -> list[tuple[float, Path]]:
        """Every upload kept, partial or complete, oldest (least recently written) first."""
        found = []
        for path in self.directory.iterdir():
            if path.suffix in _KINDS:
                with contextlib.suppress(FileNotFoundError):
                    found.append((path.stat().st_mtime, path))
        return sorted(found)

    def _part(self, sha256: str, size: int) -> Path:
        return self.directory / f"{sha256}-{size}.part"

    def _bundle(self, sha256: str) -> Path:
        return self.directory / f"{sha256}.bundle"


def _check_name(sha256: str) -> None:
    """It becomes a file name: nothing but a sha256 gets that far."""
    if not _SHA256.fullmatch(sha256):
        raise BadRequest("'sha256' must be 64 lower-case hex digits")


def _verify(part: Path, sha256: str, bundle: Path) -> None:
    """Blocking: the received bytes must hash to ``sha256``; then they are made durable and
    renamed into place. A mismatch is deleted (a retry starts over)."""
    actual = sha256_of(part)
    if actual != sha256:
        part.unlink(missing_ok=True)
        raise BadBundle(
            f"the uploaded bytes hash to {actual}, not {sha256}: corrupted, or not the bundle "
            f"declared; upload it again"
        )
    with part.open("rb") as data:
        os.fsync(data.fileno())
    part.replace(bundle)
    fsync_dir(bundle.parent)
