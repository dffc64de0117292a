"""Drift monitoring: how many requests a 0.5-sigma shift of one feature takes to be flagged,
and how many alarms a stationary stream raises, through a live daemon at the default drift
settings (every request profiled: ``max_per_s = 0``)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from edged.client import Client
from edged.demo import DEMO_FEATURES
from edged.testing import DaemonProcess

SHIFTED_FEATURE = 3
SHIFT = 0.5
#: a shift not flagged within this many requests counts as this many
GIVE_UP = 5000
REFERENCE = 1000


@contextmanager
def _served(workdir: Path, model: Path) -> Iterator[tuple[Client, Client]]:
    """A daemon serving the demo model with every request profiled: a client and a control."""
    drift = {"max_per_s": 0, "warn_interval_s": 0}
    config = {"models": {"demo": {"path": str(model), "preload": True, "drift": drift}}}
    with (
        DaemonProcess(workdir, config) as daemon,
        daemon.client(60) as client,
        daemon.control() as control,
    ):
        yield client, control


def _report(control: Client, profiled: int) -> dict[str, Any]:
    """The monitor's report once it has profiled ``profiled`` requests (or dropped some)."""
    deadline = time.monotonic() + 60
    while True:
        found: dict[str, Any] = control.command("drift", model="demo")
        if found.get("profiled", 0) + found.get("dropped", 0) >= profiled:
            return found
        if time.monotonic() > deadline:
            raise RuntimeError(f"the monitor fell behind: {found}")
        time.sleep(0.01)


def requests_to_detect(workdir: Path, model: Path, seed: int) -> int:
    """Requests of one row each after the shift began until the drift alarm was raised."""
    rng = np.random.default_rng(seed)
    with _served(workdir, model) as (client, control):
        sent = 0

        def send(count: int, shift: float) -> None:
            nonlocal sent
            for _ in range(count):
                x = rng.standard_normal((1, DEMO_FEATURES)).astype(np.float32)
                x[0, SHIFTED_FEATURE] += shift
                client.infer("demo", {"x": x})
            sent += count

        send(REFERENCE + 1000, 0.0)  # the reference, then a full window of the same
        start = _report(control, sent)
        if "drift" in start["alarms"]:
            raise RuntimeError(f"a stationary stream raised a drift alarm: {start}")
        began = int(start["profiled"])
        while sent - began < GIVE_UP:
            send(25, SHIFT)
            found = _report(control, sent)
            if "drift" in found["alarms"]:
                return int(found["raised"]["drift"]["last_at_request"]) - began
        return GIVE_UP


def false_alarms(workdir: Path, model: Path, requests: int) -> dict[str, float]:
    """Drift alarms raised by ``requests`` stationary requests after the reference."""
    rng = np.random.default_rng(7)
    data = rng.standard_normal((REFERENCE + requests, 1, DEMO_FEATURES)).astype(np.float32)
    with _served(workdir, model) as (client, control):
        for x in data:
            client.infer("demo", {"x": x})
        found = _report(control, len(data))
    return {
        "alarms": float(found["raised"].get("drift", {}).get("count", 0)),
        "profiled": float(found["profiled"]),
    }


def detection(workdir: Path, model: Path, runs: int = 5) -> float:
    """The median of ``requests_to_detect`` over ``runs`` seeds."""
    found = [requests_to_detect(workdir / f"detect-{seed}", model, seed) for seed in range(runs)]
    return float(statistics.median(found))
