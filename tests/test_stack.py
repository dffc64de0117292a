"""Thread and task stacks, taken from inside a running loop as the control command does."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

from edged.control.stack import task_stacks, thread_stacks


def blocked_in_wait(started: threading.Event, release: threading.Event) -> None:
    started.set()
    release.wait()


async def innermost(event: asyncio.Event) -> None:
    await event.wait()


async def outermost(event: asyncio.Event) -> None:
    await innermost(event)


def by_name(items: list[dict[str, Any]], name: str) -> dict[str, Any]:
    [found] = [item for item in items if item["name"] == name]
    return found


def test_a_thread_blocked_on_an_event_shows_the_waiting_function() -> None:
    started, release = threading.Event(), threading.Event()
    thread = threading.Thread(
        target=blocked_in_wait, args=(started, release), name="blocked", daemon=True
    )
    thread.start()
    try:
        assert started.wait(10)
        threads = thread_stacks()
    finally:
        release.set()
        thread.join(10)
    json.dumps(threads)
    blocked = by_name(threads, "blocked")
    assert blocked["ident"] == thread.ident
    assert blocked["native_id"] == thread.native_id
    assert blocked["daemon"] is True
    assert blocked["current"] is False
    assert any(" in blocked_in_wait: release.wait()" in line for line in blocked["stack"])
    assert blocked["stack"][-1].split(" in ")[1].startswith("wait")  # innermost last
    assert "test_stack.py:" in next(line for line in blocked["stack"] if "blocked_in_wait" in line)
    main = by_name(threads, threading.current_thread().name)
    assert main["current"] is True
    assert any(" in test_a_thread_blocked" in line for line in main["stack"])


def test_tasks_show_the_coroutines_they_are_suspended_in_from_inside_the_loop() -> None:
    async def scenario() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        event = asyncio.Event()
        task = asyncio.create_task(outermost(event), name="suspended")
        await asyncio.sleep(0)  # let it reach event.wait()
        loop = asyncio.get_running_loop()
        tasks = task_stacks(loop)  # on the loop thread, no await
        threads = thread_stacks()
        event.set()
        await task
        return tasks, threads

    tasks, threads = asyncio.run(scenario())
    json.dumps(tasks)
    suspended = by_name(tasks, "suspended")
    assert "outermost" in suspended["coro"]
    assert suspended["done"] is False
    assert suspended["cancelled"] is False
    assert suspended["current"] is False
    assert suspended["waiting_on"] is not None and "Future" in suspended["waiting_on"]
    names = [line.split(" in ")[1].split(":")[0] for line in suspended["stack"]]
    assert names[:2] == ["outermost", "innermost"]  # the whole await chain, outermost first
    assert names[-1] == "wait"  # asyncio.Event.wait
    [current] = [task for task in tasks if task["current"]]
    assert "scenario" in current["coro"]
    assert any(" in scenario: tasks = task_stacks(loop)" in line for line in current["stack"])
    main = by_name(threads, threading.current_thread().name)
    assert any(" in scenario: threads = thread_stacks()" in line for line in main["stack"])


def test_task_stacks_from_another_thread_see_the_loops_tasks() -> None:
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    event = asyncio.Event()

    async def serve() -> None:
        task = asyncio.create_task(outermost(event), name="served")
        await asyncio.sleep(0)
        ready.set()
        await task

    runner = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    runner.start()
    try:
        assert ready.wait(10)
        tasks = task_stacks(loop)
    finally:
        loop.call_soon_threadsafe(event.set)
        runner.join(10)
        loop.close()
    served = by_name(tasks, "served")
    assert any(" in innermost: await event.wait()" in line for line in served["stack"])
    assert not any(task["current"] for task in tasks if task["name"] == "served")
