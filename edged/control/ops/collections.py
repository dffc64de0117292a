"""``collections``: the vector collections: list them with their size, stat one, compact one
(SQLite's VACUUM, then its index saved) or snapshot one (a consistent copy of its database,
while it keeps serving: what a collection bundle carries)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edged.errors import BadRequest
from edged.opunit import Op, arg
from edged.protocol import Request
from edged.replies import ReplyTo
from edged.requests import valid_path

if TYPE_CHECKING:
    from edged.control.service import ControlService

ACTIONS = ("list", "stat", "compact", "snapshot")


@dataclass(frozen=True, kw_only=True)
class CollectionsRequest(Request):
    action: str = "list"
    name: str | None = None
    out: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.action not in ACTIONS:
            raise BadRequest(f"'action' must be one of {', '.join(ACTIONS)}")
        if self.action != "list" and not isinstance(self.name, str):
            raise BadRequest(f"'{self.action}' needs a collection's 'name'")
        if self.action == "snapshot" and not (
            valid_path(self.out) and Path(self.out).is_absolute()
        ):
            raise BadRequest("'snapshot' needs 'out', an absolute path on the device")


def collections(
    control: ControlService, request: CollectionsRequest, reply: ReplyTo, peer: bytes
) -> None:
    served = control.service.collections

    async def work() -> dict[str, Any]:
        if request.action == "list":
            return {"collections": [await served.stat(name) for name in sorted(served.configs)]}
        assert request.name is not None
        collection = await served.get(request.name)
        if request.action == "compact":
            await collection.compact()
        elif request.action == "snapshot":
            assert request.out is not None
            await collection.snapshot(Path(request.out))
        return {"collection": await served.stat(request.name), "action": request.action}

    control.run(request, reply, work())


OP = Op(
    "collections",
    CollectionsRequest,
    collections,
    long_running=True,
    help="vector collections: list, stat NAME, compact NAME, or snapshot NAME --out FILE",
    args=(
        arg(
            "action",
            nargs="?",
            default="list",
            choices=ACTIONS,
            metavar="action",
            help="list (the default), stat, compact or snapshot",
        ),
        arg("name", nargs="?", help="the collection to stat, compact or snapshot"),
        arg("--out", device_path=True, help="snapshot: the database copy to write"),
    ),
)
