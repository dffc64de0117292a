"""The inference socket's service: what its ops (``edged/ops``) work with, and ``dispatch``,
the one place where errors become replies.

A model is used through the ``Runner`` protocol alone: which ops it serves, what ``describe``
says of it, and how its requests queue are the runner's own. The ops raise, ``handle``
answers; a request that waited for its model to load comes back through ``handle`` too.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path
from typing import TypeVar

from edged.chains import Chain
from edged.collections.service import Collections
from edged.errors import (
    EdgedError,
    InternalError,
    OpNotSupported,
    ShuttingDown,
    UnknownModel,
    UnknownRequest,
)
from edged.logsetup import log_error_reply, log_fields
from edged.models.calls import Infer, Inference, RegionInfer
from edged.models.candidate import Candidate
from edged.models.registry import Registry, Runner
from edged.models.runner import ModelRunner
from edged.opunit import OpTable
from edged.protocol import Request
from edged.regions import RegionTable
from edged.replies import ReplyTo
from edged.requests import ModelRequest, VersionedRequest
from edged.tasks import TaskGroup

CANCELLABLE_OPS = frozenset({"generate", "chat", "embed"})
#: error replies by (model, wire code)
ErrorCounts = Counter[tuple[str, str]]
Ctx = TypeVar("Ctx")

log = logging.getLogger(__name__)


class InferenceService:
    def __init__(
        self,
        registry: Registry,
        ops: OpTable[InferenceService],
        regions: RegionTable | None = None,
    ) -> None:
        self.registry = registry
        self.ops = ops
        #: the shared-memory regions clients registered on regions.sock (none without one)
        self.regions = regions or RegionTable(max_regions=0, max_bytes=0)
        self.accepting = True
        self._pending: set[Runner] = set()
        #: requests received, for the rate in systemd's status line
        self.handled = 0
        #: error replies by (model, code), for the metrics
        self.errors: ErrorCounts = Counter()
        #: generate/embed requests waiting for their model's load, by (peer, id): cancelled?
        self._parked: dict[tuple[bytes, int], bool] = {}
        #: chains by name: a request names one as it would a model
        self.chains: dict[str, Chain] = {}
        #: the vector collections (the daemon sets them; none by default)
        self.collections = Collections({}, Path(), self, TaskGroup())

    def handle(self, request: Request, reply: ReplyTo, peer: bytes = b"") -> None:
        self.handled += 1
        dispatch(self.ops, self, request, reply, peer, errors=self.errors)

    def pump(self) -> None:
        """Start runs for what was admitted since the last pump (batches form in between)."""
        pending, self._pending = self._pending, set()
        for runner in pending:
            runner.pump()

    def submit(self, request: Inference, reply: ReplyTo, peer: bytes) -> None:
        """``infer``, ``generate`` and ``embed``: queued on the model (or its canary); runs
        start on the next ``pump``. An ``infer`` with tensors in ``peer``'s regions gets views
        on them first, and a reply that writes outputs into them."""
        self._check_accepting()
        if isinstance(request, RegionInfer):
            request, reply = self.regions.resolve(request, reply, peer)
        chain = self.chains.get(request.model)
        if chain is not None:
            if not isinstance(request, Infer):
                raise OpNotSupported(f"{request.model!r} is a chain of models: use infer")
            chain.submit(request, reply, peer)
            return
        runner = self.loaded(request, reply, peer)
        if runner is None:
            return
        if request.op not in runner.ops:
            raise runner.unsupported(request.op)
        shadow = self._shadow(request, runner)
        if shadow is None or not isinstance(request, Infer):
            runner.submit(request, reply, peer)
        else:
            self._submit_shadowed(runner, shadow, request, reply, peer)
        self._pending.add(runner)

    def cancel(self, peer: bytes, target: int) -> bool:
        """Cancel ``peer``'s request ``target``; ``False`` when it is neither waiting for its
        model nor queued or running."""
        parked = (peer, target)
        if self._parked.get(parked) is False:  # waiting for its model: cancelled once admitted
            self._parked[parked] = True
            return True
        return self._cancel_admitted(peer, target)

    def _cancel_admitted(self, peer: bytes, target: int) -> bool:
        return any(runner.cancel(peer, target) for runner in self.registry.runners())

    def _check_accepting(self) -> None:
        if not self.accepting:
            raise ShuttingDown("the daemon is shutting down; retry against its successor")

    def _shadow(self, request: Inference, runner: Runner) -> Candidate | None:
        """The model's shadow candidate when ``request`` runs on its active version."""
        candidate = self.registry.slot(runner.name).candidate
        if candidate is None or candidate.mode != "shadow" or request.version is not None:
            return None
        return candidate if candidate.runner is not runner else None

    def _submit_shadowed(
        self, runner: Runner, candidate: Candidate, request: Infer, reply: ReplyTo, peer: bytes
    ) -> None:
        """Queue an ``infer`` on the active version and its twin on the shadow candidate,
        whose outputs are compared and never sent."""
        shadow = candidate.runner
        # the one place that needs the kind: the comparison hooks tensor jobs, and a swap
        # takes a shadow only for a model that serves infer (Swapper.try_out)
        assert isinstance(runner, ModelRunner) and isinstance(shadow, ModelRunner)
        job = runner.job(request, request.inputs, reply, peer)
        runner.admit(job)
        try:
            shadow.admit(candidate.shadow_job(job))
        except EdgedError:  # a busy candidate skips the comparison, never delays the request
            candidate.shadow.skipped += 1
            job.observe = None
            return
        self._pending.add(shadow)

    def loaded(self, request: VersionedRequest, reply: ReplyTo, peer: bytes) -> Runner | None:
        """The model's runner (or its canary's), or ``None`` after parking the request until
        the model loads."""
        slot = self.registry.slot(request.model)
        runner = slot.runner_for(request.version)
        if runner is not None:
            slot.last_used_ns = time.monotonic_ns()
            candidate = slot.candidate
            if (
                candidate is not None
                and request.version is None
                and request.op != "describe"
                and candidate.takes_request()
            ):
                return candidate.runner
            return runner
        if request.version is not None and request.version != slot.version:
            loaded = ", ".join(map(str, slot.loaded_versions())) or "none"
            raise UnknownModel(
                f"model {slot.name!r} has no version {request.version} loaded; "
                f"serving {slot.version} (loaded: {loaded})"
            )

        parked = (peer, request.id)

        def resume(error: EdgedError | None) -> None:
            cancelled = self._parked.pop(parked, False)
            if error is not None:
                self.errors[slot.name, error.code] += 1
                reply_error(request, reply, error, slot.name)
                return
            self.handle(request, reply, peer)
            if cancelled:  # ends the way a cancelled queued request does
                self._cancel_admitted(peer, request.id)
            self.pump()

        slot.when_ready(resume)
        if request.op in CANCELLABLE_OPS:
            self._parked[parked] = False
        return None


