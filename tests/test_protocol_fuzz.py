"""Property tests of the decoders against mutated valid messages: whatever arrives, decoding
either succeeds or raises the documented error (``RequestRejected`` carrying an ``EdgedError``
on the daemon's side, an ``EdgedError`` on the client's), never another exception, and never
slowly."""

from __future__ import annotations

import contextlib
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edged import protocol
from edged.errors import EdgedError
from edged.protocol import Limits, RequestRejected
from tests.messages import mutate, valid_replies, valid_requests

LIMITS = Limits(max_message_bytes=1 << 20)
REQUESTS = valid_requests()
REPLIES = valid_replies()
#: what decoding may refuse a message with (PROTOCOL §8, stage B)
DECODE_CODES = {"BAD_REQUEST", "UNSUPPORTED_VERSION", "UNKNOWN_OP", "FRAME_MISMATCH", "TOO_LARGE"}


def decode_request(frames: list[bytes]) -> protocol.Request | None:
    """The request, or None when it was refused with the documented error."""
    try:
        request = protocol.decode_request(frames, LIMITS)
    except RequestRejected as rejection:
        assert isinstance(rejection.error, EdgedError)
        assert rejection.error.code in DECODE_CODES, rejection.error
        return None
    assert request.op in protocol.OP_KEYS
    return request


@settings(max_examples=1500, deadline=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(REQUESTS), st.randoms(use_true_random=False))
def test_mutated_requests_only_raise_the_documented_error(
    frames: list[bytes], rng: random.Random
) -> None:
    decode_request(mutate(rng, frames))


@settings(max_examples=300, deadline=200)
@given(st.lists(st.binary(max_size=64), max_size=4))
def test_arbitrary_requests_only_raise_the_documented_error(frames: list[bytes]) -> None:
    decode_request(frames)


@settings(max_examples=500, deadline=200)
@given(st.sampled_from(REPLIES), st.randoms(use_true_random=False))
def test_mutated_replies_only_raise_edged_errors(frames: list[bytes], rng: random.Random) -> None:
    try:
        reply = protocol.decode_reply(mutate(rng, frames), LIMITS)
    except EdgedError:
        return
    assert reply.error is None or isinstance(reply.error, EdgedError)


@settings(max_examples=300, deadline=200)
@given(st.lists(st.binary(max_size=64), max_size=4))
def test_arbitrary_replies_only_raise_edged_errors(frames: list[bytes]) -> None:
    with contextlib.suppress(EdgedError):
        protocol.decode_reply(frames, LIMITS)


def test_every_valid_message_decodes() -> None:
    ops = [protocol.decode_request(frames, LIMITS).op for frames in REQUESTS]
    assert ops == [
        "infer",
        "generate",
        "embed",
        "cancel",
        "describe",
        "swap",
        "logs",
        "install",
        "upload",
    ]


def test_the_mutations_break_most_messages() -> None:
    """The properties would be empty if mutations rarely broke anything."""
    rng = random.Random(0)
    refused = sum(decode_request(mutate(rng, rng.choice(REQUESTS))) is None for _ in range(2000))
    assert refused > 1000
