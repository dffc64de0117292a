"""Run a real edged daemon in a subprocess, for your own tests and benchmarks.

    with DaemonProcess(tmp_path, {"models": {"m": {"path": "m.onnx"}}}) as daemon:
        result = daemon.client().infer("m", {"x": x})

Sockets and state live under the given directory; ``start`` returns once the daemon answers a
ping (never a fixed sleep) and raises with the daemon's log if it exits instead. ``wrapper`` is a
command put in front of the daemon's (``sys.executable -m edged serve -c CONFIG``), e.g. a
launcher that confines it and then execs it, so that ``pid`` and signals still reach the daemon.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from edged.client import Client
from edged.errors import ClientTimeout, NoDaemon

START_TIMEOUT_S = 60.0
#: how often ``wait_ready`` looks for the socket file of a daemon still starting
POLL_S = 0.02


class DaemonExited(RuntimeError):
    """The daemon process ended while it was expected to serve."""


class DaemonProcess:
    def __init__(
        self,
        workdir: Path,
        config: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        name: str = "edged",
        wrapper: Sequence[str] = (),
    ) -> None:
        self.workdir = Path(workdir)
        self.runtime_dir = self.workdir / f"{name}-run"
        self.config_path = self.workdir / f"{name}.toml"
        self.log_path = self.workdir / f"{name}.log"
        config = dict(config or {})
        daemon = {"runtime_dir": str(self.runtime_dir), "state_dir": str(self.workdir / "state")}
        config["daemon"] = {**daemon, **config.get("daemon", {})}
        self.config = config
        self.env = env
        self.wrapper = tuple(wrapper)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"ipc://{self.runtime_dir / 'infer.sock'}"

    @property
    def control_endpoint(self) -> str:
        return f"ipc://{self.runtime_dir / 'control.sock'}"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "daemon not started"
        return self.proc.pid

    def client(self, timeout: float = 10.0) -> Client:
        return Client(self.endpoint, timeout=timeout)

    def control(self, timeout: float = 60.0) -> Client:
        """A client of the control socket, for ``command`` (swap, rollback, models)."""
        return Client(self.control_endpoint, timeout=timeout)

    def start(self, timeout: float = START_TIMEOUT_S) -> DaemonProcess:
        try:
            import tomli_w
        except ImportError:
            raise ImportError("edged.testing needs tomli-w: pip install 'edged[testing]'") from None

        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(tomli_w.dumps(self.config))
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(self.env or {})}
        command = [sys.executable, "-m", "edged", "serve", "-c", str(self.config_path)]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*self.wrapper, *command],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        with self.client(timeout=0.25) as client:
            while True:
                self._check_alive()
                try:
                    client.ping()
                    return
                except ClientTimeout as exc:
                    if time.monotonic() > deadline:
                        raise TimeoutError(
                            f"edged not ready after {timeout} s\n{self.log()}"
                        ) from None
                    if isinstance(exc, NoDaemon):  # its socket is not bound yet: look again soon
                        time.sleep(POLL_S)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait; returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for an exit already under way (after a signal the test sent itself)."""
        assert self.proc is not None, "daemon not started"
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def footprint(self) -> tuple[int, int]:
        """The daemon's resident memory in bytes and its open file descriptors: what a leak
        would grow."""
        import psutil

        process = psutil.Process(self.pid)
        return process.memory_info().rss, process.num_fds()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise DaemonExited(f"edged exited with {self.proc.returncode}\n{self.log()}")

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            self.stop()
        finally:
            self.kill()
