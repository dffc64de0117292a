"""Signed model bundles: built, signed, verified, and every kind of bad bundle refused."""

from __future__ import annotations

import json
import platform
import re
from pathlib import Path
from typing import Any

import pytest

from edged.errors import BadBundle, BadSignature
from edged.ota import bundle
from edged.ota.keys import TrustedKeys
from tests.bundles import BAD, rewrite, signing_keys

LIMIT = 64 << 20


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    return signing_keys(tmp_path)


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
