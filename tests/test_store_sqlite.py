"""What only the SQLite store promises: WAL with full sync, its migrations table, a
failing disk failing every waiter, a clear error where the file cannot be opened."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import httpx
import pytest
from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from bridge.clock import ManualClock
from bridge.config import StoreConfig
from bridge.errors import StoreUnavailable
from bridge.models import NewMessage, State
from bridge.policy.decide import Rules, text_key
from bridge.store import open_store
from bridge.store.postgres.store import PostgresStore
from bridge.store.sqlite import SqliteStore, engine
from bridge.store.sqlite.engine import whole_database
from bridge.store.sqlite.schema import migrations
from bridge.store.values import IngestQuestions, Lookups, Pending
from tests.helpers import bridge_config, running_bridge
from tests.stores import FaultySqliteStore, faulty_store, seed

MESSAGE = NewMessage("+12025550143", "hi", "http", "SMS", 1, 1)


@pytest.fixture
async def sqlite(tmp_path):
    store = FaultySqliteStore(tmp_path / "s.db")
    await store.open()
    yield store
    await store.close()


async def test_wal_and_normal_sync(sqlite: FaultySqliteStore) -> None:
    """NORMAL: a commit writes the WAL, the engine's syncer makes it durable
    (tests/test_pipeline.py holds the 202 behind that sync)."""
    conn = sqlite3.connect(sqlite.path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    sync = await sqlite.on_writer(lambda db: db.execute("PRAGMA synchronous").fetchone()[0])
    assert sync == 1  # NORMAL


async def test_migrations_are_recorded_once(tmp_path) -> None:
    for _ in range(2):
        store = SqliteStore(tmp_path / "s.db")
        await store.open()
        await store.close()
    conn = sqlite3.connect(tmp_path / "s.db")
    count, names = conn.execute(
        "SELECT count(*), count(DISTINCT name) FROM _sqlite_migrations"
    ).fetchone()
    assert count == names >= 5


async def test_a_failing_disk_fails_every_waiter_and_stores_nothing(
    sqlite: FaultySqliteStore,
) -> None:
    sqlite.disk_full()
    results = await asyncio.gather(
        *[seed(sqlite, [MESSAGE], 1.0) for _ in range(5)], return_exceptions=True
    )
    assert all(isinstance(r, StoreUnavailable) for r in results)
    sqlite.fail_commits(None)
    assert await sqlite.counts() == {}


async def test_unopenable_store_reports_clearly(tmp_path) -> None:
    (tmp_path / "dir.db").mkdir()
    store = SqliteStore(tmp_path / "dir.db")
    with pytest.raises(StoreUnavailable, match="cannot open store"):
        await store.open()
    await store.close()


def store_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name in ("store-writer", "store-sync")}


async def test_a_failed_open_leaves_no_thread_behind(tmp_path) -> None:
    """A store that cannot be opened (here a file that is no database) and is never
    closed (the CLI's commands return with the error): the writer and the syncer stayed,
    waiting on their queues, for as long as the process lived."""
    before = store_threads()  # any that another test left open
    (tmp_path / "s.db").write_bytes(b"not a database, " * 64)
    store = SqliteStore(tmp_path / "s.db")
    with pytest.raises(StoreUnavailable, match="cannot open store"):
        await store.open()
    assert store_threads() <= before


async def test_a_migration_that_raises_fails_the_open_and_leaves_no_thread(
    tmp_path, monkeypatch
) -> None:
    """Only SQLite's errors failed the open: any other out of a migration ended the
    writer with open()'s job unanswered, and open() waited for good."""

    def broken(db: Database) -> list[Any]:
        raise ValueError("a migration's own bug")

    monkeypatch.setattr(migrations, "pending", broken)
    before = store_threads()
    store = SqliteStore(tmp_path / "s.db")
    with pytest.raises(StoreUnavailable, match="a migration's own bug"):
        await asyncio.wait_for(store.open(), 10)  # a hang fails here, after 10 s
    assert store_threads() <= before


async def test_a_failed_migration_is_logged_once_with_its_reason_and_nothing_half_done(
    tmp_path, monkeypatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A migration of a release that raises (a bug of ours, not SQLite's error): its
    traceback is logged once, by the writer, with the reason; the open fails with a
    StoreUnavailable that says it, and no thread stays; what the migration did is rolled
    back and not recorded, the ones before it are kept, and the next open applies it."""
    reason = "a migration's own bug: no column 'kind' in a row of 2019"
    fixed = [False]
    with_broken = Migrations(migrations.name)
    for migration in migrations.pending(Database(memory=True)):  # every one, in order
        with_broken(name=migration.name, transactional=migration.transactional)(migration.fn)

    @with_broken(name="9999_broken")
    def _broken(db: Database) -> None:
        db.execute("CREATE TABLE half_done (x INTEGER)")
        if not fixed[0]:
            raise ValueError(reason)

    monkeypatch.setattr(engine, "migrations", with_broken)
    caplog.set_level(logging.DEBUG, logger="bridge")
    path = tmp_path / "s.db"
    before = store_threads()
    with pytest.raises(StoreUnavailable, match=re.escape(f"cannot open store {path}: {reason}")):
        await asyncio.wait_for(SqliteStore(path).open(), 10)
    assert store_threads() <= before
    [record] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert record.name == "bridge.store.sqlite.engine" and record.levelno == logging.ERROR
    assert record.getMessage() == f"store {path}: opening it failed"
    assert record.exc_info is not None and str(record.exc_info[1]) == reason
    assert f"ValueError: {reason}" in caplog.text  # the traceback, said once
    assert caplog.text.count("Traceback") == 1
    db = Database(sqlite3.connect(path))
    assert "half_done" not in db.table_names()
    assert (
        [m.name for m in with_broken.applied(db)]
        == [m.name for m in migrations.applied(db)]
        == [m.name for m in with_broken.pending(Database(memory=True))][:-1]
    )
    db.close()
    fixed[0] = True
    store = SqliteStore(path)
    await store.open()
    try:
        assert await store.migrate() == ["9999_broken"]
    finally:
        await store.close()


def test_the_factory_picks_the_backend_from_config(tmp_path) -> None:
    store = open_store(StoreConfig(path=str(tmp_path / "x.db")))
    assert isinstance(store, SqliteStore) and store.path == str(tmp_path / "x.db")
    pg = open_store(StoreConfig(url="postgresql://bridge@db.example/sms"))
    assert isinstance(pg, PostgresStore) and pg.db.url == "postgresql://bridge@db.example/sms"


@contextlib.asynccontextmanager
async def writer_held(sqlite: FaultySqliteStore) -> AsyncIterator[Callable[[int], Awaitable[None]]]:
    """The writer kept busy by a job until the block ends, so that the jobs queued
    meanwhile run as one group then. Yields `queued(n)`: wait until n jobs wait."""
    entered, release = threading.Event(), threading.Event()

    def hold(db: Any) -> None:
        entered.set()
        release.wait(10)

    holding = asyncio.ensure_future(sqlite.on_writer(hold))
    await asyncio.to_thread(entered.wait, 5)
    before = sqlite.engine.handed_over

    async def queued(n: int) -> None:
        while sqlite.engine.handed_over - before < n:  # noqa: ASYNC110 - a thread's queue
            await asyncio.sleep(0.01)

    try:
        yield queued
    finally:
        release.set()
        await holding


async def test_an_sqlite_error_of_one_job_costs_its_group_neighbours_nothing(
    tmp_path, clock: ManualClock, sandbox_url: str
) -> None:
    """A job whose statement SQLite refuses (a broken constraint: a real error, from a
    real file) failed every job of its group commit: ten alerts posted next to it got
    503, though nothing was wrong with them. An SQLite error that is the job's own is now
    handled as any other job's error: the group rolled back, each job rerun alone, and
    only the bad one fails (StoreUnavailable, which ingress answers 451/503)."""
    config = bridge_config(tmp_path, sandbox_url)
    store = faulty_store(config)
    async with running_bridge(config, clock, store) as (bridge, url):
        await seed(store, [MESSAGE], 1.0)  # id 1 exists: inserting it again is refused

        def duplicate(db: Any) -> None:
            db.execute("INSERT INTO messages SELECT * FROM messages WHERE id = 1")

        async with httpx.AsyncClient(base_url=url) as http:
            async with writer_held(store) as queued:
                posts = [
                    asyncio.ensure_future(
                        http.post(
                            "/api/v1/messages", json={"to": "+12025550144", "message": f"m{i}"}
                        )
                    )
                    for i in range(5)
                ]
                await queued(5)  # the five ingests wait in the writer's queue
                bad = asyncio.ensure_future(store.on_writer(duplicate))
                posts += [
                    asyncio.ensure_future(
                        http.post(
                            "/api/v1/messages", json={"to": "+12025550145", "message": f"n{i}"}
                        )
                    )
                    for i in range(5)
                ]
                await queued(11)
            answers = await asyncio.gather(*posts)
            with pytest.raises(StoreUnavailable, match="UNIQUE constraint failed"):
                await bad
        assert [a.status_code for a in answers] == [202] * 10
        assert (await bridge.store.counts())["queued"] == 11


async def test_a_full_database_is_every_jobs_error_a_broken_constraint_one_jobs(
    sqlite: FaultySqliteStore,
) -> None:
    """How the writer tells them apart, on real errors: a full database (SQLITE_FULL: the
    file may not grow) fails every job of the group at once, as before, with no rerun of
    each; a broken constraint is the job's own."""
    await seed(sqlite, [MESSAGE], 1.0)

    def fill(db: Any) -> None:
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count = {pages}")
        db.execute("INSERT INTO provider_requests (at, kind) VALUES (1, ?)", ("x" * 100_000,))

    with pytest.raises(StoreUnavailable) as full:
        await sqlite.on_writer(fill)
    assert whole_database(full.value.__cause__)  # type: ignore[arg-type]

    def constraint(db: Any) -> None:
        db.execute("INSERT INTO messages SELECT * FROM messages WHERE id = 1")

    with pytest.raises(StoreUnavailable) as refused:
        await sqlite.on_writer(constraint)
    assert not whole_database(refused.value.__cause__)  # type: ignore[arg-type]


# A store 0012 left: one text stored at 100, one scheduled for 00:10 (600), one a daily
# cap holds until 5000 (PostgreSQL's test_pg_schema has the same three).
PREVIOUS_ROWS = (
    "INSERT INTO messages (recipient, text, source, sender_id, message_type, parts, state,"
    " schedule_time, reason_kind, created_at, updated_at, next_attempt_at) VALUES"
    " ('+12025550143', 'a', 'http', 'SMS', 1, 1, 'queued', NULL, NULL, 100, 100, 100),"
    " ('+12025550143', 'b', 'http', 'SMS', 1, 1, 'queued', '1970-01-01 00:10:00', NULL,"
    " 100, 100, 100),"
    " ('+12025550143', 'c', 'http', 'SMS', 1, 1, 'queued', NULL, 'budget', 100, 100, 5000)"
)


async def test_a_store_of_the_previous_schema_gets_when_each_message_was_due(tmp_path) -> None:
    """0013 keeps when a message became due (due_at); the rows stored before get the
    time the oldest queued age counted from: stored, scheduled, or the hold's end."""
    path = tmp_path / "old.db"
    db = Database(sqlite3.connect(path))
    migrations.apply(db, stop_before="0013_due_at")
    db.execute(PREVIOUS_ROWS)
    db.conn.commit()
    db.conn.close()
    store = SqliteStore(path)
    await store.open()
    try:
        due = [(await store.get(i)).due_at for i in (1, 2, 3)]
        [new] = await seed(store, [MESSAGE], 7000.0)
        fresh = await store.get(new)
    finally:
        await store.close()
    assert due == [100.0, 600.0, 5000.0]
    assert fresh.due_at == 7000.0


class RetryMeanwhile:
    """Policy, but another process re-queues a failed message (as `sms-bridge retry`
    does, on its own connection) just after the first lookups were read."""

    meanwhile = "UPDATE messages SET state = 'queued' WHERE id = ?"

    def __init__(self, rules: Rules, path: str, message_id: int) -> None:
        self.rules, self.path, self.message_id, self.decided = rules, path, message_id, 0

    def questions(self, pending: Sequence[Pending]) -> IngestQuestions:
        return self.rules.questions(pending)

    def decide(
        self, lookups: Lookups, pending: Sequence[Pending], ids: Sequence[int]
    ) -> list[NewMessage]:
        self.decided += 1
        if self.decided == 1:
            other = sqlite3.connect(self.path, isolation_level=None)
            other.execute(self.meanwhile, (self.message_id,))
            other.close()
        return self.rules.decide(lookups, pending, ids)


async def test_a_commit_of_another_process_between_lookups_and_insert_is_decided_on(
    sqlite: FaultySqliteStore,
) -> None:
    """A group of ingests alone is stored in two trips into SQLite, not four: its lookups
    read outside a transaction, then its insert, which commits itself. Another process
    (`sms-bridge retry`, `purge`) may commit between the two: the insert then writes
    nothing, and the group is decided again in a transaction, on what that process
    wrote. Here the failed original of an alert is retried between them: the alert
    again is its repeat, suppressed, as when the retry came first."""
    key = text_key(MESSAGE.text)
    [original] = await seed(sqlite, [MESSAGE._replace(state=State.FAILED, dedupe_key=key)], 1.0)
    decider = RetryMeanwhile(Rules(dedupe_window=600.0), sqlite.path, original)
    [stored] = await sqlite.ingest([(MESSAGE._replace(dedupe_key=key), 2.0)], decider)
    assert decider.decided == 2  # once outside the transaction, once inside
    assert stored.message.state == State.SUPPRESSED
    assert stored.id == original + 1
    rows = await sqlite.engine.read(
        lambda c: c.execute("SELECT id, state FROM messages ORDER BY id").fetchall()
    )
    assert [tuple(r) for r in rows] == [(original, "queued"), (stored.id, "suppressed")]


class PurgeMeanwhile(RetryMeanwhile):
    """Another process deletes the newest message (as an operator's `sms-bridge purge`
    may) just after the first lookups were read."""

    meanwhile = "DELETE FROM messages WHERE id = ?"


async def test_a_purge_of_the_newest_between_lookups_and_insert_gives_no_id_again(
    sqlite: FaultySqliteStore, tmp_path
) -> None:
    """Ids were max(id) + 1: the newest message deleted between the two trips, the group
    decided again in its transaction took the deleted one's id (a caller holds it). Ids
    continue after the highest ever given, there too; and a store of the previous schema
    (0015) continues after its newest message."""
    [newest] = await seed(sqlite, [MESSAGE], 1.0)
    decider = PurgeMeanwhile(Rules(dedupe_window=600.0), sqlite.path, newest)
    [stored] = await sqlite.ingest([(MESSAGE._replace(text="after"), 2.0)], decider)
    assert decider.decided == 2  # the other process's commit was seen
    assert stored.id == newest + 1
    assert await sqlite.get(newest) is None

    path = tmp_path / "old.db"
    db = Database(sqlite3.connect(path))
    migrations.apply(db, stop_before="0016_message_ids")
    db.execute(PREVIOUS_ROWS)  # ids 1 to 3
    db.conn.commit()
    db.conn.close()
    store = SqliteStore(path)
    await store.open()
    try:
        assert [m.id for m in await store.query(limit=10)] == [3, 2, 1]
        assert await seed(store, [MESSAGE], 7000.0) == [4]
    finally:
        await store.close()


async def test_a_group_of_ingests_alone_commits_without_a_transaction(
    sqlite: FaultySqliteStore,
) -> None:
    """What the two trips buy, counted: a group of ingests takes neither BEGIN nor COMMIT
    (each a trip into SQLite that waits for the event loop to hand the GIL back), and a
    group with any other job in it still takes one transaction for all."""
    statements: list[str] = []
    await sqlite.on_writer(lambda db: db.conn.set_trace_callback(statements.append))
    statements.clear()  # that job's own COMMIT
    rules = Rules(dedupe_window=600.0)
    await asyncio.gather(
        *(sqlite.ingest([(MESSAGE._replace(text=f"m{i}"), 2.0)], rules) for i in range(3))
    )
    assert not [s for s in statements if s.startswith(("BEGIN", "COMMIT"))]
    assert sum(s.startswith("INSERT INTO messages") for s in statements) >= 1
    statements.clear()
    await sqlite.heartbeat(3.0)
    assert [s for s in statements if s.startswith(("BEGIN", "COMMIT"))] == [
        "BEGIN IMMEDIATE",
        "COMMIT",
    ]


async def test_ingests_issued_in_one_turn_of_the_loop_commit_as_one_group(
    sqlite: FaultySqliteStore,
) -> None:
    """Each ingest went to the writer's queue the moment it was issued, so the writer
    woke for the first and committed it alone while the loop was still busy with the
    next request (here a blocking pause that lets the GIL go, as a request's parsing
    may): a group of one, a wake-up and a commit per alert. The jobs of one turn of the
    loop now go over together when the turn ends: one group, one commit."""
    rules = Rules(dedupe_window=600.0)

    async def one(i: int) -> None:
        time.sleep(0.01)  # noqa: ASYNC251 - the loop busy with a request, the GIL free
        await sqlite.ingest(
            [(MESSAGE._replace(text=f"m{i}", recipient=f"+1202555{i:04d}"), 2.0)], rules
        )

    before = sqlite.engine.commits
    await asyncio.gather(*(one(i) for i in range(5)))
    assert sqlite.engine.commits - before == 1
    rows = await sqlite.engine.read(lambda c: c.execute("SELECT count(*) FROM messages").fetchone())
    assert rows[0] == 5
