"""``config``: the configuration in effect (as the last reload left it), every default filled
in, secrets redacted."""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING, Any

from edged.opunit import Op
from edged.protocol import Request
from edged.replies import ReplyTo

if TYPE_CHECKING:
    from edged.control.service import ControlService

#: config keys whose values are not shown (key material, credentials)
SECRET = re.compile(r"secret|password|token|_key$")
REDACTED = "<redacted>"


def config(control: ControlService, request: Request, reply: ReplyTo, peer: bytes) -> None:
    current = control.reloader.config
    reply.ok({"source": current.source, "config": _redacted(dataclasses.asdict(current))})


def _redacted(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _redacted(v, k) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redacted(v) for v in value]
    if value and SECRET.search(key):
        return REDACTED
    return value


OP = Op("config", Request, config, help="the configuration in effect, secrets redacted")
