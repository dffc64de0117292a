"""Named crash points for proving crash safety: ``EDGED_FAULT=<point>`` makes the daemon kill
itself with SIGKILL when it reaches that point, as a power cut would, so tests can check that
a restart recovers from every step of an install. Unset (always, in production), a point costs
one string comparison.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

ENV = "EDGED_FAULT"
_ARMED = os.environ.get(ENV, "")


def point(name: str) -> None:
    """Die here, at once and uncleanly, when ``EDGED_FAULT`` names this point."""
    if name == _ARMED:
        log.critical("fault injection: killed at %s (%s)", name, ENV)
        os.kill(os.getpid(), signal.SIGKILL)
