"""Anti-rollback: a replayed older signed bundle never takes the device back, whether its
version is pruned, stored, or the rollback target, and whether the install before it has
committed or is still under its health gate; the serving version's bundle again is a no-op."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from edged.errors import BadBundle
from edged.ota import bundle
from edged.store import ModelStore
from edged.testing import DaemonProcess
from tests.bundles import (
    history,
    inferring,
    install,
    make,
    serving,
    signing_keys,
    start_ota_daemon,
    wait_for_step,
)
from tests.conftest import DaemonFactory


def store_of(daemon: DaemonProcess) -> ModelStore:
    return ModelStore(daemon.workdir / "state" / "models")


def models_entry(daemon: DaemonProcess) -> dict[str, Any]:
    with daemon.control() as control:
        return dict(control.command("models")["models"]["m"])


def refused_as_downgrade(daemon: DaemonProcess, path: Path, version: int, newest: int) -> None:
    message = f"version {version} is older than the installed {newest}; a downgrade must be"
    with pytest.raises(BadBundle, match=message):
        install(daemon, path)


def test_replays_of_older_bundles_are_refused_once_committed_and_the_serving_one_is_a_no_op(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    keys = signing_keys(tmp_path)
    daemon = start_ota_daemon(start_daemon, tmp_path, keys, health_window_s=0, keep_versions=3)
    bundles = {version: make(tmp_path, keys, version, seed=version) for version in (2, 3, 4, 5)}
    for path in bundles.values():
        assert install(daemon, path)["outcome"] == "installed"
    store = store_of(daemon)
    assert store.versions("m") == [3, 4, 5]  # 1 and 2 pruned
    assert models_entry(daemon)["previous"] == 4  # the rollback target
    for version in (2, 3, 4):  # pruned, stored, the rollback target: each signed validly
        refused_as_downgrade(daemon, bundles[version], version, 5)
        assert serving(daemon) == 5
    record = install(daemon, bundles[5])
    assert record["outcome"] == "already_installed" and "swap" not in record
    assert "already serving" in record["reason"]
    assert serving(daemon) == 5 and store.current("m") == 5 and store.versions("m") == [3, 4, 5]
    assert models_entry(daemon)["previous"] == 4  # no swap happened
    outcomes = [r["outcome"] for r in history(daemon)]
    assert outcomes == ["installed"] * 4 + ["rejected"] * 3 + ["already_installed"]
    # authorised, a stored older version is swapped to again, a pruned one installed again
    record = install(daemon, bundles[3], allow_downgrade=True)
    assert record["outcome"] == "installed" and record["resumed"] is True
    assert serving(daemon) == 3
    record = install(daemon, bundles[2], allow_downgrade=True)
    assert record["outcome"] == "installed" and record["resumed"] is False
    assert serving(daemon) == 2 and store.current("m") == 2


def test_replays_sent_while_the_health_gate_watches_change_nothing(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    keys = signing_keys(tmp_path)
    daemon = start_ota_daemon(start_daemon, tmp_path, keys, health_window_s=3, keep_versions=3)
    bundles = {version: make(tmp_path, keys, version, seed=version) for version in (1, 2, 3)}
    stored_1 = store_of(daemon).manifest("m", 1)
    assert bundle.inspect(bundles[1])["manifest"]["files"][0]["sha256"] == stored_1.sha256
    with inferring(daemon) as tally, ThreadPoolExecutor(4) as pool:
        assert install(daemon, bundles[2])["outcome"] == "installed"
        newest = pool.submit(install, daemon, bundles[3])
        wait_for_step(daemon, "gating")  # 3 serves, 2 is the rollback target, 1 is stored
        replays = {version: pool.submit(install, daemon, path) for version, path in bundles.items()}
        assert newest.result()["outcome"] == "installed"
        for version in (1, 2):
            with pytest.raises(BadBundle, match="a downgrade must be authorised"):
                replays[version].result()
        assert replays[3].result()["outcome"] == "already_installed"
    assert serving(daemon) == 3 and store_of(daemon).current("m") == 3
    assert models_entry(daemon)["previous"] == 2
    assert tally["failures"] == 0 and tally["requests"] > 0
