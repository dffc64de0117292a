"""Each tick: is the daemon healthy enough to ping systemd's watchdog, and what does its status
line say?

Healthy means the event loop runs (a blocked loop never gets here, so the pings stop by
themselves) and no model run is stuck: a run, or a language model's wait for its next token,
going longer than ``daemon.stuck_run_s`` (a wedged GPU driver, a deadlocked kernel) holds back
the ping, and systemd restarts the daemon once ``WatchdogSec`` passes.
"""

from __future__ import annotations

import logging
import time

from edged.models.budget import MIB
from edged.models.registry import Registry
from edged.sdnotify import Notifier
from edged.service import InferenceService

log = logging.getLogger(__name__)


class Watchdog:
    def __init__(
        self,
        registry: Registry,
        service: InferenceService,
        notifier: Notifier,
        stuck_run_s: float,
    ) -> None:
        self.registry = registry
        self.service = service
        self.notifier = notifier
        self.stuck_ns = int(stuck_run_s * 1e9)
        self._last = (time.monotonic(), service.handled)
        self._stuck: tuple[str, int] | None = None

    def tick(self) -> None:
        stuck = self._stuck_run()
        runner = stuck[0] if stuck is not None else None
        if runner != self._stuck:  # logged when the stuck run changes, not each tick
            if stuck is not None:
                log.error("%s: no longer pinging the watchdog", stuck[1])
            else:
                log.info("no model run is stuck any more: pinging the watchdog again")
            self._stuck = runner
        self.notifier.status(stuck[1] if stuck is not None else self.status())
        if stuck is None:
            self.notifier.watchdog()

    def status(self) -> str:
        """e.g. ``serving detector v3, llm v1; 412 of 1024 MiB; 35.2 req/s``."""
        serving = ", ".join(
            f"{slot.name} v{slot.version}" for slot in self.registry if slot.runner is not None
        )
        memory = self.registry.budget
        capacity = f"of {memory.capacity // MIB} MiB" if memory.capacity else "MiB"
        now, handled = time.monotonic(), self.service.handled
        then, before = self._last
        self._last = now, handled
        rate = (handled - before) / (now - then) if now > then else 0.0
        used = memory.used // MIB
        return f"serving {serving or 'nothing loaded'}; {used} {capacity}; {rate:.1f} req/s"

    def _stuck_run(self) -> tuple[tuple[str, int], str] | None:
        """The stuck run's model and version, and the status line that says so."""
        now = time.monotonic_ns()
        for runner in self.registry.runners():
            stalled = runner.stalled_ns(now)
            if stalled > self.stuck_ns:
                message = (
                    f"stuck: model {runner.name} version {runner.version} has run for "
                    f"{stalled / 1e9:.0f} s"
                )
                return (runner.name, runner.version), message
        return None
