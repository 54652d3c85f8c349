"""The store on real SQLite: group commit, the event log, migrations, durability settings."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from bridge.errors import StoreUnavailable
from bridge.models import NewMessage, State
from bridge.store import Store

MESSAGE = NewMessage("+12025550143", "hi", "http", "SMS", 1, 1)


@pytest.fixture
async def store(tmp_path):
    store = Store(tmp_path / "s.db")
    await store.open()
    yield store
    await store.close()


async def test_concurrent_writes_share_transactions(store: Store) -> None:
    before = store.commits
    ids = await asyncio.gather(
        *[store.write(lambda db: Store.insert_messages(db, [MESSAGE], 1.0)) for _ in range(200)]
    )
    assert sorted(i for [i] in ids) == list(range(1, 201))
    assert store.commits - before < 200  # group commit: fewer commits than acknowledgements
    assert (await store.counts()) == {"queued": 200}


async def test_wal_and_full_sync(store: Store) -> None:
    conn = sqlite3.connect(store.path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    sync = await store.write(lambda db: db.execute("PRAGMA synchronous").fetchone()[0])
    assert sync == 2  # FULL


async def test_every_state_change_is_logged(store: Store) -> None:
    [mid] = await store.write(lambda db: Store.insert_messages(db, [MESSAGE], 1.0))
    await store.claim([mid], 2.0, "send")
    await store.requeue([mid], 3.0, at=10.0, reason="retrying: HTTP 500")
    await store.claim([mid], 11.0, "send")
    await store.mark_sent([(mid, "p-1", 0.5)], 12.0)
    await store.finish([(mid, State.DELIVERED, None)], 20.0)
    events = await store.events(mid)
    assert [(e["state"], e["attempts"]) for e in events] == [
        ("queued", 0),
        ("sending", 1),
        ("queued", 1),
        ("sending", 2),
        ("sent", 2),
        ("delivered", 2),
    ]
    assert events[2]["detail"] == "retrying: HTTP 500"
    message = await store.get(mid)
    assert message.provider_message_id == "p-1" and message.cost == 0.5


async def test_set_based_updates_give_each_row_its_own_values(store: Store) -> None:
    ids = await store.write(lambda db: Store.insert_messages(db, [MESSAGE] * 4, 1.0))
    assert await store.claim(list(reversed(ids)), 2.0, "send") == list(reversed(ids))
    await store.mark_sent([(ids[0], "p-0", 0.25), (ids[1], "p-1", None), (ids[2], "p-2", 1.5)], 3.0)
    await store.requeue([ids[3]], 3.0, at=9.0, reason="retrying: HTTP 503")
    await store.finish([(ids[0], State.DELIVERED, None), (ids[1], State.FAILED, "expired")], 4.0)
    got = {i: await store.get(i) for i in ids}
    assert [(got[i].state, got[i].provider_message_id, got[i].cost) for i in ids] == [
        (State.DELIVERED, "p-0", 0.25),
        (State.FAILED, "p-1", None),
        (State.SENT, "p-2", 1.5),
        (State.QUEUED, None, None),
    ]
    assert got[ids[1]].reason == "expired" and got[ids[3]].next_attempt_at == 9.0
    assert got[ids[3]].reason == "retrying: HTTP 503" and got[ids[2]].sent_at == 3.0


async def test_claim_only_takes_queued_messages(store: Store) -> None:
    ids = await store.write(lambda db: Store.insert_messages(db, [MESSAGE] * 3, 1.0))
    assert await store.claim(ids[:2], 2.0, "send") == ids[:2]
    assert await store.claim(ids, 3.0, "send") == ids[2:]
    assert [t for t, _ in await store.request_times(0)] == [2.0, 3.0]


async def test_reopen_keeps_data_and_migrations_run_once(tmp_path) -> None:
    def applied(c):
        return c.execute("SELECT count(*), count(DISTINCT name) FROM _sqlite_migrations").fetchone()

    first = Store(tmp_path / "s.db")
    await first.open()
    await first.write(lambda db: Store.insert_messages(db, [MESSAGE], 1.0))
    at_first = await first.read(applied)
    await first.close()
    second = Store(tmp_path / "s.db")
    await second.open()
    assert await second.counts() == {"queued": 1}
    # each migration once, none again on reopen (however many the schema has)
    assert await second.read(applied) == at_first
    assert at_first[0] == at_first[1] >= 4
    await second.close()


async def test_one_bad_job_does_not_spoil_its_group(store: Store) -> None:
    def bad(db):
        raise ValueError("policy bug")

    results = await asyncio.gather(
        store.write(lambda db: Store.insert_messages(db, [MESSAGE], 1.0)),
        store.write(bad),
        store.write(lambda db: Store.insert_messages(db, [MESSAGE], 1.0)),
        return_exceptions=True,
    )
    assert isinstance(results[1], ValueError)
    assert await store.counts() == {"queued": 2}


async def test_a_failing_disk_fails_every_waiter_and_stores_nothing(store: Store) -> None:
    def disk_full() -> None:
        raise sqlite3.OperationalError("database or disk is full")

    store.inject_fault = disk_full
    results = await asyncio.gather(
        *[store.write(lambda db: Store.insert_messages(db, [MESSAGE], 1.0)) for _ in range(5)],
        return_exceptions=True,
    )
    assert all(isinstance(r, StoreUnavailable) for r in results)
    store.inject_fault = None
    assert await store.counts() == {}


async def test_unopenable_store_reports_clearly(tmp_path) -> None:
    (tmp_path / "dir.db").mkdir()
    store = Store(tmp_path / "dir.db")
    with pytest.raises(StoreUnavailable, match="cannot open store"):
        await store.open()
    await store.close()
