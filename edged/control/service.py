"""Operator commands on the control socket: ``swap``, ``rollback``, ``reload``, ``models``,
and bundle ``upload`` and ``install``.

A swap takes as long as loading and validating a model, so each runs as a task on the event
loop and its reply is sent when it is done; the data path keeps serving meanwhile. SIGHUP is
one more client: it runs the same reload.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edged import protocol
from edged.control.diagnostics import Diagnostics
from edged.control.metrics import Metrics, loaded_runners, runner_errors
from edged.control.reload import Reloader
from edged.errors import (
    BadRequest,
    EdgedError,
    ModelLoadError,
    ShuttingDown,
    SwapInProgress,
    UnknownRequest,
)
from edged.models.loading import ModelLoader, in_fresh_thread
from edged.models.registry import ModelSlot, Registry, VersionSpec, as_edged_error
from edged.models.swap import Swapper, SwapReport
from edged.protocol import Request
from edged.replies import ReplyTo
from edged.service import Handler, dispatch, reply_error
from edged.tasks import TaskGroup

if TYPE_CHECKING:
    from edged.ota.install import Installer

log = logging.getLogger(__name__)


class ControlService:
    def __init__(
        self,
        registry: Registry,
        loader: ModelLoader,
        swapper: Swapper,
        reloader: Reloader,
        *,
        metrics: Metrics,
        diagnostics: Diagnostics,
        installer: Installer | None,
        tasks: TaskGroup,
    ) -> None:
        self.registry = registry
        self.installer = installer
        self.metrics = metrics
        self.diagnostics = diagnostics
        self.loader = loader
        self.swapper = swapper
        self.reloader = reloader
        #: the daemon's background tasks: a command's work runs there
        self.tasks = tasks
        self._ops: dict[str, Handler] = {
            "ping": self._ping,
            "swap": self._swap,
            "rollback": self._rollback,
            "canary": self._try_out,
            "shadow": self._try_out,
            "promote": self._promote,
            "discard": self._discard,
            "reload": self._reload,
            "models": self._models,
            "metrics": self._metrics,
            "load": self._load,
            "unload": self._unload,
            "cancel": self._cancel,
            "install": self._install,
            "history": self._history,
            "upload": self._upload,
            **diagnostics.ops,
        }

    def handle(self, request: Request, reply: ReplyTo, peer: bytes = b"") -> None:
        served = ", ".join(sorted(self._ops))
        dispatch(self._ops, request, reply, peer, f"is not a control command; served: {served}")

    def pump(self) -> None:
        """Nothing is batched here."""

    def _ping(self, request: Request, reply: ReplyTo, peer: bytes) -> None:
        fields = {"server": "edged", "socket": "control"}
        reply.ok(fields)

    def _swap(self, request: Request, reply: ReplyTo, peer: bytes) -> None:
        """Make another version of a model the active one: a stored ``version``, a new model
        file at ``path``, or (neither) the newest stored version."""
        slot = self.registry.slot(str(request.model))
        args = request.swap
        assert args is not None  # the protocol guarantees it for swap
        target = self._target(slot, request.version, args.path)
        if target.version == slot.version:
            raise BadRequest(f"model {slot.name!r} already serves version {target.version}")
        self._run(
            request,
            reply,
            self._report(slot, self.swapper.swap(slot, target, args.policy, args.force)),
        )

    def _try_out(self, request: Request, reply: ReplyTo, peer: bytes) -> None:
        """Load a version beside the active one: ``canary`` serves a ``fraction`` of requests
        with it, ``shadow`` runs every request on it too and compares the outputs."""
        slot = self.registry.slot(str(request.model))
        args = request.swap
        assert args is not None  # the protocol guarantees it for these ops
        target = self._target(slot, request.version, args.path)
        if target.version == slot.version:
            raise BadRequest(f"model {slot.name!r} already serves version {target.version}")
        trial = self.swapper.try_out(slot, target, request.op, args.fraction, args.force)
        self._run(request, reply, trial)

    def _promote(self, request: Request, reply: ReplyTo, peer: bytes) -> None:
        """Make the candidate the active version (it is loaded: the flip is immediate)."""
        slot = self.registry.slot(str(request.model))
        self._run(request, reply, self._report(slot, self.swapper.promote(slot)))

    def _discard(self, request: Request, reply: ReplyTo, peer: bytes) -> None:
        """End the candidate's trial and unload it."""
        slot = self.registry.slot(str(request.model))
        self._run(request, reply, self.swapper.discard(slot))

    def _load(self, request: Request, reply: ReplyTo, peer: bytes) -> None:
        """Load a model now (its active version), as its first request would."""
        slot = self.registry.slot(str(request.model))

        async def load() -> dict[str, Any]:
            await slot.load()
            return {"model": slot.name, "version": slot.version, "state": slot.state.value}

        self._run(request, reply, load())

    def _unload(self, request: Request, reply: ReplyTo, peer: bytes) -> None:
        """Unload a model's active version now; refused while it has requests or a swap."""
        slot = self.registry.slot(str(request.model))
        if slot.runner is None:
            raise BadRequest(f"model {slot.name!r} is not loaded")
        if slot.swapping or slot.runner.busy:
            raise SwapInProgress(f"model {slot.name!r} is busy; retry when it is idle")
        self.registry.unload(slot, "on request")
        fields = {"model": slot.name, "version": slot.version, "state": slot.state.value}
        reply.ok(fields)

    def _install(self, request: Request, reply: ReplyTo, peer: bytes) -> None:
        """Install a signed bundle and swap to it: a file on this device (``path``) or a
        finished upload (``upload``, its sha256), which goes once installed or refused."""
        installer = self._ota()
        path, upload = request.args.get("path"), request.args.get("upload")
        downgrade = request.args.get("allow_downgrade")
        downgrade = False if downgrade is None else downgrade
        if (path is None) == (upload is None) or type(downgrade) is not bool:
            raise BadRequest(
                "give one of 'path' (a bundle file) and 'upload' (a finished upload's sha256); "
                "'allow_downgrade' is a boolean"
            )
        if isinstance(upload, str):
            work = installer.install_upload(upload, allow_downgrade=downgrade)
        elif protocol.valid_path(path):
            work = installer.install(Path(path), allow_downgrade=downgrade)
        else:
            raise BadRequest(
                "'path' must name a bundle file (no NUL byte), 'upload' an upload's sha256"
            )
        self._run(request, reply, work)

    def _upload(self, request: Request, reply: ReplyTo, peer: bytes) -> None:
        """Append a chunk of a bundle (the data frame) at ``offset``, or, without one, say how
        much of it has arrived: where a client that lost its connection goes on."""
        uploads = self._ota().uploads
        sha256, size, offset = (request.args.get(key) for key in ("sha256", "size", "offset"))
        if not isinstance(sha256, str) or type(size) is not int or size < 1:
            raise BadRequest("'sha256' must be a string and 'size' a positive integer")
        chunk = None
        if request.data is not None:
            if type(offset) is not int or offset < 0:
                raise BadRequest("a chunk needs its 'offset', a non-negative integer")
            chunk = (offset, request.data)
        elif offset is not None:
            raise BadRequest("'offset' goes with a chunk (the frame after the header)")
        self._run(request, reply, uploads.receive(sha256, size, chunk))

    def _history(self, request: Request, reply: ReplyTo, peer: bytes) -> None:
        """The last installs, newest last: outcome, version, reason, swap report."""
        fields = {"installs": self._ota().history()}
        reply.ok(fields)

    def _ota(self) -> Installer:
        if self.installer is None:
            raise BadRequest("this daemon installs no bundles: set 'ota.trusted_keys'")
        return self.installer

    def _cancel(self, request: Request, reply: ReplyTo, peer: bytes) -> None:
        """Stop a ``logs`` follow sent on this connection."""
        target = request.target
        assert target is not None  # the protocol guarantees it for cancel
        if not self.diagnostics.cancel(peer, target):
            raise UnknownRequest(f"no logs follow with id {target} on this connection")
        reply.ok({"cancelled": target})

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

    def _reload(self, request: Request, reply: ReplyTo, peer: bytes) -> None:
        """Re-read the config file and the store, and serve what they say now."""
        self._run(request, reply, self.reloader.reload())

    def _rollback(self, request: Request, reply: ReplyTo, peer: bytes) -> None:
        """Go back to the version that served before the last swap (no interface check: it
        served before)."""
        slot = self.registry.slot(str(request.model))
        if slot.previous is None:
            raise BadRequest(f"model {slot.name!r} has no previous version to roll back to")
        self._run(
            request, reply, self._report(slot, self.swapper.swap(slot, slot.previous, force=True))
        )

    def _metrics(self, request: Request, reply: ReplyTo, peer: bytes) -> None:
        """Every metric in the Prometheus text format (``text``)."""
        text = self.metrics.exposition().decode()
        reply.ok({"text": text})

    def _models(self, request: Request, reply: ReplyTo, peer: bytes) -> None:
        """Each model's versions (active, loaded, previous, stored), memory and traffic, a
        failed load's error, and what its configuration asks for in vain (``warnings``)."""
        memory = self.registry.budget.statistics()
        errors: dict[str, Counter[str]] = {}
        for (model, code), count in self.metrics.errors.items():
            errors.setdefault(model, Counter())[code] += count
        traffic: dict[str, dict[str, Any]] = {}
        for role, runner in loaded_runners(self.registry):
            stats = runner.statistics()
            model_errors = errors.setdefault(runner.name, Counter())
            model_errors.update(runner_errors(runner))
            traffic.setdefault(runner.name, {})[str(runner.version)] = {
                "role": role,
                "requests": stats.requests,
                "queued": stats.queued,
                "latency": runner.latency.percentiles(),
                "mean_batch": _mean(runner.latency.batch.total, runner.latency.batch.count),
            }
        models = {}
        for slot in self.registry:
            previous = slot.previous
            failure = slot.statistics().error
            models[slot.name] = {
                "version": slot.version,
                "state": slot.state.value,
                "error": None if failure is None else {"code": failure[0], "message": failure[1]},
                "warnings": list(slot.warnings),
                "swapping": slot.swapping,
                "loaded": slot.loaded_versions(),
                "previous": None if previous is None else previous.version,
                "candidate": None if slot.candidate is None else slot.candidate.fields(),
                "stored": self.loader.store.versions(slot.name),
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
            }
        reply.ok({"models": models})

    def _target(self, slot: ModelSlot, version: int | None, path: str | None) -> VersionSpec:
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

    async def _report(self, slot: ModelSlot, swap: Awaitable[SwapReport]) -> dict[str, Any]:
        """The swap's report, once what the operator made active is what a restart serves."""
        report = await swap
        await in_fresh_thread(self.loader.commit, slot.name, slot.spec)
        return report.fields()

    def _run(self, request: Request, reply: ReplyTo, work: Awaitable[dict[str, Any]]) -> None:
        """Reply with ``work``'s result, or its error, once it is done."""

        async def answer() -> None:
            try:
                fields = await work
            except Exception as exc:  # the command's error is its reply
                error = as_edged_error(exc, f"{request.op} failed unexpectedly; see the log")
                reply_error(request, reply, error, request.model or "")
            else:
                reply.ok(fields)

        try:
            self.tasks.start(answer(), f"control {request.op} {request.id}")
        except ShuttingDown:
            close = getattr(work, "close", None)  # a coroutine that will never run
            if close is not None:
                close()
            raise


def _mean(total: float, count: int) -> float | None:
    return round(total / count, 2) if count else None
