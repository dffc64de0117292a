"""Where every thread and every asyncio task is right now: for diagnosing a hung or busy daemon.

Both functions only read interpreter state and never await, so the control command can call
them from the event loop thread itself. Stacks are lists of ``"file:line in function: source"``
strings, outermost call first (like a traceback); ": source" is left off where the source line
cannot be read.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import traceback
from collections.abc import Iterable
from types import FrameType
from typing import Any


def thread_stacks() -> list[dict[str, Any]]:
    """Every thread with a Python frame, including ones the threading module never saw."""
    frames = sys._current_frames()
    current = threading.get_ident()
    threads = []
    for thread in threading.enumerate():
        frame = frames.pop(thread.ident, None) if thread.ident is not None else None
        threads.append(
            {
                "name": thread.name,
                "ident": thread.ident,
                "native_id": thread.native_id,
                "daemon": thread.daemon,
                "current": thread.ident == current,
                "stack": _format(traceback.extract_stack(frame)) if frame else [],
            }
        )
    for ident, frame in frames.items():  # started from C, never registered with threading
        threads.append(
            {
                "name": None,
                "ident": ident,
                "native_id": None,
                "daemon": None,
                "current": ident == current,
                "stack": _format(traceback.extract_stack(frame)),
            }
        )
    return threads


def task_stacks(loop: asyncio.AbstractEventLoop) -> list[dict[str, Any]]:
    """Every unfinished task of ``loop``, with the chain of coroutines it is suspended in.

    ``Task.get_stack()`` shows only the outermost coroutine of a suspended task, so the stack
    follows the awaited coroutines down to the innermost one; ``waiting_on`` is the future the
    task waits for, when there is one.
    """
    current = asyncio.current_task(loop)
    tasks = sorted(asyncio.all_tasks(loop), key=lambda task: task.get_name())
    return [
        {
            "name": task.get_name(),
            "coro": repr(task.get_coro()),
            "done": task.done(),
            "cancelled": task.cancelled(),
            "current": task is current,
            "waiting_on": _waiting_on(task),
            "stack": _task_stack(task),
        }
        for task in tasks
    ]


def _task_stack(task: asyncio.Task[Any]) -> list[str]:
    frames = _await_chain(task.get_coro())
    if not frames:  # not a coroutine we can walk: whatever asyncio itself can show
        frames = task.get_stack()
    return _format(traceback.StackSummary.extract((f, f.f_lineno) for f in frames))


def _await_chain(awaitable: object) -> list[FrameType]:
    """The frames of a coroutine and of what it awaits, outermost first."""
    frames: list[FrameType] = []
    while awaitable is not None and len(frames) < 200:
        frame = _first_attr(awaitable, ("cr_frame", "gi_frame", "ag_frame"))
        if not isinstance(frame, FrameType):
            break
        frames.append(frame)
        awaitable = _first_attr(awaitable, ("cr_await", "gi_yieldfrom", "ag_await"))
    return frames


def _waiting_on(task: asyncio.Task[Any]) -> str | None:
    """The future a suspended task waits on: CPython keeps it in ``_fut_waiter``."""
    waiter = getattr(task, "_fut_waiter", None)
    return None if waiter is None else repr(waiter)


def _first_attr(obj: object, names: Iterable[str]) -> Any:
    for name in names:
        value = getattr(obj, name, None)
        if value is not None:
            return value
    return None


def _format(stack: traceback.StackSummary) -> list[str]:
    lines = []
    for frame in stack:
        where = f"{frame.filename}:{frame.lineno} in {frame.name}"
        lines.append(f"{where}: {frame.line}" if frame.line else where)
    return lines
