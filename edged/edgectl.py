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
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edged.cli import quiet_broken_pipe
from edged.client import Client, CurveKeys
from edged.errors import ClientTimeout, ConfigError, EdgedError
from edged.paths import default_control_endpoint
from edged.store import sha256_of

EXIT_FAILURE = 1
DEFAULT_TIMEOUT_S = 5.0
#: commands that load or swap models: their reply comes when that is done
LONG_TIMEOUT_S = 300.0
HEADER = ("v", "id", "ok", "trace")
SIMPLE = {
    "status": "the daemon at a glance: version, uptime, memory, models, recent errors",
    "models": "each model's versions, memory, traffic, latency and errors",
    "metrics": "every metric in the Prometheus text format",
    "sysinfo": "CPU, memory, disks, temperatures (GPU, power rails on a Jetson)",
    "config": "the configuration in effect, secrets redacted",
    "stack": "every thread's and asyncio task's stack (a hung or busy daemon)",
    "selftest": "run every loaded model on its golden vectors; exit 1 if any fails",
    "reload": "serve what the config file and the store say now",
    "history": "the last bundle installs: outcome, version, reason",
}
MODEL_COMMANDS = {
    "load": "load a model now",
    "unload": "unload a model now (refused while it is busy)",
    "rollback": "go back to the version before the last swap",
    "promote": "make the candidate version the active one",
    "discard": "end the candidate's trial and unload it",
}
LONG = frozenset(
    {"selftest", "reload", "load", "swap", "rollback", "canary", "shadow", "promote", "discard"}
    | {"install", "push"}
)
#: ``push``: new connections tried after a lost one, each resuming the upload
PUSH_RETRIES = 5
#: while waiting for a long command's reply, ping the daemon this often (seconds) on a fresh
#: connection, so that one that died mid-install is reported at once, not after LONG_TIMEOUT_S
PROBE_EVERY_S = 2.0


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


def _partly_failed(command: str, reply: dict[str, Any]) -> bool:
    """A reply that came back but reports a failure inside: a self-test that failed, or a
    reload that could not apply a model (what ``systemctl reload`` must report)."""
    return reply.get("ok_all") is False or (command == "reload" and bool(reply.get("failed")))


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

    for name, text in SIMPLE.items():
        command(name, text)
    for name, text in MODEL_COMMANDS.items():
        command(name, text).add_argument("model")
    logs = command("logs", "the daemon's recent log records; --follow for new ones as they come")
    logs.add_argument("-n", "--last", type=int, default=50, help="how many (default 50)")
    logs.add_argument("--level", help="this level or worse, e.g. WARNING")
    logs.add_argument("-f", "--follow", action="store_true", help="then every new record")
    swap = command("swap", "serve another version of a model, validated first")
    swap.add_argument("--policy", choices=("auto", "overlap", "replace"), default="auto")
    canary = command("canary", "serve a share of the model's requests with another version")
    canary.add_argument("--fraction", type=float, default=0.1, help="share of requests")
    shadow = command("shadow", "run requests on another version too and compare outputs")
    for sub in (swap, canary, shadow):
        sub.add_argument("model")
        sub.add_argument("version", type=int, nargs="?", help="a stored version (default: newest)")
        sub.add_argument("--path", help="a new model file instead of a stored version")
        sub.add_argument("--force", action="store_true", help="skip the interface check")
    install = command("install", "install a signed bundle that is on the device, then swap to it")
    install.add_argument("bundle", help="the bundle file's path on the device")
    push = command("push", "upload a signed bundle to the device (resumable), then install it")
    push.add_argument("bundle", help="the bundle file here")
    push.add_argument(
        "--chunk-kib", type=int, default=1024, help="KiB per upload message (default 1024)"
    )
    for sub in (install, push):
        sub.add_argument(
            "--allow-downgrade", action="store_true", help="accept a version older than installed"
        )
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
        if args.command == "install":
            args.bundle = _device_path(endpoint, args.bundle)
        if vars(args).get("path"):
            args.path = _device_path(endpoint, args.path)
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
    long = args.command in LONG
    timeout = max(args.timeout, LONG_TIMEOUT_S) if long else args.timeout
    wait = {"timeout": timeout, "probe_every": PROBE_EVERY_S if long else None}
    if args.command in SIMPLE:
        return client.command(args.command, **wait)
    if args.command in MODEL_COMMANDS:
        return client.command(args.command, model=args.model, **wait)
    if args.command == "install":
        return _install(client, args, wait, path=args.bundle)
    if args.command == "push":
        return _install(client, args, wait, upload=_push(client, args, timeout))
    options = vars(args)
    return client.command(
        args.command,
        model=args.model,
        version=args.version,
        path=args.path,
        policy=options.get("policy"),
        fraction=options.get("fraction"),
        force=args.force or None,
        **wait,
    )


