"""The ``edged`` command line: serve, infer, config check (``edgectl`` is edged.edgectl).

Argument parsing only; the work happens in the modules it calls. Exit codes: 0 success,
1 failure (an error reply, a timeout, a failed start), 2 usage, 78 invalid configuration
(sysexits EX_CONFIG: restarting will not help, so a supervisor should not).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edged import __version__, logsetup
from edged.config import find_config_file, load_config
from edged.errors import ConfigError, EdgedError, InputMismatch, OpNotSupported
from edged.ota import cli as ota_commands

EXIT_FAILURE = 1
EXIT_CONFIG = 78
DEFAULT_TIMEOUT_S = 5.0


def quiet_broken_pipe(main: Callable[[Sequence[str] | None], int]) -> Callable[..., int]:
    """Make a command whose reader goes away (``edgectl sysinfo | head``) exit quietly instead
    of printing a BrokenPipeError traceback, as the Python docs recommend: stdout is pointed at
    /dev/null, so that the flush at exit cannot fail again."""

    @functools.wraps(main)
    def run(argv: Sequence[str] | None = None) -> int:
        try:
            code = main(argv)
            sys.stdout.flush()  # a reader gone after the last print is found here
            return code
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_FAILURE

    return run


@quiet_broken_pipe
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edged", description="Edge-device inference daemon")
    parser.add_argument("--version", action="version", version=f"edged {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the daemon in the foreground")
    serve.add_argument("-c", "--config", help="config file (default: lookup order in CONFIG.md)")

    infer = commands.add_parser("infer", help="send one inference request and print the reply")
    infer.add_argument("model")
    infer.add_argument(
        "--input", action="append", default=[], metavar="NAME=FILE.npy", help="an input tensor"
    )
    infer.add_argument("--random", action="store_true", help="random inputs from the signature")
    infer.add_argument(
        "--shape",
        action="append",
        default=[],
        type=_shape,
        metavar="NAME=AxBxC",
        help="with --random: the shape of input NAME (else its dynamic dimensions are 1)",
    )
    infer.add_argument("--prompt", help="GGUF language model: generate from this text, streamed")
    infer.add_argument(
        "--chat",
        metavar="TEXT",
        help="GGUF language model: the reply to TEXT as the user's "
        "message, formatted by the model's chat template, streamed",
    )
    infer.add_argument("--system", metavar="TEXT", help="with --chat: a system message first")
    infer.add_argument("--max-tokens", type=int, help="with --prompt/--chat: at most this many")
    infer.add_argument("--temperature", type=float, help="with --prompt/--chat: 0 is greedy")
    infer.add_argument("--seed", type=int, help="with --prompt/--chat: a fixed sampling seed")
    infer.add_argument("--stop", action="append", help="with --prompt/--chat: a stop sequence")
    infer.add_argument(
        "--embed", action="append", metavar="TEXT", help="GGUF embedding model: embed TEXT"
    )
    infer.add_argument("--repeat", type=int, default=1, help="send N times, report median timings")
    infer.add_argument("--json", action="store_true", help="machine-readable output")
    _add_socket_options(infer)

    config = commands.add_parser("config", help="configuration tools")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    check = config_commands.add_parser("check", help="validate a config file without starting")
    check.add_argument("file")
    ota_commands.add_commands(commands)

    args = parser.parse_args(argv)
    if args.command == "infer" and args.shape and not args.random:
        parser.error("--shape gives the shape of --random inputs: add --random")
    try:
        if args.command == "serve":
            return _serve(args.config)
        if args.command == "infer":
            return _infer(args)
        if args.command in ("keys", "bundle"):
            return ota_commands.run(args)
        return _config_check(Path(args.file))
    except ConfigError as exc:
        print(f"edged: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except BrokenPipeError:  # not a failure to report: the reader of stdout went away
        raise
    except (EdgedError, OSError) as exc:
        print(f"edged: {_describe_error(exc)}", file=sys.stderr)
        return EXIT_FAILURE


def _add_socket_options(parser: argparse.ArgumentParser, timeout: Any = DEFAULT_TIMEOUT_S) -> None:
    parser.add_argument(
        "--socket", help="daemon endpoint (default: $EDGED_SOCKET or the local IPC)"
    )
    parser.add_argument(
        "--timeout", type=float, default=timeout, help="seconds to wait for a reply"
    )


def _describe_error(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    return f"{code}: {exc}" if isinstance(exc, EdgedError) and code else str(exc)


def _serve(config_arg: str | None) -> int:
    config = load_config(find_config_file(config_arg))
    if config.daemon.event_loop == "asyncio":
        _without_tls_module()
    from edged.daemon import Daemon  # imports asyncio: after the line above

    sink = logsetup.configure(config.daemon.log_level)
    logging.getLogger(__name__).info(
        "edged %s starting with config %s (logging to %s)", __version__, config.source, sink
    )
    Daemon(config).run()
    return 0


def _without_tls_module() -> None:
    """Keep ``ssl`` out of the daemon: asyncio imports it when present, mapping ~4 MB of OpenSSL
    into a process that never speaks TLS (ZeroMQ brings its own security). asyncio and urllib treat
    a missing ssl module as optional. Must run before asyncio is first imported."""
    if "asyncio" not in sys.modules:
        sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]


def _config_check(path: Path) -> int:
    config = load_config(path)
    for name, model in config.models.items():
        if model.path and not Path(model.path).is_file():  # no path: the store serves it
            raise ConfigError(f"{path}: 'models.{name}.path': no file at {model.path}")
    print(f"{path}: ok ({len(config.models) or 'no'} model(s) declared)")
    return 0


def _infer(args: argparse.Namespace) -> int:
    import statistics

    from edged.client import Client

    if args.prompt is not None or args.chat is not None:
        return _generate(args)
    if args.embed:
        return _embed(args)
    with Client(args.socket, timeout=args.timeout) as client:
        inputs = _load_inputs(args.input)
        if args.random:
            signature = _signature(client.describe(args.model))
            inputs = {**_random_inputs(signature["inputs"], dict(args.shape)), **inputs}
        timings = []
        for _ in range(max(1, args.repeat)):
            result = client.infer(args.model, inputs)
            timings.append(result.timing)
    timing = {key: statistics.median(t[key] for t in timings) for key in timings[0]}
    if args.json:
        outputs = {
            name: {"dtype": a.dtype.name, "shape": list(a.shape), "data": a.tolist()}
            for name, a in result.outputs.items()
        }
        report = {"model": result.model, "version": result.version, "outputs": outputs}
        print(json.dumps({**report, "timing": timing, "requests": len(timings)}))
        return 0
    print(f"{result.model} v{result.version}")
    with np.printoptions(precision=4, suppress=True, threshold=64):
        for name, array in result.outputs.items():
            print(f"  {name} {array.dtype.name}{list(array.shape)}: {array}")
    label = f"median of {len(timings)}: " if len(timings) > 1 else ""
    print(
        f"  timing {label}round trip {timing['rtt_us']:.0f} us "
        f"(queue {timing['queue_us']:.0f} us, run {timing['run_us']:.0f} us, "
        f"batch {timing['batch']:.0f})"
    )
    return 0


def _generate(args: argparse.Namespace) -> int:
    """``--prompt`` or ``--chat``: print the text as it streams (or one JSON object at the end
    with --json)."""
    from edged.client import Client

    options = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "seed": args.seed,
        "stop": args.stop,
    }
    with Client(args.socket, timeout=args.timeout) as client:
        if args.chat is None:
            stream = client.generate(args.model, args.prompt, **options)
        else:
            system = [{"role": "system", "content": args.system}] if args.system else []
            messages = [*system, {"role": "user", "content": args.chat}]
            stream = client.chat(args.model, messages, **options)
        with stream:
            for text in stream:
                if not args.json:
                    print(text, end="", flush=True)
    done = stream.completion
    if args.json:
        print(json.dumps(dataclasses.asdict(done)))
        return 0
    ttft_ms = done.timing.get("ttft_us", 0) / 1000
    print(
        f"\n[{done.model} v{done.version}: {done.finish_reason}, {done.prompt_tokens} prompt + "
        f"{done.completion_tokens} generated tokens, first token {ttft_ms:.1f} ms, "
        f"{done.timing.get('tokens_per_s', 0):.1f} tokens/s]",
        file=sys.stderr,
    )
    return 0


def _embed(args: argparse.Namespace) -> int:
    from edged.client import Client

    with Client(args.socket, timeout=args.timeout) as client:
        vectors = client.embed(args.model, args.embed)
    if args.json:
        print(json.dumps({"model": args.model, "embedding": vectors.tolist()}))
        return 0
    with np.printoptions(precision=4, suppress=True, threshold=16):
        for text, vector in zip(args.embed, vectors, strict=True):
            print(f"{text!r}: float32[{vector.shape[0]}] {vector}")
    return 0


def _load_inputs(specs: list[str]) -> dict[str, np.ndarray[Any, Any]]:
    inputs = {}
    for spec in specs:
        name, sep, file = spec.partition("=")
        if not sep or not name:
            raise EdgedError(f"--input takes NAME=FILE.npy, got {spec!r}")
        inputs[name] = np.load(file, allow_pickle=False)
    return inputs


def _shape(spec: str) -> tuple[str, tuple[int, ...]]:
    """``--shape NAME=AxBxC`` as (NAME, (A, B, C))."""
    name, sep, dims = spec.partition("=")
    try:
        shape = tuple(int(d) for d in dims.lower().split("x"))
    except ValueError:
        shape = ()
    if not sep or not name or not shape or min(shape) < 0:
        raise argparse.ArgumentTypeError(f"takes NAME=AxBxC, e.g. images=1x3x640x640: {spec!r}")
    return name, shape


def _signature(described: dict[str, Any]) -> dict[str, Any]:
    """The input signature of a described model; a language model has none: it takes text."""
    if "signature" in described:
        return dict(described["signature"])
    model, ops = described.get("model"), described.get("ops", [])
    flag = "--embed TEXT" if "embed" in ops else "--prompt TEXT"
    raise OpNotSupported(
        f"{model} is a language model ({', '.join(ops)}): it takes text, not tensors, so "
        f"--random has nothing to fill; send text with {flag}"
    )


def _random_inputs(
    specs: list[dict[str, Any]], shapes: dict[str, tuple[int, ...]]
) -> dict[str, np.ndarray[Any, Any]]:
    """Inputs matching a described signature: ``shapes`` where given, else dynamic
    dimensions become 1."""
    unknown = set(shapes) - {spec["name"] for spec in specs}
    if unknown:
        names = ", ".join(spec["name"] for spec in specs)
        raise InputMismatch(
            f"--shape names no input of the model: {', '.join(sorted(unknown))} "
            f"(its inputs: {names})"
        )
    rng = np.random.default_rng()
    inputs = {}
    for spec in specs:
        shape = shapes.get(spec["name"]) or [1 if d is None else d for d in spec["shape"]]
        dtype = np.dtype(spec["dtype"])
        if dtype.kind == "f":
            array = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            array = rng.integers(0, 2, shape).astype(dtype)
        else:
            array = rng.integers(0, 10, shape).astype(dtype)
        inputs[spec["name"]] = array
    return inputs
