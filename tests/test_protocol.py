"""protocol: decoding validates everything before a model sees it; encode/decode round-trip."""

from __future__ import annotations

import weakref
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edged import protocol
from edged.errors import (
    BadRequest,
    BusyError,
    EdgedError,
    FrameMismatch,
    TooLarge,
    UnknownOp,
    UnsupportedVersion,
)
from edged.models.calls import Infer
from edged.protocol import Limits, RequestRejected
from edged.requests import MAX_DEADLINE_MS
from tests.messages import decode_request

LIMITS = Limits(max_message_bytes=1 << 20)


def frames_of(header: dict[str, Any], *tensors: bytes) -> list[bytes]:
    return [msgpack.packb(header), *tensors]


def infer_header(**overrides: Any) -> dict[str, Any]:
    header = {
        "v": 1,
        "id": 7,
        "op": "infer",
        "model": "m",
        "inputs": [{"name": "x", "dtype": "float32", "shape": [2, 3]}],
    }
    header.update(overrides)
    return header


def rejected(frames: list[bytes], limits: Limits = LIMITS) -> RequestRejected:
    with pytest.raises(RequestRejected) as info:
        decode_request(frames, limits)
    return info.value


def test_round_trip_keeps_values_dtype_and_shape() -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    mask = np.array([True, False])
    frames = protocol.encode_request(
        9, "infer", model="m", inputs={"x": x, "mask": mask}, deadline_ms=5, trace="t-1"
    )
    request = decode_request([bytes(memoryview(f)) for f in frames], LIMITS)
    assert (request.id, request.op, request.model, request.trace) == (9, "infer", "m", "t-1")
    assert request.deadline_ms == 5.0
    np.testing.assert_array_equal(request.inputs["x"], x)
    np.testing.assert_array_equal(request.inputs["mask"], mask)
    assert request.inputs["x"].dtype == np.float32


def test_decoded_tensor_is_a_view_on_the_frame_not_a_copy() -> None:
    payload = bytearray(np.arange(6, dtype=np.float32).tobytes())
    request = decode_request(frames_of(infer_header(), payload), LIMITS)
    payload[0:4] = np.float32(42).tobytes()
    assert request.inputs["x"][0, 0] == 42


def test_scalar_and_empty_tensors_are_accepted() -> None:
    header = infer_header(
        inputs=[
            {"name": "sr", "dtype": "int64", "shape": []},
            {"name": "e", "dtype": "float32", "shape": [0, 4]},
        ]
    )
    request = decode_request(frames_of(header, np.int64(16000).tobytes(), b""), LIMITS)
    assert request.inputs["sr"].shape == () and int(request.inputs["sr"]) == 16000
    assert request.inputs["e"].shape == (0, 4)


def test_big_endian_input_is_sent_little_endian() -> None:
    x = np.arange(3, dtype=">i4")
    frames = protocol.encode_request(1, "infer", model="m", inputs={"x": x})
    assert bytes(memoryview(frames[1])) == np.arange(3, dtype="<i4").tobytes()


@pytest.mark.parametrize(
    ("frames", "error", "words"),
    [
        ([b""], BadRequest, "empty message"),
        ([], BadRequest, "empty message"),
        ([b"\xc1not msgpack"], BadRequest, "not valid msgpack"),
        ([msgpack.packb([1, 2])], BadRequest, "must be a msgpack map"),
        (frames_of(infer_header(v=2)), UnsupportedVersion, "version 2"),
        (frames_of(infer_header(id=-1)), BadRequest, "'id'"),
        (frames_of(infer_header(op="explode")), UnknownOp, "explode"),
        (frames_of(infer_header(model=None)), BadRequest, "needs a 'model'"),
        (frames_of(infer_header(colour="red")), BadRequest, "colour"),
        (frames_of(infer_header(deadline_ms=-3)), BadRequest, "deadline_ms"),
        (frames_of(infer_header(deadline_ms=float("inf"))), BadRequest, "deadline_ms"),
        (frames_of(infer_header(deadline_ms=float("nan"))), BadRequest, "deadline_ms"),
        (frames_of(infer_header(deadline_ms=1e308)), BadRequest, "at most 86400000"),
        (frames_of(infer_header(deadline_ms=2**64 - 1)), BadRequest, "at most 86400000"),
        (frames_of(infer_header(deadline_ms=86_400_001)), BadRequest, "at most 86400000"),
        (
            frames_of(
                infer_header(inputs=[{"name": "m", "dtype": "bool", "shape": [3]}]), b"\1\0\2"
            ),
            BadRequest,
            "neither 0 nor 1",
        ),
        (
            frames_of(infer_header(inputs=[{"name": "m", "dtype": "bool", "shape": [1]}]), b"\xff"),
            BadRequest,
            "neither 0 nor 1",
        ),
        (
            frames_of({"v": 1, "id": 1, "op": "swap", "model": "m", "path": "/tmp/a\0.onnx"}),
            BadRequest,
            "without NUL",
        ),
        (frames_of(infer_header()), FrameMismatch, "declares 1 tensor(s) but 0"),
        (frames_of(infer_header(), b"\0" * 24, b"\0"), FrameMismatch, "but 2 frame(s)"),
        (frames_of(infer_header(), b"\0" * 23), FrameMismatch, "needs 24 bytes"),
        (
            frames_of(
                infer_header(inputs=[{"name": "x", "dtype": "complex64", "shape": [1]}]), b""
            ),
            BadRequest,
            "complex64",
        ),
        (
            frames_of(infer_header(inputs=[{"name": "x", "dtype": "int8", "shape": [1] * 9}]), b""),
            BadRequest,
            "at most 8 dims",
        ),
        (
            frames_of(infer_header(inputs=[{"name": "x", "dtype": "int8", "shape": [-1]}]), b""),
            BadRequest,
            "integers from 0",
        ),
        (frames_of({"v": 1, "id": 1, "op": "ping"}, b"x"), FrameMismatch, "takes no tensor"),
        (frames_of(infer_header(), b"\0" * LIMITS.max_message_bytes), TooLarge, "limit"),
    ],
)
def test_bad_messages_get_specific_errors(
    frames: list[bytes], error: type[EdgedError], words: str
) -> None:
    failure = rejected(frames)
    assert isinstance(failure.error, error)
    assert words in failure.error.message


