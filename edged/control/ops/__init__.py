"""The control socket's ops, one module each (PROTOCOL.md): a new op is a module that declares
its ``Op`` and a line here. ``edgectl`` offers every op that has ``help``, in this order."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edged.control.ops import (
    canary,
    cancel,
    capture,
    collections,
    config,
    describe,
    discard,
    drift,
    history,
    install,
    load,
    logs,
    metrics,
    models,
    ping,
    promote,
    reload,
    rollback,
    selftest,
    shadow,
    stack,
    status,
    swap,
    sysinfo,
    unload,
    upload,
)
from edged.ops import DATA_OPS
from edged.opunit import Op, OpTable

if TYPE_CHECKING:
    from edged.control.service import ControlService
    from edged.service import InferenceService

CONTROL_OPS: dict[str, Op[ControlService, Any]] = {
    "status": status.OP,
    "models": models.OP,
    "describe": describe.OP,
    "metrics": metrics.OP,
    "sysinfo": sysinfo.OP,
    "config": config.OP,
    "stack": stack.OP,
    "selftest": selftest.OP,
    "reload": reload.OP,
    "history": history.OP,
    "load": load.OP,
    "unload": unload.OP,
    "rollback": rollback.OP,
    "promote": promote.OP,
    "discard": discard.OP,
    "logs": logs.OP,
    "swap": swap.OP,
    "canary": canary.OP,
    "shadow": shadow.OP,
    "install": install.OP,
    "collections": collections.OP,
    "drift": drift.OP,
    "capture": capture.OP,
    "upload": upload.OP,
    "cancel": cancel.OP,
    "ping": ping.OP,
}


def socket_tables() -> tuple[OpTable[InferenceService], OpTable[ControlService]]:
    """The inference socket's ops and the control socket's, each naming the other's."""
    served = ", ".join(sorted(CONTROL_OPS))
    data = OpTable(
        DATA_OPS,
        elsewhere={op: "is served on the control socket, not here" for op in CONTROL_OPS},
    )
    control = OpTable(
        CONTROL_OPS,
        elsewhere={op: f"is not a control command; served: {served}" for op in DATA_OPS},
    )
    return data, control
