"""Several instances on one PostgreSQL database (issue #13), each a `PostgresStore` with a
pool of its own, as separate `serve` processes would be: the decisions that must hold
for the cluster as a whole, made at the same instant on different connections, many
times (a race that passes by luck would fail some of the rounds).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import asyncpg
import pytest

from bridge.errors import StoreUnavailable
from bridge.models import NewMessage, State
from bridge.policy.decide import Rules
from bridge.store.api import Held
from bridge.store.postgres import coordination
from bridge.store.postgres.store import PostgresStore
from tests.stores import seed

MESSAGE = NewMessage("+12025550143", "disk full on db-1", "alertmanager", "SMS", 1, 1)
ROUNDS = 40


CALLS = 30  # bookings raced in each round, spread over the three instances
POOL = CALLS // 3  # connections of each instance: one for each of its calls in a race
# How long one statement of a raced call may take here. The store's own bound (15 s,
# bridge.store.postgres.pool.COMMAND_TIMEOUT) is for a server that hangs; in a race
# the last of CALLS transactions waits on the rate lock while each before it holds the
# lock for four round trips, and with the test and its private server at nice 19
# beside busy loops (~1 % of a core each) that queue can outlast 15 s: StoreUnavailable
# (TimeoutError) on the last bookings, a failure of the machine, not of the count the
# test checks (five rounds took up to 15.7 s beside one busy loop and a bench). The bookings' times are the test's own (`at`), so nothing here depends
# on how long the queue takes; this bound only stops a hung server hanging the run.
RACE_TIMEOUT = 600.0


async def open_every_connection(store: PostgresStore) -> None:
    """Hold POOL connections at once, so that the pool has opened all of them before a
    race: then every raced call has its connection and waits where the test looks, in
    PostgreSQL's queue for the lock. With four connections for ten calls, the last ones
    also waited for a free connection behind ~25 transactions: on a starved machine
    past the pool's 10 s acquire timeout (StoreUnavailable: TimeoutError). The wait in
    the lock's queue is bounded by RACE_TIMEOUT alone."""
    async with contextlib.AsyncExitStack() as held:
        for _ in range(POOL):
            conn = await held.enter_async_context(store.db.connection())
            await conn.fetchval("SELECT count(*) FROM provider_requests")


@pytest.fixture
async def instances(postgres_url: str) -> AsyncIterator[list[PostgresStore]]:
    stores = [PostgresStore(postgres_url, max_connections=POOL) for _ in range(3)]
    for store in stores:
        store.db.command_timeout = RACE_TIMEOUT  # read when the pool opens
        await store.open()
        await open_every_connection(store)
    yield stores
    for store in stores:
        await store.close()


async def test_one_alert_posted_to_two_instances_at_once_is_queued_once(
    instances: list[PostgresStore],
) -> None:
    """Alertmanager's HA pair: both post the same group to different instances."""
    a, b = instances[:2]
    rules = Rules(dedupe_window=600.0, per_recipient=0, per_recipient_window=600.0)
    for n in range(ROUNDS):
        alert = MESSAGE._replace(dedupe_key=f"am:group-{n}")
        pair = [(alert, 100.0 + n), (alert._replace(recipient="+12025550144"), 100.0 + n)]
        first, second = await asyncio.gather(a.ingest(pair, rules), b.ingest(pair, rules))
        for phone in range(2):
            states = {first[phone].message.state, second[phone].message.state}
            assert states == {State.QUEUED, State.SUPPRESSED}, (n, phone, states)
    counts = await a.counts()
    assert counts == {"queued": 2 * ROUNDS, "suppressed": 2 * ROUNDS}


async def test_storm_counts_are_the_clusters(instances: list[PostgresStore]) -> None:
    """Two texts allowed per phone per window, however many instances let them in."""
    rules = Rules(dedupe_window=600.0, per_recipient=2, per_recipient_window=600.0)
    distinct = [MESSAGE._replace(text=f"alert {i}", dedupe_key=f"k{i}") for i in range(9)]
    results = await asyncio.gather(
        *(instances[i % 3].ingest([(m, 10.0)], rules) for i, m in enumerate(distinct))
    )
    states = [stored.message.state for [stored] in results]
    assert states.count(State.QUEUED) == 2 and states.count(State.HELD) == 7


