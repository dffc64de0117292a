"""``drift``: a model's drift and data-contract monitoring: its reference, the window's scores
per feature against it, the worst feature, and the alarms up now (docs/OPERATIONS.md#drift)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edged.errors import BadRequest
from edged.opunit import Fields, Op, arg
from edged.replies import ReplyTo
from edged.requests import VersionedRequest

if TYPE_CHECKING:
    from edged.control.service import ControlService


def drift(control: ControlService, request: VersionedRequest, reply: ReplyTo, peer: bytes) -> None:
    slot = control.registry.slot(request.model)  # UNKNOWN_MODEL for an undeclared one
    monitors = control.loader.drift
    monitor = None if monitors is None else monitors.get(slot.name)
    if slot.config.drift is None or monitor is None:
        reason = "has no" if slot.config.drift is None else "has not loaded with its"
        raise BadRequest(f"model {slot.name!r} {reason} [models.{slot.name}.drift] table")
    reply.ok(monitor.report(request.version or slot.version))


def text(fields: Fields) -> str:
    lines = [f"{fields['model']} v{fields.get('version', '-')}: {fields['state']}"]
    if "reference" in fields:
        reference, thresholds = fields["reference"], fields["thresholds"]
        lines.append(
            f"reference: {reference['source'] or 'gathering'}, {reference['observations']} "
            f"observations; {fields['profiled']} requests profiled, {fields['dropped']} dropped; "
            f"thresholds KS {thresholds['ks']:.3f}, PSI {thresholds['psi']:.3f}"
        )
    for kind, names in fields.get("alarms", {}).items():
        lines.append(f"ALARM {kind}: {', '.join(names)}")
    features = fields.get("features", [])
    if features:
        lines.append(
            f"{'feature':<24} {'side':<6} {'KS':>7} {'PSI':>7} {'mean':>10} {'ref mean':>10} "
            f"{'ref std':>9}"
        )
        for row in sorted(features, key=lambda row: -row["ks"]):
            lines.append(
                f"{row['feature']:<24} {row['side']:<6} {row['ks']:7.3f} {row['psi']:7.3f} "
                f"{row['mean']:10.4g} {row['reference_mean']:10.4g} {row['reference_std']:9.4g}"
            )
    return "\n".join(lines)


OP = Op(
    "drift",
    VersionedRequest,
    drift,
    help="a model's drift from its reference, feature by feature, and its data alarms",
    args=(arg("model"), arg("--version", type=int, help="a version watched (default: serving)")),
    format=text,
)
