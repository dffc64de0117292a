"""Config reload (SIGHUP, ``edgectl reload``): serve what the config file and the store say now.

The file is read and validated first; an invalid one changes nothing. Then, per model: a new
declaration is added (loaded at once if preloaded or pinned); a removed one finishes its
requests and unloads; a changed file, store version or newer stored version is swapped in like
``edgectl swap`` does (validated, no request failed). Changed options alone reload a store
version in place; a model declared by ``path`` gets its file as a new version. A model whose
change fails keeps its old declaration. Settings other than models and the memory budget
(chains too) need a restart: they are named in the report until they match the running daemon
again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

from edged.config import DEFAULTS_SOURCE, Config, ModelConfig, load_config
from edged.errors import ConfigError, SwapInProgress
from edged.models.budget import MIB
from edged.models.loading import ModelLoader, in_fresh_thread
from edged.models.registry import ModelSlot, Registry, VersionSpec, as_edged_error
from edged.models.swap import Swapper
from edged.tasks import TaskGroup

log = logging.getLogger(__name__)
T = TypeVar("T")


class Reloader:
    def __init__(
        self,
        config: Config,
        registry: Registry,
        loader: ModelLoader,
        swapper: Swapper,
        tasks: TaskGroup,
    ) -> None:
        self.config = config
        self.registry = registry
        self.loader = loader
        self.swapper = swapper
        #: where the models it adds load
        self.tasks = tasks
        self._lock = asyncio.Lock()

    async def reload(self) -> dict[str, Any]:
        """Apply the config file as it is now; the report says what changed and what failed."""
        if self._lock.locked():
            raise SwapInProgress("a reload is already running; retry when it is done")
        async with self._lock:
            new = await in_fresh_thread(_read, self.config.source)  # ConfigError: nothing changes
            if self.config.models and not new.models:
                raise ConfigError(
                    f"{new.source} declares no models; restart to serve the built-in demo"
                )
            report: dict[str, Any] = {"added": [], "removed": [], "swapped": {}, "failed": {}}
            report["restart_needed"] = _restart_needed(self.config, new)
            memory = new.memory  # first: models added now are checked against the new budget
            self.registry.budget.capacity = memory.budget_mb * MIB or None
            self.registry.budget.reserve = memory.reserve_mb * MIB
            applied = await self._models(new, report) if new.models else {}
            # what took effect: a model that failed keeps its old declaration (or none)
            old = self.config
            self.config = dataclasses.replace(
                new,
                daemon=old.daemon,
                server=old.server,
                http=old.http,
                models=applied,
                chains=old.chains,
            )
            log.info("reloaded %s: %s", new.source, report)
            return report

    async def _models(self, new: Config, report: dict[str, Any]) -> dict[str, ModelConfig]:
        """Apply the declarations; returns the ones now in effect."""
        old = self.config.models
        applied = {name: old[name] for name in old.keys() & new.models.keys()}
        for name in old.keys() - new.models.keys():
            done, _ = await self._attempt(name, report, self._remove(name))
            if done:
                report["removed"].append(name)
            else:
                applied[name] = old[name]
        for name, declared in new.models.items():
            if name not in old:
                done, _ = await self._attempt(name, report, self._add(name, declared))
                if done:
                    report["added"].append(name)
                    applied[name] = declared
                continue
            update = self._update(self.registry.slot(name), old[name], declared)
            done, swapped = await self._attempt(name, report, update)
            if done:
                applied[name] = declared
            if swapped is not None:
                report["swapped"][name] = swapped
        return applied

    @staticmethod
    async def _attempt(
        name: str, report: dict[str, Any], work: Awaitable[T]
    ) -> tuple[bool, T | None]:
        """Run one model's change; a failure is reported and does not stop the others."""
        try:
            return True, await work
        except Exception as exc:  # one model's failure does not stop the others
            error = as_edged_error(exc, f"reloading model {name!r} failed; see the log")
            log.error("reload: model %s: %s", name, error)
            report["failed"][name] = f"{error.code}: {error}"
            return False, None

    async def _add(self, name: str, declared: ModelConfig) -> None:
        spec = await in_fresh_thread(self.loader.declared, name, declared)
        slot = ModelSlot(name, spec, self.loader.load, self.tasks)
        self.registry.add(slot)
        if declared.preload or declared.pinned:
            await slot.load()

    async def _remove(self, name: str) -> None:
        slot = self.registry.remove(name)  # new requests: UNKNOWN_MODEL
        await slot.settled()
        candidate, slot.candidate = slot.candidate, None
        runners = [slot.detach(), *slot.retiring, candidate.runner if candidate else None]
        for runner in runners:
            if runner is not None:
                await self.swapper.finish(runner)
                self.registry.close_runner(runner, "as the config no longer declares it")

    async def _update(
        self, slot: ModelSlot, before: ModelConfig, declared: ModelConfig
    ) -> dict[str, Any] | None:
        """Swap to what ``declared`` means now; ``None`` when nothing is to change. An unchanged
        declaration changes nothing unless the store got a version newer than any this model
        has served (so a rollback is not undone by the next reload)."""
        target = await in_fresh_thread(self.loader.declared, slot.name, declared)
        if declared == before:
            served = [slot.version] + ([slot.previous.version] if slot.previous else [])
            if declared.path or declared.version or target.version <= max(served):
                return None
        elif declared.path:  # a file is "version 1" to the loader; a new one is a new version
            target = VersionSpec(self.loader.next_version(slot), target.config)
        if target == slot.spec:
            return None
        policy = "replace" if target.version == slot.version else "auto"
        report = await self.swapper.swap(slot, target, policy)
        await in_fresh_thread(self.loader.commit, slot.name, slot.spec)  # a restart agrees
        return report.fields()


def _read(source: str) -> Config:
    return Config() if source == DEFAULTS_SOURCE else load_config(Path(source))


def _restart_needed(old: Config, new: Config) -> list[str]:
    """Top-level settings that differ and only take effect at start."""
    chains = ["chains"] if old.chains != new.chains else []
    return chains + [
        f"{table}.{item.name}"
        for table in ("daemon", "server", "http")
        for item in dataclasses.fields(getattr(old, table))
        if getattr(getattr(old, table), item.name) != getattr(getattr(new, table), item.name)
    ]
