"""Signed bundles and OTA daemons the install tests build for themselves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

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
