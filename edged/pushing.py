"""Pushing a bundle to a daemon over its control socket, in chunks that resume after a lost
connection: what ``edgectl push`` and the Mender update module (``edged.mender_module``) do
before they ask the daemon to install it (PROTOCOL.md §10.22)."""

from __future__ import annotations

import sys
from pathlib import Path

from edged.client import Client
from edged.errors import ClientTimeout, EdgedError
from edged.store import sha256_of

#: new connections tried after a lost one, each resuming the upload
PUSH_RETRIES = 5
#: while waiting for a long command's reply, ping the daemon this often (seconds) on a fresh
#: connection, so that one that died mid-install is reported at once
PROBE_EVERY_S = 2.0


def push(client: Client, bundle: Path, *, chunk_bytes: int, timeout: float, patience: float) -> str:
    """Upload ``bundle``, resuming where the daemon's copy ends after a lost connection (the
    client reconnects after a timeout); returns its sha256, which names the upload. A request
    that may complete the upload waits ``patience``, any other ``timeout``."""
    try:
        sha256, size = sha256_of(bundle), bundle.stat().st_size
    except OSError as exc:
        raise EdgedError(f"cannot read the bundle: {exc}") from None
    retries = 0
    while True:
        try:
            client.command("ping")  # a daemon still down is found within the timeout
            _send_rest(
                client,
                bundle,
                sha256,
                size,
                chunk_bytes=chunk_bytes,
                timeout=timeout,
                patience=patience,
            )
            return sha256
        except ClientTimeout as exc:
            retries += 1
            if retries > PUSH_RETRIES:
                raise
            print(f"{Path(sys.argv[0]).name}: {exc}; resuming the upload", file=sys.stderr)


def _send_rest(
    client: Client,
    bundle: Path,
    sha256: str,
    size: int,
    *,
    chunk_bytes: int,
    timeout: float,
    patience: float,
) -> None:
    """Ask the daemon how much of the bundle it has, then send the rest a chunk at a time. A
    request that may complete the upload (the question, the last chunk) waits ``patience``:
    its reply comes once the daemon has verified the whole bundle."""
    progress = client.command(
        "upload", sha256=sha256, size=size, timeout=patience, probe_every=PROBE_EVERY_S
    )
    with bundle.open("rb") as data:
        data.seek(progress["received"])
        while not progress["complete"]:
            offset = progress["received"]
            piece = data.read(chunk_bytes)
            if not piece:
                raise EdgedError(f"{bundle} changed while it was sent: push it again")
            last = offset + len(piece) >= size
            progress = client.command(
                "upload",
                sha256=sha256,
                size=size,
                offset=offset,
                data=piece,
                timeout=patience if last else timeout,
                probe_every=PROBE_EVERY_S if last else None,
            )