def dispatch(
    ops: OpTable[Ctx],
    ctx: Ctx,
    request: Request,
    reply: ReplyTo,
    peer: bytes,
    *,
    errors: ErrorCounts | None = None,
) -> None:
    """Run the op's handler; the one place where errors become replies (tracebacks stay in
    the log), counted per model in ``errors``."""
    try:
        ops.handle(ctx, request, reply, peer)
    except EdgedError as exc:
        # an unknown name is not a model: no series (and no rate-limit key) of its own
        model = "" if exc.code == UnknownModel.code else model_of(request)
        # a cancel that found nothing lost a race with its target's end: answered, not counted
        if errors is not None and exc.code != UnknownRequest.code:
            errors[model, exc.code] += 1
        reply_error(request, reply, exc, model)
    except Exception:  # a bug becomes INTERNAL; the traceback stays in the log
        log.exception(
            "request %s (op %s) failed [trace %s]",
            request.id,
            request.op,
            request.trace,
            extra=log_fields(model=model_of(request) or None, trace=request.trace, code="INTERNAL"),
        )
        error = InternalError("internal error; the daemon log has the details")
        reply.fail(error)


def reply_error(request: Request, reply: ReplyTo, error: EdgedError, model: str) -> None:
    """Send ``error`` as the reply to ``request``, and log it (rate-limited)."""
    log_error_reply(
        error.code, error.message, model=model, trace=request.trace, request_id=request.id
    )
    reply.fail(error)


def model_of(request: Request) -> str:
    """The model ``request`` names, or ``""`` for an op on no model."""
    return request.model if isinstance(request, ModelRequest) else ""
