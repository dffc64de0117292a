"""The daemon's lifecycle: startup -> serve -> drain -> stop, owning every resource it opens.

Everything started in ``startup`` is registered on one ``AsyncExitStack``, so sockets, run
threads, the ZeroMQ context, socket files and the instance lock are released in reverse order,
also when startup fails half-way.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import zmq

from edged.config import Config, ModelConfig
from edged.demo import build_demo_model
from edged.errors import ConfigError, ModelLoadError, ShuttingDown
from edged.lockfile import instance_lock
from edged.models.budget import MIB, MemoryBudget, footprint
from edged.models.generation import GenerationRunner
from edged.models.gguf import GgufBackend
from edged.models.onnx import OnnxBackend
from edged.models.registry import ModelSlot, Registry, Runner
from edged.models.runner import ModelRunner
from edged.paths import Paths, default_infer_endpoint, resolve_paths
from edged.server import InferenceEndpoint
from edged.service import InferenceService
from edged.store import Manifest, ModelStore

log = logging.getLogger(__name__)
T = TypeVar("T")

DEMO_MODEL = "demo"
#: housekeeping period (idle unloads)
TICK_S = 1.0


@dataclass(frozen=True)
class BackendKind:
    #: peak bytes a load will take, from the files alone
    estimate: Callable[[ModelConfig], int]
    #: the loaded model (blocking)
    load: Callable[[ModelConfig], Any]
    #: what schedules requests on it
    runner: Callable[[str, int, Any, ModelConfig, asyncio.AbstractEventLoop], Runner]
    #: whether a load that measured below the estimate may lower the next estimate
    learn_lower: bool


BACKENDS: dict[str, BackendKind] = {
    "onnx": BackendKind(
        estimate=lambda config: OnnxBackend.estimate(Path(config.path)),
        load=lambda config: OnnxBackend.load(Path(config.path), config.onnx),
        runner=ModelRunner,
        learn_lower=True,
    ),
    "gguf": BackendKind(
        estimate=lambda config: GgufBackend.estimate(Path(config.path), config.gguf),
        load=lambda config: GgufBackend.load(Path(config.path), config.gguf),
        runner=GenerationRunner,
        # llama.cpp's compute buffers and KV pages fill only under long prompts
        learn_lower=False,
    ),
}


def new_event_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        try:
            import uvloop
        except ImportError:
            raise ConfigError("daemon.event_loop is 'uvloop' but uvloop is not installed") from None
        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        return loop
    return asyncio.new_event_loop()


@contextlib.contextmanager
def stop_signals(loop: asyncio.AbstractEventLoop, stop: Callable[[], None]) -> Iterator[None]:
    """SIGTERM and SIGINT become a graceful stop; handlers are removed on exit."""
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop)
    try:
        yield
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


def _edged_command() -> str:
    """How to run ``edged`` from another terminal: the venv's script when it is not on PATH."""
    script = Path(sys.executable).parent / "edged"
    on_path = shutil.which("edged") == str(script)
    return "edged" if on_path or not script.exists() else str(script)


