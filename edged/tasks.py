"""The daemon's one group of background tasks, as trio's nurseries: every task the daemon runs
beside its requests (a control command's work, a self-test, an inbox install, an upload's
verification, a model load) is started here, and at stop the group cancels them, newest first,
and waits for each, so none outlives the daemon. A task that fails with a bug is logged, not
lost; one that ends with an ``EdgedError`` has handed it to whoever awaits it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from edged.errors import EdgedError, ShuttingDown

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class TaskStatistics:
    running: int
    started: int
    failed: int


class TaskGroup:
    def __init__(self) -> None:
        self._tasks: dict[asyncio.Task[Any], None] = {}  # in the order they started
        self._started = itertools.count(1)
        self._count = 0
        self._failed = 0
        self._closed = False

    def start(self, work: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        """Run ``work`` as a task of the group; refused once the group is closing."""
        if self._closed:
            work.close()
            raise ShuttingDown("the daemon is stopping; nothing new starts")
        self._count = next(self._started)
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._tasks[task] = None
        task.add_done_callback(self._finished)
        return task

    async def close(self) -> None:
        """Cancel every task, newest first, waiting for each to end."""
        self._closed = True
        for task in reversed(list(self._tasks)):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # logged when it ended
                await task

    def statistics(self) -> TaskStatistics:
        return TaskStatistics(len(self._tasks), self._count, self._failed)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.pop(task, None)
        if task.cancelled():
            return
        error = task.exception()
        if error is None:
            return
        self._failed += 1
        if isinstance(error, EdgedError):  # an outcome for whoever awaits the task
            log.debug("background task %s ended with %s", task.get_name(), error.code)
        else:
            log.error("background task %s failed", task.get_name(), exc_info=error)
