"""What a user installs: a wheel that type checkers read and whose extras declare what each
part needs, built with the setuptools its metadata calls for."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
USER_CODE = """\
from edged.client import Client


def served_version(client: Client) -> int:
    return client.infer("demo", {}).version
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel pip builds from a copy of the sources (the checkout is left as it is)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "edged", source / "edged", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)]
    subprocess.run(pip, check=True, timeout=600)
    return next(out.glob("edged-*.whl"))


def test_a_strict_mypy_user_sees_the_clients_types(wheel: Path, tmp_path: Path) -> None:
    """Without ``py.typed`` mypy treats the installed package as untyped: the client's
    results are ``Any``, which ``--strict`` reports."""
    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site)]
    subprocess.run([*pip, str(wheel)], check=True, timeout=300)
    user = tmp_path / "user.py"
    user.write_text(USER_CODE)
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(user)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(site)},
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_testing_extra_declares_what_edged_testing_imports(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(metadata).decode().splitlines()
    assert 'Requires-Dist: tomli-w>=1.0; extra == "testing"' in lines
    assert 'Requires-Dist: edged[testing]; extra == "dev"' in lines


def test_the_spdx_license_string_gets_a_setuptools_that_reads_it() -> None:
    """``license = "Apache-2.0"`` (PEP 639) is an error before setuptools 77."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert isinstance(project["project"]["license"], str)
    assert "setuptools>=77" in project["build-system"]["requires"]
