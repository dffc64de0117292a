"""``edgectl``: the operator's command line for a running edged, local or remote.

Every command talks to the control socket (``--control``, or ``--remote`` with CurveZMQ keys),
pings it first within ``--timeout`` so that a daemon that is down is reported at once, and
prints a readable summary, or with ``--json`` the reply's keys (documented in PROTOCOL.md).
Exit codes: 0 success, 1 failure (an error reply, no reply, a failed self-test), 2 usage.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edged.cli import quiet_broken_pipe
from edged.client import Client, CurveKeys
from edged.control.ops import CONTROL_OPS
from edged.control.ops.install import DOWNGRADE_ARG
from edged.control.ops.logs import log_line
from edged.errors import ConfigError, EdgedError
from edged.opunit import Arg
from edged.paths import default_control_endpoint
from edged.pushing import PROBE_EVERY_S, push
from edged.store import write_durably
from edged.textfile import textfile

EXIT_FAILURE = 1
DEFAULT_TIMEOUT_S = 5.0
#: commands that load or swap models: their reply comes when that is done
LONG_TIMEOUT_S = 300.0
HEADER = ("v", "id", "ok", "trace")
#: the control ops that are commands, in the registry's order
COMMANDS = {name: op for name, op in CONTROL_OPS.items() if op.help}


@quiet_broken_pipe
def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.remote and not (args.server_key and args.client_key):
        parser.error("--remote needs --server-key (the daemon's .key) and --client-key")
    if args.command == "push" and args.chunk_kib < 1:
        parser.error("--chunk-kib must be at least 1")
    if args.command == "keys":
        return _keys(args)
    endpoint, curve = _connection(parser, args)
    if args.command == "textfile":
        return _textfile(endpoint, curve, args)
    try:
        with Client(endpoint, timeout=args.timeout, curve=curve) as client:
            client.command("ping")  # a daemon that is down is reported within --timeout
            if args.command == "logs":
                return _logs(client, args)
            reply = _run(client, args)
    except EdgedError as exc:
        code = f"{exc.code}: " if exc.code else ""
        print(f"edgectl: {code}{exc}", file=sys.stderr)
        return EXIT_FAILURE
    _print(args, reply)
    return EXIT_FAILURE if _partly_failed(args.command, reply) else 0


def _textfile(endpoint: str, curve: CurveKeys | None, args: argparse.Namespace) -> int:
    """Write the metrics file; a daemon that does not answer is written down as such (and is
    the command's failure)."""
    try:
        with Client(endpoint, timeout=args.timeout, curve=curve) as client:
            exposition: str | None = client.command("metrics")["text"]
    except EdgedError as exc:
        print(f"edgectl: {exc}; writing edged_up 0", file=sys.stderr)
        exposition = None
    write_durably(Path(args.path), textfile(exposition))
    return 0 if exposition is not None else EXIT_FAILURE


def _partly_failed(command: str, reply: dict[str, Any]) -> bool:
    """A reply that came back but reports a failure inside (a self-test that failed, a reload
    that could not apply a model), as the op says."""
    op = COMMANDS.get(command)
    return op is not None and op.failed is not None and op.failed(reply)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgectl", description="Operate a running edged")
    _options(parser, DEFAULT_TIMEOUT_S)
    # the same options after the command too (edgectl status --json); SUPPRESS keeps a value
    # given before the command when it is not given again after it
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    _options(common, argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=text, description=text, parents=[common])

    for name, op in COMMANDS.items():
        _arguments(command(name, str(op.help)), op.args)
    push = command("push", "upload a signed bundle to the device (resumable), then install it")
    push.add_argument("bundle", help="the bundle file here")
    push.add_argument(
        "--chunk-kib", type=int, default=1024, help="KiB per upload message (default 1024)"
    )
    _arguments(push, (DOWNGRADE_ARG,))
    textfile = command(
        "textfile",
        "write the metrics for node_exporter's textfile collector (edged_up 0 if no answer)",
    )
    textfile.add_argument("path", help="the .prom file, in the collector's directory")
    _arguments(textfile, ())
    keys = command("keys", "make a CurveZMQ key pair for remote control")
    keys.add_argument(
        "action",
        choices=("curve", "gen"),
        metavar="curve",
        help="curve: make a CurveZMQ key pair ('gen' is its deprecated old name)",
    )
    keys.add_argument("name", help="file name stem: NAME.key (public) and NAME.key_secret")
    keys.add_argument("--dir", default=".", help="where to write them (default: here)")
    return parser


def _arguments(parser: argparse.ArgumentParser, arguments: Sequence[Arg]) -> None:
    """A command's arguments; what they fill in the request is kept with the parsed ones."""
    actions = [parser.add_argument(*a.flags, **a.options) for a in arguments]
    parser.set_defaults(
        wire_keys=[action.dest for action in actions],
        device_paths=[act.dest for act, a in zip(actions, arguments, strict=True) if a.device_path],
    )


def _options(parser: argparse.ArgumentParser, timeout: Any) -> None:
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
    parser.add_argument(
        "--timeout", type=float, default=timeout, help="seconds to wait for a reply"
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _connection(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[str, CurveKeys | None]:
    """The endpoint and keys to use; the command's file paths made what the daemon needs. A
    wrong key file or path is a usage error."""
    endpoint = args.remote or args.control or default_control_endpoint()
    try:
        curve = CurveKeys.load(args.server_key, args.client_key) if args.remote else None
        for dest in args.device_paths:
            setattr(args, dest, _device_path(endpoint, getattr(args, dest)))
    except ConfigError as exc:
        parser.error(str(exc))
    return endpoint, curve


def _device_path(endpoint: str, path: str | None) -> str | None:
    """A file path as the daemon must get it: absolute, since the daemon's working directory is
    not edgectl's. A relative one is taken from edgectl's directory when the daemon is on this
    machine (an ``ipc://`` endpoint), and refused for a remote one, whose files are elsewhere."""
    if path is None or Path(path).is_absolute():
        return path
    if not endpoint.startswith("ipc://"):
        raise ConfigError(f"{path!r}: a path on a remote device must be absolute")
    return str(Path(path).absolute())


def _run(client: Client, args: argparse.Namespace) -> dict[str, Any]:
    """The command's op with the request keys its arguments fill; a flag left off is left out
    (the daemon's default applies), and so is an argument not given (``None``)."""
    op = CONTROL_OPS["install" if args.command == "push" else args.command]
    timeout = max(args.timeout, LONG_TIMEOUT_S) if op.long_running else args.timeout
    wait = {"timeout": timeout, "probe_every": PROBE_EVERY_S if op.long_running else None}
    fields = {key: getattr(args, key) for key in args.wire_keys}
    if args.command == "push":
        fields["upload"] = push(
            client,
            Path(args.bundle),
            chunk_bytes=args.chunk_kib * 1024,
            timeout=args.timeout,
            patience=timeout,
        )
    given = {key: value for key, value in fields.items() if value is not False}
    return client.command(op.name, **given, **wait)


def _logs(client: Client, args: argparse.Namespace) -> int:
    """Print the backlog, and with --follow every new record until interrupted."""
    replies = client.stream(
        "logs",
        last=args.last,
        level=args.level,
        follow=args.follow or None,
        timeout=math.inf if args.follow else args.timeout,
    )
    with contextlib.closing(replies):  # leaving early (^C, a closed pipe) cancels a follow
        try:
            for reply in replies:
                for record in reply.get("records", []):
                    print(json.dumps(record) if args.json else log_line(record), flush=True)
        except KeyboardInterrupt:
            pass
    return 0


def _keys(args: argparse.Namespace) -> int:
    if args.action == "gen":
        print(
            "edgectl: 'keys gen' is deprecated, say 'keys curve' (a CurveZMQ pair for remote "
            "control; 'edged keys gen' makes the Ed25519 keys that sign bundles)",
            file=sys.stderr,
        )
    keys = _generate_keys(Path(args.dir), args.name)
    if args.json:
        print(json.dumps(keys, sort_keys=True))
    else:
        print(f"public key {keys['public']}\nsecret key {keys['secret']} (keep it private)")
    return 0


def _generate_keys(directory: Path, name: str) -> dict[str, Any]:
    import zmq.auth

    directory.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(directory), name)
    Path(secret).chmod(0o600)
    return {"public": str(public), "secret": str(secret)}


def _print(args: argparse.Namespace, reply: dict[str, Any]) -> None:
    fields = {key: value for key, value in reply.items() if key not in HEADER}
    if args.json:
        print(json.dumps(fields, sort_keys=True))
    else:
        op = COMMANDS.get(args.command)
        text = op.format if op is not None and op.format is not None else _pretty
        print(text(fields))


def _pretty(fields: dict[str, Any]) -> str:
    return json.dumps(fields, indent=2, sort_keys=True)