async def in_fresh_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run blocking ``fn`` on a thread that ends with it: an idle default executor would keep
    its thread (and that thread's memory) for the daemon's whole life."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)


def _store_demo(store: ModelStore) -> Manifest:
    with tempfile.TemporaryDirectory() as tmp:
        log.info("building the demo model into %s (first start)", store.root)
        return store.add(DEMO_MODEL, build_demo_model(Path(tmp) / "model.onnx"), "onnx")


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.paths: Paths = resolve_paths(config)
        memory = config.memory
        budget = MemoryBudget(
            memory.budget_mb * MIB or None, memory.reserve_mb * MIB, self.paths.budget_file
        )
        self.registry = Registry(budget)
        self._load_lock = asyncio.Lock()
        self.service = InferenceService(self.registry)
        self._stop: asyncio.Event | None = None

    def run(self) -> None:
        loop = new_event_loop(self.config.daemon.event_loop)
        try:
            loop.run_until_complete(self.serve())
        finally:
            loop.close()

    def request_stop(self) -> None:
        if self._stop is not None and not self._stop.is_set():
            log.info("stop requested; draining")
            self._stop.set()

    async def serve(self) -> None:
        self._stop = asyncio.Event()
        async with contextlib.AsyncExitStack() as stack:
            await self.startup(stack)
            await self.main_loop(self._stop)
            await self.drain()
        log.info("stopped")

    async def main_loop(self, stop: asyncio.Event) -> None:
        """Serve until stopped; housekeeping hangs off one tick."""
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), TICK_S)
            self.registry.unload_idle(time.monotonic_ns())

    async def startup(self, stack: contextlib.AsyncExitStack) -> None:
        loop = asyncio.get_running_loop()
        self.paths.runtime.mkdir(parents=True, exist_ok=True)
        stack.enter_context(instance_lock(self.paths.lock_file, self.paths.infer_endpoint))
        # first in, last out: a SIGTERM during loading or teardown is still a graceful stop
        stack.enter_context(stop_signals(loop, self.request_stop))
        context: zmq.Context[Any] = zmq.Context()
        stack.callback(context.term)
        stack.callback(self.registry.close)
        declared = await in_fresh_thread(self._declared_models)
        for name, (version, model_config) in declared.items():
            slot = ModelSlot(name, version, model_config, self._load_runner, loop)
            self.registry.add(slot)
            if model_config.preload or model_config.pinned:
                await slot.load()
        endpoints = [self.paths.infer_endpoint, *self.config.server.tcp]
        endpoint = InferenceEndpoint(context, endpoints, self.config.server, self.service, loop)
        stack.callback(self.paths.infer_socket.unlink, missing_ok=True)
        endpoint.start()
        stack.callback(endpoint.stop)
        names = ", ".join(slot.name for slot in self.registry)
        log.info("serving %s on %s", names, ", ".join(endpoints))
        model = next(iter(self.registry)).name
        log.info("try: %s infer %s --random%s", _edged_command(), model, self._socket_hint())

    async def drain(self) -> None:
        """Refuse new work, let queued and running requests finish, answer the rest."""
        self.service.accepting = False
        timeout = self.config.daemon.drain_timeout_s
        try:
            await asyncio.wait_for(self._drained(), timeout)
        except asyncio.TimeoutError:
            log.warning("drain did not finish within %.1f s; answering the rest", timeout)
            for runner in self.registry.runners():
                runner.abort(ShuttingDown("the daemon stopped before this request could run"))

    async def _drained(self) -> None:
        await self.registry.settled()  # requests waiting for a load are answered when it ends
        await asyncio.gather(*(runner.drained() for runner in self.registry.runners()))

    def _declared_models(self) -> dict[str, tuple[int, ModelConfig]]:
        """Each model's version and file (blocking): its own ``path`` as version 1, or the
        newest store version; with none declared, the demo, stored on first start. A missing
        file fails the start rather than some sensor's first request."""
        store = ModelStore(self.paths.models)
        if not self.config.models:
            demo = store.latest(DEMO_MODEL) or _store_demo(store)
            path = str(store.model_path(demo))
            config = ModelConfig(path=path, backend="onnx", max_batch=8, preload=True)
            return {DEMO_MODEL: (demo.version, config)}
        declared = {}
        for name, config in self.config.models.items():
            if config.path:
                if not Path(config.path).is_file():
                    raise ModelLoadError(f"model {name!r}: no file at {config.path}")
                backend = config.backend_for(config.path)
                declared[name] = (1, dataclasses.replace(config, backend=backend))
                continue
            manifest = store.latest(name)
            if manifest is None:
                raise ModelLoadError(
                    f"model {name!r} has no path and the store has no version of it under "
                    f"{store.root / name}"
                )
            path = str(store.model_path(manifest))
            backend = config.backend_for(path, manifest.format)
            declared[name] = (
                manifest.version,
                dataclasses.replace(config, path=path, backend=backend),
            )
        return declared

    async def _load_runner(self, slot: ModelSlot) -> Runner:
        """Estimate, make room, load, measure. One load at a time, so that each measurement
        sees its own load only."""
        async with self._load_lock:
            estimate = await in_fresh_thread(self._estimate, slot.name, slot.config)
            self.registry.make_room(slot, self.registry.budget.expected(slot.name, estimate))
            before = footprint()
            backend = await in_fresh_thread(self._open_backend, slot.name, slot.config)
            kind = BACKENDS[slot.config.backend]
            measured = footprint() - before
            self.registry.budget.charge(slot.name, estimate, measured, learn_lower=kind.learn_lower)
        loop = asyncio.get_running_loop()
        runner = kind.runner(slot.name, slot.version, backend, slot.config, loop)
        runner.start()
        log.info("model %s version %d loaded", slot.name, slot.version)
        return runner

    def _estimate(self, name: str, config: ModelConfig) -> int:
        try:
            return BACKENDS[config.backend].estimate(config)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"model {name!r}: cannot load {config.path}: {exc}") from None

    def _open_backend(self, name: str, config: ModelConfig) -> Any:
        """Load one model (blocking: runs on a loader thread)."""
        path = Path(config.path)
        if not path.is_file():
            raise ModelLoadError(f"model {name!r}: no file at {path}")
        try:
            return BACKENDS[config.backend].load(config)
        except ModelLoadError:
            raise
        except Exception as exc:  # backends raise their own untyped errors for bad files
            raise ModelLoadError(f"model {name!r}: cannot load {path}: {exc}") from None

    def _socket_hint(self) -> str:
        endpoint = self.paths.infer_endpoint
        return "" if endpoint == default_infer_endpoint() else f" --socket {endpoint}"
