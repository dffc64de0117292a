"""Power cuts during an install: the daemon is SIGKILLed at each step (``EDGED_FAULT``), and a
restart leaves a consistent store, serves a committed version, and takes the install again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edged.faults import ENV
from edged.store import STAGING, ModelStore, sha256_of
from tests.bundles import WIDTH, install, killed_during, make, serving, signing_keys
from tests.conftest import DaemonFactory, store_versions
from tests.models import build_wide_model

#: points at which the install has not committed: a restart rolls it back
BEFORE_COMMIT = [
    "ota.verifying",
    "ota.extracting",
    "ota.verified",
    "ota.publishing",
    "store.publishing",
    "ota.published",
    "ota.swapping",
    "swap.validated",
    "ota.gating",
    "ota.committing",
]
#: points after the commit: a restart completes the install
AFTER_COMMIT = ["ota.committed", "store.removing"]


def config(keys: dict[str, Path]) -> dict[str, Any]:
    ota = {"trusted_keys": str(keys["trusted"]), "keep_versions": 2, "health_window_s": 0.3}
    return {"ota": ota, "models": {"m": {"preload": True}}}


def assert_consistent(store: ModelStore) -> None:
    """Every stored version complete and intact, and no staging left behind."""
    for version in store.versions("m"):
        manifest = store.manifest("m", version)
        assert sha256_of(store.model_path(manifest)) == manifest.sha256
    assert not any((store.root / STAGING).iterdir())
    strays = [p.name for p in (store.root / "m").iterdir() if not p.name.isdigit()]
    assert strays in (["current"], [])


@pytest.mark.parametrize("fault", BEFORE_COMMIT + AFTER_COMMIT)
def test_a_power_cut_at_any_step_leaves_a_committed_version_serving(
    start_daemon: DaemonFactory, tmp_path: Path, fault: str
) -> None:
    keys = signing_keys(tmp_path)
    workdir = tmp_path / "d"
    models = [build_wide_model(tmp_path / f"v{v}.onnx", WIDTH, v) for v in (1, 2)]
    store = store_versions(workdir, "m", models)
    bundle = make(tmp_path, keys, 3)
    doomed = start_daemon(config(keys), workdir=workdir, env={ENV: fault})
    assert serving(doomed) == 2
    killed_during(doomed, bundle)
    assert f"killed at {fault}" in doomed.log()

    daemon = start_daemon(config(keys), workdir=workdir)
    assert_consistent(store)
    with daemon.control() as control:
        last = control.command("history")["installs"][-1]
    assert last["recovered"] is True
    if fault in BEFORE_COMMIT:
        assert last["outcome"] == "rolled_back" and last["code"] == "INTERRUPTED"
        assert serving(daemon) == 2 and 3 not in store.versions("m")
        assert install(daemon, bundle)["outcome"] == "installed"  # the retry takes
    else:
        assert last["outcome"] == "installed"
        assert install(daemon, bundle)["outcome"] == "already_installed"
    assert serving(daemon) == 3
    assert store.current("m") == 3
