"""Installing signed bundles on a live daemon: good ones swap in, bad ones change nothing."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edged.errors import BadBundle, BadSignature, ModelLoadError, SwapRejected, TooLarge
from edged.ota import bundle
from edged.ota.keys import TrustedKeys
from edged.store import ModelStore
from edged.testing import DaemonProcess
from tests.bundles import (
    BAD,
    inferring,
    install,
    make,
    rewrite,
    serving,
    signing_keys,
    start_ota_daemon,
)
from tests.conftest import DaemonFactory, edgectl_json


@pytest.fixture
def ota(start_daemon: DaemonFactory, tmp_path: Path) -> tuple[DaemonProcess, dict[str, Path]]:
    keys = signing_keys(tmp_path)
    daemon = start_ota_daemon(start_daemon, tmp_path, keys, health_window_s=0.5, max_bundle_mb=1)
    return daemon, keys


@pytest.fixture
def traffic(ota: tuple[DaemonProcess, dict[str, Path]]) -> Iterator[dict[str, int]]:
    """A client inferring all along; its tally is checked by each test."""
    with inferring(ota[0]) as tally:
        yield tally


def test_a_signed_bundle_installs_and_serves_and_is_recorded(
    ota: tuple[DaemonProcess, dict[str, Path]], traffic: dict[str, int], tmp_path: Path
) -> None:
    daemon, keys = ota
    record = install(daemon, make(tmp_path, keys, 2))
    assert record["outcome"] == "installed" and record["version"] == 2
    assert serving(daemon) == 2
    status = json.loads((daemon.workdir / "state" / "ota" / "status.json").read_text())
    assert status["outcome"] == "installed" and status["version"] == 2
    assert [r["version"] for r in edgectl_json(daemon, "history")["installs"]] == [2]
    assert traffic["failures"] == 0 and traffic["requests"] > 0


def test_bad_bundles_are_rejected_while_the_model_keeps_serving(
    ota: tuple[DaemonProcess, dict[str, Path]], traffic: dict[str, int], tmp_path: Path
) -> None:
    daemon, keys = ota
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model" * 100)
    unloadable = tmp_path / "unloadable.bundle"
    bundle.build(unloadable, "m", 9, garbage)
    bundle.sign(unloadable, keys["private"])
    install(daemon, make(tmp_path, keys, 3, seed=3))
    good = make(tmp_path, keys, 10, seed=10)
    unsigned = tmp_path / "unsigned.bundle"
    bundle.build(unsigned, "m", 11, tmp_path / "v1.onnx")
    truncated = tmp_path / "truncated.bundle"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    damaged = [
        (rewrite(good, tmp_path / f"bad-{i}.bundle", change), error, re.escape(message))
        for i, (_, change, error, message) in enumerate(BAD)
    ]
    cases = [
        *damaged,
        (unsigned, BadSignature, "not signed"),
        (truncated, BadBundle, "truncated|damaged"),
        (make(tmp_path, keys, 12, width=600), BadBundle, "more than the limit"),
        (make(tmp_path, keys, 12, width=1024), TooLarge, "over this device's limit"),
        (make(tmp_path, keys, 13, min_edged="99.0.0"), BadBundle, "needs edged 99.0.0"),
        (make(tmp_path, keys, 4, key="stranger"), BadSignature, "not among the trusted keys"),
        (make(tmp_path, keys, 3, seed=4), BadBundle, "already installed"),
        (make(tmp_path, keys, 2, seed=5), BadBundle, "a downgrade must be authorised"),
        (make(tmp_path, keys, 5, architectures=("riscv128",)), BadBundle, "this device is"),
        (make(tmp_path, keys, 6, golden="wrong"), SwapRejected, "fails its golden vectors"),
        (make(tmp_path, keys, 7, width=32), SwapRejected, "incompatible"),
        (unloadable, ModelLoadError, "cannot load"),
    ]
    for path, error, message in cases:
        with pytest.raises(error, match=message):
            install(daemon, path)
        assert serving(daemon) == 3
    store = ModelStore(daemon.workdir / "state" / "models")
    assert store.versions("m") == [1, 3]  # nothing rejected was left installed
    record = install(daemon, make(tmp_path, keys, 2, seed=6), allow_downgrade=True)
    assert record["version"] == 2 and serving(daemon) == 2
    record = install(daemon, make(tmp_path, keys, 8, seed=7))  # 4 stored, 3 kept
    assert record["pruned"] == [1] and serving(daemon) == 8
    assert store.versions("m") == [2, 3, 8] and store.current("m") == 8
    history = (daemon.workdir / "state" / "ota" / "history.jsonl").read_text().splitlines()
    outcomes = [json.loads(line)["outcome"] for line in history]
    assert outcomes == ["installed", *["rejected"] * len(cases), "installed", "installed"]
    assert len(edgectl_json(daemon, "history")["installs"]) == 20  # the last 20
    assert traffic["failures"] == 0


def test_an_install_of_a_version_stored_byte_for_byte_goes_on_with_the_swap(
    ota: tuple[DaemonProcess, dict[str, Path]], tmp_path: Path
) -> None:
    daemon, keys = ota
    path = make(tmp_path, keys, 4)
    # the version put in the store beforehand (say, pre-staged by hand)
    staging = tmp_path / "cut"
    staging.mkdir()
    extracted = bundle.extract(path, TrustedKeys(keys["trusted"]), staging, 1 << 30)
    store = ModelStore(daemon.workdir / "state" / "models")
    store.publish(staging, "m", 4, "onnx", extracted.model.path)
    assert serving(daemon) == 1
    record = install(daemon, path)
    assert record["resumed"] is True and serving(daemon) == 4
    again = install(daemon, path)  # serving now: nothing to do
    assert again["outcome"] == "already_installed" and "swap" not in again


def test_bundles_dropped_in_the_inbox_are_installed_or_filed_as_rejected(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    keys = signing_keys(tmp_path)
    inbox = tmp_path / "inbox"
    daemon = start_ota_daemon(start_daemon, tmp_path, keys, inbox=str(inbox), health_window_s=0.2)
    good, bad = make(tmp_path, keys, 2), make(tmp_path, keys, 3, key="stranger")
    (inbox / ".m-2.bundle.part").write_bytes(good.read_bytes()[:1000])  # still being written
    for source in (bad, good):  # an agent writes, then renames into place
        (inbox / f".{source.name}").write_bytes(source.read_bytes())
        (inbox / f".{source.name}").rename(inbox / source.name)
    deadline = time.monotonic() + 30
    reason_file = inbox / "rejected" / f"{bad.name}.reason"
    while not ((inbox / "done" / good.name).exists() and reason_file.exists()):
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.05)
    assert serving(daemon) == 2
    reason = reason_file.read_text()
    assert reason.startswith("BAD_SIGNATURE") and (inbox / ".m-2.bundle.part").exists()