def test_a_day_is_the_longest_deadline_and_bools_of_0_and_1_pass() -> None:
    header = infer_header(
        deadline_ms=MAX_DEADLINE_MS,
        inputs=[{"name": "m", "dtype": "bool", "shape": [2]}],
    )
    request = decode_request(frames_of(header, b"\1\0"), LIMITS)
    assert request.deadline_ms == 86_400_000.0
    assert request.inputs["m"].tolist() == [True, False]


def test_rejection_carries_the_request_id_when_readable() -> None:
    assert rejected(frames_of(infer_header(op="nope", id=41))).request_id == 41
    too_large = frames_of(infer_header(id=42), b"\0" * LIMITS.max_message_bytes)
    assert rejected(too_large).request_id == 42
    assert rejected([b"\xc1"]).request_id is None


def test_error_reply_decodes_to_the_typed_error() -> None:
    frames = protocol.encode_error(3, BusyError("queue full"), trace="abc")
    reply = protocol.decode_reply(frames)
    assert reply.id == 3
    assert isinstance(reply.error, BusyError)
    with pytest.raises(BusyError, match="queue full"):
        reply.raise_for_error()


def test_unknown_error_code_from_a_newer_daemon_stays_readable() -> None:
    header = {"v": 1, "id": 1, "ok": False, "error": {"code": "NEW_THING", "message": "m"}}
    reply = protocol.decode_reply([msgpack.packb(header)])
    assert reply.error is not None and reply.error.code == "NEW_THING"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), min_size=0, max_size=4))
def test_arbitrary_frames_only_raise_request_rejected(frames: list[bytes]) -> None:
    try:
        decode_request(frames, LIMITS)
    except RequestRejected as rejection:
        assert isinstance(rejection.error, EdgedError)


headers = st.dictionaries(
    st.sampled_from(["v", "id", "op", "model", "inputs", "version", "deadline_ms", "trace", "x"]),
    st.one_of(
        st.none(),
        st.integers(-(2**63), 2**64 - 1),
        st.floats(),
        st.text(max_size=8),
        st.lists(st.dictionaries(st.sampled_from(["name", "dtype", "shape"]), st.text(max_size=4))),
    ),
)


@settings(max_examples=300, deadline=None)
@given(headers, st.lists(st.binary(max_size=32), max_size=3))
def test_arbitrary_headers_only_raise_request_rejected(
    header: dict[str, Any], tensors: list[bytes]
) -> None:
    try:
        decode_request([msgpack.packb(header), *tensors], LIMITS)
    except RequestRejected as rejection:
        assert isinstance(rejection.error, EdgedError)


def test_zero_dimensional_tensor_keeps_its_shape() -> None:
    frames = protocol.encode_request(1, "infer", model="m", inputs={"sr": np.array(16000)})
    request = decode_request([bytes(memoryview(f)) for f in frames], LIMITS)
    assert request.inputs["sr"].shape == ()


def test_a_rejected_request_keeps_no_reference_to_its_frames() -> None:
    """A refused 60 MiB frame must be freed with its message: an error that kept the decoder's
    frames (through its traceback) kept the buffer for as long as the error lived."""
    buffer = np.zeros(1 << 20, np.uint8)
    freed = weakref.ref(buffer)
    header = msgpack.packb({"v": 1, "id": 1, "op": "infer", "model": "m", "inputs": []})
    frames: list[Any] = [header, memoryview(buffer)]
    try:
        decode_request(frames, Limits())
    except RequestRejected as rejected:
        error = rejected.error
    del frames, buffer
    assert error.code == "FRAME_MISMATCH"
    assert freed() is None


