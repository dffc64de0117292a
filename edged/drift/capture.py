"""Sample capture: recent requests' inputs and outputs kept on the device for retraining, in a
ring of at most ``max_bytes`` on disk (``[models.X.drift] capture_mb``).

Each captured request is one ``<seq>.npz``, its zero-padded sequence number making names sort
by time: arrays ``input.<name>`` and ``output.<name>`` and ``meta``, a JSON string (the version,
the unix time and the alarms up). A file is written under a temporary name and renamed, so one
that has its name is whole; the oldest files are removed first to keep the total, the new file
included, within the cap. Files are not fsynced: a power cut may cost the newest ones, which an
export skips, rather than the flash wear of a sync per request.

Writes run on the drift monitor's thread, exports on a thread of their own; the ring's files
and total are kept in memory, read from the directory once, on the first write or export.
"""

from __future__ import annotations

import io
import json
import logging
import re
import threading
import time
import zipfile
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)
Array = np.ndarray[Any, Any]
SEQ_DIGITS = 12
CAPTURED = re.compile(rf"(\d{{{SEQ_DIGITS}}})\.npz")
SIDES = ("input", "output")


@dataclass(frozen=True)
class Exported:
    #: requests written to the export
    count: int
    #: bytes of the files written
    bytes: int


class Capture:
    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        #: requests not kept because they alone are larger than the ring
        self.skipped = 0
        self._files: deque[tuple[int, int]] = deque()  # (seq, bytes), oldest first
        self._total = 0
        self._next_seq = 0
        self._recovered = False
        self._failing = False
        self._lock = threading.Lock()

    def write(
        self,
        version: int,
        inputs: Mapping[str, Array],
        outputs: Mapping[str, Array],
        alarms: Mapping[str, tuple[str, ...]],
    ) -> None:
        """Keep one request, removing the oldest ones to make room (blocking)."""
        arrays = {
            f"{side}.{name}": array
            for side, tensors in zip(SIDES, (inputs, outputs), strict=True)
            for name, array in tensors.items()
            if array.dtype != object  # strings: not loadable without pickle
        }
        if sum(array.nbytes for array in arrays.values()) > self.max_bytes:
            self.skipped += 1
            return
        meta = {"version": version, "time": time.time(), "alarms": dict(alarms)}
        contents: dict[str, Any] = {"meta": np.array(json.dumps(meta)), **arrays}
        buffer = io.BytesIO()
        np.savez(buffer, **contents)
        data = buffer.getbuffer()
        if len(data) > self.max_bytes:
            self.skipped += 1
            return
        with self._lock:
            try:
                self._recover()
                self._make_room(len(data))
                self._store(data)
            except OSError as exc:
                self._failed(exc)

    def _store(self, data: memoryview) -> None:
        seq = self._next_seq
        path = self._path(seq)
        temporary = path.with_name(f".{path.name}.tmp")
        try:
            temporary.write_bytes(data)
            temporary.replace(path)
        except OSError:
            temporary.unlink(missing_ok=True)
            raise
        self._next_seq += 1
        self._files.append((seq, len(data)))
        self._total += len(data)
        if self._failing:
            self._failing = False
            log.info("sample capture in %s writes again", self.directory)

    def _failed(self, exc: OSError) -> None:
        """Log the first of a run of failures (a full disk fails every write)."""
        if not self._failing:
            self._failing = True
            log.error(
                "sample capture in %s stopped: %s; it resumes when it can", self.directory, exc
            )

    def _make_room(self, size: int) -> None:
        while self._files and self._total + size > self.max_bytes:
            seq, taken = self._files.popleft()
            self._path(seq).unlink(missing_ok=True)
            self._total -= taken

    def _recover(self) -> None:
        """The ring a previous run left, within this run's cap; a temporary file is a write cut
        short."""
        if self._recovered:
            return
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        found: list[tuple[int, int]] = []
        for path in self.directory.iterdir():
            match = CAPTURED.fullmatch(path.name)
            if match:
                found.append((int(match[1]), path.stat().st_size))
            elif path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)
        found.sort()
        self._files = deque(found)
        self._total = sum(size for _, size in found)
        self._next_seq = found[-1][0] + 1 if found else 0
        self._make_room(0)
        self._recovered = True

    def _path(self, seq: int) -> Path:
        return self.directory / f"{seq:0{SEQ_DIGITS}d}.npz"

    def export(self, out: Path) -> Exported:
        """Write the ring as .npy files, one directory per request, ``<out>/<seq>/`` (blocking).
        The ring keeps filling meanwhile: a file rotated out before its turn is left out. An
        ``OSError`` is a failure to write ``out``."""
        with self._lock:
            self._recover()
            files = [seq for seq, _ in self._files]
        out.mkdir(parents=True, exist_ok=True)
        count = written = 0
        for seq in files:
            arrays = self._read(seq)
            if arrays is not None:
                written += _unpack(arrays, out / f"{seq:0{SEQ_DIGITS}d}")
                count += 1
        return Exported(count, written)

    def _read(self, seq: int) -> dict[str, Array] | None:
        """A captured request's arrays; ``None`` when rotated out or unreadable."""
        path = self._path(seq)
        try:
            with np.load(path, allow_pickle=False) as saved:
                return {key: saved[key] for key in saved.files}
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            log.warning("sample capture: %s is unreadable, not exported: %s", path, exc)
            return None


def _unpack(arrays: dict[str, Array], directory: Path) -> int:
    """One request as ``input.<name>.npy`` and ``output.<name>.npy`` files and ``meta.json``
    (which also maps each tensor to its file, as a '/' in a name becomes '_'); bytes written."""
    directory.mkdir(exist_ok=True)
    meta = json.loads(str(arrays.pop("meta", np.array("{}"))))
    files: dict[str, dict[str, str]] = {side: {} for side in SIDES}
    written = 0
    for key, array in arrays.items():
        side, name = key.split(".", 1)
        path = directory / f"{side}.{name.replace('/', '_')}.npy"
        np.save(path, array, allow_pickle=False)
        files[side][name] = path.name
        written += path.stat().st_size
    text = json.dumps(meta | {"files": files}, indent=1)
    (directory / "meta.json").write_text(text)
    return written + len(text)
