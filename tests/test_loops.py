"""`bridge.loops.run_steps`: the loop every background task runs (dispatcher, poller,
digests, the cluster's watches)."""

from __future__ import annotations

import asyncio

from bridge.clock import ManualClock
from bridge.loops import run_steps


async def test_a_wake_during_a_step_runs_the_next_step_at_once() -> None:
    """New work announced while a step runs (an alert stored just after the dispatcher
    read what is due) was lost: the wake was cleared after the step, and the loop slept
    the step's whole wait (up to half a minute) with the alert queued. The clock never
    moves here: a second step can only come from the wake."""
    clock, stop, wake = ManualClock(), asyncio.Event(), asyncio.Event()
    steps = 0

    async def step() -> float:
        nonlocal steps
        steps += 1
        if steps == 1:
            await asyncio.sleep(0)  # the step is under way: the ingest's wake comes now
            wake.set()
        else:
            stop.set()
        return 30.0

    await asyncio.wait_for(
        run_steps(step, name="test", clock=clock, stop=stop, retry_after=5.0, wake=wake), 5
    )
    assert steps == 2


async def test_without_a_wake_the_loop_sleeps_the_steps_wait() -> None:
    """The other side: no wake, no second step until the clock reaches the wait."""
    clock, stop, wake = ManualClock(), asyncio.Event(), asyncio.Event()
    steps = 0

    async def step() -> float:
        nonlocal steps
        steps += 1
        return 30.0

    loop = asyncio.create_task(
        run_steps(step, name="test", clock=clock, stop=stop, retry_after=5.0, wake=wake)
    )
    for _ in range(20):
        await asyncio.sleep(0)
    assert steps == 1
    clock.advance(30.0)
    for _ in range(20):
        await asyncio.sleep(0)
    assert steps == 2
    stop.set()
    await asyncio.wait_for(loop, 5)
