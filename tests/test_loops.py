"""`bridge.loops.run_steps`: the loop every background task runs (dispatcher, poller,
digests, the cluster's watches)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from bridge.clock import ManualClock
from bridge.delivery.cluster import Leader
from bridge.loops import run_steps
from bridge.models import Message
from bridge.provider.sandbox import SandboxState
from tests.helpers import bridge_config, running_bridge
from tests.stores import faulty_store


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


# -- a step that fails with an error nobody expected ----------------------------------------
async def _settle(until: Callable[[], bool], seconds: float = 5.0) -> None:
    """Let the loops (and the store's threads) run until `until()`; fail after `seconds`."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not until():
        assert asyncio.get_running_loop().time() < deadline, "not reached"
        await asyncio.sleep(0.01)


async def test_the_dispatcher_outlives_a_failing_step_and_the_health_checks_say_so(
    tmp_path: Path,
    clock: ManualClock,
    sandbox_state: SandboxState,
    sandbox_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A step that raised anything but StoreUnavailable (a bug, a driver's error nobody
    classified) ended the dispatcher, and the task group took the whole bridge down
    with it; a singleton's error was swallowed when leadership changed. Now the step is
    retried after a doubling backoff (not on every ingest's wake), its traceback logged
    once, each failure counted in /metrics, /healthz and /readyz say 503 while it keeps
    failing, and the acknowledged alert goes out once the fault clears."""
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (bridge, url):
        real_due = bridge.store.due
        calls = 0
        broken = True

        async def due(now: float, limit: int, *, texts: int | None = None) -> list[Message]:
            nonlocal calls
            calls += 1
            if broken:  # a fault a live store cannot be made to produce: a bug's error
                raise RuntimeError("a bug in the step")
            return await real_due(now, limit, texts=texts)

        bridge.store.due = due  # type: ignore[method-assign]
        task = asyncio.create_task(bridge.run())
        async with httpx.AsyncClient(base_url=url) as http:
            posted = await http.post(
                "/api/v1/messages", json={"to": "+12025550143", "message": "db-2 down"}
            )
            assert posted.status_code == 202
            t0 = clock.now()
            await _settle(lambda: calls == 1 and t0 + 5.0 in clock.wakes())  # backing off
            for i in range(5):  # acknowledged alerts wake the dispatcher: no step for them
                await http.post(
                    "/api/v1/messages", json={"to": "+12025550144", "message": f"more {i}"}
                )
            await asyncio.sleep(0.1)
            assert calls == 1 and not task.done()
            assert (await http.get("/healthz")).status_code == 200  # one failure: not yet
            clock.advance(5.0)  # the first retry: after retry_after
            await _settle(lambda: calls == 2 and t0 + 15.0 in clock.wakes())
            clock.advance(9.9)  # the second waits twice as long
            await asyncio.sleep(0.1)
            assert calls == 2
            clock.advance(0.1)
            await _settle(lambda: calls == 3)
            health = await http.get("/healthz")
            assert health.status_code == 503
            assert "dispatcher" in health.json()["problems"]["loops"]
            ready = await http.get("/readyz")
            assert ready.status_code == 503 and "dispatcher" in ready.json()["problems"]["loops"]
            metrics = (await http.get("/metrics")).text
            assert 'sms_bridge_loop_step_failures_total{loop="dispatcher"} 3.0' in metrics
            tracebacks = [
                r for r in caplog.records if r.exc_info and "dispatcher" in r.getMessage()
            ]
            assert len(tracebacks) == 1  # once, not once per failed step

            broken = False
            clock.advance(20.0)
            await _settle(lambda: not bridge.loops.failing())
            assert (await http.get("/healthz")).status_code == 200
        bridge.stop.set()
        await asyncio.wait_for(task, 10)
    assert "db-2 down" in [e.message for e in sandbox_state.entries]


async def test_steps_the_store_refuses_are_counted_and_leave_healthz_green(
    tmp_path: Path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """A step the store refused (busy, full, out of reach) was retried but never counted:
    `sms_bridge_loop_step_failures_total` said 0 for a dispatcher that could not claim a
    text for an hour. Counted now; /healthz stays 200 (a restart brings no store back),
    /readyz says the store, and the text goes once the disk has room again."""
    config = bridge_config(tmp_path, sandbox_url)
    store = faulty_store(config)
    async with running_bridge(config, clock, store) as (bridge, url):
        async with httpx.AsyncClient(base_url=url) as http:
            posted = await http.post(
                "/api/v1/messages", json={"to": "+12025550143", "message": "disk full"}
            )
            assert posted.status_code == 202  # stored, due now, before any loop runs
            store.disk_full()
            task = asyncio.create_task(bridge.run())
            await _settle(lambda: bridge.loops.failures().get("dispatcher", 0) >= 1)
            clock.advance(5.0)  # the dispatcher's retry_after: a second refused step
            await _settle(lambda: bridge.loops.failures()["dispatcher"] >= 2)
            metrics = (await http.get("/metrics")).text
            counted = 'sms_bridge_loop_step_failures_total{loop="dispatcher"} '
            assert float(metrics.split(counted)[1].split()[0]) >= 2, metrics
            assert (await http.get("/healthz")).status_code == 200
            ready = await http.get("/readyz")
            assert ready.status_code == 503 and "store" in ready.json()["problems"]
            assert "loops" not in ready.json()["problems"]
            store.fail_commits(None)  # room again
            clock.advance(5.0)
            await _settle(lambda: bool(sandbox_state.entries))
        bridge.stop.set()
        await asyncio.wait_for(task, 10)
    assert [e.message for e in sandbox_state.entries] == ["disk full"]


async def test_the_leader_outlives_a_failing_leadership_check(clock: ManualClock) -> None:
    """The leader's own loop retried only an unavailable store: any other error in a
    check (an error of the server's nobody classified) ended it, and the bridge with it.
    Now such a check counts as not leading (logged, counted) and the next one goes on."""
    answers: list[bool | Exception] = [RuntimeError("unclassified"), True]
    started = asyncio.Event()

    class Flaky:  # a fault a live server cannot be made to give: shaped here
        async def check(self) -> bool:
            answer = answers.pop(0) if answers else True
            if isinstance(answer, Exception):
                raise answer
            return answer

        async def resign(self) -> None:
            pass

    async def singleton(stop: asyncio.Event) -> None:
        started.set()
        await stop.wait()

    stop = asyncio.Event()
    leader = Leader(Flaky(), name="a", clock=clock)
    task = asyncio.create_task(leader.run(stop, [("poller", singleton)]))
    for _ in range(20):
        await asyncio.sleep(0)
    assert not task.done() and not started.is_set()
    clock.advance(2.0)
    await asyncio.wait_for(started.wait(), 5)
    assert leader.leading and leader.loops.failures() == {"leader": 1.0}
    stop.set()
    await asyncio.wait_for(task, 5)


async def test_a_singleton_stopped_by_a_lost_lead_is_not_reported_failing(
    tmp_path: Path, clock: ManualClock, sandbox_url: str
) -> None:
    """The status poller's steps failed three times in a row (/healthz: 503, "status
    poller"), then another instance took the lead and this one stopped its poller. A
    loop that no longer runs kept its failures in a row: the follower answered 503 for
    good, and an orchestrator restarted a healthy instance (in turn every instance the
    lead moved from). A loop that stops takes its run of failures with it."""
    leads = True

    class Handover:  # the lead lost to another instance: shaped, as a test cluster would
        async def check(self) -> bool:
            return leads

        async def resign(self) -> None:
            pass

    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (bridge, url):
        calls = 0

        async def awaiting_status(**_: object) -> list[Message]:
            nonlocal calls
            calls += 1
            raise RuntimeError("a bug in the step")  # a fault a live store cannot produce

        bridge.store.awaiting_status = awaiting_status  # type: ignore[method-assign]
        bridge.leader.leadership = Handover()  # type: ignore[assignment]
        task = asyncio.create_task(bridge.run())
        async with httpx.AsyncClient(base_url=url) as http:
            await _settle(lambda: calls == 1)
            for n in (2, 3):
                clock.advance(300.0)
                await _settle(lambda n=n: calls == n)
            health = await http.get("/healthz")
            assert health.status_code == 503 and "status poller" in str(health.json())
            leads = False
            clock.advance(2.0)  # the next leadership check: the poller stops
            await _settle(lambda: not bridge.leader.leading and bridge.leader.singletons_stopped)
            assert (await http.get("/healthz")).status_code == 200
        bridge.stop.set()
        await asyncio.wait_for(task, 10)
