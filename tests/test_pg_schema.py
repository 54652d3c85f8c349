"""The PostgreSQL schema on a real server: created fresh, upgraded from an older version
with its rows kept, a newer unknown version refused, concurrent `migrate` runs applying
each step once, and the event triggers writing a row on every state change."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from bridge.errors import SchemaError
from bridge.store.postgres.migrate import check_schema, migrate
from bridge.store.postgres.pool import Database
from bridge.store.postgres.queries import MENTIONED_BY, PURGE, RECENT_FAILURES
from bridge.store.postgres.schema import LATEST, MIGRATIONS
from bridge.store.totals import OLDEST_DUE
from tests.test_store_sqlite import PREVIOUS_ROWS


@pytest.fixture
async def empty_db(postgres_empty_url: str) -> AsyncIterator[Database]:
    db = Database(postgres_empty_url, max_size=4)
    await db.open()
    yield db
    await db.close()


async def versions(db: Database) -> list[tuple[int, str]]:
    async with db.connection() as conn:
        rows = await conn.fetch("SELECT version, name FROM schema_version ORDER BY version")
    return [(r["version"], r["name"]) for r in rows]


INSERT_V1 = (
    "INSERT INTO messages (recipient, text, source, sender_id, message_type, parts, state,"
    " created_at, updated_at, next_attempt_at) VALUES"
    " ('+4915100000001', 'disk full', 'http', 'bridge', 1, 1, 'queued', 10, 10, 10)"
    " RETURNING id"
)


async def test_a_fresh_database_gets_every_migration_in_order(empty_db: Database) -> None:
    with pytest.raises(SchemaError, match="no sms-bridge schema: run `sms-bridge migrate`"):
        await check_schema(empty_db)
    applied = await migrate(empty_db)
    assert [m.version for m in applied] == list(range(1, LATEST + 1))
    assert await versions(empty_db) == [(m.version, m.name) for m in MIGRATIONS]
    assert await check_schema(empty_db) == LATEST
    assert await migrate(empty_db) == []  # a second run has nothing to do


async def test_every_state_change_writes_an_event_row(empty_db: Database) -> None:
    await migrate(empty_db)
    async with empty_db.transaction() as conn:
        message_id = await conn.fetchval(INSERT_V1)
        await conn.execute(
            "UPDATE messages SET state = 'sending', attempts = 1, updated_at = 11 WHERE id = $1",
            message_id,
        )
        # Not a state change: no event.
        await conn.execute("UPDATE messages SET reason = 'x' WHERE id = $1", message_id)
        await conn.execute(
            "UPDATE messages SET state = 'sent', updated_at = 12, reason = NULL WHERE id = $1",
            message_id,
        )
    async with empty_db.connection() as conn:
        events = await conn.fetch(
            "SELECT at, state, attempts FROM events WHERE message_id = $1 ORDER BY id", message_id
        )
    assert [tuple(e) for e in events] == [(10, "queued", 0), (11, "sending", 1), (12, "sent", 1)]


async def test_an_older_schema_is_refused_then_upgraded_with_its_rows(empty_db: Database) -> None:
    await migrate(empty_db, target=1)
    async with empty_db.transaction() as conn:
        message_id = await conn.fetchval(INSERT_V1)
    with pytest.raises(SchemaError, match=f"schema version 1, this sms-bridge needs {LATEST}"):
        await check_schema(empty_db)
    applied = await migrate(empty_db)
    assert [m.version for m in applied] == list(range(2, LATEST + 1))
    assert await check_schema(empty_db) == LATEST
    async with empty_db.connection() as conn:
        row = await conn.fetchrow("SELECT * FROM messages WHERE id = $1", message_id)
    assert row["text"] == "disk full" and row["state"] == "queued"
    assert row["claimed_by"] is None and row["lease_until"] is None  # version 2's columns


async def test_version_9_gives_the_stored_messages_when_they_became_due(
    empty_db: Database,
) -> None:
    # The same three as SQLite's 0013 test: stored at 100, scheduled for 00:10 (600), held
    # by a daily cap until 5000.
    await migrate(empty_db, target=8)
    async with empty_db.transaction() as conn:
        await conn.execute(PREVIOUS_ROWS)
    assert [m.version for m in await migrate(empty_db)] == list(range(9, LATEST + 1))
    async with empty_db.connection() as conn:
        due = [r[0] for r in await conn.fetch("SELECT due_at FROM messages ORDER BY id")]
    assert due == [100.0, 600.0, 5000.0]


async def test_a_newer_unknown_schema_is_refused_and_left_alone(empty_db: Database) -> None:
    await migrate(empty_db)
    async with empty_db.transaction() as conn:
        await conn.execute(
            "INSERT INTO schema_version (version, name) VALUES ($1, 'from_the_future')", LATEST + 1
        )
    with pytest.raises(SchemaError, match=rf"version {LATEST + 1}, newer than this sms-bridge"):
        await check_schema(empty_db)
    with pytest.raises(SchemaError, match="newer"):
        await migrate(empty_db)
    assert (await versions(empty_db))[-1] == (LATEST + 1, "from_the_future")


async def test_concurrent_migrations_apply_each_step_once(empty_db: Database) -> None:
    results = await asyncio.gather(*(migrate(empty_db) for _ in range(4)))
    applied = sorted(m.version for result in results for m in result)
    assert applied == list(range(1, LATEST + 1))
    assert [v for v, _ in await versions(empty_db)] == list(range(1, LATEST + 1))


async def test_a_failing_migration_leaves_the_previous_version(empty_db: Database) -> None:
    await migrate(empty_db, target=1)
    async with empty_db.transaction() as conn:
        # Something of version 2's already there by hand: its migration must fail whole.
        await conn.execute("CREATE TABLE rate_keys (key text)")
    with pytest.raises(Exception, match="already exists"):
        await migrate(empty_db)
    assert [v for v, _ in await versions(empty_db)] == [1]
    async with empty_db.connection() as conn:
        columns = await conn.fetchval(
            "SELECT count(*) FROM information_schema.columns"
            " WHERE table_name = 'messages' AND column_name = 'claimed_by'"
        )
    assert columns == 0  # version 2's first statements were rolled back with it


async def test_migrate_refuses_a_version_it_does_not_have(empty_db: Database) -> None:
    with pytest.raises(ValueError, match="no schema version"):
        await migrate(empty_db, target=LATEST + 1)


async def plan_on_20000(db: Database, state: str, reason: str, sql: str, *args: object) -> str:
    """EXPLAIN `sql` on a migrated store of 20,000 messages in `state` with `reason` (SQL
    over n, 1..20,000: message n is created n * 432 s after the epoch, 100 days), analyzed."""
    await migrate(db)
    async with db.transaction() as conn:
        await conn.execute(
            "INSERT INTO messages (recipient, text, source, sender_id, message_type, parts,"
            " state, reason, created_at, updated_at, next_attempt_at)"
            f" SELECT '+4915100000001', 'x', 'http', 'bridge', 1, 1, {state}, {reason}, n * 432,"
            " n * 432, n * 432 FROM generate_series(1, 20000) AS n"
        )
        await conn.execute("ANALYZE messages")
        return "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN {sql}", *args))


async def test_retention_finds_old_messages_by_creation_time(empty_db: Database) -> None:
    # Most stored messages are finished, so their state narrows nothing: with the
    # planner's statistics of a store of 20,000 over 100 days, the day to purge is
    # found through messages_created_at, not by reading every finished row.
    plan = await plan_on_20000(empty_db, "'delivered'", "NULL", PURGE, 86400.0)
    assert "messages_created_at" in plan, plan


async def test_a_message_page_looks_up_what_names_it(empty_db: Database) -> None:
    # mentioned_by matched every suppressed message with LIKE; its expression must be
    # written as migration 6's index is for the planner to use it.
    reason = "'duplicate of message ' || n || ' within 600s'"
    args = (12, "% message 12 %", "% message 12", 200)
    plan = await plan_on_20000(empty_db, "'suppressed'", reason, MENTIONED_BY, *args)
    assert "messages_mentions" in plan, plan


async def test_a_scrape_finds_the_oldest_queued_among_the_queued(empty_db: Database) -> None:
    # min(created_at) alone became a walk of messages_created_at from the oldest message
    # until a queued one: the whole index when nothing is queued (260 ms a scrape on a
    # million messages). The newest few are queued, as the statistics of a live store say.
    state = "CASE WHEN n > 19950 THEN 'queued' ELSE 'delivered' END"
    plan = await plan_on_20000(empty_db, state, "NULL", OLDEST_DUE)
    assert "messages_created_at" not in plan and "messages_due" in plan, plan


async def test_the_overviews_recent_failures_read_the_latest_failed_only(
    empty_db: Database,
) -> None:
    # Ordered by when they failed, every failed message was read and sorted at each
    # overview; version 7 indexes failed messages by that time. A store where one in
    # twenty failed, as a live one's statistics say.
    state = "CASE WHEN n % 20 = 0 THEN 'failed' ELSE 'delivered' END"
    plan = await plan_on_20000(empty_db, state, "NULL", RECENT_FAILURES, 10)
    assert "messages_failed" in plan and "Sort" not in plan, plan