async def test_claims_from_three_instances_never_share_a_message(
    instances: list[PostgresStore],
) -> None:
    ids = await seed(instances[0], [MESSAGE] * 30, 1.0)
    for _ in range(3):
        got = await asyncio.gather(
            *(s.claim(ids, 2.0, owner=f"i{n}", lease_until=40.0) for n, s in enumerate(instances))
        )
        claimed = [i for batch in got for i in batch]
        assert sorted(claimed) == sorted(set(claimed))
        for n, (s, mine) in enumerate(zip(instances, got, strict=True)):
            assert await s.requeue(mine, 3.0, owner=f"i{n}", at=1.0, reason="again") == []
    assert sorted(claimed) == ids


async def test_a_retry_put_off_by_another_instance_is_not_claimed_before_its_time(
    instances: list[PostgresStore],
) -> None:
    """a read the queue; before it claimed, b claimed the same message, met a transient
    error and put it back for later (its backoff, a provider's Retry-After). a's claim
    of what it read sent it again at once, the backoff gone: the claim takes a message
    only when it is due."""
    a, b, _ = instances
    [mid] = await seed(a, [MESSAGE], 1.0)
    planned = [m.id for m in await a.due(2.0, 10)]
    assert planned == [mid]
    assert await b.claim([mid], 2.0, owner="b", lease_until=32.0) == [mid]
    assert await b.requeue([mid], 2.5, owner="b", at=62.0, reason="retrying: refused") == []
    assert await a.claim(planned, 3.0, owner="a", lease_until=33.0) == []
    assert (await a.get(mid)).state == State.QUEUED
    assert await a.claim(planned, 62.0, owner="a", lease_until=92.0) == [mid]  # due now


async def test_a_dead_instances_messages_are_taken_over_after_its_lease(
    instances: list[PostgresStore],
) -> None:
    a, b, _ = instances
    ids = await seed(a, [MESSAGE] * 3, 1.0)
    assert await a.claim(ids, 2.0, owner="a", lease_until=32.0) == ids
    # Before the lease passes, b leaves them to a (a may be sending them right now).
    assert await b.unsettled(31.0, owner="b", lease_until=61.0) == []
    assert [m.id for m in await a.unsettled(31.0, owner="a", lease_until=62.0)] == ids
    # a stops renewing; past its lease b takes them over, renewing the lease for itself.
    taken = await b.unsettled(62.5, owner="b", lease_until=92.5)
    assert [m.id for m in taken] == ids and all(m.state == State.SENDING for m in taken)
    assert await a.unsettled(63.0, owner="a", lease_until=93.0) == []  # a is out
    assert [m.id for m in await b.unsettled(63.0, owner="b", lease_until=93.0)] == ids


async def test_a_send_after_the_claim_was_taken_over_leaves_the_takers_row(
    instances: list[PostgresStore],
) -> None:
    """a's lease lapsed (frozen, or its clock behind) while the provider held its call:
    b took the message over. a's answer then arrives: b's claim, and what b records
    after it, stand; a's send is an event on the message, not a second outcome."""
    a, b, _ = instances
    mid, other = await seed(a, [MESSAGE] * 2, 1.0)
    assert await a.claim([mid, other], 2.0, owner="a", lease_until=32.0) == [mid, other]
    assert [m.id for m in await b.unsettled(40.0, owner="b", lease_until=70.0)] == [mid, other]
    assert await a.mark_sent([(mid, "p-a", 0.1)], 41.0, owner="a") == [mid]
    assert (await b.get(mid)).state == State.SENDING  # still b's to settle
    assert [m.id for m in await b.unsettled(42.0, owner="b", lease_until=72.0)] == [mid, other]
    # b settles both (its /logs shows its own send, or a's: either way b's record holds).
    assert await b.mark_sent([(mid, "p-b", 0.2), (other, "p-c", 0.2)], 43.0, owner="b") == []
    await b.record_status([(other, State.DELIVERED, None)], 44.0)
    assert await a.mark_sent([(other, "p-a2", 0.1)], 45.0, owner="a") == [other]
    got = [await b.get(i) for i in (mid, other)]
    assert [(m.state, m.provider_message_id, m.cost) for m in got] == [
        (State.SENT, "p-b", 0.2),
        (State.DELIVERED, "p-c", 0.2),
    ]
    assert [(e["state"], e["detail"]) for e in (await b.events(mid))[1:]] == [
        ("sending", None),
        ("sending", "sent also by a after its claim was taken over: provider id p-a"),
        ("sent", None),
    ]


