"""One rate budget for the cluster (#13 item 3): three bridges built as `serve` builds
them, each on a PostgreSQL store of its own pool on one database, driven on one manual
clock against the sandbox provider on loopback. The sandbox's record of the requests it
received is the judge: the provider's `requests_per_minute` holds for the three together
in every 60 s window, a 429 seen by one instance pauses every instance, and bookings
survive a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from bridge.clock import ManualClock
from bridge.delivery.ratelimit import SlidingWindowLimiter
from bridge.models import NewMessage, State
from bridge.provider.sandbox import SandboxState
from bridge.provider.sandbox.faults import Fault
from bridge.service import Bridge
from bridge.store.postgres.store import PostgresStore
from tests.helpers import bridge_config, max_in_window, running_bridge
from tests.stores import seed

LIMIT = 20
MESSAGE = NewMessage("+12025550143", "disk full on db-1", "alertmanager", "SMS", 1, 1)


@dataclass
class Cluster:
    """What a cluster test runs on: one clock, one sandbox, one database."""

    tmp_path: Path
    clock: ManualClock
    sandbox: SandboxState
    sandbox_url: str
    postgres_url: str

    @contextlib.asynccontextmanager
    async def start(self, count: int = 3) -> AsyncIterator[list[tuple[Bridge, str]]]:
        """`count` bridges on the database, each its own instance name and pool."""
        async with contextlib.AsyncExitStack() as stack:
            bridges = []
            for n in range(count):
                home = self.tmp_path / f"i{n}"
                home.mkdir(exist_ok=True)
                config = bridge_config(
                    home,
                    self.sandbox_url,
                    f'[cluster]\ninstance = "i{n}"\n[dedupe]\nwindow = "0s"\n',
                    requests_per_minute=LIMIT,
                )
                store = PostgresStore(self.postgres_url, max_connections=4)
                bridges.append(
                    await stack.enter_async_context(running_bridge(config, self.clock, store))
                )
            yield bridges


@pytest.fixture
def cluster(
    tmp_path: Path,
    clock: ManualClock,
    sandbox_state: SandboxState,
    sandbox_url: str,
    postgres_url: str,
) -> Cluster:
    return Cluster(tmp_path, clock, sandbox_state, sandbox_url, postgres_url)


async def post_each(url: str, count: int, start: int = 0) -> list[int]:
    ids: list[int] = []
    async with httpx.AsyncClient() as http:
        for i in range(start, start + count):
            body = {"to": f"+1202{5000000 + i:07d}", "message": f"alert {i}"}
            ids += (await http.post(f"{url}/api/v1/messages", json=body)).json()["ids"]
    return ids


async def step_all(bridges: list[tuple[Bridge, str]], clock: ManualClock) -> None:
    """One step of every instance's dispatcher and poller, then the clock to the next."""
    waits = [5.0]
    for bridge, _ in bridges:
        waits += [await bridge.dispatcher.run_once(), await bridge.poller.run_once()]
    clock.advance(max(min(waits), 0.01))


async def test_three_instances_under_a_flood_never_exceed_the_limit(cluster: Cluster) -> None:
    clock, sandbox_state = cluster.clock, cluster.sandbox
    sandbox_state.rate_limit = LIMIT
    async with cluster.start() as bridges:
        ids = []
        for n, (_, url) in enumerate(bridges):  # distinct texts: nothing to coalesce
            ids += await post_each(url, 30, start=100 * n)
        store = bridges[0][0].store
        start = clock.now()
        # Each step asks the running totals (one query) whether all are out, and the
        # states of the 90 are read one by one once at the end: reading them each step
        # made these queries most of the test's time.
        while clock.now() - start < 600:
            await step_all(bridges, clock)
            if set(await store.counts()) <= {State.SENT, State.DELIVERED}:
                break
        states = [(await store.get(i)).state for i in ids]  # type: ignore[union-attr]
        assert all(s in (State.SENT, State.DELIVERED) for s in states)
    times = [r.at for r in sandbox_state.requests]
    assert [r.status for r in sandbox_state.requests].count(429) == 0
    assert max_in_window(times) <= LIMIT
    sends = [r for r in sandbox_state.requests if r.path.endswith("/send")]
    assert len(sends) == 90  # each message once, whichever instance sent it
    # The three together used the budget: 90 sends at 20 a minute need 4 windows, not 13.
    assert sends[-1].at - sends[0].at < 5 * 61


async def test_a_429_seen_by_one_instance_pauses_every_instance(cluster: Cluster) -> None:
    clock, sandbox_state = cluster.clock, cluster.sandbox
    sandbox_state.faults.append(Fault(status=429, path="/send", retry_after="45"))
    async with cluster.start() as bridges:
        (a, url_a), (_, url_b), (_, url_c) = bridges
        [first] = await post_each(url_a, 1)
        await a.dispatcher.run_once()  # its price list, then the send answered 429
        [answer] = [r for r in sandbox_state.requests if r.path.endswith("/send")]
        assert answer.status == 429
        ids = [first] + await post_each(url_b, 3, start=10) + await post_each(url_c, 3, start=20)
        seen = len(sandbox_state.requests)
        for _ in range(20):  # 44 s: no instance asks the provider anything
            await step_all(bridges, clock)
            if clock.now() - answer.at >= 44:
                break
        assert len(sandbox_state.requests) == seen, sandbox_state.requests[seen:]
        for _ in range(200):
            await step_all(bridges, clock)
            got = [await a.store.get(i) for i in ids]
            if all(m is not None and m.state in (State.SENT, State.DELIVERED) for m in got):
                break
        after = [r for r in sandbox_state.requests if r.at > answer.at]
        assert after and min(r.at for r in after) - answer.at >= 45
        assert all(r.status == 200 for r in after)
        assert len([r for r in after if r.path.endswith("/send")]) == 7