# -- tensors in shared-memory regions ---------------------------------------------------------

TOKEN = "0123456789abcdef" * 2


def ref_spec(name: str = "x", offset: int = 64, **overrides: Any) -> dict[str, Any]:
    spec = {"name": name, "dtype": "float32", "shape": [2, 3], "region": TOKEN, "offset": offset}
    spec.update(overrides)
    return spec


def test_a_tensor_in_a_region_has_no_frame_and_keeps_its_place() -> None:
    x, y, z = (np.full((2, 3), k, np.float32) for k in range(3))
    places = {"y": protocol.RegionRef(TOKEN, 128)}
    frames = protocol.encode_request(
        5, "infer", model="m", inputs={"x": x, "y": y, "z": z}, locate=lambda n, _: places.get(n)
    )
    assert len(frames) == 3  # the header, x and z
    request = decode_request([bytes(memoryview(f)) for f in frames], LIMITS)
    assert list(request.inputs) == ["x", "z"]
    (ref,) = request.refs
    assert (ref.name, ref.shape, ref.at, ref.index, ref.nbytes) == ("y", (2, 3), places["y"], 1, 24)
    assert ref.dtype == np.float32
    merged = protocol.interleave(request.inputs, request.refs, lambda _: y)
    assert list(merged) == ["x", "y", "z"]  # the header's order, as batching needs


def test_outputs_to_write_into_regions_are_decoded() -> None:
    target = {"region": TOKEN, "offset": 8}
    request = decode_request(frames_of(infer_header(outputs={"y": target}), bytes(24)), LIMITS)
    assert request.outputs == {"y": protocol.RegionRef(TOKEN, 8)}
    assert type(decode_request(frames_of(infer_header(), bytes(24)), LIMITS)) is Infer


@pytest.mark.parametrize(
    ("header", "frames", "error", "words"),
    [
        (infer_header(inputs=[ref_spec(offset=-4)]), [], BadRequest, "'offset' must be a non"),
        (infer_header(inputs=[ref_spec(offset=6)]), [], BadRequest, "not a multiple of float32"),
        (infer_header(inputs=[ref_spec(offset=1.0)]), [], BadRequest, "'offset'"),
        (infer_header(inputs=[ref_spec(region=7)]), [], BadRequest, "'region' must be"),
        (infer_header(inputs=[ref_spec(region="")]), [], BadRequest, "'region' must be"),
        (infer_header(inputs=[ref_spec(region="f" * 65)]), [], BadRequest, "'region' must be"),
        (infer_header(inputs=[ref_spec(dtype="f4")]), [], BadRequest, "dtype 'f4'"),
        (infer_header(inputs=[ref_spec()]), [bytes(24)], FrameMismatch, "takes no frame"),
        (
            infer_header(inputs=[ref_spec(), {"name": "w", "dtype": "int8", "shape": [1]}]),
            [],
            FrameMismatch,
            "2 tensor(s) (1 in regions, with no frame) but 0 frame(s)",
        ),
        (
            infer_header(
                inputs=[ref_spec(), ref_spec(), {"name": "w", "dtype": "int8", "shape": []}]
            ),
            [b"\0"],
            BadRequest,
            "'x' is declared twice",
        ),
        (infer_header(outputs=[]), [bytes(24)], BadRequest, "'outputs' must be a map"),
        (infer_header(outputs={"y": {"region": TOKEN}}), [bytes(24)], BadRequest, "exactly"),
        (
            infer_header(outputs={"y": {"region": TOKEN, "offset": -1}}),
            [bytes(24)],
            BadRequest,
            "outputs['y']: 'offset'",
        ),
        (
            infer_header(outputs={"": {"region": TOKEN, "offset": 0}}),
            [bytes(24)],
            BadRequest,
            "keys",
        ),
    ],
)
def test_bad_references_get_specific_errors(
    header: dict[str, Any], frames: list[bytes], error: type[EdgedError], words: str
) -> None:
    failure = rejected(frames_of(header, *frames))
    assert isinstance(failure.error, error), failure.error
    assert words in failure.error.message


def test_a_reply_with_outputs_in_regions_decodes_them_as_references() -> None:
    y = np.ones((2, 3), np.float32)
    frames = protocol.encode_reply(
        1,
        {"model": "m"},
        {"y": y, "z": y},
        lambda n, _: protocol.RegionRef(TOKEN, 0) if n == "z" else None,
    )
    reply = protocol.decode_reply([bytes(memoryview(f)) for f in frames])
    assert list(reply.tensors) == ["y"]
    assert [(ref.name, ref.index, ref.at.offset) for ref in reply.refs] == [("z", 1, 0)]
