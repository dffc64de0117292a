"""Decoding generate/embed/cancel requests, and stop sequences that never leak into a stream."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from edged import protocol
from edged.errors import BadRequest
from edged.models.calls import Generate, Sampling
from edged.models.slots import StopScanner
from edged.protocol import Limits, RequestRejected
from tests.messages import decode_request

LIMITS = Limits()


def decode(**header: Any) -> protocol.Request:
    return decode_request([msgpack.packb({"v": 1, "id": 3, **header})], LIMITS)


def test_generate_takes_llama_cpp_defaults_and_a_single_stop_string() -> None:
    request = decode(op="generate", model="m", prompt="hi")
    assert isinstance(request, Generate) and request.prompt == "hi"
    assert request.sampling == Sampling(
        max_tokens=128, stop=(), temperature=0.8, top_p=0.95, seed=None, top_k=40, min_p=0.05
    )
    assert request.sampling.repeat_penalty == 1.0 and request.sampling.presence_penalty == 0.0
    assert request.sampling.frequency_penalty == 0.0
    nils = dict.fromkeys(
        ("max_tokens", "stop", "temperature", "top_p", "seed", "top_k", "min_p", "repeat_penalty")
    )
    again = decode(op="generate", model="m", prompt="hi", **nils)
    assert isinstance(again, Generate) and again.sampling == request.sampling
    request = decode(op="generate", model="m", prompt="hi", stop="\n", temperature=0, seed=5)
    assert isinstance(request, Generate)
    assert request.sampling.stop == ("\n",) and request.sampling.temperature == 0.0
    assert request.sampling.seed == 5
    tuned = decode(
        op="generate",
        model="m",
        prompt="hi",
        top_k=0,
        min_p=0,
        repeat_penalty=1.3,
        presence_penalty=-0.5,
        frequency_penalty=2,
    )
    assert isinstance(tuned, Generate)
    sampling = tuned.sampling
    assert (sampling.top_k, sampling.min_p, sampling.repeat_penalty) == (0, 0.0, 1.3)
    assert (sampling.presence_penalty, sampling.frequency_penalty) == (-0.5, 2.0)
    assert isinstance(sampling.frequency_penalty, float)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"prompt": ""}, "'prompt' must be a non-empty string"),
        ({"prompt": "x", "max_tokens": 0}, "'max_tokens' must be an integer"),
        ({"prompt": "x", "max_tokens": 1.5}, "'max_tokens' must be an integer"),
        ({"prompt": "x", "stop": [""]}, "'stop' must be"),
        ({"prompt": "x", "stop": ["a"] * 17}, "'stop' must be"),
        ({"prompt": "x", "temperature": -1}, "'temperature' must be"),
        ({"prompt": "x", "temperature": float("nan")}, "'temperature' must be"),
        ({"prompt": "x", "top_p": 0}, "'top_p' must be"),
        ({"prompt": "x", "seed": -1}, "'seed' must be"),
        ({"prompt": "x", "top_k": -1}, "'top_k' must be an integer"),
        ({"prompt": "x", "top_k": 2.0}, "'top_k' must be an integer"),
        ({"prompt": "x", "min_p": 1.5}, "'min_p' must be"),
        ({"prompt": "x", "repeat_penalty": 0}, "'repeat_penalty' must be"),
        ({"prompt": "x", "repeat_penalty": float("inf")}, "'repeat_penalty' must be"),
        ({"prompt": "x", "presence_penalty": 3}, "'presence_penalty' must be"),
        ({"prompt": "x", "frequency_penalty": float("nan")}, "'frequency_penalty' must be"),
        ({"prompt": "x", "seed": True}, "'seed' must be"),
        ({"prompt": "x", "inputs": []}, "unknown header key"),
    ],
)
def test_bad_generate_fields_are_bad_requests_naming_the_key(
    fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(RequestRejected) as info:
        decode(op="generate", model="m", **fields)
    assert isinstance(info.value.error, BadRequest) and message in str(info.value)
    assert info.value.request_id == 3


def test_embed_takes_one_text_or_a_list_and_cancel_a_target_id() -> None:
    assert decode(op="embed", model="m", input="a").texts == ("a",)
    assert decode(op="embed", model="m", input=["a", "b"]).texts == ("a", "b")
    assert decode(op="cancel", target=9).target == 9
    for header in (
        {"op": "embed", "model": "m", "input": []},
        {"op": "embed", "model": "m", "input": [1]},
        {"op": "embed", "model": "m"},
        {"op": "cancel"},
        {"op": "cancel", "target": -1},
        {"op": "cancel", "target": 1, "model": "m"},
        {"op": "generate", "prompt": "x"},
    ):
        with pytest.raises(RequestRejected):
            decode(**header)


def test_stop_scanner_holds_back_what_may_become_a_stop_sequence() -> None:
    scanner = StopScanner(("END", "\n\n"))
    assert scanner.feed("hello E") == ("hello ", False)
    assert scanner.feed("N") == ("", False)
    assert scanner.feed("Dless") == ("", True)  # "END" completed: nothing of it is sent
    scanner = StopScanner(("END",))
    assert scanner.feed("a EN") == ("a ", False)
    assert scanner.feed("Xb") == ("ENXb", False)  # not a stop after all: released
    assert scanner.feed("tail E") == ("tail ", False)
    assert scanner.flush() == "E"
    assert StopScanner(()).feed("END") == ("END", False)


def test_a_request_without_a_trace_gets_one_of_its_own() -> None:
    first, second = decode(op="ping"), decode(op="ping")
    assert first.trace and second.trace and first.trace != second.trace
    assert decode(op="ping", trace="mine").trace == "mine"
