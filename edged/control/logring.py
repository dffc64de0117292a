"""The daemon's recent log records, kept in memory for ``edgectl logs`` and ``logs --follow``.

A device may have no journal worth reading (or no shell at all), so the daemon keeps its own
last few thousand records. Records arrive from any thread; followers are asyncio code, so they
are called on one event loop, in batches, never in the logging thread. Nothing here logs: a
log call from inside a handler would recurse.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

Record = dict[str, Any]
Follower = Callable[[Record], None]

#: ERROR-or-worse records kept apart from the ring, which may have rotated them out
LAST_ERRORS = 20
#: a record's message (with its traceback) is cut beyond this many characters, so the ring
#: stays bounded in bytes, not just in records, whatever a client made the daemon log
MAX_MESSAGE_CHARS = 8192

_FORMATTER = logging.Formatter()


class LogRing(logging.Handler):
    """The last ``capacity`` records as plain dicts, numbered from 1 by ``seq``.

    To follow without a gap: ``follow`` first, then read the backlog with ``records``, and
    drop followed records whose seq is not above the backlog's last. A follower is only sent
    records logged after it subscribed, and only once a loop is attached; if the loop falls
    more than ``capacity`` records behind, the oldest undelivered ones are dropped (a gap in
    seq shows it).
    """

    def __init__(
        self,
        capacity: int = 2000,
        loop: asyncio.AbstractEventLoop | None = None,
        level: int = logging.NOTSET,
    ) -> None:
        super().__init__(level)
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, not {capacity}")
        self.capacity = capacity
        # every field below is guarded by the handler's own lock (an RLock that logging re-creates
        # in a forked child); handle() already holds it around emit, which takes it again
        assert self.lock is not None
        self._mutex: AbstractContextManager[Any] = self.lock
        self._ring: deque[tuple[int, Record]] = deque(maxlen=capacity)  # (levelno, record)
        self._errors: deque[Record] = deque(maxlen=LAST_ERRORS)
        self._counts: dict[str, int] = {}
        self._seq = 0
        self._loop = loop
        self._followers: dict[int, tuple[int, Follower]] = {}  # token: (first seq, callback)
        self._tokens = itertools.count()
        self._pending: deque[Record] = deque(maxlen=capacity)
        self._scheduled = False
        self._dropped_followers = 0

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Deliver to followers on ``loop`` from now on (the daemon's loop exists after us)."""
        with self._mutex:
            self._loop = loop
            self._scheduled = False
            if self._pending:
                self._schedule()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            entry = self._entry(record)
            with self._mutex:
                self._seq += 1
                entry["seq"] = self._seq
                self._ring.append((record.levelno, entry))
                self._counts[entry["level"]] = self._counts.get(entry["level"], 0) + 1
                if record.levelno >= logging.ERROR:
                    self._errors.append(entry)
                if self._followers and self._loop is not None:
                    self._pending.append(entry)
                    if not self._scheduled:
                        self._schedule()
        except Exception:
            self.handleError(record)  # prints to stderr, as every logging handler does

    def records(self, last: int, since_seq: int = 0, level: str | None = None) -> list[Record]:
        """The last ``last`` records after ``since_seq`` of at least ``level``, oldest first."""
        minimum = _levelno(level) if level is not None else logging.NOTSET
        found: list[Record] = []
        if last <= 0:
            return found
        with self._mutex:
            for levelno, entry in reversed(self._ring):
                if entry["seq"] <= since_seq:
                    break
                if levelno >= minimum:
                    found.append(dict(entry))
                    if len(found) == last:
                        break
        found.reverse()
        return found

    def last_errors(self) -> list[Record]:
        """The last ERROR-or-worse records, oldest first, even those the ring has rotated out."""
        with self._mutex:
            return [dict(entry) for entry in self._errors]

    def statistics(self) -> dict[str, Any]:
        """Counts per level since start, and what the ring holds now."""
        with self._mutex:
            return {
                "counts": dict(self._counts),
                "total": self._seq,
                "retained": len(self._ring),
                "oldest_seq": self._ring[0][1]["seq"] if self._ring else None,
                "capacity": self.capacity,
                "followers": len(self._followers),
                "followers_dropped": self._dropped_followers,
            }

    def follow(self, callback: Follower) -> Callable[[], None]:
        """Call ``callback`` on the attached loop for every new record; returns unsubscribe.

        A callback that raises is dropped, silently: it cannot be allowed to break logging.
        """
        with self._mutex:
            token = next(self._tokens)
            self._followers[token] = (self._seq, callback)

        def unsubscribe() -> None:
            with self._mutex:
                self._followers.pop(token, None)

        return unsubscribe

    def _schedule(self) -> None:
        """With _mutex held: have the loop deliver what is pending; drop it if the loop is gone."""
        loop = self._loop
        assert loop is not None
        self._scheduled = True  # first: call_soon_threadsafe may log in debug mode
        try:
            if loop.is_closed():
                raise RuntimeError("event loop is closed")
            loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:
            self._pending.clear()
            self._scheduled = False

    def _deliver(self) -> None:
        """On the loop: the pending batch, in order, to every follower (outside the lock)."""
        with self._mutex:
            batch = list(self._pending)
            self._pending.clear()
            self._scheduled = False
            followers = list(self._followers.items())
        for token, (first_seq, callback) in followers:
            for entry in batch:
                if entry["seq"] <= first_seq:
                    continue
                with self._mutex:
                    if token not in self._followers:  # unsubscribed by an earlier callback
                        break
                try:
                    callback(dict(entry))
                except Exception:
                    with self._mutex:
                        if self._followers.pop(token, None) is not None:
                            self._dropped_followers += 1
                    break

    def _entry(self, record: logging.LogRecord) -> Record:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = _FORMATTER.formatException(record.exc_info)
        if record.exc_text:
            message = f"{message}\n{record.exc_text}"
        if record.stack_info:
            message = f"{message}\n{_FORMATTER.formatStack(record.stack_info)}"
        if len(message) > MAX_MESSAGE_CHARS:
            cut = len(message) - MAX_MESSAGE_CHARS
            message = f"{message[:MAX_MESSAGE_CHARS]}... ({cut} characters cut)"
        trace = getattr(record, "trace", None)
        return {
            "seq": 0,
            "time": record.created,
            "level": record.levelname,
            "logger": record.name,
            "message": message,
            "trace": None if trace is None else str(trace),
        }


def _levelno(level: str) -> int:
    value = logging.getLevelName(level.upper())
    if not isinstance(value, int):
        raise ValueError(f"unknown log level {level!r}")
    return value
