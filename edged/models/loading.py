"""Turning declarations and store versions into loaded, running model versions.

Each backend is one row of ``BACKENDS``: how to estimate a model from its files, how to load
it, and what schedules requests on it. Loads run one at a time, so that each memory
measurement sees its own load only, and each one is charged to the budget. The first load of a
kind primes its runtime first: the runtime's one-time start-up is the process's memory, not
that model's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from edged.config import ModelConfig, read_pipeline
from edged.drift.features import Layout
from edged.drift.monitor import DriftMonitors, Tensors
from edged.errors import BudgetExceeded, ConfigError, ModelLoadError, StoreError
from edged.logsetup import log_fields
from edged.models.budget import footprint
from edged.models.generation import GenerationRunner
from edged.models.gguf import GgufBackend
from edged.models.onnx import OnnxBackend
from edged.models.registry import ModelSlot, Registry, Runner, VersionSpec
from edged.models.runner import ModelRunner
from edged.steps.pipeline import pipeline_path
from edged.store import ModelStore

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class BackendKind:
    #: peak bytes a load will take, from the files alone
    estimate: Callable[[ModelConfig], int]
    #: the loaded model (blocking), given a directory for what it may cache across loads
    load: Callable[[ModelConfig, Path], Any]
    #: what schedules requests on it: (name, version, backend, config, loop), and for a kind
    #: with ``layouts``, ``profile=`` the drift monitor's hook
    runner: Callable[..., Runner]
    #: the runtime's one-time start-up (blocking), run before the kind's first measured load
    prime: Callable[[], None] = lambda: None
    #: a loaded model's tensors as drift monitoring sees them; ``None``: not monitored
    layouts: Callable[[Any], dict[str, Layout]] | None = None


BACKENDS: dict[str, BackendKind] = {
    "onnx": BackendKind(
        estimate=lambda config: OnnxBackend.estimate(Path(config.path), config.pipeline),
        load=lambda config, cache: OnnxBackend.load(
            Path(config.path), config.onnx, cache, config.pipeline, config.embed
        ),
        runner=ModelRunner,
        prime=OnnxBackend.prime,
        layouts=lambda backend: {
            tensor.name: Layout.of(tensor.shape)
            for tensor in backend.signature.inputs + backend.signature.outputs
        },
    ),
    "gguf": BackendKind(
        estimate=lambda config: GgufBackend.estimate(Path(config.path), config.gguf),
        load=lambda config, _: GgufBackend.load(Path(config.path), config.gguf, config.embed),
        runner=GenerationRunner,
    ),
}


async def in_fresh_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run blocking ``fn`` on a thread that ends with it: an idle default executor would keep
    its thread (and that thread's memory) for the daemon's whole life."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)


class ModelLoader:
    def __init__(self, registry: Registry, store: ModelStore, cache_dir: Path) -> None:
        self.registry = registry
        self.store = store
        #: what backends keep across loads (TensorRT engines)
        self.cache_dir = cache_dir
        self._lock = asyncio.Lock()
        self._primed: set[str] = set()
        #: the drift monitors of models with a ``drift`` table (``edged.drift``), if any
        self.drift: DriftMonitors | None = None

    async def expected_bytes(self, name: str, spec: VersionSpec) -> int:
        """What loading ``spec`` will take, past loads of the model taken into account."""
        estimate = await in_fresh_thread(_estimate, name, spec.config)
        return self.registry.budget.expected(name, estimate)

    async def load(self, name: str, spec: VersionSpec, *, evict: bool = True) -> Runner:
        """Estimate, make room (evicting idle models, or only checking the fit when ``evict``
        is false), load, measure, charge, and start the runner."""
        budget = self.registry.budget
        async with self._lock:
            estimate = await in_fresh_thread(_estimate, name, spec.config)
            need = budget.expected(name, estimate)
            if evict:
                self.registry.make_room(name, need)
            elif budget.shortfall(need) > 0:
                raise BudgetExceeded(self.registry.no_room(name, need))
            kind = BACKENDS[spec.config.backend]
            if spec.config.backend not in self._primed:
                await in_fresh_thread(kind.prime)
                self._primed.add(spec.config.backend)
            before = footprint()
            backend = await in_fresh_thread(_open_backend, name, spec.config, self.cache_dir)
            measured = footprint() - before
            budget.charge(name, spec.version, estimate, measured)
        drift, extra = spec.config.drift, {}
        if drift is not None and self.drift is not None and kind.layouts is not None:
            monitor = self.drift.monitor(name, drift)
            tensors = Tensors(kind.layouts(backend))
            extra["profile"] = monitor.profiler(spec.version, spec.config.path, tensors)
        loop = asyncio.get_running_loop()
        runner = kind.runner(name, spec.version, backend, spec.config, loop, **extra)
        runner.start()
        fields = log_fields(model=name, version=spec.version)
        log.info("model %s version %d loaded", name, spec.version, extra=fields)
        for warning in runner.warnings():
            log.warning("model %s version %d: %s", name, spec.version, warning, extra=fields)
        return runner

    def at_start(self, name: str, config: ModelConfig) -> VersionSpec:
        """What to serve when the daemon starts (blocking): the version last committed (by an
        install, a swap or a reload), unless the declaration pins a store version."""
        committed = None if config.version else self.store.current(name)
        if committed is None:
            return self.declared(name, config)
        return self.stored(name, config, committed)

    def declared(self, name: str, config: ModelConfig) -> VersionSpec:
        """A declaration's version (blocking): its own ``path`` as version 1, else the store
        version it names, else the newest one. A missing file fails here rather than at some
        sensor's first request."""
        if config.path:
            if not Path(config.path).is_file():
                raise ModelLoadError(f"model {name!r}: no file at {config.path}")
            return VersionSpec(
                1, dataclasses.replace(config, backend=config.backend_for(config.path))
            )
        if config.version:
            return self.stored(name, config, config.version)
        manifest = self.store.latest(name)
        if manifest is None:
            raise ModelLoadError(
                f"model {name!r} has no path and the store has no version of it under "
                f"{self.store.root / name}"
            )
        return self.stored(name, config, manifest.version)

    def next_version(self, slot: ModelSlot) -> int:
        """A version number for a new model file: past every version known for the model."""
        known = [slot.version, *slot.loaded_versions(), *self.store.versions(slot.name)]
        if slot.previous is not None:
            known.append(slot.previous.version)
        return max(known) + 1

    def commit(self, name: str, spec: VersionSpec) -> None:
        """Make ``spec`` what a restart serves (blocking): a store version is recorded; any
        other file clears the record, and a restart serves the declaration."""
        stored = None
        if spec.version in self.store.versions(name):
            path = self.store.model_path(self.store.manifest(name, spec.version))
            stored = spec.version if spec.config.path == str(path) else None
        self.store.set_current(name, stored)

    def stored(self, name: str, config: ModelConfig, version: int) -> VersionSpec:
        """Store version ``version`` of ``name``, served with the model's declared options."""
        try:
            manifest = self.store.manifest(name, version)
        except StoreError as exc:
            raise ModelLoadError(f"model {name!r} has no usable version {version}: {exc}") from None
        path = str(self.store.model_path(manifest))  # the store knows each version's format
        resolved = dataclasses.replace(config, path=path, backend=manifest.format, version=version)
        shipped = pipeline_path(path)
        if shipped.is_file():  # the version's bundle brought its own: it replaces the declared
            try:
                pipeline = read_pipeline(shipped)
            except ConfigError as exc:
                raise ModelLoadError(f"model {name!r} version {version}: {exc}") from None
            resolved = dataclasses.replace(
                resolved, preprocess=pipeline.preprocess, postprocess=pipeline.postprocess
            )
        return VersionSpec(version, resolved)


def _estimate(name: str, config: ModelConfig) -> int:
    if config.pipeline and config.backend != "onnx":
        raise ModelLoadError(f"model {name!r}: preprocess and postprocess apply to ONNX models")
    try:
        return BACKENDS[config.backend].estimate(config)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model {name!r}: cannot load {config.path}: {exc}") from None


def _open_backend(name: str, config: ModelConfig, cache_dir: Path) -> Any:
    """Load one model (blocking: runs on a loader thread)."""
    path = Path(config.path)
    if not path.is_file():
        raise ModelLoadError(f"model {name!r}: no file at {path}")
    try:
        return BACKENDS[config.backend].load(config, cache_dir)
    except ModelLoadError:
        raise
    except Exception as exc:  # backends raise their own untyped errors for bad files
        raise ModelLoadError(f"model {name!r}: cannot load {path}: {exc}") from None
