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
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import zmq

from edged import faults
from edged.chains import Chain
from edged.collections.service import Collections
from edged.config import Config, ModelConfig
from edged.control.auth import HandshakeLog, curve_server, load_server_keys, start_authenticator
from edged.control.logring import LogRing
from edged.control.metrics import Metrics
from edged.control.ops import socket_tables
from edged.control.reload import Reloader
from edged.control.service import ControlService
from edged.demo import build_demo_model
from edged.drift.monitor import DriftMonitors
from edged.errors import ConfigError, ShuttingDown
from edged.heap import HeapTrimmer
from edged.http.binding import check_listen
from edged.lockfile import instance_lock
from edged.models.budget import MIB, MemoryBudget
from edged.models.loading import ModelLoader, in_fresh_thread
from edged.models.registry import ModelSlot, Registry, VersionSpec
from edged.models.swap import Swapper
from edged.ota.journal import Journal
from edged.paths import Paths, default_infer_endpoint, resolve_paths
from edged.regions import RegionListener, RegionTable
from edged.sdnotify import Notifier
from edged.server import Endpoint, Service
from edged.service import InferenceService
from edged.store import Manifest, ModelStore
from edged.tasks import TaskGroup
from edged.watchdog import Watchdog

if TYPE_CHECKING:
    from edged.http.server import HttpEndpoint

log = logging.getLogger(__name__)
T = TypeVar("T")

DEMO_MODEL = "demo"
#: housekeeping period (idle unloads)
TICK_S = 1.0


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
def signal_handlers(
    loop: asyncio.AbstractEventLoop, stop: Callable[[], None], reload: Callable[[], None]
) -> Iterator[None]:
    """SIGTERM and SIGINT become a graceful stop, SIGHUP a reload; removed on exit."""
    handlers = {signal.SIGTERM: stop, signal.SIGINT: stop, signal.SIGHUP: reload}
    for sig, handler in handlers.items():
        loop.add_signal_handler(sig, handler)
    try:
        yield
    finally:
        for sig in handlers:
            loop.remove_signal_handler(sig)


def _edged_command() -> str:
    """How to run ``edged`` from another terminal: the venv's script when it is not on PATH."""
    script = Path(sys.executable).parent / "edged"
    on_path = shutil.which("edged") == str(script)
    return "edged" if on_path or not script.exists() else str(script)


def _try_args(config: ModelConfig) -> str:
    """Arguments of ``edged infer`` that work on a model of this kind: random tensors for an
    ONNX model, text for a GGUF one (a prompt, or a text to embed)."""
    if config.backend != "gguf":
        return "--random"
    return '--embed "hello"' if config.gguf.embedding else '--prompt "Hello"'


