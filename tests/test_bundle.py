"""Signed model bundles: built, signed, verified, and every kind of bad bundle refused."""

from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
import tarfile
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from edged.errors import BadBundle, BadSignature
from edged.ota import bundle
from edged.ota.keys import TrustedKeys
from edged.store import sha256_of
from tests.bundles import BAD, raw_bundle, rewrite, signing_keys, sized

LIMIT = 64 << 20
#: the model file that ``sign`` must stream, not hold
LARGE = 64 << 20


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


def hostile(tmp_path: Path, *members: tuple[tarfile.TarInfo, bytes]) -> Path:
    return raw_bundle(tmp_path / "hostile.bundle", list(members))


def manifest_member(data: dict[str, Any] | bytes) -> tuple[tarfile.TarInfo, bytes]:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return sized(bundle.MANIFEST, len(raw)), raw


def signature(raw: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return sized(bundle.SIGNATURE, len(raw)), raw


def pax(records: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return sized("././@PaxHeader", len(records), tarfile.XHDTYPE), records


GOOD = json.loads(
    bundle.Manifest("demo", 2, "onnx", (bundle.BundleFile("demo.onnx", 1, "0" * 64),)).to_bytes()
)


@pytest.mark.parametrize(
    ("members", "error", "message"),
    [
        ([manifest_member(GOOD), signature(b"[" * 4000)], BadSignature, "nests too deep"),
        ([manifest_member(GOOD), signature(b" " * 5000)], BadSignature, "is 5000 bytes"),
        ([manifest_member(GOOD), signature(b"[1]")], BadSignature, "not a JSON object"),
        ([manifest_member(GOOD), signature(b"{")], BadSignature, "not valid JSON"),
        ([manifest_member(b"[" * 100_000)], BadBundle, "the manifest nests too deep"),
        ([manifest_member({**GOOD, "name": 5})], BadBundle, "must be strings"),
        (
            [manifest_member({**GOOD, "files": [{**GOOD["files"][0], "sha256": 1}]})],
            BadBundle,
            "must be strings",
        ),
        ([manifest_member({**GOOD, "version": 10**19})], BadBundle, "version must be an integer"),
        ([manifest_member([GOOD])], BadBundle, "the manifest is not valid"),
        ([pax(b"x" * 70_000), manifest_member(GOOD)], BadBundle, "extended tar header of 70000"),
        ([*[pax(b"")] * 3000, manifest_member(GOOD)], BadBundle, "extended tar headers in a row"),
        (
            [(sized(bundle.MANIFEST, 0, tarfile.GNUTYPE_SPARSE), b"")],
            BadBundle,
            "sparse file",
        ),
    ],
    ids=[
        "deep signature",
        "large signature",
        "signature not an object",
        "signature not JSON",
        "deep manifest",
        "name not a string",
        "sha256 not a string",
        "version too large",
        "manifest not an object",
        "large extended header",
        "chained extended headers",
        "sparse member",
    ],
)
def test_what_is_read_before_the_signature_is_bounded_and_refused_specifically(
    tmp_path: Path,
    keys: dict[str, Path],
    members: list[tuple[tarfile.TarInfo, bytes]],
    error: type[Exception],
    message: str,
) -> None:
    path = hostile(tmp_path, *members)
    read = bundle.inspect if error is BadBundle else partial(verify, keys=keys)
    with pytest.raises(error, match=re.escape(message)):
        read(path)


def verify(path: Path, keys: dict[str, Path]) -> bundle.Manifest:
    return bundle.verify(path, TrustedKeys(keys["trusted"]))


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    created = '[[[[[[[[[[{{{{{{{{{{\\"[[[[[[[[[[\\\\'
    manifest = bundle.Manifest("demo", 2, "onnx", (bundle.BundleFile("demo.onnx", 1, "0" * 64),))
    raw = manifest.to_bytes().replace(b'"created": ""', b'"created": "' + created.encode() + b'"')
    assert bundle.Manifest.parse(raw).created == json.loads(f'"{created}"')


def peak_rss(command: list[str]) -> int:
    """The peak resident memory of ``command``, run as the only child of a fresh process."""
    probe = (
        "import resource, subprocess, sys; "
        "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, *command],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return int(done.stdout) * 1024  # Linux reports kB


def test_signing_streams_the_files_instead_of_holding_them_in_memory(
    tmp_path: Path, keys: dict[str, Path], models_dir: Path
) -> None:
    large = tmp_path / "large.onnx"
    with large.open("wb") as out:  # sparse: read back like any file, with no disk behind it
        out.truncate(LARGE)
    peaks = {}
    for model in (models_dir / "demo.onnx", large):
        out = tmp_path / f"{model.stem}.bundle"
        bundle.build(out, "demo", 2, model)
        sign = [sys.executable, "-m", "edged", "bundle", "sign", str(out)]
        peaks[model] = peak_rss([*sign, "--key", str(keys["private"])])
        assert verify(out, keys).model.size == model.stat().st_size
    growth = peaks[large] - peaks[models_dir / "demo.onnx"]
    assert growth < LARGE // 4, f"signing {LARGE >> 20} MiB took {growth >> 20} MiB more"
    extract(tmp_path / "large.bundle", keys, tmp_path, limit=LARGE)
    assert sha256_of(tmp_path / "staging" / "large.onnx") == sha256_of(large)


def test_signing_a_truncated_bundle_fails_and_leaves_it_as_it_was(
    signed: Path, keys: dict[str, Path], tmp_path: Path
) -> None:
    truncated = tmp_path / "truncated.bundle"
    raw = signed.read_bytes()[: signed.stat().st_size // 2]  # inside the model file
    truncated.write_bytes(raw)
    with pytest.raises(BadBundle, match="cannot rewrite"):
        bundle.sign(truncated, keys["private"])
    assert truncated.read_bytes() == raw
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
