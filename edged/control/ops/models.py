"""``models``: each model's versions (active, loaded, previous, stored), memory and traffic, a
failed load's error, and what its configuration asks for in vain (``warnings``)."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from edged.control.metrics import loaded_runners, runner_errors
from edged.opunit import Fields, Op
from edged.protocol import Request
from edged.replies import ReplyTo

if TYPE_CHECKING:
    from edged.control.service import ControlService


def models(control: ControlService, request: Request, reply: ReplyTo, peer: bytes) -> None:
    registry = control.registry
    memory = registry.budget.statistics()
    errors: dict[str, Counter[str]] = {}
    for (model, code), count in control.metrics.errors.items():
        errors.setdefault(model, Counter())[code] += count
    traffic: dict[str, dict[str, Any]] = {}
    for role, runner in loaded_runners(registry):
        stats = runner.statistics()
        errors.setdefault(runner.name, Counter()).update(runner_errors(runner))
        traffic.setdefault(runner.name, {})[str(runner.version)] = {
            "role": role,
            "requests": stats.requests,
            "queued": stats.queued,
            "latency": runner.latency.percentiles(),
            "mean_batch": _mean(runner.latency.batch.total, runner.latency.batch.count),
        }
    entries = {}
    monitors = control.loader.drift
    for slot in registry:
        monitor = None if monitors is None else monitors.get(slot.name)
        previous = slot.previous
        failure = slot.statistics().error
        entries[slot.name] = {
            "version": slot.version,
            "state": slot.state.value,
            "error": None if failure is None else {"code": failure[0], "message": failure[1]},
            "warnings": list(slot.warnings),
            "swapping": slot.swapping,
            "loaded": slot.loaded_versions(),
            "previous": None if previous is None else previous.version,
            "candidate": None if slot.candidate is None else slot.candidate.fields(),
            "stored": control.loader.store.versions(slot.name),
            "path": slot.config.path,
            "backend": slot.config.backend,
            "memory": {
                "charged_bytes": memory.charged_bytes.get(slot.name),
                "estimated_bytes": memory.estimated_bytes.get(slot.name),
                "measured_bytes": memory.measured_bytes.get(slot.name),
                "returned_bytes": memory.returned_bytes.get(slot.name),
            },
            "versions": traffic.get(slot.name, {}),
            "errors": {code: n for code, n in sorted(errors.get(slot.name, {}).items()) if n},
            "drift": None if monitor is None else monitor.summary(),
        }
    reply.ok({"models": entries})


def _mean(total: float, count: int) -> float | None:
    return round(total / count, 2) if count else None


def text(fields: Fields) -> str:
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
        drift = model["drift"]
        if drift is not None:
            worst = drift.get("worst")
            shown = f", worst {worst['feature']} KS {worst['ks']:.3f}" if worst else ""
            alarms = "; ".join(f"{k} {', '.join(v)}" for k, v in drift["alarms"].items())
            lines.append(f"  drift: {drift['state']}{shown}{'; ALARM ' + alarms if alarms else ''}")
    return "\n".join(lines)


OP = Op(
    "models",
    Request,
    models,
    help="each model's versions, memory, traffic, latency and errors",
    format=text,
)
