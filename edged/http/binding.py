"""Where the HTTP endpoint listens (``config.http_binding``), and aiohttp loaded for it, checked
before the daemon opens anything."""

from __future__ import annotations

import sys
from typing import cast

from edged.config import Binding, HttpConfig, http_binding
from edged.errors import ConfigError

INSTALL_HINT = "pip install 'edged[http]'"


def check_listen(http: HttpConfig, source: str) -> Binding | None:
    """The binding ``[http] listen`` asks for (``None`` when it is off), with aiohttp loaded;
    a ``ConfigError`` when the address is wrong or aiohttp is not installed."""
    binding = http_binding(http, source)
    if binding is not None:
        _load_aiohttp(source)
    return binding


def _load_aiohttp(source: str) -> None:
    """Import aiohttp's server, or say how to install it. The daemon keeps ``ssl`` out of its
    idle memory (``edged.cli``); aiohttp's standard-library imports want it whole, so a daemon
    that serves HTTP lets it in, as the metrics do when first asked for."""
    if cast("object | None", sys.modules.get("ssl", sys)) is None:
        del sys.modules["ssl"]
    try:
        import aiohttp.web  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"{source}: 'http.listen' is set but aiohttp is not installed: {INSTALL_HINT}"
        ) from None