async def test_a_late_outcome_leaves_the_takers_claim(
    instances: list[PostgresStore], postgres_url: str
) -> None:
    """a's lease lapsed while it waited for the provider; b took the message over. What
    a then learns (a refusal) is not written over b's claim: the row stays b's to
    settle, and a's word is an event on the message."""
    a, b, _ = instances
    [mid] = await seed(a, [MESSAGE], 1.0)
    assert await a.claim([mid], 2.0, owner="a", lease_until=32.0) == [mid]
    assert [m.id for m in await b.unsettled(40.0, owner="b", lease_until=70.0)] == [mid]
    refused = (mid, State.FAILED, "provider refused: invalid number")
    assert await a.finish([refused], 41.0, owner="a") == [mid]
    assert await a.requeue([mid], 42.0, owner="a", at=50.0, reason="retrying: HTTP 503") == [mid]
    assert await a.note_unknown([mid], 43.0, "outcome unknown", "unknown", owner="a") == [mid]
    assert await a.resend_unknown([mid], 44.0, "not in /logs", owner="a") == [mid]
    assert await a.settle_unknown([mid], 45.0, "given up", owner="a") == [mid]
    assert (await b.get(mid)).state == State.SENDING
    assert [m.id for m in await b.unsettled(50.0, owner="b", lease_until=80.0)] == [mid]
    by = "not applied, a no longer held it"
    assert [(e["state"], e["detail"]) for e in (await b.events(mid))[-5:]] == [
        ("sending", f"{by}: failed: provider refused: invalid number"),
        ("sending", f"{by}: queued again: retrying: HTTP 503"),
        ("sending", f"{by}: outcome unknown"),
        ("sending", f"{by}: not in /logs"),
        ("sending", f"{by}: given up"),
    ]
    assert (await b.get(mid)).reason_kind is None  # a's unknown outcome is not b's
    # b's own requeue is written, and the row is nobody's claim once queued.
    assert await b.requeue([mid], 51.0, owner="b", at=60.0, reason="retrying") == []
    conn = await asyncpg.connect(postgres_url)
    try:
        row = await conn.fetchrow("SELECT state, claimed_by, lease_until FROM messages")
    finally:
        await conn.close()
    assert tuple(row) == ("queued", None, None)


async def test_instances_together_never_book_past_the_limit(
    instances: list[PostgresStore],
) -> None:
    for second in range(5):
        at = 1000.0 + second * 100  # a window clear of the last round's bookings
        waits = await asyncio.gather(
            *(
                instances[i % 3].book_request(at + i / 100, "send", limit=10, window=60.0)
                for i in range(CALLS)
            )
        )
        assert sum(1 for w in waits if w == 0.0) == 10
    assert len(await instances[1].request_rows(0)) == 50


