"""``capture``: a model's sample capture (``[models.X.drift] capture_mb``): export the ring of
captured requests with ``out``, or capture every profiled request for ``seconds`` from now,
whatever ``capture`` says (docs/OPERATIONS.md#drift)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edged.errors import BadRequest
from edged.models.loading import in_fresh_thread
from edged.opunit import Fields, Op, arg
from edged.protocol import is_number
from edged.replies import ReplyTo
from edged.requests import ModelRequest, valid_path

if TYPE_CHECKING:
    from edged.control.service import ControlService
    from edged.drift.monitor import DriftMonitor

#: the longest capture on request: a day
MAX_CAPTURE_S = 86_400.0


@dataclass(frozen=True, kw_only=True)
class CaptureRequest(ModelRequest):
    #: export the ring here: a directory on the device, made if missing
    out: str | None = None
    #: capture every profiled request for this long
    seconds: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.out is None) == (self.seconds is None):
            raise BadRequest("'capture' takes one of 'out' (export) and 'seconds' (capture now)")
        if self.out is not None and not (valid_path(self.out) and Path(self.out).is_absolute()):
            raise BadRequest("'out' must be an absolute path on the device")
        if self.seconds is not None:
            if not (is_number(self.seconds) and 0 < self.seconds <= MAX_CAPTURE_S):
                raise BadRequest(
                    f"'seconds' must be a number above 0 and at most {MAX_CAPTURE_S:g}"
                )
            object.__setattr__(self, "seconds", float(self.seconds))


def capture(control: ControlService, request: CaptureRequest, reply: ReplyTo, peer: bytes) -> None:
    monitor = _capturing(control, request.model)
    if request.seconds is not None:
        until = monitor.capture_for(request.seconds)
        reply.ok({"model": monitor.name, "capturing_until": until})
        return
    assert request.out is not None and monitor.capture is not None
    ring, out = monitor.capture, Path(request.out)

    async def work() -> dict[str, Any]:
        try:
            exported = await in_fresh_thread(ring.export, out)
        except OSError as exc:
            raise BadRequest(f"cannot export to {out}: {exc.strerror or exc}") from None
        return {
            "model": monitor.name,
            "captured": exported.count,
            "bytes": exported.bytes,
            "out": str(out),
            "skipped": ring.skipped,
        }

    control.run(request, reply, work())


def _capturing(control: ControlService, model: str) -> DriftMonitor:
    """The model's drift monitor, if it captures; else a BAD_REQUEST saying how to turn it on."""
    slot = control.registry.slot(model)  # UNKNOWN_MODEL for an undeclared one
    table = f"[models.{slot.name}.drift]"
    options = slot.config.drift
    if options is None or not options.capture_mb:
        reason = "has no" if options is None else "has capture_mb = 0 in its"
        raise BadRequest(
            f"model {slot.name!r} {reason} {table} table: capture_mb above 0 turns capture on"
        )
    monitors = control.loader.drift
    monitor = None if monitors is None else monitors.get(slot.name)
    if monitor is None or monitor.capture is None:
        raise BadRequest(f"model {slot.name!r} has not loaded with capture_mb in {table} yet")
    return monitor


def text(fields: Fields) -> str:
    if "capturing_until" in fields:
        until = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(fields["capturing_until"]))
        return f"{fields['model']}: capturing every profiled request until {until}"
    skipped = f"; {fields['skipped']} too large to keep" if fields["skipped"] else ""
    return (
        f"{fields['model']}: {fields['captured']} captured requests, {fields['bytes']} bytes, "
        f"written to {fields['out']}/<seq>/{{input,output}}.<tensor>.npy{skipped}"
    )


OP = Op(
    "capture",
    CaptureRequest,
    capture,
    long_running=True,
    help=(
        "a model's captured requests (drift capture_mb): --out DIR exports them as "
        "DIR/<seq>/input.<tensor>.npy, output.<tensor>.npy and meta.json; --for SECONDS "
        "captures every profiled request from now"
    ),
    args=(
        arg("model"),
        arg("--out", device_path=True, help="export the captured requests into this directory"),
        arg(
            "--for",
            dest="seconds",
            type=float,
            metavar="SECONDS",
            help="capture every profiled request for this long (needs capture_mb above 0)",
        ),
    ),
    format=text,
)
