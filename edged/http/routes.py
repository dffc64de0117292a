"""The endpoint's routes: each reads an OpenAI request, submits it through the bridge and
answers in OpenAI's shape, whole or as a stream of events.

A streamed answer's headers wait for the daemon's first reply, so a request refused at once
(an unknown model, a full queue, a prompt too long) still gets its HTTP status. Leaving a
handler by any path (done, failed, or cancelled because its client hung up) closes its
submission, which cancels a generation still running.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from edged.errors import BadRequest, EdgedError, InternalError, UnknownModel
from edged.http import errors, parse, shapes
from edged.http.bridge import Bridge, Reply, Submission
from edged.http.shapes import ChatShape, CompletionShape, TextShape
from edged.http.sse import REQUEST_ID, EventStream, json_response
from edged.models.registry import ModelSlot, Registry

log = logging.getLogger(__name__)

#: the ops a model must serve to be listed
TEXT_OPS = frozenset({"generate", "chat", "embed"})
#: OpenAI-style codes of the HTTP layer's own refusals
HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}


#: a text or embedding route: the HTTP request, and the new request's id and trace
Handler = Callable[[web.Request, int, str], Awaitable[web.StreamResponse]]
Route = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Routes:
    def __init__(self, bridge: Bridge, registry: Registry) -> None:
        self.bridge = bridge
        self.registry = registry
        #: what ``/v1/models`` gives as each model's creation time
        self.created = int(time.time())

    async def models(self, http: web.Request) -> web.Response:
        data = [
            shapes.model_entry(slot.name, self.created) for slot in self.registry if _serves(slot)
        ]
        return json_response({"object": "list", "data": data})

    async def model(self, http: web.Request) -> web.Response:
        name = http.match_info["model"]
        if not any(slot.name == name and _serves(slot) for slot in self.registry):
            raise UnknownModel(f"no model named {name!r} serves this endpoint")
        return json_response(shapes.model_entry(name, self.created))

    async def completions(
        self, http: web.Request, request_id: int, trace: str
    ) -> web.StreamResponse:
        call = parse.completion(await read_json(http), request_id, trace)
        request = call.request
        shape = CompletionShape(trace, request.model, int(time.time()), request.prompt)
        return await self._text(http, call, shape)

    async def chat(self, http: web.Request, request_id: int, trace: str) -> web.StreamResponse:
        call = parse.chat(await read_json(http), request_id, trace)
        return await self._text(http, call, ChatShape(trace, call.request.model, int(time.time())))

    async def embeddings(self, http: web.Request, request_id: int, trace: str) -> web.Response:
        call = parse.embedding(await read_json(http), request_id, trace)
        with self.bridge.submit(call.request) as submission:
            reply = await submission.next()
        vectors = reply.outputs["embedding"]
        return json_response(
            shapes.embeddings(call.request.model, vectors, reply.fields, call.base64)
        )

    def traced(self, handler: Handler) -> Route:
        """``handler`` with a new request id and trace; the trace is the response's request
        id, its error's too."""

        async def handle(http: web.Request) -> web.StreamResponse:
            request_id, trace = self.bridge.envelope()
            try:
                response = await handler(http, request_id, trace)
            except EdgedError as error:
                response = error_response(error)
            if not response.prepared:
                response.headers[REQUEST_ID] = trace
            return response

        return handle

    async def _text(
        self, http: web.Request, call: parse.TextCall[Any], shape: TextShape
    ) -> web.StreamResponse:
        with self.bridge.submit(call.request) as submission:
            first = await submission.next()  # an error here is answered with its status
            if not call.stream:
                return json_response(await _whole(submission, first, shape))
            return await _stream(http, submission, first, shape, call.include_usage)


async def _whole(submission: Submission, reply: Reply, shape: TextShape) -> dict[str, Any]:
    partials = []
    while not reply.final:
        partials.append(reply.fields)
        reply = await submission.next()
    return shape.body(partials, reply.fields)


async def _stream(
    http: web.Request, submission: Submission, reply: Reply, shape: TextShape, usage: bool
) -> web.StreamResponse:
    """One event per reply the daemon sends; an error after the first one ends the stream
    with an error event (OpenAI's clients raise it) and no ``[DONE]``."""
    events = EventStream(shape.trace)
    try:
        while not reply.final:
            await events.send(http, shape.chunk(reply.fields))
            reply = await submission.next()
    except EdgedError as error:
        await events.send(http, errors.error_body(error))
        await events.end(done=False)
        return events.response
    except ConnectionResetError:  # the client hung up: leaving cancels the generation
        return events.response
    await events.send(http, shape.end_chunk(reply.fields))
    if usage:
        await events.send(http, shape.usage_chunk(reply.fields))
    await events.end()
    return events.response


async def read_json(http: web.Request) -> dict[str, Any]:
    """The body as a JSON object (aiohttp refuses one over ``max_body_mb``: 413)."""
    if http.content_type != "application/json":
        raise BadRequest(
            f"the body must be JSON, sent as application/json, not {http.content_type}"
        )
    raw = await http.read()
    try:
        body = json.loads(raw)
    except ValueError as exc:  # UnicodeDecodeError is one too
        raise BadRequest(f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def _serves(slot: ModelSlot) -> bool:
    """Whether the model serves a text op: as its runner says once loaded, else by its
    declaration (GGUF models and ONNX text encoders serve text, other ONNX ones tensors)."""
    runner = slot.runner
    if runner is not None:
        return bool(runner.ops & TEXT_OPS)
    return slot.config.backend == "gguf" or slot.config.embed is not None


def error_response(error: EdgedError) -> web.Response:
    response = json_response(errors.error_body(error), errors.error_status(error))
    if response.status in errors.RETRYABLE:
        response.headers["Retry-After"] = errors.RETRY_AFTER_S
    return response


@web.middleware
async def openai_errors(request: web.Request, handler: Route) -> web.StreamResponse:
    """Every refusal in OpenAI's error shape: the routes' own, and aiohttp's."""
    try:
        response = await handler(request)
    except EdgedError as error:
        return error_response(error)
    except web.HTTPException as exc:  # no such route, wrong method, body too large
        code = HTTP_CODES.get(exc.status, exc.reason.lower().replace(" ", "_"))
        return json_response(errors.body(exc.status, exc.text or exc.reason, code), exc.status)
    except ConnectionError:
        raise
    except Exception:
        log.exception("HTTP %s %s failed", request.method, request.path)
        return error_response(InternalError("internal error; the daemon log has the details"))
    return response


def build_app(bridge: Bridge, registry: Registry, max_body_bytes: int) -> web.Application:
    app = web.Application(middlewares=[openai_errors], client_max_size=max_body_bytes)
    routes = Routes(bridge, registry)
    app.router.add_get("/v1/models", routes.models)
    app.router.add_get("/v1/models/{model}", routes.model)
    app.router.add_post("/v1/completions", routes.traced(routes.completions))
    app.router.add_post("/v1/chat/completions", routes.traced(routes.chat))
    app.router.add_post("/v1/embeddings", routes.traced(routes.embeddings))
    return app
