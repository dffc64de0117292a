"""The daemon's lifecycle: startup -> serve -> drain -> stop, owning every resource it opens.

Everything started in ``startup`` is registered on one ``AsyncExitStack``, so sockets, run
threads, the ZeroMQ context, socket files and the instance lock are released in reverse order,
also when startup fails half-way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import zmq

from edged.config import Config, ModelConfig
from edged.demo import ensure_demo_model
from edged.errors import ConfigError, ModelLoadError, ShuttingDown
from edged.lockfile import instance_lock
from edged.models.backend import Backend
from edged.models.onnx import OnnxBackend
from edged.models.registry import Registry
from edged.models.runner import ModelRunner
from edged.paths import Paths, default_infer_endpoint, resolve_paths
from edged.server import InferenceEndpoint
from edged.service import InferenceService

log = logging.getLogger(__name__)

DEMO_MODEL = "demo"


def _load_onnx(config: ModelConfig) -> Backend:
    return OnnxBackend.load(Path(config.path), config.onnx)


BACKENDS: dict[str, Callable[[ModelConfig], Backend]] = {"onnx": _load_onnx}


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


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.paths: Paths = resolve_paths(config)
        self.registry = Registry()
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
            await self._stop.wait()
            await self.drain()
        log.info("stopped")

    async def startup(self, stack: contextlib.AsyncExitStack) -> None:
        loop = asyncio.get_running_loop()
        self.paths.runtime.mkdir(parents=True, exist_ok=True)
        stack.enter_context(instance_lock(self.paths.lock_file, self.paths.infer_endpoint))
        # first in, last out: a SIGTERM during loading or teardown is still a graceful stop
        stack.enter_context(stop_signals(loop, self.request_stop))
        context: zmq.Context[Any] = zmq.Context()
        stack.callback(context.term)
        # A loader thread that ends with startup: an idle default executor would keep its
        # thread (and its memory) for the daemon's whole life.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="load") as loader:
            for name, model_config in self._model_configs().items():
                backend = await loop.run_in_executor(loader, self._open_backend, name, model_config)
                runner = ModelRunner(name, 1, backend, model_config, loop)
                stack.callback(runner.close)
                runner.start()
                self.registry.add(runner)
        endpoints = [self.paths.infer_endpoint, *self.config.server.tcp]
        endpoint = InferenceEndpoint(context, endpoints, self.config.server, self.service, loop)
        stack.callback(self.paths.infer_socket.unlink, missing_ok=True)
        endpoint.start()
        stack.callback(endpoint.stop)
        names = ", ".join(runner.name for runner in self.registry)
        log.info("serving %s on %s", names, ", ".join(endpoints))
        model = next(iter(self.registry)).name
        log.info("try: %s infer %s --random%s", _edged_command(), model, self._socket_hint())

    async def drain(self) -> None:
        """Refuse new work, let queued and running requests finish, answer the rest."""
        self.service.accepting = False
        timeout = self.config.daemon.drain_timeout_s
        try:
            await asyncio.wait_for(
                asyncio.gather(*(runner.drained() for runner in self.registry)), timeout
            )
        except asyncio.TimeoutError:
            log.warning("drain did not finish within %.1f s; answering the rest", timeout)
            for runner in self.registry:
                runner.abort(ShuttingDown("the daemon stopped before this request could run"))

    def _model_configs(self) -> dict[str, ModelConfig]:
        if self.config.models:
            return self.config.models
        path = self.paths.models / DEMO_MODEL / "1" / "model.onnx"
        return {DEMO_MODEL: ModelConfig(path=str(path), max_batch=8)}

    def _open_backend(self, name: str, config: ModelConfig) -> Backend:
        """Load one model (blocking: runs in an executor); builds the demo on first start."""
        path = Path(config.path)
        if name == DEMO_MODEL and not self.config.models and not path.is_file():
            log.info("building the demo model at %s (first start)", path)
            ensure_demo_model(path)
        if not path.is_file():
            raise ModelLoadError(f"model {name!r}: no file at {path}")
        try:
            return BACKENDS[config.backend](config)
        except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
            raise ModelLoadError(f"model {name!r}: cannot load {path}: {exc}") from None

    def _socket_hint(self) -> str:
        endpoint = self.paths.infer_endpoint
        return "" if endpoint == default_infer_endpoint() else f" --socket {endpoint}"