def _install(
    client: Client,
    args: argparse.Namespace,
    wait: dict[str, Any],
    *,
    path: str | None = None,
    upload: str | None = None,
) -> dict[str, Any]:
    """``install`` a bundle: a ``path`` on the device, or a finished ``upload``."""
    return client.command(
        "install", path=path, upload=upload, allow_downgrade=args.allow_downgrade or None, **wait
    )


def _push(client: Client, args: argparse.Namespace, patience: float) -> str:
    """Upload the bundle, resuming where the daemon's copy ends after a lost connection (the
    client reconnects after a timeout); returns its sha256, which names the upload."""
    bundle = Path(args.bundle)
    try:
        sha256, size = sha256_of(bundle), bundle.stat().st_size
    except OSError as exc:
        raise EdgedError(f"cannot read the bundle: {exc}") from None
    retries = 0
    while True:
        try:
            client.command("ping")  # a daemon still down is found within --timeout
            _send_rest(client, bundle, sha256, size, args=args, patience=patience)
            return sha256
        except ClientTimeout as exc:
            retries += 1
            if retries > PUSH_RETRIES:
                raise
            print(f"edgectl: {exc}; resuming the upload", file=sys.stderr)


def _send_rest(
    client: Client,
    bundle: Path,
    sha256: str,
    size: int,
    *,
    args: argparse.Namespace,
    patience: float,
) -> None:
    """Ask the daemon how much of the bundle it has, then send the rest a chunk at a time. A
    request that may complete the upload (the question, the last chunk) waits ``patience``:
    its reply comes once the daemon has verified the whole bundle."""
    progress = client.command(
        "upload", sha256=sha256, size=size, timeout=patience, probe_every=PROBE_EVERY_S
    )
    with bundle.open("rb") as data:
        data.seek(progress["received"])
        while not progress["complete"]:
            offset = progress["received"]
            piece = data.read(args.chunk_kib * 1024)
            if not piece:
                raise EdgedError(f"{bundle} changed while it was sent: push it again")
            last = offset + len(piece) >= size
            progress = client.command(
                "upload",
                sha256=sha256,
                size=size,
                offset=offset,
                data=piece,
                timeout=patience if last else args.timeout,
                probe_every=PROBE_EVERY_S if last else None,
            )


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
                    print(json.dumps(record) if args.json else _log_line(record), flush=True)
        except KeyboardInterrupt:
            pass
    return 0


def _log_line(record: dict[str, Any]) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record["time"]))
    trace = record.get("trace")
    trace = f" [trace {trace}]" if trace and f"[trace {trace}]" not in record["message"] else ""
    return f"{stamp} {record['level']} {record['logger']}: {record['message']}{trace}"


def _keys(args: argparse.Namespace) -> int:
    if args.action == "gen":
        print(
            "edgectl: 'keys gen' is deprecated, say 'keys curve' (a CurveZMQ pair for remote "
            "control; 'edged keys gen' makes the Ed25519 keys that sign bundles)",
            file=sys.stderr,
        )
    return _print(args, _generate_keys(Path(args.dir), args.name))