def _store_demo(store: ModelStore) -> Manifest:
    with tempfile.TemporaryDirectory() as tmp:
        log.info("building the demo model into %s (first start)", store.root)
        return store.add(DEMO_MODEL, build_demo_model(Path(tmp) / "model.onnx"), "onnx")


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self._http_binding = check_listen(config.http, config.source)  # before anything opens
        self.paths: Paths = resolve_paths(config)
        memory = config.memory
        budget = MemoryBudget(
            memory.budget_mb * MIB or None, memory.reserve_mb * MIB, self.paths.budget_file
        )
        self.registry = Registry(budget)
        #: every background task, cancelled (newest first) when the daemon stops
        self.tasks = TaskGroup()
        self.loader = ModelLoader(
            self.registry, ModelStore(self.paths.models), self.paths.state / "cache"
        )
        self.drift = DriftMonitors(self.paths.state / "drift")
        self.loader.drift = self.drift
        swapper = Swapper(self.registry, self.loader, config.daemon.swap_grace_s)
        reloader = Reloader(config, self.registry, self.loader, swapper, self.tasks)
        data_ops, control_ops = socket_tables()
        server = config.server
        self.regions = RegionTable(server.max_regions, server.max_region_mb * MIB)
        self.service = InferenceService(self.registry, data_ops, self.regions)
        self.service.collections = Collections(
            config.collections,
            self.paths.state / "collections",
            self.service,
            self.tasks,
            self.registry.budget,
        )
        self.service.chains = {
            name: Chain(name, chain, self.service, self.tasks)
            for name, chain in config.chains.items()
        }
        self.metrics = Metrics(self.registry, self.service.errors, self.service.regions)
        self.metrics.drift = self.drift
        self.logs = LogRing()
        self.journal = Journal(self.paths.state / "ota")
        installer = None
        if config.ota.trusted_keys:  # imported only here: cryptography is not small
            from edged.ota.install import Installer
            from edged.ota.keys import TrustedKeys

            installer = Installer(
                self.registry,
                self.loader,
                swapper,
                journal=self.journal,
                config=config.ota,
                trusted=TrustedKeys(Path(config.ota.trusted_keys)),
                tasks=self.tasks,
                collections=self.service.collections,
            )
        self._installer = installer
        self.control = ControlService(
            control_ops,
            self.registry,
            self.loader,
            swapper,
            reloader,
            self.metrics,
            self.service,
            self.logs,
            str(self.paths.state),
            installer,
            self.tasks,
        )
        self.notifier = Notifier()
        self.watchdog = Watchdog(
            self.registry, self.service, self.notifier, config.daemon.stuck_run_s
        )
        self.heap = HeapTrimmer()
        self._http: HttpEndpoint | None = None
        self._stop: asyncio.Event | None = None
        #: set by a second stop request: skip the rest of the drain
        self._hurry: asyncio.Event | None = None

    def run(self) -> None:
        loop = new_event_loop(self.config.daemon.event_loop)
        try:
            loop.run_until_complete(self.serve())
        finally:
            loop.close()

    def request_stop(self) -> None:
        """The first stop drains; a second one (an impatient Ctrl-C, a repeated SIGTERM) stops
        without waiting for the drain, answering what is left, as uvicorn does."""
        if self._stop is None or self._hurry is None:
            return
        if not self._stop.is_set():
            log.info("stop requested; draining (stop again to skip the drain)")
            self.notifier.stopping()
            self._stop.set()
        elif not self._hurry.is_set():
            log.info("second stop request: answering what is left without draining")
            self._hurry.set()

    def _reload(self) -> None:
        """SIGHUP: re-read the config, telling systemd (RELOADING=1, then READY=1)."""
        self.notifier.reloading()
        self.control.reload_later(done=lambda: self.notifier.ready(self.watchdog.status()))

    async def serve(self) -> None:
        self._stop, self._hurry = asyncio.Event(), asyncio.Event()
        async with contextlib.AsyncExitStack() as stack:
            await self.startup(stack)
            await self.main_loop(self._stop)
            if self._http is not None:  # no new connections; requests under way drain
                await self._http.stop_listening()
            await self.drain()
        log.info("stopped")

    async def main_loop(self, stop: asyncio.Event) -> None:
        """Serve until stopped; housekeeping hangs off one tick."""
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), TICK_S)
            faults.point("daemon.tick")
            self.watchdog.tick()
            self.registry.unload_idle(time.monotonic_ns())
            await self.heap.tick()
            if self._installer is not None and self.config.ota.inbox:
                self._installer.poll(Path(self.config.ota.inbox))

    async def startup(self, stack: contextlib.AsyncExitStack) -> None:
        loop = asyncio.get_running_loop()
        self.logs.attach(loop)
        logging.getLogger().addHandler(self.logs)
        stack.callback(logging.getLogger().removeHandler, self.logs)
        self.paths.runtime.mkdir(parents=True, exist_ok=True)
        stack.enter_context(instance_lock(self.paths.lock_file, self.paths.infer_endpoint))
        # first in, last out: a SIGTERM during loading or teardown is still a graceful stop
        stack.enter_context(signal_handlers(loop, self.request_stop, self._reload))
        context: zmq.Context[Any] = zmq.Context()
        stack.callback(context.term)
        stack.callback(self.drift.close)  # after the models close: nothing profiles then
        stack.callback(self.registry.close)
        # before the models close, after the sockets stop: what still runs in the background
        # (a swap, a load, an install) is cancelled, newest first
        stack.push_async_callback(self.tasks.close)
        await in_fresh_thread(self._recover)
        declared = await in_fresh_thread(self._declared_models)
        if self.config.ota.inbox:  # there before any agent looks for it
            await in_fresh_thread(Path(self.config.ota.inbox).mkdir, 0o755, True, True)
        for name, spec in declared.items():
            slot = ModelSlot(name, spec, self.loader.load, self.tasks)
            self.registry.add(slot)
            if spec.config.preload or spec.config.pinned:
                await slot.load()
        self.service.collections.start()
        stack.push_async_callback(self.service.collections.close)  # after the sockets stop
        paths = self.paths
        endpoints: list[tuple[Path, list[str], Service]] = [
            (paths.infer_socket, [paths.infer_endpoint, *self.config.server.tcp], self.service),
            (paths.control_socket, [paths.control_endpoint], self.control),
        ]
        for socket_file, addresses, service in endpoints:
            endpoint = Endpoint(context, addresses, self.config.server, service, loop)
            stack.callback(socket_file.unlink, missing_ok=True)
            endpoint.start()
            stack.callback(endpoint.stop)
        regions = RegionListener(paths.runtime / "regions.sock", self.regions, loop)
        regions.start()  # created like infer.sock: in the same directory, under the same umask
        stack.callback(regions.stop)
        remote = self._remote_control(stack, context, loop)
        if self.config.metrics.http:
            stack.callback(self.metrics.serve_http(self.config.metrics.http))
        if self._http_binding is not None:  # only a daemon that serves HTTP loads aiohttp
            from edged.http.server import HttpEndpoint

            self._http = HttpEndpoint(self._http_binding, self.config.http, self.service)
            await self._http.start()
            stack.push_async_callback(self._http.close)
        names = ", ".join(slot.name for slot in self.registry)
        serving = [address for _, addresses, _ in endpoints for address in addresses] + remote
        log.info("serving %s on %s", names, ", ".join(serving))
        first = next(iter(self.registry))
        hint = f"{_edged_command()} infer {first.name} {_try_args(first.config)}"
        log.info("try: %s%s", hint, self._socket_hint())
        self.notifier.ready(self.watchdog.status())

    def _remote_control(
        self, stack: contextlib.AsyncExitStack, context: zmq.Context[Any], loop: Any
    ) -> list[str]:
        """The control socket on TCP: CurveZMQ with an allow-list, unless ``insecure``."""
        control = self.config.control
        if not control.tcp:
            return []
        configure = None
        if control.server_key:
            public, secret = load_server_keys(Path(control.server_key))
            # ZAP must be running before the CURVE socket binds; it stops after the socket
            authenticator = start_authenticator(context, Path(control.authorized_keys))
            stack.callback(authenticator.stop)
            configure = curve_server(public, secret)
        else:
            log.warning(
                "control.insecure: the control socket on %s accepts ANY client, unauthenticated "
                "and unencrypted: anyone who reaches it can swap, unload and reconfigure models",
                ", ".join(control.tcp),
            )
        endpoint = Endpoint(
            context, list(control.tcp), self.config.server, self.control, loop, configure=configure
        )
        endpoint.start()
        stack.callback(endpoint.stop)
        if configure is not None:
            stack.callback(HandshakeLog(endpoint.socket, loop).close)
        return list(control.tcp)

    async def drain(self) -> None:
        """Refuse new work, let queued and running requests finish, answer the rest (at the
        drain timeout, or at once on a second stop request)."""
        self.service.accepting = False
        timeout = self.config.daemon.drain_timeout_s
        drained = asyncio.ensure_future(self._drained())
        waits: set[asyncio.Future[Any]] = {drained}
        if self._hurry is not None:
            waits.add(asyncio.ensure_future(self._hurry.wait()))
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        if drained.done() and not drained.cancelled():
            return
        if self._hurry is not None and self._hurry.is_set():
            log.info("stopping without draining; answering the rest")
        else:
            log.warning("drain did not finish within %.1f s; answering the rest", timeout)
        for runner in self.registry.runners():
            runner.abort(ShuttingDown("the daemon stopped before this request could run"))

    async def _drained(self) -> None:
        await self.registry.settled()  # requests waiting for a load are answered when it ends
        await asyncio.gather(*(runner.drained() for runner in self.registry.runners()))

    def _recover(self) -> None:
        """Settle what a crash or power cut interrupted, before any model loads (blocking)."""
        self.loader.store.sweep()
        self.journal.recover(self.loader.store, self.service.collections.directory)

    def _declared_models(self) -> dict[str, VersionSpec]:
        """Each declared model's version (blocking); with none declared, the demo, stored on
        first start."""
        store = self.loader.store
        if not self.config.models:
            demo = store.latest(DEMO_MODEL) or _store_demo(store)
            config = ModelConfig(backend="onnx", max_batch=8, preload=True)
            return {DEMO_MODEL: self.loader.stored(DEMO_MODEL, config, demo.version)}
        return {name: self.loader.at_start(name, c) for name, c in self.config.models.items()}

    def _socket_hint(self) -> str:
        endpoint = self.paths.infer_endpoint
        return "" if endpoint == default_infer_endpoint() else f" --socket {endpoint}"
