"""What only the SQLite store promises: WAL with full sync, its migrations table, a
failing disk failing every waiter, a clear error where the file cannot be opened."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from bridge.config import StoreConfig
from bridge.errors import StoreUnavailable
from bridge.models import NewMessage
from bridge.store import open_store
from bridge.store.sqlite import SqliteStore
from tests.stores import FaultySqliteStore, seed

MESSAGE = NewMessage("+12025550143", "hi", "http", "SMS", 1, 1)


@pytest.fixture
async def sqlite(tmp_path):
    store = FaultySqliteStore(tmp_path / "s.db")
    await store.open()
    yield store
    await store.close()


async def test_wal_and_full_sync(sqlite: FaultySqliteStore) -> None:
    conn = sqlite3.connect(sqlite.path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    sync = await sqlite.on_writer(lambda db: db.execute("PRAGMA synchronous").fetchone()[0])
    assert sync == 2  # FULL


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


def test_the_factory_picks_the_backend_from_config(tmp_path) -> None:
    store = open_store(StoreConfig(path=str(tmp_path / "x.db")))
    assert isinstance(store, SqliteStore) and store.path == str(tmp_path / "x.db")
    # The PostgreSQL store has landed: a URL picks it (not connected until opened).
    from bridge.store.postgres.store import PostgresStore

    assert isinstance(
        open_store(StoreConfig(url="postgresql://bridge@db.example/sms")), PostgresStore
    )
