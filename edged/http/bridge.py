"""The HTTP requests' way into the inference service, in process: a request is submitted as a
client's would be (one error path, one set of counters), and its replies come back through a
queue as the runner made them, never encoded.

Each HTTP request is a peer of its own, so ``cancel`` reaches exactly its request: leaving
a ``Submission`` before its final reply (a client that hung up, a cancelled handler) cancels
it, which frees the model's slot at its next token.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import numpy as np

from edged.errors import EdgedError
from edged.models.calls import Inference
from edged.protocol import new_trace
from edged.replies import ReplyTo
from edged.service import InferenceService

Outputs = Mapping[str, np.ndarray[Any, Any]]


@dataclass(frozen=True)
class Reply:
    """One success reply: partial (``more``) or final, with its outputs (``embed``'s)."""

    fields: dict[str, Any]
    outputs: Outputs = field(default_factory=dict)

    @property
    def final(self) -> bool:
        return not self.fields.get("more")


class QueueReply(ReplyTo):
    """Where one submitted request's replies go: into its queue, as they are. Once the
    submission is closed a send reports the client gone, as a vanished socket peer's does."""

    __slots__ = ("_queue", "open")

    def __init__(self, queue: asyncio.Queue[Reply | EdgedError], request_id: int) -> None:
        super().__init__(_never_encoded, request_id, None)
        self._queue = queue
        self.open = True

    def ok(self, fields: dict[str, Any], outputs: Outputs | None = None) -> bool:
        if self.open:
            self._queue.put_nowait(Reply(fields, outputs or {}))
        return self.open

    def fail(self, error: EdgedError) -> bool:
        if self.open:
            self._queue.put_nowait(error)
        return self.open


def _never_encoded(frames: list[Any]) -> bool:
    raise AssertionError("an in-process reply is never encoded")


class Submission:
    """One request in the service; ``next`` gives its replies in order, the final one last,
    and raises the error reply. Closing it before the final reply cancels the request."""

    def __init__(self, service: InferenceService, request: Inference, peer: bytes) -> None:
        self._service = service
        self.request = request
        self._peer = peer
        self._queue: asyncio.Queue[Reply | EdgedError] = asyncio.Queue()
        self._reply = QueueReply(self._queue, request.id)
        self.finished = False

    def start(self) -> None:
        """Through the inference socket's own op (whose handler is ``service.submit``), so
        errors are answered, counted and logged in the one place they all are."""
        self._service.handle(self.request, self._reply, self._peer)
        self._service.pump()

    async def next(self) -> Reply:
        event = await self._queue.get()
        if isinstance(event, EdgedError):
            self.finished = True
            raise event
        self.finished = event.final
        return event

    def close(self) -> None:
        self._reply.open = False
        if not self.finished:
            self.finished = True
            self._service.cancel(self._peer, self.request.id)

    def __enter__(self) -> Submission:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class Bridge:
    """Submits HTTP requests to the service, each with a fresh id, trace and peer."""

    def __init__(self, service: InferenceService) -> None:
        self.service = service
        self._ids = itertools.count(1)

    def envelope(self) -> tuple[int, str]:
        """A new request's id and trace."""
        return next(self._ids), new_trace()

    def submit(self, request: Inference) -> Submission:
        """Submit ``request``; an error found at once is its submission's first reply."""
        submission = Submission(self.service, request, b"http-%d" % request.id)
        submission.start()
        return submission
