"""One leader for the singletons, and wake-ups across instances (issue #13 item 5), on a
real PostgreSQL server.

The lock itself is tested with a leader in another process, killed (`kill -9`) or
frozen (its event loop blocked), because that is what the server must notice; the
bridges are tested as `serve` builds and runs them, two on one database in this
process, each with its own clock, its own connections and its own sandbox provider (so
the requests each one made can be told apart). Waits are bounded polls, never sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from bridge.app import build
from bridge.clock import ManualClock
from bridge.config import load_config
from bridge.delivery.cluster import SINGLETONS, Leader
from bridge.models import NewMessage, State
from bridge.policy.shaping import Draft
from bridge.service import Bridge
from bridge.store.postgres.store import PostgresStore
from tests.helpers import served, write_config
from tests.postgres import fresh_database
from tests.stores import seed

MESSAGE = NewMessage("+12025550143", "disk full on db-1", "alertmanager", "SMS", 1, 1)
ROLE = "singletons"
# A leader in a process of its own: takes the role, says so, then idles or freezes.
CHILD = """
import asyncio, sys, time
from bridge.store.postgres.store import PostgresStore

async def main() -> None:
    store = PostgresStore(sys.argv[1])
    store.leader_idle_timeout = float(sys.argv[2])
    await store.open()
    role = store.leadership("singletons", holder="child")
    print("leading" if await role.check() else "standing by", flush=True)
    if sys.argv[3] == "freeze":
        time.sleep(120)  # the event loop blocked: alive, connected, and doing nothing
    await asyncio.sleep(120)

asyncio.run(main())
"""


async def until(check: Callable[[], Awaitable[bool]], seconds: float = 10.0) -> float:
    """Poll `check` every 0.1 s until true; how long it took. Fails after `seconds`."""
    start = time.monotonic()
    while not await check():
        if time.monotonic() - start > seconds:
            raise AssertionError(f"not true within {seconds}s")
        await asyncio.sleep(0.1)
    return time.monotonic() - start


@contextlib.contextmanager
def child_leader(url: str, mode: str, idle: float = 10.0) -> Iterator[subprocess.Popen[str]]:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, url, str(idle), mode],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "leading"
        yield child
    finally:
        child.kill()
        child.wait(10)
        if child.stdout is not None:
            child.stdout.close()


@pytest.fixture
async def store(postgres_url: str) -> AsyncIterator[PostgresStore]:
    store = PostgresStore(postgres_url, max_connections=2)
    await store.open()
    yield store
    await store.close()


@pytest.mark.slow  # starts leader processes
async def test_one_instance_leads_and_a_killed_leaders_role_moves_within_a_second(
    postgres_url: str, store: PostgresStore
) -> None:
    role = store.leadership(ROLE, holder="b")
    with child_leader(postgres_url, "idle") as child:
        for _ in range(3):
            assert not await role.check()  # held by the child: one leader
        child.kill()  # kill -9: the kernel closes its connection, the server its session
        took = await until(role.check, seconds=5.0)
    assert took < 2.0
    assert await role.check()  # and it keeps it
    other = store.leadership(ROLE, holder="c")
    assert not await other.check()
    await role.resign()  # shutdown: free at once
    assert await other.check()
    await other.resign()


@pytest.mark.slow  # starts a leader process
async def test_a_frozen_leaders_session_is_ended_by_the_server(
    postgres_url: str, store: PostgresStore
) -> None:
    role = store.leadership(ROLE, holder="b")
    with child_leader(postgres_url, "freeze", idle=1.0) as child:
        assert not await role.check()
        await until(role.check, seconds=10.0)
        assert child.poll() is None  # alive, still connected, frozen: and no longer leads
    await role.resign()


async def test_a_leader_that_lost_its_session_steps_down(
    postgres_url: str, store: PostgresStore
) -> None:
    a, b = store.leadership(ROLE, holder="a"), store.leadership(ROLE, holder="b")
    assert await a.check() and not await b.check()
    assert await who_leads(postgres_url) == ["sms-bridge leader a"]
    await terminate(postgres_url, "sms-bridge leader a")  # its connection, cut server-side
    await until(b.check, seconds=5.0)  # b tries first and takes it (once the session ended)
    assert not await a.check()  # a sees it no longer holds the lock
    assert not await a.check()
    await b.resign()
    assert await a.check()
    await a.resign()


async def test_two_clusters_on_one_server_lead_each_its_own_database(
    postgres_server: str, postgres_template: str, postgres_url: str, store: PostgresStore
) -> None:
    """Another bridge cluster in another database of the same server: advisory locks
    are the database's own (each leads), and the leader's session, named alike there,
    is not this database's leader in the query docs/cluster.md gives."""
    with fresh_database(postgres_server, postgres_template) as elsewhere:
        theirs = PostgresStore(elsewhere)
        await theirs.open()
        here, there = store.leadership(ROLE, holder="a"), theirs.leadership(ROLE, holder="a")
        try:
            assert await here.check() and await there.check()
            assert await here.check() and await there.check()  # and each confirms it
            for url in (postgres_url, elsewhere):
                assert await who_leads(url) == ["sms-bridge leader a"]
        finally:
            await there.resign()
            await theirs.close()
            await here.resign()