async def test_a_warning_is_queued_once_by_the_cluster(instances: list[PostgresStore]) -> None:
    for n in range(ROUNDS // 4):
        warning = MESSAGE._replace(source="budget", dedupe_key=f"budget:cap:{n}")
        done = await asyncio.gather(*(s.queue_once([warning], 1.0) for s in instances))
        assert sorted(done) == [False, False, True]


async def test_held_messages_are_folded_once(instances: list[PostgresStore]) -> None:
    held = MESSAGE._replace(state=State.HELD, reason="storm", reason_kind="storm")
    await seed(instances[0], [held._replace(text=f"t{i}") for i in range(5)], 1.0)

    def digest(messages: list[Held]) -> NewMessage:
        return MESSAGE._replace(source="digest", text=f"{len(messages)} alerts")

    folded = await asyncio.gather(
        *(
            s.fold_held(MESSAGE.recipient, 2.0, digest, lambda i: f"folded into message {i}")
            for s in instances
        )
    )
    assert folded.count(None) == 2
    assert next(f for f in folded if f)[1] == 5
    assert await instances[2].counts() == {"queued": 1, "suppressed": 5}


async def test_the_caps_turn_is_one_instances_at_a_time(instances: list[PostgresStore]) -> None:
    """While one instance counts today's use and claims, another waits for its turn (or
    both would count the same use and spend the last of a cap twice); the turn ends with
    the block, an exception included."""
    one, two, _ = instances
    entered = asyncio.Event()

    async def take_turn() -> None:
        async with two.budget_turn():
            entered.set()

    async with one.budget_turn():
        waiting = asyncio.create_task(take_turn())
        # No event says "blocked on the lock": a wait it would end well within if the
        # turn were not exclusive. A starved machine can only make this pass vacuously.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(entered.wait()), 0.5)
        assert not entered.is_set()
    await asyncio.wait_for(waiting, RACE_TIMEOUT)
    with contextlib.suppress(RuntimeError):
        async with one.budget_turn():
            raise RuntimeError("a failed decision")
    await asyncio.wait_for(take_turn(), RACE_TIMEOUT)  # freed by the exception


async def test_a_caps_turn_whose_holder_stopped_is_freed_by_the_server(
    instances: list[PostgresStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A holder that stops inside its turn (frozen, cut off) would keep every instance's
    capped texts waiting until TCP noticed: the server ends its session once it has
    been idle in the turn for the limit, and the next instance gets the turn. The
    stopped holder's exit says its turn was lost (what it claimed in it is undone)."""
    monkeypatch.setattr(coordination, "TURN_IDLE_LIMIT", 0.5)
    one, two, _ = instances
    # `one` takes the turn and does nothing in it, as a frozen process would.
    with pytest.raises(StoreUnavailable, match="turn was lost"):
        async with one.budget_turn(), asyncio.timeout(RACE_TIMEOUT), two.budget_turn():
            pass


async def test_waiting_too_long_for_the_caps_turn_says_so(
    instances: list[PostgresStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dispatcher's step fails (and is tried again) naming the wait, not a bare
    timeout of the pool's."""
    monkeypatch.setattr(coordination, "TURN_WAIT_LIMIT", 0.2)
    one, two, _ = instances
    async with one.budget_turn():
        with pytest.raises(StoreUnavailable, match="another instance has held the daily caps"):
            async with two.budget_turn():
                pass
    async with two.budget_turn():  # the failed wait left nothing held
        pass


async def test_a_caps_turn_lost_while_its_holder_waited_claims_nothing(
    instances: list[PostgresStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Texts per day 1. `one` counts today's use in its turn (none), then waits past the
    turn's idle limit (for the pool, for the rate lock) before it claims: the server
    ends its turn, `two` takes it, counts none, claims and commits. `one`'s claim, made
    on a connection of its own, went through too: two texts against a cap of one. The
    claim is the turn's now: lost with it, and `one` is told so."""
    monkeypatch.setattr(coordination, "TURN_IDLE_LIMIT", 0.5)
    one, two, _ = instances
    a, b = await seed(one, [MESSAGE._replace(text="a"), MESSAGE._replace(text="b")], 1.0)
    counted = asyncio.Event()

    async def spend(store: PostgresStore, message_id: int, wait: float) -> list[int]:
        async with store.budget_turn():
            texts, _ = await store.used_since(0.0, "budget")
            counted.set()
            await asyncio.sleep(wait)  # real seconds: the server's limit is real time
            if texts >= 1:
                return []
            return await store.claim([message_id], 10.0, owner="x", lease_until=100.0)

    first = asyncio.create_task(spend(one, a, 1.5))
    await asyncio.wait_for(counted.wait(), RACE_TIMEOUT)
    assert await asyncio.wait_for(spend(two, b, 0.0), RACE_TIMEOUT) == [b]
    with pytest.raises(StoreUnavailable, match="turn was lost"):
        await asyncio.wait_for(first, RACE_TIMEOUT)
    assert (await one.used_since(0.0, "budget"))[0] == 1
    assert (await one.get(a)).state == State.QUEUED
