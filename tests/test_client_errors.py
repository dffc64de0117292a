"""A client never hangs and says why it cannot reach a daemon: gone, never there, or closed to
this user (``Client``, ``AsyncClient`` and ``edgectl`` alike)."""

from __future__ import annotations

import asyncio
import grp
import os
import pwd
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edged.client import AsyncClient, Client
from edged.errors import ClientTimeout, NoDaemon
from tests.conftest import EDGECTL, DaemonFactory

X = np.zeros((1, 16), np.float32)
#: more requests than the client socket's send high-water mark (1000) queues
FLOOD = 2500
#: the user the permission tests run their clients as (root may open any socket)
NOBODY = 65534
#: who owns the files this test makes
OWNER, GROUP = pwd.getpwuid(os.geteuid()).pw_name, grp.getgrgid(os.getegid()).gr_name


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user may search (pytest's own are closed to other users)."""
    with tempfile.TemporaryDirectory(prefix="edged-") as tmp:
        Path(tmp).chmod(0o755)
        yield Path(tmp)


@pytest.fixture
def stale_socket(open_dir: Path) -> Iterator[Path]:
    """A socket file nobody listens on: what a killed daemon leaves behind."""
    path = open_dir / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
        yield path


def test_async_calls_end_within_their_timeout_when_the_daemon_is_gone(
    start_daemon: DaemonFactory, models_dir: Path
) -> None:
    daemon = start_daemon({"models": {"demo": {"path": str(models_dir / "demo.onnx")}}})

    async def flood() -> list[BaseException | object]:
        async with AsyncClient(daemon.endpoint, timeout=1.0) as client:
            await client.ping()
            daemon.stop()
            calls = asyncio.gather(
                *(client.infer("demo", {"x": X}) for _ in range(FLOOD)), return_exceptions=True
            )
            return await asyncio.wait_for(calls, 60)  # a bound on a hang, not a timing

    results = asyncio.run(flood())
    assert all(isinstance(result, NoDaemon) for result in results), {
        type(result).__name__ for result in results
    }
    assert "no daemon at" in str(results[-1])


def test_blocking_sends_end_within_their_timeout_on_a_stale_socket(stale_socket: Path) -> None:
    """``generate`` sends without waiting for a reply, so its requests pile up in the socket's
    queue; the one that finds the queue full ends within the timeout, not never."""
    script = (
        "from edged.client import Client\n"
        "from edged.errors import NoDaemon\n"
        f"client = Client('ipc://{stale_socket}', timeout=1.0)\n"
        f"for sent in range({FLOOD}):\n"
        "    try:\n"
        "        client.generate('chat', 'hello')\n"
        "    except NoDaemon as exc:\n"
        "        print(sent, exc)\n"
        "        break\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )  # the timeout: a bound on a hang
    assert done.returncode == 0, done.stderr
    sent, _, message = done.stdout.partition(" ")
    assert 0 < int(sent) < FLOOD
    assert "nothing listens on it" in message and str(stale_socket) in message


def test_a_missing_socket_fails_at_once(tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path / 'none.sock'}"
    started = time.monotonic()
    with Client(endpoint, timeout=30) as client, pytest.raises(NoDaemon, match="no daemon at"):
        client.ping()

    async def ping() -> None:
        async with AsyncClient(endpoint, timeout=30) as client:
            await client.ping()

    with pytest.raises(NoDaemon, match="no daemon at"):
        asyncio.run(ping())
    assert time.monotonic() - started < 30  # neither waited out its timeout
    done = subprocess.run(
        [*EDGECTL, "--control", endpoint, "--timeout", "30", "status"],
        check=False,
        capture_output=True,
        text=True,
        timeout=25,
    )
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"edgectl: NO_DAEMON: no daemon at {tmp_path / 'none.sock'}: no socket there "
        "(is edged running? `edged serve` starts it)"
    ]


def test_a_missing_socket_is_still_a_client_timeout(tmp_path: Path) -> None:
    """Code that retries on ClientTimeout keeps working."""
    with Client(f"ipc://{tmp_path / 'none.sock'}") as client, pytest.raises(ClientTimeout):
        client.ping()


def as_nobody(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``code`` as an unprivileged user: root opens any socket whatever its mode. The
    imports come first, while the interpreter's files can still be read."""
    drop = "os.setgroups([]); os.setgid(NOBODY); os.setuid(NOBODY)" if os.geteuid() == 0 else ""
    # argparse's messages import gettext and locale only when used (on Python 3.10)
    imports = "import os, gettext, locale, edged.client, edged.edgectl"
    script = f"{imports}\nNOBODY = {NOBODY}\n{drop}\n{code}"
    return subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


EDGECTL_STATUS = "raise SystemExit(edged.edgectl.main(['--timeout', '30', 'status']))"
CLIENT_PING = """
try:
    edged.client.Client(timeout=30).ping()
except edged.errors.SocketAccessDenied as exc:
    print(exc)
"""


def test_a_socket_closed_to_this_user_names_its_mode_and_group(
    open_dir: Path, start_daemon: DaemonFactory, models_dir: Path
) -> None:
    config = {"models": {"demo": {"path": str(models_dir / "demo.onnx")}}}
    daemon = start_daemon(config, workdir=open_dir / "d")
    for name in ("infer.sock", "control.sock"):
        (daemon.runtime_dir / name).chmod(0)
    sockets = {"EDGED_CONTROL": daemon.control_endpoint, "EDGED_SOCKET": daemon.endpoint}
    edgectl = as_nobody(EDGECTL_STATUS, sockets)
    client = as_nobody(CLIENT_PING, sockets)
    for done, path in ((edgectl, "control.sock"), (client, "infer.sock")):
        assert done.returncode == (1 if done is edgectl else 0), done.stderr
        output = done.stderr if done is edgectl else done.stdout
        assert len(output.splitlines()) == 1, output  # one line, no traceback
        assert f"{daemon.runtime_dir / path}: the socket has mode s---------" in output
        assert f"owner {OWNER}, group {GROUP}" in output and f"run as {OWNER}" in output
    assert edgectl.stderr.startswith("edgectl: ACCESS_DENIED: permission denied: ")


def test_a_closed_directory_above_the_socket_is_named(open_dir: Path) -> None:
    closed = open_dir / "closed"
    (closed / "edged").mkdir(parents=True)
    closed.chmod(0o700)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(closed / "edged" / "infer.sock"))
        sock.listen()
        # the default endpoint: the lookup of where sockets are must not fail either
        done = as_nobody(CLIENT_PING, {"XDG_RUNTIME_DIR": str(closed), "EDGED_SOCKET": ""})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(
        f"permission denied: {closed / 'edged' / 'infer.sock'}: the directory {closed} has "
        f"mode drwx------, owner {OWNER}, group {GROUP}"
    )