async def who_leads(url: str) -> list[str]:
    """The query docs/cluster.md gives operators (and chaos tests) to see the leader."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
            " WHERE l.locktype = 'advisory' AND l.classid = 1397576452 AND l.granted"
            " AND a.datname = current_database()"
        )
    finally:
        await conn.close()
    return [r[0] for r in rows]


async def terminate(url: str, application_name: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        ended = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            # This test's database only: the server may be shared (by xdist workers, or
            # SMS_BRIDGE_TEST_POSTGRES), its tests' instances named alike.
            " WHERE application_name = $1 AND datname = current_database()",
            application_name,
        )
        assert ended == 1
    finally:
        await conn.close()


async def test_only_a_sweep_that_takes_over_takes_over(store: PostgresStore) -> None:
    ids = await seed(store, [MESSAGE] * 2, 1.0)
    await store.claim(ids[:1], 2.0, owner="dead", lease_until=32.0)
    await store.claim(ids[1:], 2.0, owner="b", lease_until=32.0)
    # Past the lease, a non-leader settles its own claims and leaves the dead one's.
    mine = await store.unsettled(40.0, owner="b", lease_until=70.0, take_over=False)
    assert [m.id for m in mine] == ids[1:]
    swept = await store.unsettled(40.0, owner="lead", lease_until=70.0, take_over=True)
    assert [m.id for m in swept] == ids[:1]


# -- two bridges on one database ----------------------------------------------------------
@contextlib.asynccontextmanager
async def instance(
    tmp_path: Path, url: str, name: str, *, dispatcher: bool = True
) -> AsyncIterator[tuple[Bridge, ManualClock, asyncio.Task[None]]]:
    """A bridge as `serve` runs it (no listeners), on its own clock and sandbox."""
    body = f'[store]\nurl = "{url}"\n[cluster]\ninstance = "{name}"\n'
    config = load_config(write_config(tmp_path, body, f"{name}.toml"), env={})
    clock = ManualClock(1_800_000_000.0)
    async with build(config, clock=clock) as bridge:
        if not dispatcher:  # an instance whose dispatcher is stuck or gone

            async def idle(stop: asyncio.Event) -> None:
                await stop.wait()

            bridge.dispatcher.run = idle  # type: ignore[method-assign]
        task = asyncio.create_task(bridge.run())
        try:
            yield bridge, clock, task
        finally:
            bridge.stop.set()
            await asyncio.wait_for(task, 30)


async def sent_awaiting_status(store: PostgresStore, now: float) -> None:
    """A text sent by an instance gone since, waiting for its delivery state."""
    [sent] = await seed(store, [MESSAGE._replace(text="sent")], now - 100)
    await store.claim([sent], now - 100, owner="gone", lease_until=now - 70)
    await store.mark_sent([(sent, "p-1", 0.05)], now - 100, owner="gone")


async def leader_metric(bridge: Bridge) -> float:
    """`sms_bridge_leader` as a scrape of the instance's /metrics reads it."""
    async with served(bridge.app) as url, httpx.AsyncClient() as client:
        text = (await client.get(f"{url}/metrics")).text
    [value] = [
        line.split()[1] for line in text.splitlines() if line.startswith("sms_bridge_leader ")
    ]
    return float(value)


def logs_requests(bridge: Bridge) -> int:
    assert bridge.sandbox is not None
    return sum(1 for r in bridge.sandbox.requests if r.path.endswith("/logs"))


def sends(bridge: Bridge) -> int:
    assert bridge.sandbox is not None
    return sum(1 for r in bridge.sandbox.requests if r.path.endswith(("/send", "/send-bulk")))


def status_pollers() -> int:
    """The status pollers running in this event loop, every instance's (service.py names
    the task so): a leader that stepped down has ended its own."""
    return sum(1 for task in asyncio.all_tasks() if task.get_name() == "status-poller")


async def tick(*clocks: ManualClock, seconds: float = 2.5) -> None:
    for clock in clocks:
        clock.advance(seconds)
    await asyncio.sleep(0.05)  # let the woken loops talk to the server


