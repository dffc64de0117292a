"""Signed bundles and OTA daemons the install tests build for themselves."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import re
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edged.client import Client
from edged.errors import BadBundle, BadSignature, EdgedError
from edged.ota import bundle
from edged.ota.keys import generate, key_id, load_private
from edged.testing import DaemonProcess
from tests.conftest import EDGECTL, DaemonFactory, store_versions
from tests.models import build_wide_model

#: model "m": x float32[batch, WIDTH] -> y
WIDTH = 64
X = np.ones((1, WIDTH), np.float32)


def signing_keys(tmp_path: Path) -> dict[str, Path]:
    """A trusted signing key ("private"), an untrusted one ("stranger"), the trusted dir."""
    keys = {"trusted": tmp_path / "trusted"}
    keys["trusted"].mkdir()
    keys["private"], public = generate(tmp_path / "keys", "fleet")
    keys["stranger"], _ = generate(tmp_path / "keys", "stranger")
    (keys["trusted"] / public.name).write_bytes(public.read_bytes())
    return keys


def start_ota_daemon(
    start_daemon: DaemonFactory,
    tmp_path: Path,
    keys: dict[str, Path],
    width: int = WIDTH,
    env: dict[str, str] | None = None,
    **ota: Any,
) -> DaemonProcess:
    """A daemon in ``tmp_path / "d"`` that trusts ``keys`` (and takes these other ``ota``
    settings), serving "m" version 1, ``width`` wide, from its store; ``env`` is added to its
    environment."""
    store_versions(tmp_path / "d", "m", [build_wide_model(tmp_path / "v1.onnx", width, 1)])
    config = {
        "ota": {"trusted_keys": str(keys["trusted"]), **ota},
        "models": {"m": {"preload": True}},
    }
    return start_daemon(config, workdir=tmp_path / "d", env=env)


def make(
    tmp_path: Path,
    keys: dict[str, Path],
    version: int,
    *,
    width: int = WIDTH,
    seed: int = 2,
    golden: str = "right",
    key: str = "private",
    **options: Any,
) -> Path:
    """A bundle of "m" ``version``, signed with ``key``; its golden vectors "right", "wrong"
    or "none"."""
    model = build_wide_model(tmp_path / f"model-{version}-{width}-{seed}.onnx", width, seed)
    vectors = None
    if golden != "none":
        x = np.ones((2, width), np.float32)
        y = ort.InferenceSession(str(model)).run(None, {"x": x})[0]
        vectors = tmp_path / f"golden-{version}-{golden}.npz"
        np.savez(vectors, **{"input.x": x, "output.y": y if golden == "right" else y + 1})
    out = tmp_path / f"m-{version}-{width}-{golden}-{key}.bundle"
    bundle.build(out, "m", version, model, golden=vectors, **options)
    bundle.sign(out, keys[key])
    return out


def install(daemon: DaemonProcess, path: Path, **options: Any) -> dict[str, Any]:
    with daemon.control(timeout=120) as control:
        return control.command("install", path=str(path), **options)


def serving(daemon: DaemonProcess) -> int:
    """The version of "m" that answers now."""
    with daemon.client() as client:
        return client.infer("m", {"x": X}).version


@contextlib.contextmanager
def calling(daemon: DaemonProcess, call: Callable[[Client], Any]) -> Iterator[dict[str, Any]]:
    """A client making ``call`` all along; its tally of requests and failures, and the set
    of what the calls returned."""
    tally: dict[str, Any] = {"requests": 0, "failures": 0, "seen": set()}
    stop = threading.Event()

    def run() -> None:
        with Client(daemon.endpoint, timeout=30) as client:
            while not stop.is_set():
                tally["requests"] += 1
                try:
                    tally["seen"].add(call(client))
                except EdgedError:
                    tally["failures"] += 1

    worker = threading.Thread(target=run)
    worker.start()
    try:
        yield tally
    finally:
        stop.set()
        worker.join(30)


def inferring(daemon: DaemonProcess) -> contextlib.AbstractContextManager[dict[str, Any]]:
    """A client inferring on "m" all along (``calling``)."""
    return calling(daemon, lambda client: client.infer("m", {"x": X}).version)


def killed_during(daemon: DaemonProcess, bundle: Path) -> None:
    """Install ``bundle`` with edgectl; the daemon dies at its fault point, unanswered."""
    command = [*EDGECTL, "--control", daemon.control_endpoint, "install", str(bundle)]
    edgectl = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert daemon.wait(60) == -9, daemon.log()
    finally:
        edgectl.kill()
        edgectl.wait()


def history(daemon: DaemonProcess) -> list[dict[str, Any]]:
    with daemon.control() as control:
        return list(control.command("history")["installs"])


def wait_for_step(daemon: DaemonProcess, step: str, timeout: float = 60) -> None:
    """Until the install under way has begun ``step`` (its status file says so)."""
    status = daemon.workdir / "state" / "ota" / "status.json"
    deadline = time.monotonic() + timeout
    while not (status.exists() and json.loads(status.read_text()).get("step") == step):
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.01)


# -- bad bundles ----------------------------------------------------------------------------


def rewrite(
    source: Path, out: Path, change: Callable[[str, bytes], list[tuple[tarfile.TarInfo, bytes]]]
) -> Path:
    """Copy a bundle member by member through ``change`` (name, data) -> members to write."""
    with tarfile.open(source) as old, tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as new:
        for member in old.getmembers():
            stream = old.extractfile(member)
            for info, data in change(member.name, stream.read() if stream else b""):
                new.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return out


def raw_bundle(out: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    """A tar archive written header by header, whatever the headers say. A member given
    ``None`` for data gets its declared size as a hole (a sparse file: no disk, no memory
    here), which is how a bundle with a member of hundreds of MB costs the test nothing."""
    with out.open("wb") as archive:
        for info, data in members:
            archive.write(info.tobuf(tarfile.USTAR_FORMAT))
            if data is None:
                archive.seek(info.size, io.SEEK_CUR)
            else:
                archive.write(data)
            archive.seek(-info.size % tarfile.BLOCKSIZE, io.SEEK_CUR)
        archive.write(bytes(2 * tarfile.BLOCKSIZE))  # the end of the archive
    return out


def sized(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    """A header for a member of ``size`` bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    return info


