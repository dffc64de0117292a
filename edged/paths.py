"""Where the daemon keeps its sockets and state, with no root and no /etc needed.

systemd's RuntimeDirectory/StateDirectory (exported as $RUNTIME_DIRECTORY/$STATE_DIRECTORY) win
over the per-user defaults, so the same binary works from a checkout and as a service.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from edged.config import Config
from edged.errors import ConfigError

#: sun_path is 108 bytes on Linux including the terminating NUL
MAX_IPC_PATH = 107
#: the system service's RuntimeDirectory (systemd/edged.service)
SERVICE_RUNTIME_DIR = Path("/run/edged")


@dataclass(frozen=True)
class Paths:
    runtime: Path
    state: Path

    @property
    def infer_socket(self) -> Path:
        return self.runtime / "infer.sock"

    @property
    def lock_file(self) -> Path:
        return self.runtime / "edged.lock"

    @property
    def models(self) -> Path:
        return self.state / "models"

    @property
    def budget_file(self) -> Path:
        """Per-model memory corrections learned from past loads."""
        return self.state / "memory.json"

    @property
    def infer_endpoint(self) -> str:
        return f"ipc://{self.infer_socket}"

    @property
    def control_socket(self) -> Path:
        return self.runtime / "control.sock"

    @property
    def control_endpoint(self) -> str:
        return f"ipc://{self.control_socket}"


def default_runtime_dir() -> Path:
    systemd = os.environ.get("RUNTIME_DIRECTORY")
    if systemd:
        return Path(systemd.split(":")[0])
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "edged"
    return Path(f"/tmp/edged-{os.getuid()}")


def default_state_dir() -> Path:
    systemd = os.environ.get("STATE_DIRECTORY")  # a ':'-separated list under systemd
    if systemd:
        return Path(systemd.split(":")[0])
    home = os.environ.get("EDGED_HOME")
    return Path(home) if home else Path("var/edged").absolute()


def resolve_paths(config: Config) -> Paths:
    runtime = (
        Path(config.daemon.runtime_dir) if config.daemon.runtime_dir else default_runtime_dir()
    )
    state = Path(config.daemon.state_dir) if config.daemon.state_dir else default_state_dir()
    paths = Paths(runtime=runtime.absolute(), state=state.absolute())
    if len(os.fsencode(paths.control_socket)) > MAX_IPC_PATH:  # the longer of the two
        raise ConfigError(
            f"{config.source}: socket path {paths.control_socket} is longer than the "
            f"{MAX_IPC_PATH} bytes a Unix socket allows; set daemon.runtime_dir to a shorter path"
        )
    return paths


def client_socket(name: str) -> str:
    """Where a client finds socket ``name``: the daemon's own default place, unless nothing
    is there and the system service's socket (edged.service, /run/edged) exists. A place this
    user may not look into counts as there: connecting then says why (the client's check)."""
    socket = default_runtime_dir() / name
    service = SERVICE_RUNTIME_DIR / name
    return f"ipc://{service if not _present(socket) and _present(service) else socket}"


def _present(path: Path) -> bool:
    """Whether ``path`` exists, True where a closed directory hides it (``Path.exists`` raises
    PermissionError there before Python 3.12)."""
    try:
        path.stat()
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def default_control_endpoint() -> str:
    """The control endpoint on this machine ($EDGED_CONTROL overrides)."""
    return os.environ.get("EDGED_CONTROL") or client_socket("control.sock")


def default_infer_endpoint() -> str:
    """The endpoint a client on this machine uses when none is given ($EDGED_SOCKET overrides)."""
    return os.environ.get("EDGED_SOCKET") or client_socket("infer.sock")