def _generate_keys(directory: Path, name: str) -> dict[str, Any]:
    import zmq.auth

    directory.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(directory), name)
    Path(secret).chmod(0o600)
    return {"public": str(public), "secret": str(secret)}


def _print(args: argparse.Namespace, reply: dict[str, Any]) -> int:
    fields = {key: value for key, value in reply.items() if key not in HEADER}
    if args.json:
        print(json.dumps(fields, sort_keys=True))
    else:
        print(TEXT.get(args.command, _pretty)(fields))
    return 0


def _pretty(fields: dict[str, Any]) -> str:
    return json.dumps(fields, indent=2, sort_keys=True)


def _status(fields: dict[str, Any]) -> str:
    memory, process = fields["memory"], fields["process"]
    budget = memory["budget_bytes"]
    limit = f"of {budget / 2**20:.0f} MiB" if budget else "(no budget)"
    lines = [
        f"edged {fields['edged_version']} pid {fields['pid']}: {fields['state']}, "
        f"up {fields['uptime_s']:.0f} s",
        f"process: {process['rss_bytes'] / 2**20:.1f} MiB RSS, {process['cpu_percent']:.0f}% CPU",
        f"models: {memory['used_bytes'] / 2**20:.1f} MiB {limit}, "
        f"{memory['free_bytes'] / 2**20:.0f} MiB free",
    ]
    for name, m in fields["models"].items():
        lines.append(f"  {name}: v{m['version']} {m['state']}")
        if "error" in m:
            lines.append(
                f"    {m['error']['code']}: {m['error']['message']} ({m['failed_loads']} failed "
                f"loads; next attempt in {m['retry_in_s']:.0f} s, or now with edgectl load)"
            )
    lines.append(f"errors answered: {fields['errors']}")
    lines += [f"  {_log_line(record)}" for record in fields["last_errors"]]
    return "\n".join(lines)


def _models(fields: dict[str, Any]) -> str:
    lines = []
    for name, model in fields["models"].items():
        lines.append(
            f"{name}: v{model['version']} {model['state']}, loaded {model['loaded']}, "
            f"previous {model['previous']}, stored {model['stored']}"
        )
        for version, traffic in model["versions"].items():
            latency = traffic["latency"]
            lines.append(
                f"  v{version} ({traffic['role']}): {traffic['requests']} requests, "
                f"{traffic['queued']} queued, p50/p95/p99 {latency['p50_us']}/"
                f"{latency['p95_us']}/{latency['p99_us']} us"
            )
        if model["errors"]:
            lines.append(f"  errors: {model['errors']}")
        if model["error"]:
            lines.append(
                f"  last load failed: {model['error']['code']}: {model['error']['message']}"
            )
        lines += [f"  warning: {warning}" for warning in model["warnings"]]
    return "\n".join(lines)


def _stack(fields: dict[str, Any]) -> str:
    lines = []
    for kind in ("threads", "tasks"):
        for entry in fields[kind]:
            lines.append(f"{kind[:-1]} {entry['name']}:")
            lines += [f"    {frame}" for frame in entry["stack"]]
    return "\n".join(lines)


def _swap(fields: dict[str, Any]) -> str:
    return (
        f"{fields['model']}: version {fields['from_version']} -> {fields['version']} "
        f"({fields['policy']}, {fields['seconds']:.2f} s)"
    )


TEXT: dict[str, Callable[[dict[str, Any]], str]] = {
    "status": _status,
    "models": _models,
    "metrics": lambda fields: str(fields["text"]).rstrip("\n"),
    "stack": _stack,
    "selftest": lambda fields: "\n".join(f"{m}: {r}" for m, r in fields["results"].items()),
    "swap": _swap,
    "rollback": _swap,
    "promote": _swap,
    "keys": lambda f: f"public key {f['public']}\nsecret key {f['secret']} (keep it private)",
}