def signature_member(manifest: bytes, private: Path) -> bytes:
    """The ``manifest.sig`` that ``private`` makes for these exact manifest bytes."""
    key = load_private(private)
    signature = base64.b64encode(key.sign(manifest)).decode()
    return json.dumps({"key_id": key_id(key.public_key()), "signature": signature}).encode()


def member(
    name: str, data: bytes, kind: bytes = tarfile.REGTYPE, link: str = ""
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.type = kind
    info.linkname = link
    return info


def keep(name: str, data: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
    return [(member(name, data), data)]


def tamper_model(name: str, data: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
    if name.endswith(".onnx"):
        data = data[:-1] + bytes([data[-1] ^ 1])
    return keep(name, data)


def tamper_manifest(name: str, data: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
    if name == bundle.MANIFEST:  # a higher version than was signed
        data = re.sub(rb'"version": (\d+)', lambda m: b'"version": 9' + m[1], data, count=1)
    return keep(name, data)


def drop_golden(name: str, data: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
    return [] if name.endswith(".npz") else keep(name, data)


def add(
    extra: tarfile.TarInfo, data: bytes = b""
) -> Callable[[str, bytes], list[tuple[tarfile.TarInfo, bytes]]]:
    def change(name: str, payload: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
        members = keep(name, payload)
        return [*members, (extra, data)] if name.endswith(".npz") else members

    return change


#: (case, change, error, message): every way a bundle's archive can be bad
BAD = [
    ("tampered model file", tamper_model, BadBundle, "does not match its sha256"),
    ("tampered manifest", tamper_manifest, BadSignature, "does not match the manifest"),
    ("missing file", drop_golden, BadBundle, "missing from the bundle"),
    (
        "extra file",
        add(member("files/extra.bin", b"x"), b"x"),
        BadBundle,
        "not in the signed manifest",
    ),
    ("path traversal", add(member("files/../../etc/x", b"x"), b"x"), BadBundle, "outside files/"),
    ("absolute path", add(member("/etc/passwd", b"x"), b"x"), BadBundle, "outside files/"),
    (
        "symlink",
        add(member("files/demo.onnx.link", b"", tarfile.SYMTYPE, "/etc/passwd")),
        BadBundle,
        "link",
    ),
    ("device", add(member("files/null", b"", tarfile.CHRTYPE)), BadBundle, "device"),
]
