"""Named fault points for proving crash safety and supervision.

``EDGED_FAULT=<point>`` makes the daemon kill itself with SIGKILL when it reaches that point, as
a power cut would, so tests can check that a restart recovers from every step of an install.
``EDGED_FAULT=<point>:hang`` blocks the thread that reaches it instead (a wedged event loop, for
the watchdog). ``EDGED_FAULT_AFTER=<n>`` lets the point pass ``n`` times first. Unset (always,
in production), a point costs one string comparison.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger(__name__)

ENV = "EDGED_FAULT"
AFTER_ENV = "EDGED_FAULT_AFTER"
_POINT, _, _ACTION = os.environ.get(ENV, "").partition(":")
_passes = {"left": int(os.environ.get(AFTER_ENV, "0") or 0)}


def point(name: str) -> None:
    """Die (or hang) here when ``EDGED_FAULT`` names this point."""
    if name != _POINT:
        return
    if _passes["left"] > 0:
        _passes["left"] -= 1
        return
    log.critical("fault injection: %s at %s (%s)", _ACTION or "killed", name, ENV)
    if _ACTION == "hang":
        threading.Event().wait()
    os.kill(os.getpid(), signal.SIGKILL)
