"""Config reload (SIGHUP, ``edgectl reload``): serve what the config file and the store say now.

The file is read and validated first; an invalid one changes nothing. Then, per model: a new
declaration is added (loaded at once if preloaded or pinned); a removed one finishes its
requests and unloads; a changed file, store version or newer stored version is swapped in like
``edgectl swap`` does (validated, no request failed); changed options alone reload the same
version in place. Settings other than models and the memory budget need a restart: they are
named in the report.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path
from typing import Any

from edged.config import DEFAULTS_SOURCE, Config, ModelConfig, load_config
from edged.errors import SwapInProgress
from edged.models.budget import MIB
from edged.models.loading import ModelLoader, in_fresh_thread
from edged.models.registry import ModelSlot, Registry, VersionSpec, as_edged_error
from edged.models.swap import Swapper

log = logging.getLogger(__name__)


class Reloader:
    def __init__(
        self, config: Config, registry: Registry, loader: ModelLoader, swapper: Swapper
    ) -> None:
        self.config = config
        self.registry = registry
        self.loader = loader
        self.swapper = swapper
        self._lock = asyncio.Lock()

    async def reload(self) -> dict[str, Any]:
        """Apply the config file as it is now; the report says what changed and what failed."""
        if self._lock.locked():
            raise SwapInProgress("a reload is already running; retry when it is done")
        async with self._lock:
            new = await in_fresh_thread(_read, self.config.source)  # ConfigError: nothing changes
            report: dict[str, Any] = {"added": [], "removed": [], "swapped": {}, "failed": {}}
            report["restart_needed"] = _restart_needed(self.config, new)
            if new.models or self.config.models:  # the built-in demo is not reloaded
                await self._models(new, report)
            memory = new.memory
            self.registry.budget.capacity = memory.budget_mb * MIB or None
            self.registry.budget.reserve = memory.reserve_mb * MIB
            self.config = dataclasses.replace(new, daemon=self.config.daemon)
            log.info("reloaded %s: %s", new.source, report)
            return report

    async def _models(self, new: Config, report: dict[str, Any]) -> None:
        old = self.config.models
        for name in old.keys() - new.models.keys():
            await self._remove(self.registry.slot(name))
            report["removed"].append(name)
        for name, declared in new.models.items():
            try:
                if name not in old:
                    await self._add(name, declared)
                    report["added"].append(name)
                    continue
                swapped = await self._update(self.registry.slot(name), old[name], declared)
                if swapped is not None:
                    report["swapped"][name] = swapped
            except Exception as exc:  # one model's failure does not stop the others
                error = as_edged_error(exc, f"reloading model {name!r} failed; see the log")
                log.error("reload: model %s: %s", name, error)
                report["failed"][name] = f"{error.code}: {error}"

    async def _add(self, name: str, declared: ModelConfig) -> None:
        spec = await in_fresh_thread(self.loader.declared, name, declared)
        slot = ModelSlot(name, spec, self.loader.load, asyncio.get_running_loop())
        self.registry.add(slot)
        if declared.preload or declared.pinned:
            await slot.load()

    async def _remove(self, slot: ModelSlot) -> None:
        self.registry.remove(slot.name)  # new requests: UNKNOWN_MODEL
        await slot.settled()
        runner = slot.detach()
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
        return (await self.swapper.swap(slot, target, policy)).fields()


def _read(source: str) -> Config:
    return Config() if source == DEFAULTS_SOURCE else load_config(Path(source))


def _restart_needed(old: Config, new: Config) -> list[str]:
    """Top-level settings that differ and only take effect at start."""
    return [
        f"{table}.{item.name}"
        for table in ("daemon", "server")
        for item in dataclasses.fields(getattr(old, table))
        if getattr(getattr(old, table), item.name) != getattr(getattr(new, table), item.name)
    ]
