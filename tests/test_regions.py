"""Shared-memory regions (docs/PROTOCOL.md §11): tensors handed to a live
daemon as sealed memfds on regions.sock and named in infer requests, read there without a copy
and with outputs written back into them; every kind of bad fd, bad message and bad reference
answered with its own error while the daemon keeps serving; and no mapping or fd left behind by
a client that unregisters, closes or dies."""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
from onnx import TensorProto, helper, save

from edged import protocol
from edged.client import AsyncClient, Client
from edged.errors import (
    BadRegion,
    BadRequest,
    ClientTimeout,
    ConfigError,
    EdgedError,
    UnknownRegion,
)
from edged.models.calls import RegionInfer
from edged.regions import RegionTable
from edged.replies import ReplyTo
from edged.shm import FrameRing, regions_socket
from edged.testing import DaemonProcess
from tests.conftest import DaemonFactory, slow_config
from tests.models import SLOW_WIDTH

FRAME_SHAPE = (1080, 1920, 3)
IMAGE_SHAPE = (1, 3, 224, 224)
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
MIB = 1024 * 1024


def build_frame_model(path: Path) -> Path:
    """frame uint8[1080, 1920, 3] -> mean float32[] (of every byte) and copy uint8 (the frame)."""
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["frame"], ["wide"], to=TensorProto.FLOAT),
            helper.make_node("ReduceMean", ["wide"], ["mean"], keepdims=0),
            helper.make_node("Identity", ["frame"], ["copy"]),
        ],
        "frame",
        [helper.make_tensor_value_info("frame", TensorProto.UINT8, list(FRAME_SHAPE))],
        [
            helper.make_tensor_value_info("mean", TensorProto.FLOAT, []),
            helper.make_tensor_value_info("copy", TensorProto.UINT8, list(FRAME_SHAPE)),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    save(model, path)
    return path


@pytest.fixture
def image_daemon(start_daemon: DaemonFactory, models_dir: Path) -> DaemonProcess:
    return start_daemon({"models": {"image": {"path": str(models_dir / "image.onnx")}}})


def image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(IMAGE_SHAPE).astype(np.float32)


def memfd(size: int, seals: int = SEALS, flags: int = os.MFD_ALLOW_SEALING) -> int:
    fd = os.memfd_create("test", flags | os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


class RawRegions:
    """regions.sock spoken by hand, for messages the client never sends."""

    def __init__(self, daemon: DaemonProcess) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.settimeout(10)
        try:
            self.sock.connect(str(regions_socket(daemon.endpoint)))
        except OSError:
            self.sock.close()
            raise

    def send(self, data: bytes, fds: Sequence[int] = ()) -> dict[str, Any]:
        socket.send_fds(self.sock, [data], list(fds)) if fds else self.sock.send(data)
        reply: dict[str, Any] = msgpack.unpackb(self.sock.recv(4096))
        return reply

    def call(self, message: Any, fds: Sequence[int] = ()) -> dict[str, Any]:
        return self.send(msgpack.packb(message), fds)

    def register(self, fd: int, routing_id: bytes = b"\x01owner") -> dict[str, Any]:
        return self.call({"op": "register", "routing_id": routing_id}, [fd])

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def dealer(image_daemon: DaemonProcess) -> Iterator[Callable[[bytes], zmq.Socket[Any]]]:
    """DEALERs on the image daemon with routing ids of the test's choosing."""
    context: zmq.Context[Any] = zmq.Context()
    sockets: list[zmq.Socket[Any]] = []

    def open_(routing_id: bytes) -> zmq.Socket[Any]:
        sock = context.socket(zmq.DEALER)
        sockets.append(sock)
        sock.setsockopt(zmq.ROUTING_ID, routing_id)  # before connecting, or it is not used
        sock.setsockopt(zmq.RCVTIMEO, 10_000)
        sock.connect(image_daemon.endpoint)
        return sock

    yield open_
    for sock in sockets:
        sock.close(linger=0)
    context.term()


@pytest.fixture
def raw_regions() -> Iterator[Callable[[DaemonProcess], RawRegions]]:
    opened: list[RawRegions] = []

    def open_(daemon: DaemonProcess) -> RawRegions:
        opened.append(RawRegions(daemon))
        return opened[-1]

    yield open_
    for raw in opened:
        raw.close()


def refused(reply: dict[str, Any], code: str, *words: str) -> None:
    assert reply["ok"] is False, reply
    assert reply["code"] == code, reply
    for word in words:
        assert word in reply["message"], reply


def on_tmpfs(path: Path) -> bool:
    """Whether ``path`` lies on a tmpfs, whose files take F_GET_SEALS as memfds do."""
    mounts = [line.split() for line in Path("/proc/self/mounts").read_text().splitlines()]
    best = max((m for m in mounts if str(path).startswith(m[1])), key=lambda m: len(m[1]))
    return best[2] == "tmpfs"


def memfd_mappings(pid: int) -> int:
    return sum("memfd:" in line for line in Path(f"/proc/{pid}/maps").read_text().splitlines())


def open_fds(pid: int) -> int:
    """The daemon's open fds but its sockets, whose count changes as clients come and go: a
    memfd or any other fd it was handed and kept would be counted."""
    return sum(1 for fd in Path(f"/proc/{pid}/fd").iterdir() if not _is_socket(fd))


def _is_socket(fd: Path) -> bool:
    try:
        return str(fd.readlink()).startswith("socket:")
    except FileNotFoundError:  # closed while listed
        return True


def settles(measure: Callable[[], Any], expected: Any, timeout: float = 10.0) -> None:
    """Wait until ``measure()`` gives ``expected`` (a daemon releases what a client closed as
    soon as it reads of the close, not before the client's call returns)."""
    deadline = time.monotonic() + timeout
    while (value := measure()) != expected:
        assert time.monotonic() < deadline, f"{value} after {timeout} s, not {expected}"
        time.sleep(0.01)


# -- results ----------------------------------------------------------------------------------


def test_an_input_in_a_region_gives_the_frame_s_result_bit_for_bit(
    image_daemon: DaemonProcess,
) -> None:
    x = image(1)
    with image_daemon.client() as client:
        expected = client.infer("image", {"image": x})["logits"]
        region = client.region(x.nbytes + 4096, "camera")
        # at the region's start (aligned, read in place) and at an offset off the 64-byte grid
        # (copied to an aligned buffer first, as a frame that lands there is)
        for offset in (0, 4):
            view = region.array(IMAGE_SHAPE, np.float32, offset)
            view[...] = x
            result = client.infer("image", {"image": view})
            np.testing.assert_array_equal(result["logits"], expected)


def test_outputs_written_into_a_region_equal_the_frame_reply(image_daemon: DaemonProcess) -> None:
    x = image(2)
    with image_daemon.client() as client:
        expected = client.infer("image", {"image": x})["logits"]
        region = client.region(x.nbytes + 64, "io")
        frame = region.array(IMAGE_SHAPE, np.float32)
        frame[...] = x
        logits = region.array(expected.shape, np.float32, x.nbytes)
        result = client.infer("image", {"image": frame}, outputs_to={"logits": logits})
        np.testing.assert_array_equal(logits, expected)
        assert result["logits"].base is logits.base  # the result is that view, not a copy
        np.testing.assert_array_equal(result["logits"], expected)


def test_a_camera_frame_by_reference_in_and_out(
    start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    """A 1080p uint8 frame in a region: the same mean as sent in a frame, and a 6 MB output
    written into a region of its own."""
    model = build_frame_model(tmp_path / "frame.onnx")
    daemon = start_daemon({"models": {"frame": {"path": str(model)}}})
    frame = np.random.default_rng(3).integers(0, 256, FRAME_SHAPE, dtype=np.uint8)
    with daemon.client(timeout=30) as client:
        expected = client.infer("frame", {"frame": frame})
        with client.region(frame.nbytes) as inputs, client.region(frame.nbytes) as outputs:
            view = inputs.array(FRAME_SHAPE, np.uint8)
            view[...] = frame
            copy = outputs.array(FRAME_SHAPE, np.uint8)
            result = client.infer("frame", {"frame": view}, outputs_to={"copy": copy})
            np.testing.assert_array_equal(result["mean"], expected["mean"])
            np.testing.assert_array_equal(copy, frame)


def test_the_async_client_sends_region_views_by_reference(image_daemon: DaemonProcess) -> None:
    x = image(4)

    async def main() -> tuple[np.ndarray, np.ndarray]:
        async with AsyncClient(image_daemon.endpoint, timeout=10) as client:
            expected = (await client.infer("image", {"image": x}))["logits"]
            with client.region(x.nbytes) as region:
                view = region.array(IMAGE_SHAPE, np.float32)
                view[...] = x
                got = (await client.infer("image", {"image": view}))["logits"]
            return got, expected

    got, expected = asyncio.run(main())
    np.testing.assert_array_equal(got, expected)


def test_a_frame_ring_hands_out_its_slots_in_turn(demo_daemon: DaemonProcess) -> None:
    rng = np.random.default_rng(5)
    with demo_daemon.client() as client, FrameRing(client, (2, 16), np.float32, slots=3) as ring:
        slots = [ring.next() for _ in range(4)]
        assert slots[3] is slots[0]
        assert len({slot.__array_interface__["data"][0] for slot in slots}) == 3
        assert all(slot.__array_interface__["data"][0] % 64 == 0 for slot in slots)
        for slot in slots[:3]:
            x = rng.standard_normal((2, 16)).astype(np.float32)
            slot[...] = x
            np.testing.assert_array_equal(
                client.infer("demo", {"x": slot})["probs"], client.infer("demo", {"x": x})["probs"]
            )


# -- references that do not resolve ----------------------------------------------------------


def reference_header(
    region: str, offset: int, shape: Sequence[int] = IMAGE_SHAPE, request_id: int = 1
) -> bytes:
    ref = {"name": "image", "dtype": "float32", "shape": list(shape)}
    ref |= {"region": region, "offset": offset}
    return msgpack.packb(
        {"v": 1, "id": request_id, "op": "infer", "model": "image", "inputs": [ref]}
    )


def test_a_reference_past_the_end_misaligned_or_unknown_is_refused(
    image_daemon: DaemonProcess,
    raw_regions: Callable[[DaemonProcess], RawRegions],
    dealer: Callable[[bytes], zmq.Socket[Any]],
) -> None:
    dealers = {routing_id: dealer(routing_id) for routing_id in (b"\x01mine", b"\x01other")}
    fd = memfd(1000)
    try:
        token = raw_regions(image_daemon).register(fd, b"\x01mine")["region"]
    finally:
        os.close(fd)
    cases = [
        (b"\x01mine", token, 0, BadRegion, ["'image'", token, "offset 0", "(1000 bytes)"]),
        (
            b"\x01mine",
            token,
            2,
            BadRequest,
            ["'image'", token, "offset 2", "not a multiple of float32's 4 bytes"],
        ),
        (b"\x01mine", "f" * 32, 0, UnknownRegion, ["input 'image'", "no region 'fff"]),
        (b"\x01other", token, 0, UnknownRegion, ["registered by another connection"]),
    ]
    for request_id, (sender, region, offset, error, words) in enumerate(cases, 1):
        dealers[sender].send(reference_header(region, offset, request_id=request_id))
        reply = protocol.decode_reply(dealers[sender].recv_multipart())
        assert isinstance(reply.error, error), reply
        assert reply.id == request_id
        for word in words:
            assert word in reply.error.message, reply.error.message
    with image_daemon.client() as client:
        assert client.ping()["state"] == "serving"


def test_client_side_misuse_of_regions_is_named(image_daemon: DaemonProcess) -> None:
    with image_daemon.client() as client:
        region = client.region(1000)
        with pytest.raises(BadRegion, match="cannot start at offset 2"):
            region.array((4,), np.float32, 2)
        with pytest.raises(BadRegion, match="cannot start at offset 0"):
            region.array((251,), np.float32)
        with pytest.raises(BadRegion, match="not a view on a region"):
            client.infer("image", {"image": image()}, outputs_to={"logits": np.zeros((1, 10))})
        with pytest.raises(BadRegion, match="at least one byte"):
            client.region(0)
    with pytest.raises(ConfigError, match="regions need the IPC endpoint"):
        Client("tcp://127.0.0.1:1").region(4096)


def test_an_output_that_does_not_fit_writes_nothing(image_daemon: DaemonProcess) -> None:
    with image_daemon.client() as client:
        region = client.region(4096 + 16)
        tail = region.array((4,), np.float32, 4096)
        tail[...] = 7
        with pytest.raises(BadRegion, match=r"'logits' .*does not fit.*nothing was written"):
            client.infer("image", {"image": image()}, outputs_to={"logits": tail})
        np.testing.assert_array_equal(tail, 7)
        with pytest.raises(BadRequest, match="'nope': not an output of this model"):
            client.infer("image", {"image": image()}, outputs_to={"nope": tail})
        assert client.ping()["state"] == "serving"


# -- regions.sock ------------------------------------------------------------------------------


def test_fds_that_are_no_sealed_memfd_are_refused(
    image_daemon: DaemonProcess, raw_regions: Callable[[DaemonProcess], RawRegions], tmp_path: Path
) -> None:
    raw = raw_regions(image_daemon)
    file = tmp_path / "frame.bin"
    file.write_bytes(bytes(4096))
    read_end, write_end = os.pipe()
    fds = {
        "a regular file": os.open(file, os.O_RDWR),
        "a pipe": read_end,
        "a memfd without seals": memfd(4096, seals=0),
        "a memfd that may not be sealed": memfd(4096, seals=0, flags=0),
        "a memfd that may shrink": memfd(4096, seals=fcntl.F_SEAL_GROW),
        "an empty memfd": memfd(0),
        "a memfd sealed against writes": memfd(4096, SEALS | fcntl.F_SEAL_WRITE),
    }
    expected = {
        # a file on tmpfs (/tmp is, in many roots) reports F_SEAL_SEAL alone: either way refused
        "a regular file": "not a sealed memfd" if not on_tmpfs(file) else "not sealed against",
        "a pipe": "not a sealed memfd",
        "a memfd without seals": "not sealed against shrinking",
        "a memfd that may not be sealed": "not sealed against shrinking",
        "a memfd that may shrink": "not sealed against shrinking",
        "an empty memfd": "the memfd is empty",
        "a memfd sealed against writes": "cannot map the memfd read-write",
    }
    try:
        for what, fd in fds.items():
            refused(raw.register(fd), "BAD_REGION", expected[what])
    finally:
        for fd in [*fds.values(), write_end]:
            os.close(fd)
    assert memfd_mappings(image_daemon.pid) == 0
    with image_daemon.client() as client:
        assert client.ping()["state"] == "serving"


def test_malformed_messages_are_answered_and_the_connection_stays(
    image_daemon: DaemonProcess, raw_regions: Callable[[DaemonProcess], RawRegions]
) -> None:
    raw = raw_regions(image_daemon)
    register = {"op": "register", "routing_id": b"\x01me"}
    fds_before = open_fds(image_daemon.pid)
    spare = [memfd(4096) for _ in range(10)]
    try:
        cases: list[tuple[bytes, list[int], str, str]] = [
            (b"\xc1", [], "BAD_REQUEST", "one msgpack map"),
            (msgpack.packb([1, 2]), [], "BAD_REQUEST", "not list"),
            (b"", [], "BAD_REQUEST", "one msgpack map"),
            (b"x" * 5000, [], "BAD_REQUEST", "at most 4096 bytes"),
            (msgpack.packb({"op": "map"}), [], "BAD_REQUEST", "unknown op 'map'"),
            (msgpack.packb(register), [], "BAD_REQUEST", "exactly one fd"),
            (
                msgpack.packb(register),
                spare[:2],
                "BAD_REQUEST",
                "exactly one fd (SCM_RIGHTS), not 2",
            ),
            (msgpack.packb(register), spare, "BAD_REQUEST", "at most 8 fds"),
            (msgpack.packb({**register, "size": 1}), spare[:1], "BAD_REQUEST", "'size'"),
            (
                msgpack.packb({"op": "register", "routing_id": "text"}),
                spare[:1],
                "BAD_REQUEST",
                "'routing_id' must be 1 to 255 bytes",
            ),
            (msgpack.packb({**register, "name": 3}), spare[:1], "BAD_REQUEST", "'name'"),
            (
                msgpack.packb({"op": "unregister", "region": "ab"}),
                spare[:1],
                "BAD_REQUEST",
                "no fd",
            ),
            (msgpack.packb({"op": "unregister", "region": 5}), [], "BAD_REQUEST", "'region'"),
            (msgpack.packb({"op": "unregister", "region": "ab"}), [], "UNKNOWN_REGION", "'ab'"),
        ]
        for data, fds, code, words in cases:
            refused(raw.send(data, fds), code, words)
        registered = raw.register(spare[0])
        assert registered["ok"] and registered["size"] == 4096
        assert raw.call({"op": "unregister", "region": registered["region"]}) == {"ok": True}
    finally:
        for fd in spare:
            os.close(fd)
    settles(lambda: open_fds(image_daemon.pid), fds_before)  # every fd it got, closed
    assert memfd_mappings(image_daemon.pid) == 0


def test_regions_over_the_limits_are_refused(
    start_daemon: DaemonFactory,
    models_dir: Path,
    raw_regions: Callable[[DaemonProcess], RawRegions],
) -> None:
    daemon = start_daemon(
        {
            "server": {"max_regions": 2, "max_region_mb": 3},
            "models": {"image": {"path": str(models_dir / "image.onnx")}},
        }
    )
    first, second = raw_regions(daemon), raw_regions(daemon)
    fds = [memfd(MIB) for _ in range(3)] + [memfd(2 * MIB)]
    try:
        assert first.register(fds[0])["ok"] and first.register(fds[1])["ok"]
        refused(first.register(fds[2]), "REGION_LIMIT", "holds 2 regions", "server.max_regions = 2")
        refused(second.register(fds[3]), "REGION_LIMIT", "server.max_region_mb", "2.0 MiB mapped")
        assert second.register(fds[2])["ok"]  # per connection: the second has room
    finally:
        for fd in fds:
            os.close(fd)
    first.close()  # its two regions go with it: room again
    settles(lambda: memfd_mappings(daemon.pid), 1)
    fd = memfd(2 * MIB)
    try:
        assert second.register(fd)["ok"]
    finally:
        os.close(fd)


def patiently(open_: Callable[[DaemonProcess], RawRegions], daemon: DaemonProcess) -> RawRegions:
    """A connection, once the daemon's backlog (16) has room: it accepts in bursts."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return open_(daemon)
        except BlockingIOError:
            assert time.monotonic() < deadline
            time.sleep(0.01)


def test_the_daemons_descriptors_are_bounded_however_many_regions_and_connections(
    start_daemon: DaemonFactory,
    models_dir: Path,
    raw_regions: Callable[[DaemonProcess], RawRegions],
) -> None:
    """Each region and each connection holds one of the daemon's file descriptors: 1024 regions
    and 256 connections at most, whatever ``server.max_regions`` allows each connection."""
    daemon = start_daemon({"models": {"image": {"path": str(models_dir / "image.onnx")}}})
    page = memfd(4096)
    try:
        connections = [raw_regions(daemon) for _ in range(16)]
        for connection in connections:
            for _ in range(64):
                assert connection.register(page)["ok"]
        refused(raw_regions(daemon).register(page), "REGION_LIMIT", "holds 1024 regions")
    finally:
        os.close(page)
    for connection in connections:
        connection.close()
    settles(lambda: memfd_mappings(daemon.pid), 0)
    more = [patiently(raw_regions, daemon) for _ in range(256 - 1)]  # +1 open: the refused one
    extra = patiently(raw_regions, daemon)
    with pytest.raises((ConnectionError, OSError, msgpack.ExtraData, ValueError)):
        extra.call({"op": "unregister", "region": "0" * 32})
    more[0].close()  # room for one again
    time.sleep(0.2)  # the daemon sees the close before the next connection
    page = memfd(4096)
    try:
        assert raw_regions(daemon).register(page)["ok"]
    finally:
        os.close(page)


# -- ownership and leaks -----------------------------------------------------------------------

DYING_CLIENT = """
import os, signal, sys
import numpy as np
from edged.client import Client
client = Client(sys.argv[1])
region = client.region(8 << 20, "dying")
region.array((8 << 20,), np.uint8)[:] = 1
client.ping()
print(region.token, flush=True)
if sys.argv[2] == "exit":
    os._exit(0)
signal.pause()
"""


@pytest.mark.parametrize("death", ["exit", "kill"])
def test_a_client_that_dies_takes_its_regions_with_it(
    image_daemon: DaemonProcess, death: str
) -> None:
    pid = image_daemon.pid
    baseline = memfd_mappings(pid), open_fds(pid)
    with subprocess.Popen(
        [sys.executable, "-c", DYING_CLIENT, image_daemon.endpoint, death],
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        assert child.stdout is not None
        assert len(child.stdout.readline().strip()) == 32
        assert memfd_mappings(pid) == baseline[0] + 1
        if death == "kill":
            child.send_signal(signal.SIGKILL)
        child.wait(30)
    settles(lambda: (memfd_mappings(pid), open_fds(pid)), baseline)


def test_fifty_regions_made_used_and_closed_leave_nothing_behind(
    image_daemon: DaemonProcess,
) -> None:
    pid = image_daemon.pid
    x = image(6)
    with image_daemon.client() as client:
        expected = client.infer("image", {"image": x})["logits"]
    rss_before, _ = image_daemon.footprint()
    baseline = memfd_mappings(pid), open_fds(pid)
    for cycle in range(50):
        with image_daemon.client() as client:
            region = client.region(4 * MIB, f"cycle-{cycle}")
            view = region.array(IMAGE_SHAPE, np.float32)
            view[...] = x
            np.testing.assert_array_equal(
                client.infer("image", {"image": view})["logits"], expected
            )
            if cycle % 2:  # half unregister, half go with their connection
                region.close()
    with image_daemon.client() as client:  # the model's thread lets go of its last run's inputs
        client.infer("image", {"image": x})  # when it takes the next run
    settles(lambda: (memfd_mappings(pid), open_fds(pid)), baseline)
    rss_after, _ = image_daemon.footprint()
    assert rss_after - rss_before < 50 * MIB  # 50 regions of 4 MiB read there: 200 MiB if kept


def test_unregistering_a_region_that_queued_requests_use(
    start_daemon: DaemonFactory, models_dir: Path
) -> None:
    """The input's mapping outlives its table entry until the request has run; an output whose
    region went is a clean error for that request alone."""
    daemon = start_daemon(slow_config(models_dir))
    rng = np.random.default_rng(7)
    busy = rng.standard_normal((256, SLOW_WIDTH)).astype(np.float32)
    x = rng.standard_normal((4, SLOW_WIDTH)).astype(np.float32)

    async def main() -> tuple[np.ndarray, BaseException | None, np.ndarray]:
        async with AsyncClient(daemon.endpoint, timeout=60) as client:
            inputs, outputs = client.region(x.nbytes), client.region(x.nbytes)
            view = inputs.array(x.shape, np.float32)
            view[...] = x
            target = outputs.array(x.shape, np.float32)
            running = asyncio.ensure_future(client.infer("slow", {"x": busy}))
            queued = asyncio.ensure_future(client.infer("slow", {"x": view}))
            placed = asyncio.ensure_future(
                client.infer("slow", {"x": view}, outputs_to={"y": target})
            )
            # tasks send in the order they were made: a ping sent after them on one connection
            # is answered once the daemon has read them
            await asyncio.ensure_future(client.ping())
            inputs.close()
            outputs.close()
            await running
            got = (await queued)["y"]
            error = (await asyncio.gather(placed, return_exceptions=True))[0]
            expected = (await client.infer("slow", {"x": x}))["y"]
            return got, error, expected

    got, error, expected = asyncio.run(main())
    np.testing.assert_array_equal(got, expected)
    assert isinstance(error, UnknownRegion) and "was released" in str(error), error
    settles(lambda: memfd_mappings(daemon.pid), 0)


def test_regions_are_registered_again_with_a_daemon_that_restarted(
    image_daemon: DaemonProcess,
) -> None:
    x = image(8)
    with image_daemon.client() as client:
        expected = client.infer("image", {"image": x})["logits"]
        region = client.region(x.nbytes, "camera")
        view = region.array(IMAGE_SHAPE, np.float32)
        view[...] = x
        np.testing.assert_array_equal(client.infer("image", {"image": view})["logits"], expected)
        first = region.token
        assert image_daemon.stop() == 0
        image_daemon.start()
        np.testing.assert_array_equal(client.infer("image", {"image": view})["logits"], expected)
        assert region.token != first
        assert memfd_mappings(image_daemon.pid) == 1


def test_a_client_that_timed_out_keeps_its_regions_under_its_new_connection(
    start_daemon: DaemonFactory, models_dir: Path
) -> None:
    """A timeout drops the socket (the daemon may still hold the old connection) and the next
    call connects under a new routing id: the regions are registered again for it."""
    daemon = start_daemon(slow_config(models_dir))
    x = np.random.default_rng(3).standard_normal((1, SLOW_WIDTH)).astype(np.float32)
    busy = np.ones((512, SLOW_WIDTH), np.float32)
    with daemon.client(timeout=60) as client:
        expected = client.infer("slow", {"x": x})["y"]
        region = client.region(x.nbytes, "sensor")
        view = region.array(x.shape, np.float32)
        view[...] = x
        first, owner = region.token, client.routing_id
        with pytest.raises(ClientTimeout):
            client.infer("slow", {"x": busy}, timeout=0.001)
        np.testing.assert_array_equal(client.infer("slow", {"x": view})["y"], expected)
        assert region.token != first and client.routing_id != owner
    settles(lambda: memfd_mappings(daemon.pid), 0)


# -- the table, in process ---------------------------------------------------------------------


def test_a_released_region_stays_mapped_under_its_views() -> None:
    table = RegionTable(max_regions=4, max_bytes=MIB)
    fd = memfd(4096)
    held: dict[str, Any] = {}
    try:
        region = table.register(held, b"peer", fd, "test")
    finally:
        os.close(fd)
    ref = protocol.TensorRef(
        "x", protocol.DTYPES["float32"], (2, 16), protocol.RegionRef(region.token, 128), 0
    )
    request = RegionInfer(id=1, op="infer", model="m", refs=(ref,))
    resolved, _ = table.resolve(request, ReplyTo(lambda frames: True, 1, None), b"peer")
    view = resolved.inputs["x"]
    assert view.flags.writeable is False
    with pytest.raises(UnknownRegion, match="another connection"):
        table.resolve(request, ReplyTo(lambda frames: True, 1, None), b"other")
    table.release_all(held)
    assert table.statistics().regions == 0 and table.statistics().mapped_bytes == 0
    assert float(view.sum()) == 0.0  # still mapped: read without a fault
    with pytest.raises(UnknownRegion, match="no region"):
        table.resolve(request, ReplyTo(lambda frames: True, 1, None), b"peer")
    with pytest.raises(EdgedError):
        table.unregister(held, region.token)
