"""What an untrusted bundle can cost a live daemon before its signature is checked: every read
bounded in size and depth, each refusal a specific error (never INTERNAL); and inbox bundles
that are too large, crash the daemon or cannot be moved never make it retry them forever."""

from __future__ import annotations

import re
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from edged.errors import BadBundle, BadSignature, EdgedError, TooLarge
from edged.faults import ENV
from edged.ota import bundle
from edged.testing import DaemonProcess
from tests.bundles import (
    history,
    install,
    make,
    raw_bundle,
    serving,
    signature_member,
    signing_keys,
    sized,
    start_ota_daemon,
)
from tests.conftest import DaemonFactory

MB = 1 << 20
#: the size of the oversize members: what an unbounded read would allocate (twice)
HUGE = 200 * MB
#: what the daemon's peak memory may grow by while refusing one
GROWTH_BOUND = 50 * MB


def peak_growth(daemon: DaemonProcess, action: Callable[[], object]) -> int:
    """How far above its resident memory before ``action`` the daemon's peak went during it:
    the peak (VmHWM) is reset first, so an allocation freed again is still seen."""
    proc = Path(f"/proc/{daemon.pid}")
    (proc / "clear_refs").write_text("5")
    before = _status_bytes(proc, "VmRSS")
    action()
    return _status_bytes(proc, "VmHWM") - before


def _status_bytes(proc: Path, field: str) -> int:
    found = re.search(rf"^{field}:\s+(\d+) kB", (proc / "status").read_text(), re.MULTILINE)
    assert found is not None
    return int(found[1]) * 1024


def manifest_of(path: Path) -> bytes:
    with tarfile.open(path) as archive:
        stream = archive.extractfile(bundle.MANIFEST)
        assert stream is not None
        return stream.read()


def refused(daemon: DaemonProcess, path: Path, error: type[EdgedError], message: str) -> int:
    """Install ``path``, which must be refused with ``error``; the peak memory growth."""

    def attempt() -> None:
        with pytest.raises(error, match=message):
            install(daemon, path)

    return peak_growth(daemon, attempt)


def test_oversize_and_deeply_nested_members_are_refused_before_being_read(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    keys = signing_keys(tmp_path)
    daemon = start_ota_daemon(start_daemon, tmp_path, keys, max_bundle_mb=512)
    manifest = manifest_of(make(tmp_path, keys, 2))
    deep = b"[" * 100_000  # a manifest under its size cap, signed by a trusted key
    signed_deep = signature_member(deep, keys["private"])
    head = [(sized(bundle.MANIFEST, len(manifest)), manifest)]
    cases = [
        (
            [*head, (sized(bundle.SIGNATURE, HUGE), None)],
            BadSignature,
            f"{bundle.SIGNATURE} is {HUGE} bytes",
        ),
        (
            [(sized("././@PaxHeader", HUGE, tarfile.XHDTYPE), None), *head],
            BadBundle,
            f"an extended tar header of {HUGE} bytes",
        ),
        (
            [*head, (sized(bundle.SIGNATURE, 100_000), b"[" * 100_000)],
            BadSignature,
            "is 100000 bytes",
        ),
        ([*head, (sized(bundle.SIGNATURE, 4000), b"[" * 4000)], BadSignature, "nests too deep"),
        (
            [
                (sized(bundle.MANIFEST, len(deep)), deep),
                (sized(bundle.SIGNATURE, len(signed_deep)), signed_deep),
            ],
            BadBundle,
            "the manifest nests too deep",
        ),
    ]
    for i, (members, error, message) in enumerate(cases):
        path = raw_bundle(tmp_path / f"hostile-{i}.bundle", members)
        growth = refused(daemon, path, error, re.escape(message))
        assert growth < GROWTH_BOUND, f"case {i}: peak grew by {growth >> 20} MiB"
        assert serving(daemon) == 1
    assert [r["code"] for r in history(daemon)] == [error.code for _, error, _ in cases]


def test_a_bundle_file_over_the_size_limit_is_refused_unread(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    keys = signing_keys(tmp_path)
    inbox = tmp_path / "inbox"
    daemon = start_ota_daemon(start_daemon, tmp_path, keys, inbox=str(inbox), max_bundle_mb=1)
    big = tmp_path / "big.bundle"
    with big.open("wb") as out:  # sparse: garbage if it were read, a BAD_BUNDLE
        out.truncate(bundle.archive_limit(MB) + 1)
    with pytest.raises(TooLarge, match=r"over this device's limit .*ota\.max_bundle_mb = 1"):
        install(daemon, big)
    big.rename(inbox / "big.bundle")
    reason = wait_for_file(daemon, inbox / "rejected" / "big.bundle.reason")
    assert reason.startswith("TOO_LARGE: ") and not (inbox / "big.bundle").exists()
    assert (inbox / "rejected" / "big.bundle").exists()


def wait_for_file(daemon: DaemonProcess, path: Path, timeout: float = 60) -> str:
    """``path``'s text once it exists; the daemon must stay up meanwhile."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert daemon.proc is not None and daemon.proc.poll() is None, daemon.log()
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.02)
    return path.read_text()


def test_an_inbox_bundle_whose_install_kills_the_daemon_is_not_taken_again(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    keys = signing_keys(tmp_path)
    inbox = tmp_path / "inbox"
    settings = {"inbox": str(inbox), "health_window_s": 0}
    crash = {ENV: "ota.swapping"}  # as a bundle that crashes the daemon each time would
    daemon = start_ota_daemon(start_daemon, tmp_path, keys, **settings, env=crash)
    path = make(tmp_path, keys, 2)
    path.rename(inbox / path.name)
    assert daemon.wait(60) == -9, daemon.log()
    again = start_daemon(daemon.config, workdir=daemon.workdir, env=crash)
    reason = wait_for_file(again, inbox / "rejected" / f"{path.name}.reason")
    assert reason.startswith("INTERRUPTED: ")
    assert not list(inbox.glob("*.bundle")) and not list((inbox / "installing").iterdir())
    [record] = history(again)
    assert record["outcome"] == "rolled_back" and record["code"] == "INTERRUPTED"
    assert serving(again) == 1


def test_an_inbox_bundle_that_cannot_be_moved_is_never_installed(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    keys = signing_keys(tmp_path)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for directory in ("installing", "done", "rejected"):  # files where directories go
        (inbox / directory).write_text("in the way\n")
    daemon = start_ota_daemon(start_daemon, tmp_path, keys, inbox=str(inbox))
    path = make(tmp_path, keys, 2, key="stranger")
    path.rename(inbox / path.name)
    deadline = time.monotonic() + 30
    while "cannot move" not in daemon.log():
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.02)
    time.sleep(3.5)  # unavoidable: what must not happen is a retry on the next ticks (1 s)
    assert daemon.log().count("cannot move") == 1
    assert history(daemon) == [] and (inbox / path.name).exists()
