"""The control socket's service: what its ops (``edged/control/ops``) work with.

A swap takes as long as loading and validating a model, so such an op's work runs as a task on
the event loop (``run``) and its reply is sent when it is done; the data path keeps serving
meanwhile. SIGHUP is one more client: it runs the same reload.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from edged.control.logring import LogRing
from edged.control.metrics import Metrics
from edged.control.reload import Reloader
from edged.errors import BadRequest, EdgedError, ModelLoadError, ShuttingDown
from edged.models.loading import ModelLoader, in_fresh_thread
from edged.models.registry import ModelSlot, Registry, VersionSpec, as_edged_error
from edged.models.swap import Swapper, SwapReport
from edged.opunit import OpTable
from edged.protocol import Request
from edged.replies import ReplyTo
from edged.service import InferenceService, dispatch, model_of, reply_error
from edged.tasks import TaskGroup

if TYPE_CHECKING:
    from edged.ota.install import Installer

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ControlService:
    """The daemon's parts that control ops use, and the helpers they share."""

    ops: OpTable[ControlService]
    registry: Registry
    loader: ModelLoader
    swapper: Swapper
    reloader: Reloader
    metrics: Metrics
    #: the inference socket's service: its state, its error counts
    service: InferenceService
    logs: LogRing
    state_dir: str
    #: ``None`` when no bundle signing key is trusted
    installer: Installer | None
    #: the daemon's background tasks: a command's work runs there
    tasks: TaskGroup
    started: float = dataclasses.field(default_factory=time.time)
    process: psutil.Process = dataclasses.field(default_factory=psutil.Process)
    #: ``logs`` follows by (connection, request id): what stops each
    follows: dict[tuple[bytes, int], Callable[[], None]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.process.cpu_percent(None)  # primes the measurement: the first call reads 0
        psutil.cpu_percent(percpu=True)

    def handle(self, request: Request, reply: ReplyTo, peer: bytes = b"") -> None:
        dispatch(self.ops, self, request, reply, peer)

    def pump(self) -> None:
        """Nothing is batched here."""

    def stop_follow(self, peer: bytes, target: int) -> bool:
        """Stop a ``logs`` follow; ``False`` when there is none by that id."""
        stop = self.follows.pop((peer, target), None)
        if stop is None:
            return False
        stop()
        return True

    def ota(self) -> Installer:
        """The bundle installer, or the reason there is none."""
        if self.installer is None:
            raise BadRequest("this daemon installs no bundles: set 'ota.trusted_keys'")
        return self.installer

    def reload_later(self, done: Callable[[], None]) -> None:
        """SIGHUP: reload in the background; the outcome goes to the log, then ``done``."""

        async def reload() -> None:
            try:
                await self.reloader.reload()
            except EdgedError as exc:
                log.error("reload refused, nothing changed: %s", exc)
            finally:
                done()

        try:
            self.tasks.start(reload(), "reload (SIGHUP)")
        except ShuttingDown:
            log.info("SIGHUP while stopping: no reload")

    def target(self, slot: ModelSlot, version: int | None, path: str | None) -> VersionSpec:
        """The version to load: a new model file at ``path``, a stored ``version``, or
        (neither) the newest stored one."""
        if path is not None:
            try:  # the protocol let through a string: the OS may still refuse it (too long)
                file = Path(path).resolve()
                found = file.is_file()
            except (OSError, RuntimeError) as exc:
                raise BadRequest(f"'path' cannot name a file: {exc}") from None
            if not found:
                raise ModelLoadError(f"model {slot.name!r}: no file at {file}")
            config = dataclasses.replace(slot.config, path=str(file))
            return VersionSpec(self.loader.next_version(slot), config)
        if version is None:
            stored = self.loader.store.versions(slot.name)
            if not stored:
                raise BadRequest(
                    f"model {slot.name!r} has no stored versions; name a 'version' or a 'path'"
                )
            version = stored[-1]
        return self.loader.stored(slot.name, slot.config, version)

    async def report(self, slot: ModelSlot, swap: Awaitable[SwapReport]) -> dict[str, Any]:
        """The swap's report, once what the operator made active is what a restart serves."""
        report = await swap
        await in_fresh_thread(self.loader.commit, slot.name, slot.spec)
        return report.fields()

    def run(self, request: Request, reply: ReplyTo, work: Awaitable[dict[str, Any]]) -> None:
        """Reply with ``work``'s result, or its error, once it is done."""

        async def answer() -> None:
            try:
                fields = await work
            except Exception as exc:  # the command's error is its reply
                error = as_edged_error(exc, f"{request.op} failed unexpectedly; see the log")
                reply_error(request, reply, error, model_of(request))
            else:
                reply.ok(fields)

        try:
            self.tasks.start(answer(), f"control {request.op} {request.id}")
        except ShuttingDown:
            close = getattr(work, "close", None)  # a coroutine that will never run
            if close is not None:
                close()
            raise
