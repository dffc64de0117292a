"""A device as fleet agents' tests see it (Mender, SWUpdate): a daemon serving "m" version 1, a
small model of ``build_slow_model``, trusting the test's keys, with a short health gate; and
signed bundles of later versions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edged.ota import bundle
from edged.testing import DaemonProcess
from tests.bundles import calling, signing_keys
from tests.conftest import DaemonFactory, store_versions
from tests.models import SLOW_WIDTH, build_slow_model

X = np.ones((1, SLOW_WIDTH), np.float32)


class Device:
    """``env`` goes to the daemon."""

    def __init__(
        self, start_daemon: DaemonFactory, tmp_path: Path, env: dict[str, str] | None = None
    ) -> None:
        self.tmp = tmp_path
        self.keys = signing_keys(tmp_path)
        store_versions(tmp_path / "d", "m", [build_slow_model(tmp_path / "v1.onnx", layers=1)])
        ota = {
            "trusted_keys": str(self.keys["trusted"]),
            "health_window_s": 2.0,
            "health_min_requests": 5,
        }
        self.config = {"ota": ota, "models": {"m": {"preload": True}}}
        self.daemon = start_daemon(self.config, workdir=tmp_path / "d", env=env)

    def bundle(self, version: int, layers: int, key: str = "private") -> Path:
        """A bundle of "m" ``version`` (``layers`` deep: 200 is slow enough to fail the
        health gate), signed by ``key``."""
        model = build_slow_model(self.tmp / f"v{version}-{layers}.onnx", layers=layers)
        signed = self.tmp / f"m-{version}-{layers}-{key}.bundle"
        bundle.build(signed, "m", version, model)
        bundle.sign(signed, self.keys[key])
        return signed


def serving(daemon: DaemonProcess) -> int:
    with daemon.client() as client:
        return client.infer("m", {"x": X}).version


def traffic(daemon: DaemonProcess) -> Any:
    """A client inferring on "m" all along (``calling``)."""
    return calling(daemon, lambda client: client.infer("m", {"x": X}).version)
