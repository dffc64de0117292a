"""Replacing a model's active version while it serves, without failing a request.

Two policies, picked by the memory budget unless the operator names one:

- ``overlap``: the new version loads beside the old one, is validated, and routing flips to it
  in one step on the event loop; the old version finishes what it had queued and running, then
  unloads. Nobody waits.
- ``replace``: when both do not fit, new requests wait (bounded by ``queue_depth``, as during a
  load) while the old version finishes its work and unloads; the new one then loads, is
  validated, and the waiting requests go on to it. Latency rises for the swap's duration only.

Either way, a new version that fails to load or validate is dropped and the old one serves (it
is loaded back first when ``replace`` had unloaded it). One swap per model at a time: another
one is refused with ``SwapInProgress``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from edged import faults
from edged.errors import BadRequest, OpNotSupported, RunFailed, SwapInProgress
from edged.models.candidate import Candidate
from edged.models.loading import ModelLoader, in_fresh_thread
from edged.models.registry import ModelSlot, Registry, Runner, VersionSpec, as_edged_error
from edged.models.validation import Interface, check_compatible

log = logging.getLogger(__name__)

POLICIES = ("auto", "overlap", "replace")


@dataclass(frozen=True)
class SwapReport:
    model: str
    from_version: int
    to_version: int
    policy: str
    seconds: float

    def fields(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "from_version": self.from_version,
            "version": self.to_version,
            "policy": self.policy,
            "seconds": round(self.seconds, 3),
        }


class Swapper:
    def __init__(self, registry: Registry, loader: ModelLoader, grace_s: float) -> None:
        self.registry = registry
        self.loader = loader
        #: how long an old version may take to finish its requests before they are failed
        self.grace_s = grace_s

    async def swap(
        self, slot: ModelSlot, target: VersionSpec, policy: str = "auto", force: bool = False
    ) -> SwapReport:
        """Make ``target`` the active version; ``force`` skips the interface check only."""
        if slot.candidate is not None and slot.candidate.spec.version == target.version:
            raise BadRequest(f"version {target.version} is on trial: promote it instead")
        self._begin(slot)
        started = time.monotonic()
        previous = slot.spec
        try:
            await slot.settled()  # a load under way ends first
            old = slot.runner
            chosen = "replace" if old is None else await self._choose(slot, target, policy)
            if old is not None and chosen == "overlap":
                await self._overlap(slot, old, target, force, evict=policy == "overlap")
            else:
                await self._replace(slot, old, target, force)
        finally:
            slot.swapping = False
        if target.version != previous.version:  # an in-place reload keeps the rollback target
            slot.previous = previous
        report = SwapReport(
            slot.name, previous.version, target.version, chosen, time.monotonic() - started
        )
        log.info(
            "model %s: version %d -> %d (%s) in %.3f s",
            slot.name,
            report.from_version,
            report.to_version,
            chosen,
            report.seconds,
        )
        return report

    async def try_out(
        self, slot: ModelSlot, target: VersionSpec, mode: str, fraction: float, force: bool
    ) -> dict[str, Any]:
        """Load and validate ``target`` as the model's candidate (canary or shadow)."""
        old = slot.runner
        if old is None:
            raise BadRequest(f"model {slot.name!r} is not loaded: nothing to compare with")
        if mode == "shadow" and "infer" not in old.ops:
            raise OpNotSupported("shadow compares tensor outputs: GGUF models take canaries")
        self._begin(slot)
        try:
            if slot.candidate is not None:
                raise BadRequest(
                    f"model {slot.name!r} already has candidate version "
                    f"{slot.candidate.spec.version}; promote or discard it first"
                )
            new = await self.loader.load(slot.name, target)
            try:
                await self._validate(slot.name, old.interface(), new, force)
            except BaseException:
                self.registry.close_runner(new, "after failing validation")
                raise
            slot.candidate = Candidate(new, target, mode, fraction)
        finally:
            slot.swapping = False
        log.info("model %s: version %d on trial (%s)", slot.name, target.version, mode)
        return {"model": slot.name, "version": slot.version, "candidate": slot.candidate.fields()}

    async def promote(self, slot: ModelSlot) -> SwapReport:
        """The candidate becomes the active version at once; the old one retires."""
        candidate = self._candidate(slot)
        self._begin(slot)
        started, previous = time.monotonic(), slot.spec
        try:
            old, slot.candidate = slot.runner, None
            slot.activate(candidate.runner, candidate.spec)
            if old is not None:
                slot.retiring.append(old)
                try:
                    await self.finish(old)
                finally:
                    slot.retiring.remove(old)
                    self.registry.close_runner(old, "after its candidate was promoted")
        finally:
            slot.swapping = False
        slot.previous = previous
        seconds = time.monotonic() - started
        return SwapReport(slot.name, previous.version, candidate.spec.version, "promote", seconds)

    async def discard(self, slot: ModelSlot) -> dict[str, Any]:
        """Unload the candidate once it has answered what it had."""
        candidate = self._candidate(slot)
        slot.candidate = None
        await self.finish(candidate.runner)
        self.registry.close_runner(candidate.runner, "as its trial ended")
        return {"model": slot.name, "version": slot.version, "discarded": candidate.fields()}

    def _candidate(self, slot: ModelSlot) -> Candidate:
        if slot.candidate is None:
            raise BadRequest(f"model {slot.name!r} has no candidate version")
        return slot.candidate

    def _begin(self, slot: ModelSlot) -> None:
        if slot.swapping:
            raise SwapInProgress(f"model {slot.name!r} is already swapping; retry when it is done")
        slot.swapping = True

    async def _choose(self, slot: ModelSlot, target: VersionSpec, policy: str) -> str:
        if policy != "auto":
            return policy
        need = await self.loader.expected_bytes(slot.name, target)
        return "overlap" if self.registry.budget.shortfall(need) == 0 else "replace"

    async def _overlap(
        self, slot: ModelSlot, old: Runner, target: VersionSpec, force: bool, *, evict: bool
    ) -> None:
        new = await self.loader.load(slot.name, target, evict=evict)
        try:
            await self._validate(slot.name, old.interface(), new, force)
        except BaseException:
            self.registry.close_runner(new, "after failing validation")
            raise
        faults.point("swap.validated")
        slot.retiring.append(old)
        slot.activate(new, target)  # from here on, requests go to the new version
        try:
            await self.finish(old)
        finally:
            slot.retiring.remove(old)
            self.registry.close_runner(old, f"after the swap to version {target.version}")

    async def _replace(
        self, slot: ModelSlot, old: Runner | None, target: VersionSpec, force: bool
    ) -> None:
        previous = slot.spec
        interface = None if old is None else old.interface()
        slot.hold()
        if old is not None:
            slot.detach()  # new requests wait in the slot from here on
            await self.finish(old)
            self.registry.close_runner(old, f"to make room for version {target.version}")
        try:
            new = await self.loader.load(slot.name, target)
            try:
                await self._validate(slot.name, interface, new, force)
            except BaseException:
                self.registry.close_runner(new, "after failing validation")
                raise
        except BaseException as failure:
            if old is None:
                slot.release(None)  # not loaded before, not loaded now: requests load it
            else:
                await self._restore(slot, previous, failure)
            raise
        slot.activate(new, target)

    async def _restore(
        self, slot: ModelSlot, previous: VersionSpec, failure: BaseException
    ) -> None:
        """Load the version a failed ``replace`` unloaded; requests wait for it meanwhile."""
        log.warning(
            "model %s: swap failed (%s); loading version %d back",
            slot.name,
            failure,
            previous.version,
        )
        try:
            slot.activate(await self.loader.load(slot.name, previous), previous)
        except Exception as exc:  # the waiting requests get the reason; the next one retries
            error = as_edged_error(exc, f"model {slot.name!r} could not be loaded back")
            log.error(
                "model %s: version %d did not load back: %s", slot.name, previous.version, error
            )
            slot.release(error)

    async def _validate(self, name: str, old: Interface | None, new: Runner, force: bool) -> None:
        if old is not None and not force:
            check_compatible(name, old, new.interface())
        await in_fresh_thread(new.rehearse)

    async def finish(self, old: Runner) -> None:
        """Let the old version answer what it has; past the grace period, fail the rest."""
        try:
            await asyncio.wait_for(old.drained(), self.grace_s)
        except asyncio.TimeoutError:
            log.warning(
                "model %s version %d: requests still running %.0f s after a swap; failing them",
                old.name,
                old.version,
                self.grace_s,
            )
            old.abort(RunFailed(f"model {old.name!r} version {old.version} was swapped out"))