async def test_only_the_leader_polls_and_another_takes_over_when_it_stops(
    tmp_path: Path, postgres_url: str, store: PostgresStore
) -> None:
    now = 1_800_000_000.0
    await sent_awaiting_status(store, now)
    async with instance(tmp_path, postgres_url, "a") as (a, clock_a, task_a):
        await until(lambda: _true(a.leader.leading))
        async with instance(tmp_path, postgres_url, "b") as (b, clock_b, _):
            for _ in range(5):
                await tick(clock_a, clock_b)
            assert a.leader.leading and not b.leader.leading
            await until(lambda: _true(logs_requests(a) > 0))
            assert logs_requests(b) == 0  # the poller runs on the leader only

            # A text claimed by an instance that died, its lease passed: taking it over
            # means reading /logs to settle it. b's dispatcher looks first and leaves it.
            lost = MESSAGE._replace(text="cpu", state=State.SENDING)  # no owner: its died
            [stranded] = await seed(store, [lost], now - 100)
            await tick(clock_b, seconds=31.0)
            await asyncio.sleep(0.3)
            assert logs_requests(b) == 0
            assert await state(store, stranded) == State.SENDING
            await tick(clock_a, seconds=31.0)  # the leader's sweep takes it over
            await until(lambda: state_is_not(store, stranded, State.SENDING))
            assert logs_requests(b) == 0

            a.stop.set()  # the leader stops (resigns): b leads on its next check
            await asyncio.wait_for(task_a, 30)

            async def b_leads() -> bool:
                await tick(clock_b)
                return b.leader.leading

            await until(b_leads, seconds=10.0)
            await until(lambda: _true(logs_requests(b) > 0))


def leader_lines(caplog: pytest.LogCaptureFixture, name: str) -> list[tuple[str, str]]:
    """What instance `name` said about the role, in order: (level, message)."""
    return [
        (r.levelname, r.getMessage())
        for r in caplog.records
        if r.getMessage().startswith("leader:") and f"({name})" in r.getMessage()
    ]


