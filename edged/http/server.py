"""The HTTP endpoint's lifetime in the daemon: bound once the sockets are up, deaf to new
connections as soon as a stop begins (requests under way finish during the drain, as the
sockets' do), closed once the drain is over."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

from aiohttp import web

from edged.config import MIB, Binding, HttpConfig, is_loopback
from edged.http.bridge import Bridge
from edged.http.routes import build_app
from edged.service import InferenceService

log = logging.getLogger(__name__)

#: after the drain, how long a response still being written may take before it is cut
CLOSE_TIMEOUT_S = 1.0


class HttpEndpoint:
    def __init__(self, binding: Binding, config: HttpConfig, service: InferenceService) -> None:
        self.binding = binding
        app = build_app(Bridge(service), service.registry, config.max_body_mb * MIB)
        # a client that hangs up cancels its handler, and with it its generation
        self._runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,
            handler_cancellation=True,
            shutdown_timeout=CLOSE_TIMEOUT_S,
        )

    async def start(self) -> None:
        binding = self.binding
        if binding.path:
            _check_unused(binding.path)
        await self._runner.setup()
        site: web.BaseSite
        if binding.path:
            site = web.UnixSite(self._runner, binding.path)
        else:
            site = web.TCPSite(self._runner, binding.host, binding.port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise OSError(f"cannot bind the HTTP endpoint to {binding.url}: {exc}") from None
        log.info("OpenAI-compatible HTTP API on %s (/v1)", binding.url)
        if binding.host and not is_loopback(binding.host):
            log.warning(
                "http.public: the HTTP API on %s answers ANY client that reaches it, "
                "unauthenticated and unencrypted",
                binding.url,
            )

    async def stop_listening(self) -> None:
        for site in list(self._runner.sites):
            await site.stop()

    async def close(self) -> None:
        await self._runner.cleanup()
        self._remove_socket_file()

    def _remove_socket_file(self) -> None:
        """asyncio leaves a Unix socket's file behind before Python 3.13."""
        if self.binding.path:
            Path(self.binding.path).unlink(missing_ok=True)


def _check_unused(path: str) -> None:
    """Refuse a Unix socket another process listens on: asyncio would replace its file (as it
    should a stale one, left by a crash)."""
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(path)
        except OSError:
            return
    raise OSError(f"cannot bind the HTTP endpoint to unix:{path}: another process listens there")
