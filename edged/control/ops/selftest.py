"""``selftest``: run every loaded model once (its golden vectors when it ships them); per model
"ok" or the error, and ``ok_all``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edged.models.registry import as_edged_error
from edged.opunit import Fields, Op
from edged.protocol import Request
from edged.replies import ReplyTo

if TYPE_CHECKING:
    from edged.control.service import ControlService


def selftest(control: ControlService, request: Request, reply: ReplyTo, peer: bytes) -> None:
    async def run() -> None:
        results: dict[str, str] = {}
        for slot in control.registry:
            runner = slot.runner
            if runner is None:
                continue
            try:
                await runner.probe()
                results[slot.name] = "ok"
            except Exception as exc:  # the result names what failed
                error = as_edged_error(exc, "the self-test failed unexpectedly; see the log")
                results[slot.name] = f"{error.code}: {error}"
        reply.ok({"results": results, "ok_all": all(r == "ok" for r in results.values())})

    control.tasks.start(run(), f"selftest {request.id}")


def text(fields: Fields) -> str:
    return "\n".join(f"{model}: {result}" for model, result in fields["results"].items())


def failed(fields: Fields) -> bool:
    return fields.get("ok_all") is False


OP = Op(
    "selftest",
    Request,
    selftest,
    long_running=True,
    help="run every loaded model on its golden vectors; exit 1 if any fails",
    format=text,
    failed=failed,
)
