"""Property tests of the decoders against mutated valid messages: whatever arrives, decoding
either succeeds or raises the documented error (``RequestRejected`` carrying an ``EdgedError``
on the daemon's side, an ``EdgedError`` on the client's), never another exception, and never
slowly."""

from __future__ import annotations

import contextlib
import math
import random
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edged import protocol
from edged.control.ops.canary import Canary
from edged.control.ops.swap import VersionTarget
from edged.errors import EdgedError
from edged.models.calls import TextRequest
from edged.protocol import Limits, RequestRejected
from edged.requests import MAX_DEADLINE_MS, InferenceRequest
from tests.messages import (
    ABSURD_NUMBERS,
    ALL_OPS,
    EVERY_OP,
    mutate,
    valid_replies,
    valid_requests,
)

LIMITS = Limits(max_message_bytes=1 << 20)
REQUESTS = valid_requests()
REPLIES = valid_replies()
#: what decoding may refuse a message with (PROTOCOL §8, stage B)
DECODE_CODES = {"BAD_REQUEST", "UNSUPPORTED_VERSION", "UNKNOWN_OP", "FRAME_MISMATCH", "TOO_LARGE"}


def decode_request(frames: list[bytes]) -> protocol.Request | None:
    """The request, or None when it was refused with the documented error."""
    try:
        request = protocol.decode_request(frames, LIMITS, ALL_OPS)
    except RequestRejected as rejection:
        assert isinstance(rejection.error, EdgedError)
        assert rejection.error.code in DECODE_CODES, rejection.error
        return None
    assert request.op in EVERY_OP
    assert_usable(request)
    return request


def assert_usable(request: protocol.Request) -> None:
    """What the daemon computes from a decoded request's numbers and paths cannot fail: a
    deadline in nanoseconds, sampling settings, a canary's share, a file to open."""
    if isinstance(request, InferenceRequest) and request.deadline_ms is not None:
        assert 0 < request.deadline_ms <= MAX_DEADLINE_MS
        assert int(request.deadline_ms * 1e6) >= 0  # no overflow
    if isinstance(request, TextRequest):
        sampling = request.sampling
        for value in (sampling.temperature, sampling.top_p, sampling.min_p):
            assert math.isfinite(value)
        for value in (sampling.repeat_penalty, sampling.presence_penalty):
            assert math.isfinite(value)
        assert math.isfinite(sampling.frequency_penalty) and 0 <= sampling.top_k <= 10**6
    if isinstance(request, Canary):
        assert 0 < request.fraction <= 1
    if isinstance(request, VersionTarget):
        assert request.path is None or "\0" not in request.path


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


#: (op, key) of every number and path the decoder checks, with the rest of a valid header
CHECKED_FIELDS: dict[tuple[str, str], dict[str, Any]] = {
    ("infer", "deadline_ms"): {"model": "m", "inputs": []},
    ("generate", "deadline_ms"): {"model": "m", "prompt": "hi"},
    ("embed", "deadline_ms"): {"model": "m", "input": "hi"},
    ("generate", "max_tokens"): {"model": "m", "prompt": "hi"},
    ("generate", "temperature"): {"model": "m", "prompt": "hi"},
    ("generate", "top_p"): {"model": "m", "prompt": "hi"},
    ("generate", "top_k"): {"model": "m", "prompt": "hi"},
    ("generate", "min_p"): {"model": "m", "prompt": "hi"},
    ("generate", "repeat_penalty"): {"model": "m", "prompt": "hi"},
    ("generate", "presence_penalty"): {"model": "m", "prompt": "hi"},
    ("generate", "frequency_penalty"): {"model": "m", "prompt": "hi"},
    ("generate", "seed"): {"model": "m", "prompt": "hi"},
    ("chat", "deadline_ms"): {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    ("chat", "max_tokens"): {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    ("infer", "version"): {"model": "m", "inputs": []},
    ("cancel", "target"): {},
    ("canary", "fraction"): {"model": "m"},
    ("swap", "path"): {"model": "m"},
    ("canary", "path"): {"model": "m"},
}
ANY_VALUE = st.one_of(
    st.sampled_from(ABSURD_NUMBERS),
    st.floats(),
    st.integers(-(2**63), 2**64 - 1),
    st.text(alphabet=st.sampled_from("a/.\0\u00e9"), max_size=12),
)


@settings(max_examples=600, deadline=200)
@given(st.sampled_from(sorted(CHECKED_FIELDS)), ANY_VALUE)
def test_any_number_or_string_in_a_checked_field_is_refused_or_usable(
    field: tuple[str, str], value: Any
) -> None:
    op, key = field
    header = {"v": 1, "id": 1, "op": op, **CHECKED_FIELDS[field], key: value}
    decode_request([msgpack.packb(header)])


def test_every_valid_message_decodes() -> None:
    ops = [decode_request(frames).op for frames in REQUESTS]
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
        "canary",
    ]


def test_the_mutations_break_most_messages() -> None:
    """The properties would be empty if mutations rarely broke anything."""
    rng = random.Random(0)
    refused = sum(decode_request(mutate(rng, rng.choice(REQUESTS))) is None for _ in range(2000))
    assert refused > 1000
