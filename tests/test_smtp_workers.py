"""The mail parser's worker threads (`bridge.ingress.workers`): a slow call holds one
thread, never the loop; a deadline that passes before a thread took the call means the
call never runs (SMTP's 451 "too busy"); errors reach the caller; close cancels the
calls not started."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

from bridge.ingress.workers import Workers


async def test_answers_and_errors_reach_the_caller_from_another_thread() -> None:
    workers = Workers(2, "test")
    try:
        name = await workers.run(lambda: threading.current_thread().name, 5)
        assert name.startswith("test_") and name != threading.current_thread().name
        with pytest.raises(ZeroDivisionError):
            await workers.run(lambda: 1 / 0, 5)
    finally:
        workers.close()


@pytest.fixture
def gate() -> Iterator[tuple[Workers, threading.Event]]:
    """One worker thread, and an event that releases the calls waiting on it."""
    workers = Workers(1, "test")
    release = threading.Event()
    yield workers, release
    release.set()
    workers.close()


async def test_a_call_that_waited_past_its_deadline_is_never_run(
    gate: tuple[Workers, threading.Event],
) -> None:
    workers, release = gate
    ran: list[str] = []
    holding = asyncio.ensure_future(workers.run(lambda: release.wait(10), 10))
    await asyncio.sleep(0.05)  # the one thread is in the first call
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await workers.run(lambda: ran.append("late"), 0.05)
    assert time.monotonic() - started < 2
    release.set()
    assert await holding is True
    # The thread is free again and takes the next call; the expired one was skipped.
    assert await workers.run(lambda: "next", 5) == "next"
    assert ran == []


async def test_a_call_past_its_deadline_while_running_times_out(
    gate: tuple[Workers, threading.Event],
) -> None:
    workers, release = gate
    with pytest.raises(TimeoutError):
        await workers.run(lambda: release.wait(10), 0.05)
    release.set()
    assert await workers.run(lambda: "after", 5) == "after"


async def test_close_cancels_the_calls_not_started() -> None:
    workers = Workers(1, "test")
    release = threading.Event()
    holding = asyncio.ensure_future(workers.run(lambda: release.wait(10), 10))
    await asyncio.sleep(0.05)
    waiting = asyncio.ensure_future(workers.run(lambda: "never", 10))
    await asyncio.sleep(0.01)
    workers.close()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert await holding is True  # the call in progress finished