async def test_the_log_says_who_leads_once_per_change(
    tmp_path: Path, postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The leader's session ends (here cut server-side) and, nobody else trying at that
    moment, the same instance takes the role again on a new session, at once: it says
    it lost the role and that it leads again, once each; confirmations say nothing."""
    caplog.set_level(logging.INFO, logger="bridge")
    leads = "leader: this instance ({}) leads: " + SINGLETONS
    async with (
        instance(tmp_path, postgres_url, "a") as (a, clock_a, _),
        instance(tmp_path, postgres_url, "b") as (b, clock_b, _),
    ):
        await until(lambda: _true(a.leader.leading or b.leader.leading))
        first, first_clock, second = (a, clock_a, b) if a.leader.leading else (b, clock_b, a)
        one, other = first.leader.name, second.leader.name
        for _ in range(4):  # confirmations on both sides
            await tick(clock_a, clock_b)
        assert leader_lines(caplog, one) == [("INFO", leads.format(one))]
        await terminate(postgres_url, f"sms-bridge leader {one}")
        await asyncio.sleep(0.5)  # the client has seen its session end
        # Only the leader's clock moves: it finds the lock free and takes it again.
        expected = [
            ("INFO", leads.format(one)),
            ("WARNING", f"leader: this instance ({one}) no longer leads"),
            ("INFO", leads.format(one)),
        ]

        async def lost() -> bool:
            await tick(first_clock)
            return len(leader_lines(caplog, one)) >= 2

        await until(lost, seconds=10.0)
        # No clock moves now: the next try comes at once, not a check later (the queue
        # would wait that long with nobody leading).
        await until(lambda: _true(len(leader_lines(caplog, one)) >= len(expected)), seconds=10.0)
        for _ in range(4):
            await tick(clock_a, clock_b)
        assert first.leader.leading and not second.leader.leading
    assert leader_lines(caplog, one) == expected
    assert leader_lines(caplog, other) == [
        ("INFO", f"leader: another instance leads; this one ({other}) stands by")
    ]


async def test_a_leader_cut_off_from_the_database_stops_its_singletons(
    tmp_path: Path, postgres_url: str, store: PostgresStore
) -> None:
    await sent_awaiting_status(store, 1_800_000_000.0)
    async with (
        instance(tmp_path, postgres_url, "a") as (a, clock_a, _),
        instance(tmp_path, postgres_url, "b") as (b, clock_b, _),
    ):
        await until(lambda: _true(a.leader.leading or b.leader.leading))
        first, first_clock, second, second_clock = (
            (a, clock_a, b, clock_b) if a.leader.leading else (b, clock_b, a, clock_a)
        )
        await terminate(postgres_url, f"sms-bridge leader {first.leader.name}")

        async def second_leads() -> bool:
            await tick(second_clock)
            return second.leader.leading

        await until(second_leads, seconds=10.0)

        async def first_stepped_down() -> bool:
            await tick(first_clock)
            # and its poller's step under way when the role went has ended (it may poll)
            return not first.leader.leading and first.leader.singletons_stopped

        await until(first_stepped_down, seconds=10.0)
        # The role is dropped first, then the singletons are halted and their step in
        # flight ends (it may still reach /logs): count once only second's poller runs.
        await until(lambda: _true(status_pollers() == 1))
        polled = logs_requests(first)

        async def second_polled() -> bool:
            await tick(first_clock, second_clock, seconds=6.0)  # past the poll interval
            assert second.leader.leading and not first.leader.leading
            return logs_requests(second) > 0

        await until(second_polled)  # its poller talks to the server and the sandbox first
        assert logs_requests(first) == polled  # its poller stopped with the role
        assert await leader_metric(second) == 1.0 and await leader_metric(first) == 0.0


async def test_a_singletons_step_under_way_ends_after_the_role_is_lost(
    postgres_url: str, store: PostgresStore
) -> None:
    """`leading` drops at once (no new step, no takeover); the step under way ends before
    `singletons_stopped` says so: what a test waits for before counting requests."""
    clock = ManualClock()
    leader = Leader(store.leadership(ROLE, holder="a"), name="a", clock=clock)
    other = store.leadership(ROLE, holder="b")
    in_step, release, stop = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def poller(halt: asyncio.Event) -> None:
        in_step.set()
        await release.wait()  # a /logs request on the wire

    task = asyncio.create_task(leader.run(stop, [("poller", poller)]))
    try:
        await asyncio.wait_for(in_step.wait(), 10)
        assert leader.leading and not leader.singletons_stopped
        await terminate(postgres_url, "sms-bridge leader a")
        await until(other.check)  # b takes the role (else a would take it back)

        async def stepped_down() -> bool:
            await tick(clock)
            return not leader.leading

        await until(stepped_down)
        await tick(clock)
        assert not leader.singletons_stopped  # the step still runs
        release.set()
        await until(lambda: _true(leader.singletons_stopped))
    finally:
        release.set()
        stop.set()
        await asyncio.wait_for(task, 30)
        await other.resign()


async def test_an_alert_ingested_on_one_instance_is_sent_by_another_at_once(
    tmp_path: Path, postgres_url: str, store: PostgresStore
) -> None:
    """b's clock never moves: its dispatcher sleeps its idle wait for ever, so only a
    notification from a's ingest can make it send."""
    async with instance(tmp_path, postgres_url, "b") as (b, _, _):
        await asyncio.sleep(0.3)  # b has looked at the empty queue and sleeps
        assert sends(b) == 0
        async with instance(tmp_path, postgres_url, "a", dispatcher=False) as (a, _, _):
            draft = Draft(["+12025550143"], "disk full on db-1", "api", "SMS", dedupe_key="k")
            await a.ingestor.submit([draft])  # as HTTP / SMTP do, before the 202 / 250
            took = await until(lambda: _true(sends(b) == 1), seconds=5.0)
    assert took < 2.0
    assert (await store.counts()).get("sent") == 1


async def state(store: PostgresStore, message_id: int) -> State:
    found = await store.get(message_id)
    assert found is not None
    return found.state


async def state_is_not(store: PostgresStore, message_id: int, unwanted: State) -> bool:
    return await state(store, message_id) != unwanted


async def _true(value: object) -> bool:
    return bool(value)


async def test_two_instances_given_one_name_stay_two_owners_of_claims(
    tmp_path: Path, postgres_url: str, store: PostgresStore
) -> None:
    """Replicas given one `cluster.instance` (a ConfigMap every pod reads) were one owner
    of claims: each took the other's sends in flight for its own, looked them up in
    /logs before their call could have ended and sent them again. The name is a label;
    each process's claims carry a tag of their own."""
    async with (
        instance(tmp_path, postgres_url, "pod") as (a, clock, _),
        instance(tmp_path, postgres_url, "pod") as (b, _, _),
    ):
        [mid] = await seed(store, [MESSAGE], clock.now())
        assert await a.store.claim(
            [mid], clock.now(), owner=a.dispatcher.owner, lease_until=clock.now() + 30
        ) == [mid]
        # b's own claims, as its reconciler reads them: not a's, within a's lease.
        mine = await b.store.unsettled(
            clock.now() + 1, owner=b.dispatcher.owner, lease_until=clock.now() + 31, take_over=False
        )
    assert mine == []
    assert a.dispatcher.owner.startswith("pod:") and b.dispatcher.owner.startswith("pod:")
