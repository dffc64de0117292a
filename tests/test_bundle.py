"""Signed model bundles: built, signed, verified, and every kind of bad bundle refused."""

from __future__ import annotations

import io
import json
import platform
import re
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edged.errors import BadBundle, BadSignature
from edged.ota import bundle
from edged.ota.keys import TrustedKeys, generate

LIMIT = 64 << 20


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    """A trusted signing key, and one the device does not trust."""
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    private, public = generate(tmp_path / "keys", "fleet")
    (trusted / public.name).write_bytes(public.read_bytes())
    stranger, _ = generate(tmp_path / "keys", "stranger")
    return {"private": private, "stranger": stranger, "trusted": trusted}


@pytest.fixture
def signed(tmp_path: Path, keys: dict[str, Path], models_dir: Path) -> Path:
    out = tmp_path / "demo-2.bundle"
    golden = tmp_path / "demo.golden.npz"
    golden.write_bytes(b"golden vectors stand-in")
    bundle.build(out, "demo", 2, models_dir / "demo.onnx", golden=golden)
    bundle.sign(out, keys["private"])
    return out


def extract(
    path: Path, keys: dict[str, Path], tmp_path: Path, limit: int = LIMIT
) -> bundle.Manifest:
    staging = tmp_path / "staging"
    staging.mkdir(exist_ok=True)
    return bundle.extract(path, TrustedKeys(keys["trusted"]), staging, limit)


def test_a_signed_bundle_verifies_and_extracts_exactly_its_files(
    signed: Path, keys: dict[str, Path], tmp_path: Path, models_dir: Path
) -> None:
    manifest = extract(signed, keys, tmp_path)
    assert (manifest.name, manifest.version, manifest.backend) == ("demo", 2, "onnx")
    assert sorted(p.name for p in (tmp_path / "staging").iterdir()) == [
        "demo.golden.npz",
        "demo.onnx",
    ]
    assert (tmp_path / "staging" / "demo.onnx").read_bytes() == (
        models_dir / "demo.onnx"
    ).read_bytes()
    assert bundle.verify(signed, TrustedKeys(keys["trusted"])) == manifest
    assert bundle.inspect(signed)["manifest"]["version"] == 2


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
    if name == "files/demo.onnx":
        data = data[:-1] + bytes([data[-1] ^ 1])
    return keep(name, data)


def tamper_manifest(name: str, data: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
    if name == bundle.MANIFEST:
        data = data.replace(b'"version": 2', b'"version": 3')
    return keep(name, data)


def drop_golden(name: str, data: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
    return [] if name.endswith(".golden.npz") else keep(name, data)


def add(
    extra: tarfile.TarInfo, data: bytes = b""
) -> Callable[[str, bytes], list[tuple[tarfile.TarInfo, bytes]]]:
    def change(name: str, payload: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
        members = keep(name, payload)
        return [*members, (extra, data)] if name.endswith(".golden.npz") else members

    return change


BAD = [
    ("tampered model file", tamper_model, BadBundle, "does not match its sha256"),
    ("tampered manifest", tamper_manifest, BadSignature, "does not match the manifest"),
    ("missing file", drop_golden, BadBundle, "missing from the bundle: demo.golden.npz"),
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


@pytest.mark.parametrize("bad_case", BAD, ids=[case[0] for case in BAD])
def test_bad_bundles_are_refused_with_a_specific_error(
    signed: Path, keys: dict[str, Path], tmp_path: Path, bad_case: tuple[Any, ...]
) -> None:
    _, change, error, message = bad_case
    bad = rewrite(signed, tmp_path / "bad.bundle", change)
    with pytest.raises(error, match=re.escape(message)):
        extract(bad, keys, tmp_path)


def test_unsigned_untrusted_and_damaged_bundles_are_refused(
    signed: Path, keys: dict[str, Path], tmp_path: Path, models_dir: Path
) -> None:
    unsigned = tmp_path / "unsigned.bundle"
    bundle.build(unsigned, "demo", 2, models_dir / "demo.onnx")
    with pytest.raises(BadSignature, match="not signed"):
        extract(unsigned, keys, tmp_path)
    bundle.sign(unsigned, keys["stranger"])
    with pytest.raises(BadSignature, match="not among the trusted keys"):
        extract(unsigned, keys, tmp_path)
    truncated = tmp_path / "truncated.bundle"
    truncated.write_bytes(signed.read_bytes()[: signed.stat().st_size // 2])
    with pytest.raises(BadBundle, match=r"truncated|damaged"):
        extract(truncated, keys, tmp_path)
    with pytest.raises(BadBundle, match="more than the limit"):
        extract(signed, keys, tmp_path, limit=100)
    garbage = tmp_path / "garbage.bundle"
    garbage.write_bytes(b"not a tar archive at all" * 100)
    with pytest.raises(BadBundle):
        extract(garbage, keys, tmp_path)


def test_bundles_for_another_machine_or_a_newer_edged_are_refused(
    tmp_path: Path, models_dir: Path
) -> None:
    for options, message in (
        ({"architectures": ("riscv128",)}, "this device is"),
        ({"min_edged": "99.0.0"}, "needs edged 99.0.0"),
    ):
        manifest = bundle.build(
            tmp_path / "x.bundle", "demo", 2, models_dir / "demo.onnx", **options
        )  # type: ignore[arg-type]
        with pytest.raises(BadBundle, match=message):
            manifest.check_device()
    here = bundle.build(
        tmp_path / "y.bundle",
        "demo",
        2,
        models_dir / "demo.onnx",
        architectures=(platform.machine(),),
    )
    here.check_device()
    data = json.loads(here.to_bytes())
    assert data["format"] == bundle.FORMAT and data["files"][0]["role"] == "model"
