"""One daemon per runtime directory, enforced with an flock.

ZeroMQ silently unlinks and re-binds an existing IPC path, so without this lock a second daemon
would steal the first one's socket. The kernel drops the lock when the holder dies, so a crash
never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edged.errors import AlreadyRunning


@contextmanager
def instance_lock(path: Path, what: str) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise AlreadyRunning(
                f"another edged (pid {holder}) is already serving {what}; stop it first or "
                f"set daemon.runtime_dir to run a second daemon"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)
