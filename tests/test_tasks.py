"""The daemon's task group: everything it starts ends when it closes, newest first."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

import pytest

from edged.errors import BadBundle, ShuttingDown
from edged.tasks import TaskGroup


def test_close_cancels_every_task_newest_first_and_waits_for_each() -> None:
    ended: list[str] = []

    async def forever(name: str) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            ended.append(name)

    async def run() -> None:
        group = TaskGroup()
        tasks = [group.start(forever(name), name) for name in ("first", "second", "third")]
        await asyncio.sleep(0)  # each has started
        assert group.statistics().running == 3
        await group.close()
        assert ended == ["third", "second", "first"]
        assert all(task.cancelled() for task in tasks)
        assert group.statistics().running == 0

    asyncio.run(run())


def test_nothing_starts_once_the_group_is_closing() -> None:
    async def run() -> None:
        group = TaskGroup()
        await group.close()
        work = asyncio.sleep(1)
        with pytest.raises(ShuttingDown):
            group.start(work, "late")
        assert work.cr_frame is None  # closed, so never "never awaited"

    asyncio.run(run())


def test_a_bug_in_a_task_is_logged_and_an_edged_error_is_left_to_its_awaiter(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def bug() -> None:
        raise ValueError("a bug")

    async def refused() -> None:
        raise BadBundle("not a bundle")

    async def run() -> None:
        group = TaskGroup()
        failing = group.start(bug(), "buggy")
        awaited = group.start(refused(), "refused")
        with pytest.raises(BadBundle):
            await awaited
        await asyncio.wait([failing])
        assert group.statistics().failed == 2

    with caplog.at_level(logging.DEBUG, logger="edged.tasks"):
        asyncio.run(run())
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == ["background task buggy failed"]


#: where tasks may be made outside the group, and why
OWN_TASKS = {
    "edged/tasks.py": "the group itself",
    "edged/client.py": "a client's reader, in the client's own process",
    "edged/daemon.py": "the drain's own waits, awaited and cancelled within the call",
}


def test_the_daemon_starts_background_tasks_through_its_group_alone() -> None:
    root = Path(__file__).resolve().parents[1]
    found = sorted(
        str(path.relative_to(root))
        for path in (root / "edged").rglob("*.py")
        if re.search(r"\b(create_task|ensure_future)\(", path.read_text())
    )
    assert set(found) <= set(OWN_TASKS), found
