"""``swap``: make another version of a model the active one, validated first."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from edged.errors import BadRequest
from edged.opunit import Fields, Op, arg
from edged.replies import ReplyTo
from edged.requests import VersionedRequest, check_bool, valid_path

if TYPE_CHECKING:
    from edged.control.service import ControlService
    from edged.models.registry import ModelSlot, VersionSpec

SWAP_POLICIES = ("auto", "overlap", "replace")


@dataclass(frozen=True, kw_only=True)
class VersionTarget(VersionedRequest):
    """A version to load: a stored ``version``, a new model file at ``path``, or (neither)
    the newest stored one; ``force`` skips the interface check."""

    path: str | None = None
    force: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.path is not None and (not valid_path(self.path) or self.version is not None):
            raise BadRequest(
                "'path' must be a non-empty string without NUL, and not given with 'version'"
            )
        check_bool(self.force, "force")

    def target(self, control: ControlService) -> tuple[ModelSlot, VersionSpec]:
        """The model's slot and the version named, which must not be the active one."""
        slot = control.registry.slot(self.model)
        target = control.target(slot, self.version, self.path)
        if target.version == slot.version:
            raise BadRequest(f"model {slot.name!r} already serves version {target.version}")
        return slot, target


@dataclass(frozen=True, kw_only=True)
class Swap(VersionTarget):
    policy: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if type(self.policy) is not str or self.policy not in SWAP_POLICIES:
            raise BadRequest(f"'policy' must be one of {', '.join(SWAP_POLICIES)}")


def swap(control: ControlService, request: Swap, reply: ReplyTo, peer: bytes) -> None:
    slot, target = request.target(control)
    work = control.swapper.swap(slot, target, request.policy, request.force)
    control.run(request, reply, control.report(slot, work))


def report_text(fields: Fields) -> str:
    """A swap's report (also ``rollback``'s and ``promote``'s) in one line."""
    return (
        f"{fields['model']}: version {fields['from_version']} -> {fields['version']} "
        f"({fields['policy']}, {fields['seconds']:.2f} s)"
    )


#: the arguments that name a model's version to load
TARGET_ARGS = (
    arg("model"),
    arg("version", type=int, nargs="?", help="a stored version (default: newest)"),
    arg("--path", device_path=True, help="a new model file instead of a stored version"),
    arg("--force", action="store_true", help="skip the interface check"),
)

OP = Op(
    "swap",
    Swap,
    swap,
    long_running=True,
    help="serve another version of a model, validated first",
    args=(*TARGET_ARGS, arg("--policy", choices=SWAP_POLICIES, default="auto")),
    format=report_text,
)
