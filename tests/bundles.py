"""Signed bundles and OTA daemons the install tests build for themselves."""

from __future__ import annotations

import io
import re
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edged.errors import BadBundle, BadSignature
from edged.ota import bundle
from edged.ota.keys import generate
from edged.testing import DaemonProcess
from tests.conftest import DaemonFactory, store_versions
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
    **ota: Any,
) -> DaemonProcess:
    """A daemon in ``tmp_path / "d"`` that trusts ``keys`` (and takes these other ``ota``
    settings), serving "m" version 1, ``width`` wide, from its store."""
    store_versions(tmp_path / "d", "m", [build_wide_model(tmp_path / "v1.onnx", width, 1)])
    config = {
        "ota": {"trusted_keys": str(keys["trusted"]), **ota},
        "models": {"m": {"preload": True}},
    }
    return start_daemon(config, workdir=tmp_path / "d")


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
