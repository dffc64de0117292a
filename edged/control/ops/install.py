"""``install``: install a signed bundle and swap to it: a file on this device (``path``) or a
finished upload (``upload``, its sha256), which goes once installed or refused."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edged.errors import BadRequest
from edged.opunit import Op, arg
from edged.protocol import Request
from edged.replies import ReplyTo
from edged.requests import valid_path

if TYPE_CHECKING:
    from edged.control.service import ControlService


@dataclass(frozen=True, kw_only=True)
class Install(Request):
    path: str | None = None
    upload: str | None = None
    allow_downgrade: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.path is None) == (self.upload is None) or type(self.allow_downgrade) is not bool:
            raise BadRequest(
                "give one of 'path' (a bundle file) and 'upload' (a finished upload's sha256); "
                "'allow_downgrade' is a boolean"
            )
        if not (isinstance(self.upload, str) or valid_path(self.path)):
            raise BadRequest(
                "'path' must name a bundle file (no NUL byte), 'upload' an upload's sha256"
            )


def install(control: ControlService, request: Install, reply: ReplyTo, peer: bytes) -> None:
    installer = control.ota()
    downgrade = request.allow_downgrade
    if request.upload is not None:
        work = installer.install_upload(request.upload, allow_downgrade=downgrade)
    else:
        work = installer.install(Path(str(request.path)), allow_downgrade=downgrade)
    control.run(request, reply, work)


#: ``install`` and edgectl's ``push`` (an upload, then this)
DOWNGRADE_ARG = arg(
    "--allow-downgrade", action="store_true", help="accept a version older than installed"
)

OP = Op(
    "install",
    Install,
    install,
    long_running=True,
    help="install a signed bundle that is on the device, then swap to it",
    args=(
        arg(
            "path", metavar="bundle", device_path=True, help="the bundle file's path on the device"
        ),
        DOWNGRADE_ARG,
    ),
)
