"""The running totals behind /metrics and /api/v1/stats on a real PostgreSQL server
(bridge.store.totals): several instances writing at once on one database export the
same, right figures; the rows of connections that are gone fold into one slot; an
upgrade from version 4 counts the messages already stored."""

from __future__ import annotations

import asyncio

from bridge.models import NewMessage, State
from bridge.store.postgres.migrate import migrate
from bridge.store.postgres.pool import Database
from bridge.store.postgres.store import PostgresStore
from tests.postgres import fresh_database
from tests.stores import aggregated, reported, seed

MESSAGE = NewMessage("+12025550143", "hi", "http", "SMS", 1, 1)


async def slots(store: PostgresStore) -> set[int]:
    rows = await store._fetch("SELECT DISTINCT slot FROM message_totals")
    return {int(r[0]) for r in rows}


async def test_two_instances_writing_at_once_export_the_same_right_figures(
    postgres_url: str,
) -> None:
    a, b = PostgresStore(postgres_url), PostgresStore(postgres_url)
    await a.open()
    await b.open()
    try:

        async def life(store: PostgresStore, n: int) -> None:
            source = "smtp" if n % 3 else "http"
            [mid] = await seed(store, [MESSAGE._replace(source=source, parts=1 + n % 2)], 1.0)
            owner = f"i{id(store)}"
            await store.claim([mid], 2.0, owner=owner, lease_until=1e12)
            if n % 4:
                await store.mark_sent([(mid, f"p{n}", 0.5)], 3.0, owner=owner)
            else:
                await store.finish([(mid, State.FAILED, "refused")], 3.0, owner=owner)

        # Each store's pool runs a transaction on each of its connections at once: they
        # touch counter rows of the same keys and must neither wait on nor deadlock each
        # other. No more lives at once than that: every claim books in the rate window
        # the cluster shares, under one lock held to its commit (bridge.store.postgres.rate),
        # and 60 lives at once queued ~100 claims of both stores ahead of the last ones'
        # connections. On a loaded machine they waited longer than the pool's
        # ACQUIRE_TIMEOUT (10 s): "store unavailable: TimeoutError".
        bound = {s: asyncio.Semaphore(s.db.max_size) for s in (a, b)}

        async def bounded(store: PostgresStore, n: int) -> None:
            async with bound[store]:
                await life(store, n)

        await asyncio.gather(*(bounded(s, n) for n in range(60) for s in (a, b)))
        expected = await aggregated(a)
        assert await reported(a) == expected and await reported(b) == expected
        assert expected[3] == sum(1 + n % 2 for n in range(60) if n % 4) * 2
        assert len(await slots(a)) > 2  # one per connection that wrote
        await b.close()  # its connections are gone: the leader's hourly upkeep folds them
        await a.upkeep()
        assert await reported(a) == expected
        held = await a._fetch("SELECT DISTINCT slot FROM message_totals WHERE slot <> 0")
        # This database's sessions: the server may be shared (by xdist workers, or
        # SMS_BRIDGE_TEST_POSTGRES), and a pid of another's proves nothing here.
        sessions = "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
        live = {int(r[0]) for r in await a._fetch(sessions)}
        assert {int(r[0]) for r in held} <= live
        assert 0 in await slots(a)
    finally:
        await a.close()
        await b.close()


async def test_a_gone_connections_pid_taken_by_another_databases_session_is_folded(
    postgres_server: str, postgres_template: str, postgres_url: str
) -> None:
    """The fold kept the rows of a slot whose pid was alive anywhere on the server: a
    session of another database (another bridge cluster's, named alike) that got a gone
    connection's pid again kept them unfolded as long as it lived. Only sessions of the
    bridge's own database count."""
    with fresh_database(postgres_server, postgres_template) as elsewhere:
        ours, gone, theirs = (PostgresStore(u) for u in (postgres_url, postgres_url, elsewhere))
        for store in (ours, gone, theirs):
            await store.open()
        try:
            await seed(gone, [MESSAGE], 1.0)
            [gone_pid] = await slots(ours)
            await seed(theirs, [MESSAGE], 1.0)
            [their_pid] = await slots(theirs)
            await gone.close()
            # The server gave the gone connection's pid to the other database's session:
            # its rows here now carry that session's pid (a pid's reuse cannot be forced).
            await ours._execute(
                "UPDATE message_totals SET slot = $1 WHERE slot = $2", their_pid, gone_pid
            )
            shape = await ours._fetch(
                "SELECT application_name, datname <> current_database() FROM pg_stat_activity"
                " WHERE pid = $1",
                their_pid,
            )
            assert [tuple(r) for r in shape] == [("sms-bridge", True)]  # alive, elsewhere
            expected = await aggregated(ours)
            await ours.upkeep()
            assert await slots(ours) == {0}
            assert await reported(ours) == expected
            assert await slots(theirs) == {their_pid}  # another database's: not ours to fold
        finally:
            for store in (ours, gone, theirs):
                await store.close()


async def test_an_upgrade_counts_the_messages_already_stored(postgres_empty_url: str) -> None:
    db = Database(postgres_empty_url, max_size=2)
    await db.open()
    try:
        await migrate(db, target=4)
        async with db.transaction() as conn:
            await conn.execute(
                "INSERT INTO messages (recipient, text, source, sender_id, message_type, parts,"
                " state, reason_kind, cost, sent_at, created_at, updated_at, next_attempt_at)"
                " SELECT '+4915100000001', 'x', 'http', 'b', 1, 1 + n % 3,"
                " (ARRAY['delivered', 'failed', 'suppressed'])[1 + n % 3],"
                " CASE WHEN n % 3 = 2 THEN 'duplicate' END, 0.25, CASE WHEN n % 3 = 0 THEN n END,"
                " n, n, n FROM generate_series(1, 30) AS n"
            )
        await migrate(db)
    finally:
        await db.close()
    store = PostgresStore(postgres_empty_url)
    await store.open()
    try:
        assert await reported(store) == await aggregated(store)
        assert await store.counts() == {"delivered": 10, "failed": 10, "suppressed": 10}
    finally:
        await store.close()
