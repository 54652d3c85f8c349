"""A flood of one text to one phone: the next ingest's dedupe lookup does as much work
after 10,000 repeats as after 100.

The flap rule (a derived key repeats only while it is its scope's last word to the
phone) first asked, for every candidate original, whether any later message to the
phone had another key: under a flood every repeat was read again at each ingest, the
store's writer sat at 100 % CPU and `serve` would not stop (BENCHMARKS.md, "Found by the
benchmark, reverted"). Its probe now walks the phone's messages back from the newest
and stops at the first of the scope: in a flood, the newest repeat.

The work is counted, not timed: SQLite's virtual machine steps for the whole ingest
transaction (the writer's own `ingest_all`), PostgreSQL's buffers and rows for the
lookup statement (EXPLAIN ANALYZE), on one store holding both floods.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from sqlite_utils import Database

from bridge.models import NewMessage, State
from bridge.policy.decide import Rules, scoped_key, text_key
from bridge.store.postgres.ingest import ORIGINALS
from bridge.store.postgres.pool import Database as PgDatabase
from bridge.store.sqlite.queries import insert_messages
from bridge.store.sqlite.schema import migrations
from bridge.store.sqlite.store import ingest_all

FLOOD, FEW = 10_000, 100
RULES = Rules(dedupe_window=86400.0)  # the whole flood within the window
START = 1_000_000.0
TEXT = "disk full on db-2"
KEY = scoped_key("route@kuma", text_key(TEXT))
SCOPE = "route@kuma:"
FLOODED, CALM = "+12025550143", "+12025550144"


def text(phone: str, words: str = TEXT) -> NewMessage:
    key = scoped_key("route@kuma", text_key(words))
    return NewMessage(phone, words, "hook", "Bridge", 1, 1, route="kuma", dedupe_key=key)


def repeats(phone: str, count: int) -> list[NewMessage]:
    """The rows a flood leaves: the first text queued, every repeat suppressed."""
    first = text(phone)
    dup = first._replace(state=State.SUPPRESSED, reason="duplicate", reason_kind="duplicate")
    return [first] + [dup] * (count - 1)


def after(count: int) -> float:
    """When the next text of a flood of `count` (one every 0.1 s) arrives."""
    return START + count * 0.1


# -- SQLite ---------------------------------------------------------------------------
def flooded_sqlite() -> Database:
    db = Database(sqlite3.connect(":memory:", isolation_level=None))
    migrations.apply(db)
    for phone, count in ((CALM, FEW), (FLOODED, FLOOD)):
        insert_messages(db, repeats(phone, count), [START + i * 0.1 for i in range(count)])
    return db


def ingest_steps(db: Database, message: NewMessage, now: float) -> tuple[int, str]:
    """The virtual machine steps of one ingest transaction, and the state it stored."""
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0  # go on

    db.conn.set_progress_handler(count, 1)
    try:
        [[stored]] = ingest_all(db, [([(message, now)], RULES)])
    finally:
        db.conn.set_progress_handler(None, 1)
    return steps, str(stored.message.state)


def test_sqlite_an_ingest_after_a_flood_works_as_after_a_few() -> None:
    db = flooded_sqlite()
    few, state = ingest_steps(db, text(CALM), after(FEW))
    assert state == "suppressed"
    flood, state = ingest_steps(db, text(FLOODED), after(FLOOD))
    assert state == "suppressed"
    # The same b-tree descents either way; the quadratic probe took ~100x the steps.
    assert flood <= 2 * few, (few, flood)
    # A flap at the flood's end is news, and found as cheaply.
    for phone, count in ((CALM, FEW), (FLOODED, FLOOD)):
        _, state = ingest_steps(db, text(phone, "disk ok on db-2"), after(count) + 1)
        assert state == "queued"
    few, state = ingest_steps(db, text(CALM), after(FEW) + 2)
    assert state == "queued"
    flood, state = ingest_steps(db, text(FLOODED), after(FLOOD) + 2)
    assert state == "queued"
    assert flood <= 2 * few, (few, flood)


# -- PostgreSQL -----------------------------------------------------------------------
async def explained(db: PgDatabase, phone: str, since: float) -> dict[str, Any]:
    """EXPLAIN ANALYZE of the lookup the next repeat to `phone` asks (as decide.py asks
    it), and the answer it gives."""
    args = [[KEY], [phone], [since], [SCOPE]]
    async with db.connection() as conn:
        [[plan]] = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {ORIGINALS}", *args)
        [[_, _, last_word]] = await conn.fetch(ORIGINALS, *args)
    assert last_word == KEY  # still the last word: the repeat is a duplicate
    return dict(json.loads(plan)[0]["Plan"])


def work(node: dict[str, Any]) -> tuple[int, int]:
    """Buffers touched (the top node's count holds its children's) and rows read by the
    nodes that read a relation (rows returned and rows their filters removed, each loop)."""

    def rows(n: dict[str, Any]) -> int:
        own = 0
        if "Relation Name" in n or "Index Name" in n:
            own = int((n["Actual Rows"] + n.get("Rows Removed by Filter", 0)) * n["Actual Loops"])
        return own + sum(rows(child) for child in n.get("Plans", []))

    return node["Shared Hit Blocks"] + node["Shared Read Blocks"], rows(node)


async def test_postgres_the_lookup_after_a_flood_reads_as_after_a_few(postgres_url: str) -> None:
    db = PgDatabase(postgres_url, max_size=2)
    await db.open()
    try:
        async with db.transaction() as conn:
            for phone, count in ((CALM, FEW), (FLOODED, FLOOD)):
                await conn.execute(
                    "INSERT INTO messages (recipient, text, source, sender_id, message_type,"
                    " parts, route, dedupe_key, state, created_at, updated_at, next_attempt_at)"
                    " SELECT $1, $2, 'hook', 'Bridge', 1, 1, 'kuma', $3,"
                    " CASE WHEN n = 0 THEN 'queued' ELSE 'suppressed' END,"
                    " $4 + n * 0.1, $4 + n * 0.1, $4 + n * 0.1 FROM generate_series(0, $5) AS n",
                    phone,
                    TEXT,
                    KEY,
                    START,
                    count - 1,
                )
            # Other phones' texts, as a store holds them: the planner's statistics
            # (with two phones it walked messages_created_at instead, as cheap for
            # the flooded phone and bounded by the calm one's last word).
            await conn.execute(
                "INSERT INTO messages (recipient, text, source, sender_id, message_type,"
                " parts, route, dedupe_key, state, created_at, updated_at, next_attempt_at)"
                " SELECT '+1303555' || lpad((n % 500)::text, 4, '0'), 'x', 'hook', 'Bridge',"
                " 1, 1, 'am', 'route@am:k' || n, 'delivered', $1 + n * 0.05, $1, $1"
                " FROM generate_series(0, 20000) AS n",
                START,
            )
            await conn.execute("ANALYZE messages")
        since = START - 1  # the whole flood within the window
        few = work(await explained(db, CALM, since))
        plan = await explained(db, FLOODED, since)
        flood = work(plan)
    finally:
        await db.close()
    # The walk in the index's order, LIMIT 1: no bitmap of the phone's rows, no sort of
    # them by time (a sort by id is of one time's ties).
    assert "Bitmap" not in json.dumps(plan) and "l.created_at DESC" not in json.dumps(plan), plan
    # Index descents either way (a level more, maybe): the quadratic probe read every
    # repeat, ~10,000 rows and as many buffers.
    assert flood[0] <= 2 * few[0] + 4, (few, flood)
    assert flood[1] <= 2 * few[1] + 4, (few, flood)
