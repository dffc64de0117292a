"""Telling systemd the truth about the daemon (sd_notify): ready, reloading, stopping, a status
line, and watchdog pings while healthy.

Under ``Type=notify`` systemd waits for ``READY=1`` before it counts the service as started,
and with ``WatchdogSec=`` it restarts the service when the pings stop. Outside systemd
(``NOTIFY_SOCKET`` unset) every call does nothing. systemd-python's ``notify`` sends the
messages where it is installed; where it is not (it needs libsystemd to build), the datagram
is sent here: the protocol is one ``AF_UNIX`` datagram of newline-separated assignments, and
without it a ``Type=notify`` unit would never start.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


def _sender() -> Callable[[str], object]:
    try:
        from systemd.daemon import notify
    except ImportError:
        return _send_datagram
    sender: Callable[[str], object] = notify
    return sender


def _send_datagram(message: str) -> bool:
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.sendto(message.encode(), address)
    return True


class Notifier:
    """The daemon's side of sd_notify; a no-op outside systemd."""

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self.watchdog_s = _watchdog_interval() if self.enabled else None
        self._send = _sender() if self.enabled else None
        self._status = ""
        self._next_ping = 0.0

    def ready(self, status: str) -> None:
        self._notify("READY=1", f"STATUS={status}")
        self._status = status

    def reloading(self) -> None:
        # systemd 253+ wants the reload's start time, to tell this reload from an older one
        now_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._notify("RELOADING=1", f"MONOTONIC_USEC={now_us}")

    def stopping(self) -> None:
        self._notify("STOPPING=1", "STATUS=stopping: draining requests")

    def status(self, status: str) -> None:
        """Update the status line ``systemctl status`` shows, when it changed."""
        if status != self._status:
            self._status = status
            self._notify(f"STATUS={status}")

    def watchdog(self) -> None:
        """Ping the watchdog, at most every half interval (as sd_watchdog_enabled advises)."""
        if self.watchdog_s is None:
            return
        now = time.monotonic()
        if now >= self._next_ping:
            self._next_ping = now + self.watchdog_s / 2
            self._notify("WATCHDOG=1")

    def _notify(self, *assignments: str) -> None:
        if self._send is None:
            return
        try:
            self._send("\n".join(assignments))
        except OSError as exc:  # systemd gone or the socket unreachable: keep serving
            log.warning("cannot notify systemd (%s): %s", assignments[0], exc)


def _watchdog_interval() -> float | None:
    """``WatchdogSec`` as systemd passes it, when it is meant for this process."""
    usec, pid = os.environ.get("WATCHDOG_USEC", ""), os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1e6
