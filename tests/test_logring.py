"""The in-memory log ring: rotation, filters, and followers on a real event loop."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from edged.control.logring import LAST_ERRORS, MAX_MESSAGE_CHARS, LogRing


@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    """A logger of its own, so records reach only the ring under test."""
    log = logging.getLogger(f"edged.test.logring.{time.monotonic_ns()}")
    log.setLevel(logging.DEBUG)
    log.propagate = False
    yield log
    for handler in list(log.handlers):
        log.removeHandler(handler)


def ring_on(log: logging.Logger, **kwargs: Any) -> LogRing:
    ring = LogRing(**kwargs)
    log.addHandler(ring)
    return ring


async def until(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def messages(records: list[dict[str, Any]]) -> list[str]:
    return [r["message"] for r in records]


def test_the_ring_keeps_the_last_records_numbered_from_one(logger: logging.Logger) -> None:
    ring = ring_on(logger, capacity=5)
    for i in range(12):
        logger.info("message %d", i)
    kept = ring.records(last=100)
    assert [r["seq"] for r in kept] == [8, 9, 10, 11, 12]
    assert [r["message"] for r in kept] == [f"message {i}" for i in range(7, 12)]
    assert kept[0]["level"] == "INFO"
    assert kept[0]["logger"] == logger.name
    assert kept[0]["trace"] is None
    assert abs(kept[0]["time"] - time.time()) < 60
    assert [r["seq"] for r in ring.records(last=2)] == [11, 12]
    assert ring.records(last=0) == []
    stats = ring.statistics()
    assert stats["counts"] == {"INFO": 12}
    assert stats["total"] == 12
    assert stats["retained"] == 5
    assert stats["oldest_seq"] == 8


def test_level_and_since_seq_filters(logger: logging.Logger) -> None:
    ring = ring_on(logger)
    logger.debug("d1")
    logger.warning("w1")
    logger.info("i1")
    logger.error("e1")
    logger.critical("c1")
    logger.warning("w2")
    assert messages(ring.records(last=10, level="WARNING")) == ["w1", "e1", "c1", "w2"]
    assert messages(ring.records(last=2, level="warning")) == ["c1", "w2"]
    assert messages(ring.records(last=10, level="ERROR")) == ["e1", "c1"]
    assert messages(ring.records(last=10, since_seq=3)) == ["e1", "c1", "w2"]
    assert messages(ring.records(last=10, since_seq=3, level="ERROR")) == ["e1", "c1"]
    assert ring.records(last=10, since_seq=6) == []
    with pytest.raises(ValueError, match="unknown log level"):
        ring.records(last=10, level="LOUD")
    assert ring.statistics()["counts"] == {
        "DEBUG": 1,
        "WARNING": 2,
        "INFO": 1,
        "ERROR": 1,
        "CRITICAL": 1,
    }


def test_exceptions_are_formatted_and_the_trace_attribute_is_carried(
    logger: logging.Logger,
) -> None:
    ring = ring_on(logger)
    try:
        raise KeyError("model-x")
    except KeyError:
        logger.exception("load failed for %s", "model-x", extra={"trace": "abc123"})
    logger.info("plain", extra={"trace": 42})
    failed, plain = ring.records(last=2)
    assert failed["message"].startswith("load failed for model-x\nTraceback (most recent call")
    assert "KeyError: 'model-x'" in failed["message"]
    assert failed["level"] == "ERROR"
    assert failed["trace"] == "abc123"
    assert plain["trace"] == "42"


def test_a_huge_message_is_cut_so_the_ring_stays_bounded_in_bytes(
    logger: logging.Logger,
) -> None:
    ring = ring_on(logger, capacity=10)
    for _ in range(20):
        logger.warning("unknown model %r", "m" * 1_000_000)  # a name a client chose
    records = ring.records(last=10)
    assert len(records) == 10
    assert all(len(r["message"]) < MAX_MESSAGE_CHARS + 64 for r in records)
    assert records[-1]["message"].endswith("characters cut)")
    assert records[-1]["message"].startswith("unknown model 'mmm")


def test_last_errors_survive_rotation(logger: logging.Logger) -> None:
    ring = ring_on(logger, capacity=3)
    for i in range(LAST_ERRORS + 5):
        logger.error("error %d", i)
        logger.info("noise")
    for _ in range(3):
        logger.info("noise")  # the last error rotates out of the ring too
    errors = ring.last_errors()
    assert [e["message"] for e in errors] == [f"error {i}" for i in range(5, LAST_ERRORS + 5)]
    assert [r["level"] for r in ring.records(last=10)] == ["INFO"] * 3
    assert ring.statistics()["counts"] == {"ERROR": LAST_ERRORS + 5, "INFO": LAST_ERRORS + 8}


def test_records_from_many_threads_get_unique_monotonic_seqs(logger: logging.Logger) -> None:
    ring = ring_on(logger, capacity=10_000)

    def spam(n: int) -> None:
        for i in range(500):
            logger.info("thread %d record %d", n, i)

    threads = [threading.Thread(target=spam, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    seqs = [r["seq"] for r in ring.records(last=10_000)]
    assert seqs == list(range(1, 4001))
    for n in range(8):  # each thread's own records stay in its order
        mine = [r["message"] for r in ring.records(last=10_000) if f"thread {n} " in r["message"]]
        assert mine == [f"thread {n} record {i}" for i in range(500)]


def test_followers_on_a_loop_get_records_from_another_thread_in_order(
    logger: logging.Logger,
) -> None:
    ring = ring_on(logger)
    logger.info("before anyone follows")

    async def scenario() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        ring.attach(asyncio.get_running_loop())
        first: list[dict[str, Any]] = []
        second: list[dict[str, Any]] = []
        loop_thread = threading.get_ident()
        threads_seen: set[int] = set()

        def on_first(record: dict[str, Any]) -> None:
            threads_seen.add(threading.get_ident())
            first.append(record)

        ring.follow(on_first)
        unsubscribe = ring.follow(second.append)

        def produce() -> None:
            for i in range(200):
                logger.warning("from thread %d", i)

        producer = threading.Thread(target=produce)
        producer.start()
        await until(lambda: len(second) >= 50)
        unsubscribe()
        stopped_at = len(second)
        await asyncio.to_thread(producer.join, 30)
        await until(lambda: len(first) == 200)
        logger.info("from the loop itself")
        await until(lambda: len(first) == 201)
        assert threads_seen == {loop_thread}
        assert len(second) == stopped_at  # nothing after unsubscribe
        return first, second

    first, second = asyncio.run(scenario())
    assert [r["message"] for r in first[:200]] == [f"from thread {i}" for i in range(200)]
    assert first[-1]["message"] == "from the loop itself"
    assert [r["seq"] for r in first] == list(range(2, 203))
    assert second == first[: len(second)]
    assert ring.statistics()["followers"] == 1


def test_a_raising_follower_is_dropped_and_logging_goes_on(logger: logging.Logger) -> None:
    ring = ring_on(logger)

    async def scenario() -> list[str]:
        ring.attach(asyncio.get_running_loop())
        calls = 0
        good: list[str] = []

        def bad(record: dict[str, Any]) -> None:
            nonlocal calls
            calls += 1
            raise RuntimeError("follower bug")

        ring.follow(bad)
        ring.follow(lambda record: good.append(record["message"]))
        for i in range(3):
            logger.info("record %d", i)
        await until(lambda: len(good) == 3)
        logger.info("after the drop")
        await until(lambda: len(good) == 4)
        assert calls == 1
        return good

    assert asyncio.run(scenario()) == ["record 0", "record 1", "record 2", "after the drop"]
    stats = ring.statistics()
    assert stats["followers"] == 1
    assert stats["followers_dropped"] == 1
    assert stats["total"] == 4


def test_a_closed_loop_drops_deliveries_silently(logger: logging.Logger) -> None:
    ring = ring_on(logger)
    loop = asyncio.new_event_loop()
    ring.attach(loop)
    got: list[dict[str, Any]] = []
    ring.follow(got.append)
    loop.close()
    logger.info("nobody can deliver this")
    logger.info("nor this")
    assert [r["message"] for r in ring.records(last=5)] == ["nobody can deliver this", "nor this"]
    assert got == []

    async def reattached() -> None:
        ring.attach(asyncio.get_running_loop())
        logger.info("delivered again")
        await until(lambda: len(got) == 1)

    asyncio.run(reattached())
    assert got[0]["message"] == "delivered again"
