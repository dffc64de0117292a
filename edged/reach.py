"""Why a client cannot reach an ``ipc://`` endpoint, found out at once rather than after a
timeout: no socket file (no daemon), a socket this user may not open, or a socket file left
behind by a daemon that is gone. ZeroMQ itself retries such a connect silently for ever, so a
client would otherwise only ever see a timeout. A few system calls: made when a client connects
and when it times out, never per request.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import stat
from pathlib import Path
from typing import Any

from edged.errors import ClientTimeout, NoDaemon, SocketAccessDenied


def _ipc_path(endpoint: str) -> Path | None:
    """The socket file of an ``ipc://`` endpoint; None for other transports and for Linux's
    abstract sockets (``ipc://@name``), which have no file."""
    if not endpoint.startswith("ipc://") or endpoint.startswith("ipc://@"):
        return None
    return Path(endpoint[len("ipc://") :])


def check_endpoint(endpoint: str) -> None:
    """Fail at once where an ``ipc://`` endpoint cannot be reached, rather than after a timeout:
    raises NoDaemon when its socket file is missing, SocketAccessDenied when this user may not
    open it (ZeroMQ itself would retry such a connect silently for ever). A few system calls:
    made once per connect, never per request."""
    path = _ipc_path(endpoint)
    if path is None:
        return
    try:
        info = path.stat()
    except PermissionError:
        raise SocketAccessDenied(_denied(path, _closed_directory(path))) from None
    except OSError:
        raise NoDaemon(
            f"no daemon at {path}: no socket there (is edged running? `edged serve` starts it)"
        ) from None
    if not _may(path, os.W_OK):  # connecting to a Unix socket needs write permission
        raise SocketAccessDenied(_denied(path, path, info))


def _closed_directory(path: Path) -> Path:
    """The first directory above ``path`` this user may not search (what made stat fail)."""
    parents = path.absolute().parents
    return next((p for p in reversed(parents) if not _may(p, os.X_OK)), parents[0])


def _may(path: Path, mode: int) -> bool:
    """Whether this process may use ``path`` so (by its effective ids, as connect checks)."""
    return os.access(path, mode, effective_ids=os.access in os.supports_effective_ids)


def _denied(path: Path, culprit: Path, info: os.stat_result | None = None) -> str:
    """Why this user may not open ``path``: the mode, owner and group of ``culprit`` (the socket
    itself, or a directory above it that is closed to this user), and what would help."""
    if info is None:
        try:
            info = culprit.stat()
        except OSError:
            return f"permission denied: {path}: this user ({_user()}) may not reach it"
    what = "the socket" if culprit == path else f"the directory {culprit}"
    owner, group = _name(pwd.getpwuid, info.st_uid), _name(grp.getgrgid, info.st_gid)
    needed = stat.S_IWGRP if culprit == path else stat.S_IXGRP
    remedy = f"join group {group} or run as {owner}" if info.st_mode & needed else f"run as {owner}"
    return (
        f"permission denied: {path}: {what} has mode {stat.filemode(info.st_mode)}, owner "
        f"{owner}, group {group}; this user ({_user()}) may not open it: {remedy}"
    )


def _name(lookup: Any, number: int) -> str:
    """A user's or group's name (its number when it has none)."""
    try:
        return str(lookup(number)[0])
    except KeyError:
        return str(number)


def _user() -> str:
    return f"{_name(pwd.getpwuid, os.geteuid())}, uid {os.geteuid()}"


def _listened(path: Path) -> bool:
    """Whether something listens on the Unix socket ``path``: a connect that is refused means a
    socket file left behind by a daemon that is gone. Non-blocking, so a busy listener (a full
    backlog) counts as listening."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            return False
        except OSError:
            return True  # cannot tell: let the timeout speak
    return True


def why_unreachable(endpoint: str) -> ClientTimeout | None:
    """After a timeout on an ``ipc://`` endpoint: the error that says why no reply came (the
    daemon stopped, or was replaced, while the client waited), or None when nothing tells."""
    try:
        check_endpoint(endpoint)
    except ClientTimeout as exc:
        return exc
    path = _ipc_path(endpoint)
    if path is not None and not _listened(path):
        return NoDaemon(
            f"no daemon at {path}: the socket file is there but nothing listens on it "
            "(edged stopped without removing it?)"
        )
    return None
