"""The daemon's collections: opened in the background at start, found by name, each request's
work run as a task that answers it, texts embedded by the collection's model through the
inference service like any other ``embed``."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edged import faults
from edged.chains import StepReply
from edged.collections import snapshots
from edged.collections.calls import CollectionRequest, as_vectors
from edged.collections.collection import Collection
from edged.collections.index import estimate_bytes
from edged.collections.store import Item
from edged.config import CollectionConfig
from edged.errors import BadRequest, BudgetExceeded, EdgedError, InternalError, UnknownCollection
from edged.models.budget import MIB, MemoryBudget
from edged.models.calls import Embed
from edged.models.loading import in_fresh_thread
from edged.replies import ReplyTo
from edged.tasks import TaskGroup

if TYPE_CHECKING:
    from edged.service import InferenceService

log = logging.getLogger(__name__)
#: the peer the collections' own embed requests come from (their fair share of a model)
PEER = b"collections"


def budget_name(collection: str) -> str:
    """How the memory budget (``ping``'s ``memory.models``) names a collection's index."""
    return f"collection:{collection}"


class Collections:
    def __init__(
        self,
        configs: Mapping[str, CollectionConfig],
        directory: Path,
        service: InferenceService,
        tasks: TaskGroup,
        budget: MemoryBudget | None = None,
    ) -> None:
        self.configs = dict(configs)
        self._budget = budget
        self._directory = directory
        self._service = service
        self._tasks = tasks
        self._opening: dict[str, asyncio.Future[Collection]] = {}
        self._ids = itertools.count(1)

    def start(self) -> None:
        """Open every collection in the background (a rebuild of a large index takes a
        while); requests for one wait until it is open."""
        for name, config in self.configs.items():
            self._opening[name] = self._tasks.start(self._open(name, config), f"open {name}")

    @property
    def directory(self) -> Path:
        return self._directory

    async def _open(self, name: str, config: CollectionConfig) -> Collection:
        collection = await in_fresh_thread(self._open_installed, name, config)
        self._charge(collection, collection.indexed)
        return collection

    def _open_installed(self, name: str, config: CollectionConfig) -> Collection:
        self._directory.mkdir(parents=True, exist_ok=True)
        snapshots.sweep(self._directory, name)  # what an install left uncommitted
        return Collection.open(name, config.dim, config.metric, self._directory)

    # -- installing a snapshot (edged.ota.snapshot) ------------------------------------------

    async def prepare(self, name: str, version: int, count: int) -> Collection:
        """Open the published snapshot ``version`` of ``name`` (``count`` items) and build its
        index, while the collection serves what it served; charged to the budget beside it."""
        config = self.configs[name]
        need = estimate_bytes(count, config.dim)
        if self._budget is not None and self._budget.shortfall(need) > 0:
            raise BudgetExceeded(
                f"collection {name!r}: the snapshot's {count} items need {need / MIB:.1f} MiB "
                f"beside the index serving now, beyond the memory budget"
            )
        collection = await in_fresh_thread(
            Collection.open, name, config.dim, config.metric, self._directory, version
        )
        try:
            await collection.save_index()  # a restart reads it rather than building it again
            self._charge(collection, collection.indexed)
        except BaseException:
            await in_fresh_thread(collection.close, False)
            raise
        return collection

    async def switch(self, new: Collection, sha256: str) -> None:
        """Commit ``new`` (``prepare``) as the collection a restart serves, serve it, then
        close the one it replaces and remove its files. Writes the old one acknowledged
        while ``new`` was prepared go with it: a snapshot replaces the collection whole."""
        name = new.name
        old = await self.get(name)
        installed = await in_fresh_thread(snapshots.installed, self._directory, name)
        try:
            await in_fresh_thread(
                snapshots.commit, self._directory, name, installed.after(new.version, sha256)
            )
        except BaseException:
            await self.discard(new)
            raise
        faults.point("collections.committed")
        switched: asyncio.Future[Collection] = asyncio.get_running_loop().create_future()
        switched.set_result(new)
        self._opening[name] = switched
        old.retire()
        await in_fresh_thread(old.close, False)
        if self._budget is not None:
            self._budget.release(budget_name(name), old.version, 0, report=False)
        await in_fresh_thread(snapshots.sweep, self._directory, name)
        log.info("collection %s: now serving snapshot version %d", name, new.version)

    async def discard(self, prepared: Collection) -> None:
        """Close a prepared snapshot that will not serve, and remove its files."""
        await in_fresh_thread(prepared.close, False)
        if self._budget is not None:
            self._budget.release(budget_name(prepared.name), prepared.version, 0, report=False)
        await in_fresh_thread(snapshots.sweep, self._directory, prepared.name)

    def _charge(self, collection: Collection, count: int) -> None:
        """Charge the index to the memory budget, as a loaded model is: what it holds, or what
        ``count`` items will take, whichever is more."""
        if self._budget is not None:
            held = max(estimate_bytes(count, collection.dim), collection.memory_bytes)
            self._budget.charge(budget_name(collection.name), collection.version, held, held)

    async def upsert(self, collection: Collection, items: Sequence[Item]) -> int:
        """``collection.upsert``, refused with ``BUDGET_EXCEEDED`` when the items it adds would
        not fit the memory budget."""
        budget = self._budget
        if budget is not None:
            after = collection.indexed + len(items)
            charged = budget.statistics().charged_bytes.get(budget_name(collection.name), 0)
            need = max(estimate_bytes(after, collection.dim) - charged, 0)
            if budget.shortfall(need) > 0:  # also when the index already outgrew the budget
                raise BudgetExceeded(
                    f"collection {collection.name!r}: {len(items)} more items need "
                    f"{need / MIB:.1f} MiB more, beyond the memory budget"
                )
        generation = await collection.upsert(items)
        self._charge(collection, collection.indexed)
        return generation

    def ready(self, name: str) -> Collection | None:
        """The collection if it is open now: a request then needs no task of its own."""
        opening = self._opening.get(name)
        if opening is None or not opening.done() or opening.cancelled() or opening.exception():
            return None
        return opening.result()

    async def get(self, name: str) -> Collection:
        opening = self._opening.get(name)
        if opening is None:
            known = ", ".join(sorted(self._opening)) or "none"
            raise UnknownCollection(f"unknown collection {name!r}; declared: {known}")
        try:
            return await asyncio.shield(opening)
        except Exception as exc:  # a collection that cannot open answers every request so
            raise InternalError(f"collection {name!r} could not open: {exc}") from None

    async def stat(self, name: str) -> dict[str, Any]:
        """A collection's declaration and size (``edgectl collections``)."""
        config = self.configs[name]
        found: dict[str, Any] = {
            "name": name,
            "dim": config.dim,
            "metric": config.metric,
            "model": config.model,
        }
        try:
            collection = await self.get(name)
        except EdgedError as exc:
            return {**found, "error": exc.message}
        return {**found, **collection.stat()}

    def run(
        self, request: CollectionRequest, reply: ReplyTo, work: Awaitable[dict[str, Any]]
    ) -> None:
        """Answer ``request`` with ``work``'s result, or its error, once it is done."""

        async def answer() -> None:
            try:
                fields = await work
            except EdgedError as exc:
                reply.fail(exc)
            except Exception:
                log.exception("collection request %s failed", request.op)
                reply.fail(InternalError(f"{request.op} failed unexpectedly; see the log"))
            else:
                tensors = fields.pop("tensors", None)
                reply.ok(fields, tensors)

        self._tasks.start(answer(), f"collection {request.op} {request.id}")

    async def embed(self, name: str, texts: tuple[str, ...]) -> np.ndarray[Any, Any]:
        """The vectors of ``texts`` from collection ``name``'s model."""
        model = self.configs[name].model
        if not model:
            raise BadRequest(f"collection {name!r} has no model to embed texts: send vectors")
        request = Embed(id=next(self._ids), op="embed", model=model, texts=texts)
        done: asyncio.Future[dict[str, np.ndarray[Any, Any]]] = (
            asyncio.get_running_loop().create_future()
        )
        self._service.handle(request, StepReply(done, request), PEER)
        self._service.pump()
        return as_vectors((await done)["embedding"])

    async def close(self) -> None:
        """Save every open index (its next start reads it rather than rebuilding)."""
        for name, opening in self._opening.items():
            if opening.done() and not opening.cancelled() and opening.exception() is None:
                collection = opening.result()
                await in_fresh_thread(collection.close)
                if self._budget is not None:
                    self._budget.release(budget_name(name), collection.version, 0, report=False)
            log.info("collection %s closed", name)
