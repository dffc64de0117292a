"""``describe`` on the control socket: what a loaded version of a model takes and gives (its
inputs and outputs, or a language model's context), for an operator at the device. Unlike the
inference socket's ``describe`` it never waits for a load: a model that is not loaded is said
to be so."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edged.errors import BadRequest
from edged.opunit import Fields, Op, arg
from edged.replies import ReplyTo
from edged.requests import VersionedRequest

if TYPE_CHECKING:
    from edged.control.service import ControlService


def describe(
    control: ControlService, request: VersionedRequest, reply: ReplyTo, peer: bytes
) -> None:
    slot = control.registry.slot(request.model)
    runner = slot.runner_for(request.version)
    if runner is None:
        loaded = ", ".join(map(str, slot.loaded_versions())) or "none"
        raise BadRequest(
            f"model {slot.name!r} has no version {request.version or slot.version} loaded "
            f"(loaded: {loaded}); 'edgectl load {slot.name}' loads its active one"
        )
    reply.ok({"model": runner.name, "version": runner.version, **runner.describe()})


def text(fields: Fields) -> str:
    lines = [f"{fields['model']} v{fields['version']}"]
    signature = fields.get("signature", {})
    for role, key in (("in ", "inputs"), ("out", "outputs")):
        lines += [
            f"  {role} {spec['name']}: {spec['dtype']}[{_dims(spec['shape'])}]"
            for spec in signature.get(key, [])
        ]
    rest = {k: v for k, v in fields.items() if k not in ("model", "version", "signature")}
    lines += [f"  {key}: {value}" for key, value in sorted(rest.items())]
    return "\n".join(lines)


def _dims(shape: list[int | None]) -> str:
    return ", ".join("?" if dim is None else str(dim) for dim in shape)


OP = Op(
    "describe",
    VersionedRequest,
    describe,
    help="what a loaded model takes and gives: inputs, outputs, settings",
    args=(arg("model"), arg("version", type=int, nargs="?", help="a loaded version")),
    format=text,
)