async def test_a_refused_key_seen_by_one_instance_pauses_every_instance(cluster: Cluster) -> None:
    clock, sandbox_state = cluster.clock, cluster.sandbox
    async with cluster.start() as bridges:
        (a, url_a), (b, url_b), (c, url_c) = bridges
        sandbox_state.api_key = "rotated-key"
        await post_each(url_a, 1)
        await a.dispatcher.run_once()  # the price list and the send: both 401
        refused = sandbox_state.requests[-1]
        assert refused.status == 401 and not a.dispatcher.health.ready
        await post_each(url_b, 1, start=10)
        await post_each(url_c, 1, start=20)
        seen = len(sandbox_state.requests)
        # Until the probe interval (30 s) has passed, nobody asks again: one probe then.
        for _ in range(10):
            waits = [await bridge.dispatcher.run_once() for bridge in (b, c, a)]
            assert len(sandbox_state.requests) == seen
            clock.advance(min(min(waits), refused.at + 30 - clock.now()))
            if clock.now() >= refused.at + 30:
                break
        sandbox_state.api_key = "test-key"  # the operator fixes the key upstream
        for bridge in (a, b, c):
            await bridge.dispatcher.run_once()
        assert min(r.at for r in sandbox_state.requests[seen:]) - refused.at >= 30
        assert len(sandbox_state.entries) == 3


async def test_bookings_survive_a_restart_of_the_cluster(cluster: Cluster) -> None:
    clock, sandbox_state = cluster.clock, cluster.sandbox
    sandbox_state.rate_limit = LIMIT
    async with cluster.start() as bridges:
        for n, (bridge, url) in enumerate(bridges):
            await post_each(url, 6, start=10 * n)
            await bridge.dispatcher.run_once()
        # Three price lists and 17 sends: the window is full, one message left waiting.
        assert len(sandbox_state.requests) == LIMIT
    async with cluster.start(2) as bridges:
        for n, (bridge, url) in enumerate(bridges):
            await post_each(url, 1, start=50 + n)
            assert await bridge.dispatcher.run_once() > 50  # no fresh burst after the restart
        assert len(sandbox_state.requests) == LIMIT
        clock.advance(61)
        for bridge, _ in bridges:
            await bridge.dispatcher.run_once()
        assert len(sandbox_state.requests) > LIMIT
    assert [r.status for r in sandbox_state.requests].count(429) == 0


# -- a wait for the pool must not age a booking ---------------------------------------------
@contextlib.asynccontextmanager
async def one_connection_store(postgres_url: str) -> AsyncIterator[PostgresStore]:
    """A store whose pool has one connection: the test holds it to play a flood."""
    store = PostgresStore(postgres_url, max_connections=1)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def waited_for_the_pool(store: PostgresStore, clock: ManualClock, task: asyncio.Task) -> None:
    """`task` waits for the pool's one connection (held here) while 10 s pass."""
    async with store.db.pool.acquire():
        await asyncio.sleep(0.2)
        assert not task.done()  # it waits for the connection
        clock.advance(10.0)


async def test_a_booking_that_waited_for_the_pool_is_stamped_when_it_got_it(
    postgres_url: str, clock: ManualClock, sandbox_state: SandboxState
) -> None:
    """The rate window's stamp was read before waiting for a pooled connection: under a
    flood (here: a pool of one, held for 10 s) the booking said t, the request went at
    t + 10, and at t + 60.5 the bridge thought that request out of the window while the
    provider still counted it: 6 requests in the provider's minute for a limit of 5.
    The store now reads the clock once it holds the connection and the rate lock. The
    sandbox's own sliding-window count judges every request the bridge allows."""
    limit = 5
    sandbox_state.rate_limit = limit
    async with one_connection_store(postgres_url) as store:
        limiter = SlidingWindowLimiter(limit=limit, clock=clock, store=store)
        made: list[float] = []

        def make_request() -> None:  # what the provider sees, on the shared clock
            made.append(clock.now())
            assert sandbox_state.admit() is None, f"a 429: {len(made)} requests in its minute"

        first = asyncio.create_task(limiter.acquire("send"))
        await waited_for_the_pool(store, clock, first)
        assert await first == 0.0
        make_request()
        start = clock.now()
        while clock.now() - start < 130:  # the rest, each as soon as the bridge allows
            await limiter.sync()  # as each dispatcher step does: the store's window
            wait = await limiter.acquire("send")
            if wait > 0:
                clock.advance(wait)
            else:
                make_request()
    assert len(made) >= 2 * limit
    assert max_in_window(made) <= limit


async def test_a_claim_that_waited_for_the_pool_books_and_leases_from_when_it_got_it(
    postgres_url: str, clock: ManualClock
) -> None:
    """The same wait in a send's claim: its booking is stamped when the claim held the
    connection, and its lease runs from then (a lease counted from before a long wait
    could have passed already, and another instance take the claim over and resend)."""
    async with one_connection_store(postgres_url) as store:
        [mid] = await seed(store, [MESSAGE], clock.now())
        asked = clock.now()
        claim = asyncio.create_task(
            store.claim([mid], clock.now, owner="a", lease_until=asked + 30, limit=5, window=60.5)
        )
        await waited_for_the_pool(store, clock, claim)
        assert await claim == [mid]
        [booking] = await store.request_rows(0.0)
        assert booking.at == asked + 10
        lease = await store._fetchval("SELECT lease_until FROM messages WHERE id = $1", mid)
        assert lease == asked + 40
