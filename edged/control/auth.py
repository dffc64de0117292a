"""CurveZMQ for the remote control socket: the server's key pair and an allow-list of clients.

ZeroMQ's ZAP handler (``zmq.auth``) asks ``KeyAllowList`` about every client key. The list is
the directory of client public key files (``edgectl keys curve`` makes them), re-read on each
attempt, so adding or deleting a key file takes effect without a restart. Every refusal is
logged, and so is every handshake that fails before ZAP is even asked (no key, the wrong
server key, plain text on a CURVE port), through the socket's monitor.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, cast

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import parse_monitor_message

from edged.errors import ConfigError

log = logging.getLogger(__name__)

ZAP_DOMAIN = "edged-control"
HANDSHAKE_FAILURES = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


class KeyAllowList:
    """The ZAP credentials provider: is this client's public key in the directory?"""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def callback(self, domain: str, client_key: bytes) -> bool:
        """Never raises: an exception here would stop ZAP, and with it all remote control."""
        try:
            allowed = self._keys()
        except Exception as exc:  # refuse, say why, and keep ZAP alive for the next attempt
            log.error("control: cannot read the authorized keys in %s: %s", self.directory, exc)
            return False
        if client_key in allowed:
            log.info("control: client key %s accepted", client_key.decode())
            return True
        log.warning(
            "control: refused a client whose key %s is not in %s",
            client_key.decode(),
            self.directory,
        )
        return False

    def _keys(self) -> set[bytes]:
        """The public keys of the directory's ``.key`` files; a file that is not one is skipped
        (and logged) rather than costing every other client its access."""
        keys = set()
        for path in sorted(self.directory.glob("*.key")):
            try:
                public, _ = zmq.auth.load_certificate(str(path))
            except (OSError, ValueError) as exc:
                log.warning("control: skipping %s, not a public key file: %s", path, exc)
                continue
            keys.add(public)
        return keys


def load_server_keys(path: Path) -> tuple[bytes, bytes]:
    """The server's (public, secret) key pair from a ``.key_secret`` file."""
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"control.server_key: cannot read {path}: {exc}") from None
    if secret is None:
        raise ConfigError(f"control.server_key: {path} holds no secret key (use the .key_secret)")
    return public, secret


def start_authenticator(context: zmq.Context[Any], authorized: Path) -> ThreadAuthenticator:
    """ZAP on ``context``: must run before the CURVE socket binds."""
    if not authorized.is_dir():
        raise ConfigError(f"control.authorized_keys: {authorized} is not a directory")
    authenticator = ThreadAuthenticator(context, log=logging.getLogger("edged.control.zap"))
    authenticator.start()
    allow_list = KeyAllowList(authorized)
    authenticator.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=allow_list)
    return authenticator


def curve_server(public: bytes, secret: bytes) -> Any:
    """A socket setup that makes it a CURVE server (clients must know ``public``)."""

    def configure(sock: zmq.Socket[Any]) -> None:
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
        sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())

    return configure


class HandshakeLog:
    """Logs the failed handshakes of a socket (a client with no key or the wrong server key
    never reaches ZAP), read from the socket's monitor on the event loop."""

    def __init__(self, sock: zmq.Socket[Any], loop: asyncio.AbstractEventLoop) -> None:
        self._monitor = sock.get_monitor_socket(HANDSHAKE_FAILURES)
        self._loop = loop
        self._fd = cast(int, self._monitor.getsockopt(zmq.FD))
        loop.add_reader(self._fd, self._drain)
        self._drain()

    def close(self) -> None:
        self._loop.remove_reader(self._fd)
        self._monitor.close(linger=0)

    def _drain(self) -> None:
        while True:  # the FD is edge-triggered: read until nothing is left
            try:
                frames = self._monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            event = parse_monitor_message(frames)
            log.warning(
                "control: refused a connection on %s (handshake failed: %s)",
                event["endpoint"].decode(errors="replace"),
                zmq.Event(event["event"]).name,
            )
