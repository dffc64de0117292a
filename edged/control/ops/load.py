"""``load``: load a model's active version now, as its first request would."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edged.opunit import Op, arg
from edged.replies import ReplyTo
from edged.requests import ModelRequest

if TYPE_CHECKING:
    from edged.control.service import ControlService


def load(control: ControlService, request: ModelRequest, reply: ReplyTo, peer: bytes) -> None:
    slot = control.registry.slot(request.model)

    async def loaded() -> dict[str, Any]:
        await slot.load()
        return {"model": slot.name, "version": slot.version, "state": slot.state.value}

    control.run(request, reply, loaded())


OP = Op(
    "load", ModelRequest, load, long_running=True, help="load a model now", args=(arg("model"),)
)
