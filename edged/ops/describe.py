"""``describe``: a model's inputs, outputs and settings, as its runner tells them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edged.opunit import Op
from edged.replies import ReplyTo
from edged.requests import VersionedRequest

if TYPE_CHECKING:
    from edged.service import InferenceService


def describe(
    service: InferenceService, request: VersionedRequest, reply: ReplyTo, peer: bytes
) -> None:
    runner = service.loaded(request, reply, peer)
    if runner is None:  # answered once the model has loaded
        return
    fields = {"model": runner.name, "version": runner.version, **runner.describe()}
    reply.ok(fields)


OP = Op("describe", VersionedRequest, describe)
