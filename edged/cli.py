"""Command lines: ``edged`` (serve, infer, config check) and ``edgectl`` (operator commands).

Argument parsing only; the work happens in the modules it calls. Exit codes: 0 success,
1 failure (an error reply, a timeout, a failed start), 2 usage, 78 invalid configuration
(sysexits EX_CONFIG: restarting will not help, so a supervisor should not).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edged import __version__
from edged.config import find_config_file, load_config
from edged.errors import ConfigError, EdgedError

if TYPE_CHECKING:
    from edged.client import Client

EXIT_FAILURE = 1
EXIT_CONFIG = 78
SWAP_TIMEOUT_S = 300.0
DEFAULT_TIMEOUT_S = 5.0
#: reply keys every reply has
HEADER = ("v", "id", "ok")


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
    infer.add_argument("--prompt", help="GGUF language model: generate from this text, streamed")
    infer.add_argument("--max-tokens", type=int, help="with --prompt: at most this many tokens")
    infer.add_argument("--temperature", type=float, help="with --prompt: 0 is greedy")
    infer.add_argument("--seed", type=int, help="with --prompt: a fixed sampling seed")
    infer.add_argument("--stop", action="append", help="with --prompt: a stop sequence")
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

    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args.config)
        if args.command == "infer":
            return _infer(args)
        return _config_check(Path(args.file))
    except ConfigError as exc:
        print(f"edged: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (EdgedError, OSError) as exc:
        print(f"edged: {_describe_error(exc)}", file=sys.stderr)
        return EXIT_FAILURE


def edgectl_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgectl", description="Operate a running edged")
    _add_edgectl_options(parser, DEFAULT_TIMEOUT_S)
    # the same options after the command too (edgectl status --json); SUPPRESS keeps a value
    # given before the command when it is not given again after it
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    _add_edgectl_options(common, argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=text, parents=[common])

    command("status", "is the daemon up, and what does it serve")
    keys = command("keys", "CurveZMQ key pairs for remote control")
    keys.add_argument("action", choices=("gen",), help="gen: make a key pair")
    keys.add_argument("name", help="file name stem: NAME.key (public) and NAME.key_secret")
    keys.add_argument("--dir", default=".", help="where to write them (default: here)")
    command("models", "each model's active, loaded, previous, stored versions")
    command("reload", "serve what the config file and the store say now")
    swap = command("swap", "serve another version of a model, validated first")
    swap.add_argument("--policy", choices=("auto", "overlap", "replace"), default="auto")
    trials = {
        "canary": command("canary", "serve a share of the model's requests with another version"),
        "shadow": command("shadow", "run requests on another version too and compare outputs"),
    }
    trials["canary"].add_argument("--fraction", type=float, default=0.1, help="share of requests")
    for sub in (swap, *trials.values()):
        sub.add_argument("model")
        sub.add_argument("version", type=int, nargs="?", help="a stored version (default: newest)")
        sub.add_argument("--path", help="a new model file instead of a stored version")
        sub.add_argument("--force", action="store_true", help="skip the interface check")
    for verb, text in (
        ("rollback", "go back to the version before the last swap"),
        ("promote", "make the candidate version the active one"),
        ("discard", "end the candidate's trial and unload it"),
    ):
        command(verb, text).add_argument("model")
    args = parser.parse_args(argv)
    try:
        reply = _edgectl(args)
    except EdgedError as exc:
        print(f"edgectl: {_describe_error(exc)}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print(json.dumps(reply, sort_keys=True))
    else:
        print(_edgectl_text(args.command, reply))
    return 0


def _add_edgectl_options(parser: argparse.ArgumentParser, timeout: Any) -> None:
    _add_socket_options(parser, timeout)
    parser.add_argument(
        "--control", help="control endpoint (default: $EDGED_CONTROL or the local IPC)"
    )
    parser.add_argument(
        "--remote", metavar="tcp://HOST:PORT", help="a remote daemon's control socket (CurveZMQ)"
    )
    parser.add_argument("--server-key", metavar="FILE", help="with --remote: the daemon's .key")
    parser.add_argument(
        "--client-key", metavar="FILE", help="with --remote: this client's .key_secret"
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _edgectl(args: argparse.Namespace) -> dict[str, Any]:
    from edged.client import Client

    if args.command == "keys":
        return _generate_keys(Path(args.dir), args.name)
    if args.command == "status" and not args.remote:
        with Client(args.socket, timeout=args.timeout) as client:
            return client.ping()
    with _control_client(args) as client:
        client.command("ping")  # a daemon that is down is reported within --timeout
        if args.command == "models":
            return client.command("models")
        # a swap (or a reload that swaps) takes as long as loading and checking a model
        timeout = max(args.timeout, SWAP_TIMEOUT_S)
        if args.command == "reload":
            return client.command("reload", timeout=timeout)
        if args.command in ("rollback", "promote", "discard"):
            return client.command(args.command, model=args.model, timeout=timeout)
        options = vars(args)
        return client.command(
            args.command,
            model=args.model,
            version=args.version,
            path=str(Path(args.path).resolve()) if args.path else None,  # the daemon's cwd differs
            policy=options.get("policy"),
            fraction=options.get("fraction"),
            force=args.force or None,
            timeout=timeout,
        )


def _control_client(args: argparse.Namespace) -> Client:
    """The local control socket, or ``--remote`` with CurveZMQ keys."""
    from edged.client import Client, CurveKeys  # here: edged infer and serve never need it
    from edged.paths import default_control_endpoint

    if not args.remote:
        return Client(args.control or default_control_endpoint(), timeout=args.timeout)
    if not (args.server_key and args.client_key):
        raise EdgedError("--remote needs --server-key (the daemon's .key) and --client-key")
    keys = CurveKeys.load(args.server_key, args.client_key)
    return Client(args.remote, timeout=args.timeout, curve=keys)


def _generate_keys(directory: Path, name: str) -> dict[str, Any]:
    import zmq.auth

    directory.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(directory), name)
    Path(secret).chmod(0o600)
    return {"public": str(public), "secret": str(secret)}


def _edgectl_text(command: str, reply: dict[str, Any]) -> str:
    if command == "status":
        memory = reply.get("memory", {})
        budget = memory.get("budget_bytes")
        limit = f"of {budget / 2**20:.0f} MiB" if budget else "(no budget)"
        used = memory.get("used_bytes", 0) / 2**20
        loaded = ", ".join(reply["loaded"]) or "none"
        return "\n".join(
            [
                f"edged {reply['edged_version']} pid {reply['pid']}: {reply['state']}",
                f"models: {', '.join(reply['models'])}",
                f"memory: {used:.1f} MiB {limit} charged to {loaded}",
            ]
        )
    if command == "models":
        return "\n".join(
            f"{name}: version {m['version']} ({m['state']}), loaded {m['loaded']}, "
            f"previous {m['previous']}, stored {m['stored']}"
            for name, m in reply["models"].items()
        )
    if command == "keys":
        return f"public key {reply['public']}\nsecret key {reply['secret']} (keep it private)"
    if command in ("reload", "canary", "shadow", "discard"):
        return "\n".join(f"{key}: {value}" for key, value in reply.items() if key not in HEADER)
    return (
        f"{reply['model']}: version {reply['from_version']} -> {reply['version']} "
        f"({reply['policy']}, {reply['seconds']:.2f} s)"
    )


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

    logging.basicConfig(
        level=config.daemon.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger(__name__).info("edged %s starting with config %s", __version__, config.source)
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

    if args.prompt is not None:
        return _generate(args)
    if args.embed:
        return _embed(args)
    with Client(args.socket, timeout=args.timeout) as client:
        inputs = _load_inputs(args.input)
        if args.random:
            signature = client.describe(args.model)["signature"]
            inputs = {**_random_inputs(signature["inputs"]), **inputs}
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
    """Print the text as it streams (or one JSON object at the end with --json)."""
    from edged.client import Client

    with Client(args.socket, timeout=args.timeout) as client:
        stream = client.generate(
            args.model,
            args.prompt,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            seed=args.seed,
            stop=args.stop,
        )
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


def _random_inputs(specs: list[dict[str, Any]]) -> dict[str, np.ndarray[Any, Any]]:
    """Inputs matching a described signature; dynamic dimensions become 1."""
    rng = np.random.default_rng()
    inputs = {}
    for spec in specs:
        shape = [1 if d is None else d for d in spec["shape"]]
        dtype = np.dtype(spec["dtype"])
        if dtype.kind == "f":
            array = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            array = rng.integers(0, 2, shape).astype(dtype)
        else:
            array = rng.integers(0, 10, shape).astype(dtype)
        inputs[spec["name"]] = array
    return inputs
