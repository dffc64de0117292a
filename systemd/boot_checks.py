"""What systemd/boot-test.sh needs from Python inside its container: ONNX models built for the
checks, and client calls whose outcome is judged by the error class the client raises, not by
parsing text. Runs with the service's own venv (/opt/edged/bin/python), so it uses exactly the
edged that the unit runs.

    boot_checks.py model square|one-row|slow PATH [--seed N]
    boot_checks.py infer MODEL --shape 2x8 [--trace T] [--expect CODE] [--timeout S]
    boot_checks.py serving MODEL
    boot_checks.py requests MODEL

``infer`` exits 0 when the outcome is the expected one (a result, or the error code given by
``--expect``) and prints it on one line either way; ``serving`` prints the model's active
version and state as the control socket reports them, ``requests`` how many requests its loaded
versions have admitted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
from onnx import ModelProto, NodeProto, TensorProto, helper, numpy_helper, save

from edged.client import Client
from edged.errors import EdgedError

INFER_SOCKET = "ipc:///run/edged/infer.sock"
CONTROL_SOCKET = "ipc:///run/edged/control.sock"
#: the square models' width: x float32[batch, WIDTH] -> y float32[batch, WIDTH]
WIDTH = 8
#: the slow model's state: one SLOW_SIZE x SLOW_SIZE MatMul per loop iteration
SLOW_SIZE = 256
#: loop iterations per input row: a one-row warm-up takes a fraction of a second, a request of
#: a few thousand rows minutes
SLOW_ITERATIONS_PER_ROW = 50


def square_model(seed: int) -> ModelProto:
    """x float32[batch, 8] -> y = x @ w; the seed makes another version of the same interface."""
    weight = np.random.default_rng(seed).standard_normal((WIDTH, WIDTH)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    return _model("square", nodes, [numpy_helper.from_array(weight, "w")])


def one_row_model(seed: int) -> ModelProto:
    """Like ``square_model``, but a run of two or more rows fails (a Reshape to one row): an
    error reply from a version that was admitted, so its log record names the version."""
    weight = np.random.default_rng(seed).standard_normal((WIDTH, WIDTH)).astype(np.float32)
    nodes = [
        helper.make_node("Reshape", ["x", "one_row"], ["row"]),
        helper.make_node("MatMul", ["row", "w"], ["y"]),
    ]
    initializers = [
        numpy_helper.from_array(weight, "w"),
        numpy_helper.from_array(np.array([1, WIDTH], np.int64), "one_row"),
    ]
    return _model("one_row", nodes, initializers)


def slow_model(seed: int) -> ModelProto:
    """Like ``square_model``, but each input row costs SLOW_ITERATIONS_PER_ROW iterations of a
    Loop over a 256 x 256 MatMul: a stuck run on demand, while the warm-up (one row) is quick."""
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((SLOW_SIZE, SLOW_SIZE)) / SLOW_SIZE).astype(np.float32)
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("MatMul", ["state_in", "w"], ["product"]),
            helper.make_node("Tanh", ["product"], ["state_out"]),
        ],
        "slow_body",
        [
            helper.make_tensor_value_info("iteration", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("state_in", TensorProto.FLOAT, [SLOW_SIZE, SLOW_SIZE]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [SLOW_SIZE, SLOW_SIZE]),
        ],
    )
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["rows"], axis=0),
        helper.make_node("Mul", ["rows", "per_row"], ["trips"]),
        helper.make_node("Loop", ["trips", "true", "state0"], ["state"], body=body),
        helper.make_node("ReduceMean", ["state"], ["mean"], keepdims=0),
        helper.make_node("Add", ["x", "mean"], ["y"]),
    ]
    initializers = [
        numpy_helper.from_array(weight, "w"),
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(np.array(SLOW_ITERATIONS_PER_ROW, np.int64), "per_row"),
        numpy_helper.from_array(np.array(True), "true"),
        numpy_helper.from_array(np.eye(SLOW_SIZE, dtype=np.float32), "state0"),
    ]
    return _model("slow", nodes, initializers)


def _model(name: str, nodes: list[NodeProto], initializers: list[TensorProto]) -> ModelProto:
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", WIDTH])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


BUILDERS = {"square": square_model, "one-row": one_row_model, "slow": slow_model}


def build(kind: str, path: Path, seed: int) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    save(BUILDERS[kind](seed), path)
    print(f"built {kind} model {path}")
    return 0


def infer(
    model: str,
    shape: tuple[int, ...],
    trace: str | None,
    expect: str,
    timeout: float,
    *,
    region: bool = False,
) -> int:
    """One request; 0 when its outcome is ``expect`` ("" meaning a result). With ``region``
    its input goes by shared memory (a memfd handed over regions.sock)."""
    try:
        with Client(INFER_SOCKET, timeout=timeout) as client:
            x = np.ones(shape, np.float32)
            if region:
                x = client.region(x.nbytes, "boot-check").array(shape, np.float32)
                x[...] = 1
            result = client.infer(model, {"x": x}, trace=trace)
    except EdgedError as exc:
        print(f"{type(exc).__name__} {exc.code}: {exc}")
        return 0 if exc.code == expect else 1
    outputs = ", ".join(f"{name} {list(array.shape)}" for name, array in result.outputs.items())
    print(f"result from {model} version {result.version}: {outputs} [trace {result.trace}]")
    return 0 if not expect else 1


def serving(model: str) -> int:
    entry = _model_entry(model)
    if entry is None:
        return 1
    print(entry["version"], entry["state"])
    return 0


def requests(model: str) -> int:
    entry = _model_entry(model)
    if entry is None:
        return 1
    print(sum(version["requests"] for version in entry["versions"].values()))
    return 0


def _model_entry(model: str) -> dict[str, Any] | None:
    """The control socket's ``models`` entry for ``model``; None (said why) when it has none."""
    with Client(CONTROL_SOCKET, timeout=5.0) as client:
        entries: dict[str, dict[str, Any]] = client.command("models")["models"]
    if model not in entries:
        print(f"no model {model} (models: {', '.join(entries)})")
        return None
    return entries[model]


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(dim) for dim in text.split("x"))


def main() -> int:
    parser = argparse.ArgumentParser(prog="boot_checks.py", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    model = commands.add_parser("model", help="build an ONNX model for the checks")
    model.add_argument("kind", choices=sorted(BUILDERS))
    model.add_argument("path", type=Path)
    model.add_argument("--seed", type=int, default=0)
    request = commands.add_parser("infer", help="one request on the service's socket")
    request.add_argument("model")
    request.add_argument("--shape", type=_shape, default=(1, WIDTH))
    request.add_argument("--trace")
    request.add_argument("--expect", default="", help="the error code expected")
    request.add_argument("--timeout", type=float, default=10.0)
    request.add_argument("--region", action="store_true", help="the input by shared memory")
    active = commands.add_parser("serving", help="a model's active version and state")
    active.add_argument("model")
    admitted = commands.add_parser("requests", help="requests a model's versions admitted")
    admitted.add_argument("model")
    args = parser.parse_args()
    if args.command == "model":
        return build(args.kind, args.path, args.seed)
    if args.command == "infer":
        return infer(
            args.model, args.shape, args.trace, args.expect, args.timeout, region=args.region
        )
    if args.command == "requests":
        return requests(args.model)
    return serving(args.model)


if __name__ == "__main__":
    sys.exit(main())
