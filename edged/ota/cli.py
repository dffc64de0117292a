"""``edged keys gen`` and ``edged bundle build|sign|verify|inspect``: making signed bundles.

These run where bundles are made (a build machine, a laptop), and on the device to check one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_commands(commands: Any) -> None:
    keys = commands.add_parser("keys", help="Ed25519 keys that sign model bundles")
    keys.add_argument("action", choices=("gen",), help="gen: make a signing key pair")
    keys.add_argument("name", help="NAME.ed25519 (private: keep it off devices) and NAME.pub")
    keys.add_argument("--dir", default=".", help="where to write them (default: here)")

    bundle = commands.add_parser("bundle", help="build, sign, verify and inspect model bundles")
    actions = bundle.add_subparsers(dest="bundle_command", required=True)
    build = actions.add_parser(
        "build", help="pack a model (and golden vectors), or a collection's snapshot, into a bundle"
    )
    build.add_argument(
        "model", type=Path, help="the model file (.onnx or .gguf), or with --collection a snapshot"
    )
    build.add_argument(
        "--collection",
        action="store_true",
        help="the file is a collection's snapshot (edgectl collections snapshot); --name names "
        "the collection",
    )
    build.add_argument("-o", "--output", type=Path, required=True, help="the bundle to write")
    build.add_argument("--name", required=True, help="the model's name on the devices")
    build.add_argument("--version", type=int, required=True, help="higher than any shipped")
    build.add_argument("--golden", type=Path, help="golden vectors (.npz) checked at install")
    build.add_argument(
        "--pipeline", type=Path, help="the version's preprocess/postprocess (.toml, docs/CONFIG.md)"
    )
    build.add_argument(
        "--reference", type=Path, help="its drift reference (.json: edged bundle reference)"
    )
    build.add_argument("--backend", choices=("onnx", "gguf"), help="default: by file suffix")
    build.add_argument("--min-edged", default="0.0.0", help="the oldest edged that may install")
    build.add_argument(
        "--arch", action="append", default=[], help="a machine type it is for (repeatable)"
    )
    sign = actions.add_parser("sign", help="sign a bundle's manifest with a private key")
    sign.add_argument("bundle", type=Path)
    sign.add_argument("--key", type=Path, required=True, help="NAME.ed25519")
    verify = actions.add_parser("verify", help="check a bundle against trusted public keys")
    verify.add_argument("bundle", type=Path)
    verify.add_argument("--trusted", type=Path, required=True, help="a directory of NAME.pub")
    reference = actions.add_parser(
        "reference", help="a model's drift reference from sample inputs, for --reference"
    )
    reference.add_argument("model", type=Path, help="the ONNX model")
    reference.add_argument(
        "--inputs", type=Path, required=True, help="sample inputs: an .npz, one array per input"
    )
    reference.add_argument("-o", "--output", type=Path, required=True, help="the .json to write")
    reference.add_argument("--bins", type=int, default=20, help="bins per feature (default 20)")
    inspect = actions.add_parser("inspect", help="show a bundle's manifest (nothing trusted)")
    inspect.add_argument("bundle", type=Path)


def run(args: argparse.Namespace) -> int:
    """Run a keys or bundle command; errors propagate as EdgedError (exit 1)."""
    from edged.ota import bundle, keys

    if args.command == "keys":
        private, public = keys.generate(Path(args.dir), args.name)
        return _print({"private": str(private), "public": str(public)})
    action = args.bundle_command
    if action == "build":
        manifest = bundle.build(
            args.output,
            args.name,
            args.version,
            args.model,
            backend=args.backend,
            golden=args.golden,
            pipeline=args.pipeline,
            reference=args.reference,
            min_edged=args.min_edged,
            architectures=tuple(args.arch),
            kind="collection" if args.collection else "model",
        )
        return _print(
            {"bundle": str(args.output), "name": manifest.name, "version": manifest.version}
        )
    if action == "reference":
        return _reference(args)
    if action == "sign":
        return _print({"bundle": str(args.bundle), "signed_by": bundle.sign(args.bundle, args.key)})
    if action == "verify":
        manifest = bundle.verify(args.bundle, keys.TrustedKeys(args.trusted))
        return _print({"ok": True, "name": manifest.name, "version": manifest.version})
    return _print(bundle.inspect(args.bundle))


def _reference(args: argparse.Namespace) -> int:
    import numpy as np

    from edged.drift.reference import from_samples

    with np.load(args.inputs) as samples:
        inputs = {name: samples[name] for name in samples.files}
    reference = from_samples(args.model, inputs, args.bins)
    reference.save(args.output)
    found = {"features": len(reference.features), "rows": reference.count}
    return _print({"reference": str(args.output), **found})


def _print(fields: dict[str, Any]) -> int:
    print(json.dumps(fields, indent=2, sort_keys=True))
    return 0
