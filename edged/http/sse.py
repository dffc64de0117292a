"""Server-Sent Events as OpenAI streams them: ``data: {chunk}`` per message, then
``data: [DONE]``; JSON bodies in the same compact encoding."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web

DONE = b"data: [DONE]\n\n"
#: a proxy in between must pass each event on at once, not buffer the stream
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
REQUEST_ID = "x-request-id"


def dumps(payload: Any) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


def json_response(payload: Mapping[str, Any], status: int = 200) -> web.Response:
    return web.json_response(payload, status=status, dumps=dumps)


class EventStream:
    """One streamed answer; its headers go out with the first event."""

    def __init__(self, trace: str) -> None:
        headers = {**HEADERS, REQUEST_ID: trace}
        self.response = web.StreamResponse(headers=headers)
        self.response.content_type = "text/event-stream"

    async def send(self, http: web.Request, payload: Mapping[str, Any]) -> None:
        if not self.response.prepared:
            await self.response.prepare(http)
        await self.response.write(b"data: " + dumps(payload).encode() + b"\n\n")

    async def end(self, done: bool = True) -> None:
        """End the stream, with ``[DONE]`` unless it ends on an error event."""
        if done:
            await self.response.write(DONE)
        await self.response.write_eof()
