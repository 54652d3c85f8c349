"""Group commit on PostgreSQL (bridge.store.postgres.ingest): every call gets a
transaction, however the event loop interleaves its arrival with the end of the ones
under way."""

from __future__ import annotations

import asyncio
import re

import asyncpg
import httpx
import pytest

from bridge.clock import ManualClock
from bridge.models import NewMessage, State
from bridge.policy.decide import Rules
from bridge.store.api import Stored
from bridge.store.postgres.ingest import _Call
from bridge.store.postgres.store import PostgresStore
from tests import helpers
from tests.helpers import bridge_config, running_bridge
from tests.postgres import admin
from tests.test_smtp import SMTP_BASE, data_reply, smtp_listening

RULES = Rules(dedupe_window=600.0)


def alert(n: int) -> NewMessage:
    return NewMessage(f"+1202555014{n}", f"alert {n}", "http", "SMS", 1, 1)


class CommitsReturnTogether(PostgresStore):
    """Each transaction's answer held until `together` is set: the commits of every
    transaction under way then come back in one turn of the event loop, as they do when
    the server answers them in one batch of reads (a flood)."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.together = asyncio.Event()
        self.committed: asyncio.Queue[None] = asyncio.Queue()  # one per transaction held

    async def _ingest_group(self, group: list[_Call]) -> list[list[Stored]]:
        done = await super()._ingest_group(group)
        self.committed.put_nowait(None)
        await self.together.wait()
        return done


async def test_an_ingest_arriving_as_every_transaction_ends_is_stored(postgres_url: str) -> None:
    """A call that arrived in the turn where the last transactions under way ended was
    left waiting: they had left their loop, yet still counted as running until their
    done callbacks ran, so it started none of its own. Its sender had no answer (and the
    message no row) until some later ingest came to start one: after a flood, the last
    alert hung for as long as the next one took to come."""
    store = CommitsReturnTogether(postgres_url)
    await store.open()
    try:
        under_way = []
        for n in range(store.MAX_FLUSHERS):  # one transaction each, all at once
            under_way.append(asyncio.create_task(store.ingest([(alert(n), 1.0)], RULES)))
            # Until a transaction of its own took it and committed (a hang fails here).
            async with asyncio.timeout(10):
                await store.committed.get()
        store.together.set()
        await asyncio.sleep(0)  # the transactions end their loops; now this arrives
        async with asyncio.timeout(10):  # the store's own bound; it never came
            [late] = await store.ingest([(alert(9), 2.0)], RULES)
        assert late.message.state == State.QUEUED
        assert [s.message.state for [s] in await asyncio.gather(*under_way)] == [
            State.QUEUED
        ] * store.MAX_FLUSHERS
        assert await store.counts() == {"queued": store.MAX_FLUSHERS + 1}
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("sqlstate", "why"),
    [
        ("40P01", "deadlock detected"),
        ("40001", "could not serialize access due to concurrent update"),
        ("55P03", "canceling statement due to lock timeout"),
        ("53200", "out of memory"),
        ("57P03", "the database system is not yet accepting connections"),
    ],
)
async def test_a_transient_store_error_is_a_503_and_a_451_saying_why(
    tmp_path,
    clock: ManualClock,
    sandbox_url: str,
    postgres_url: str,
    monkeypatch: pytest.MonkeyPatch,
    sqlstate: str,
    why: str,
) -> None:
    """A deadlock or a serialization failure that reached an ingest alone (not a whole
    group) answered HTTP 500, and SMTP a 451 "internal error" with a traceback in the
    log: the sender was not told to retry, nor why. Now every transient SQLSTATE is a
    503 with Retry-After and a 451 saying why, counted; the retry is stored."""
    monkeypatch.setitem(helpers.STORE_URL, "url", postgres_url)
    admin(
        postgres_url,
        "CREATE FUNCTION test_fails() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        f" RAISE EXCEPTION '{why}' USING ERRCODE = '{sqlstate}'; END $$",
        "CREATE TRIGGER test_fails BEFORE INSERT ON messages"
        " FOR EACH ROW EXECUTE FUNCTION test_fails()",
    )
    config = bridge_config(tmp_path, sandbox_url, SMTP_BASE)
    alert = {"to": "+12025550143", "message": "disk full"}
    mail = b"Subject: UPS on battery\r\n\r\nruntime 12 min\r\n"
    async with (
        running_bridge(config, clock) as (bridge, url),
        smtp_listening(bridge) as port,
        httpx.AsyncClient(base_url=url) as http,
    ):
        refused = await http.post("/api/v1/messages", json=alert)
        code, text = await asyncio.to_thread(data_reply, port, mail)
        metrics = (await http.get("/metrics")).text
        admin(postgres_url, "DROP TRIGGER test_fails ON messages")
        stored = await http.post("/api/v1/messages", json=alert)
        again = await asyncio.to_thread(data_reply, port, mail)
        counts = await bridge.store.counts()
    assert refused.status_code == 503, refused.text
    assert int(refused.headers["retry-after"]) > 0
    assert why in refused.json()["error"]
    said = f"store busy: {why}" if sqlstate[:2] in ("40", "55") else "store is unavailable"
    assert code == 451 and text.startswith(b"4.3.0") and said.encode() in text, text
    assert re.search(r"^sms_bridge_ingest_refused_total 2\.0$", metrics, re.M), metrics
    assert stored.status_code == 202 and again[0] == 250
    assert counts == {"queued": 2}


async def test_a_lock_not_had_in_time_is_a_503_not_a_500(
    tmp_path, clock: ManualClock, sandbox_url: str, postgres_url: str, monkeypatch
) -> None:
    """The same with a real lock: another session holds the messages table while the
    database's lock_timeout is short. The ingest waits for it, PostgreSQL gives up with
    55P03, and the sender is told to retry (it was a 500); released, the retry is stored."""
    monkeypatch.setitem(helpers.STORE_URL, "url", postgres_url)
    name = postgres_url.rsplit("/", 1)[1].split("?")[0]
    admin(postgres_url, f"ALTER DATABASE \"{name}\" SET lock_timeout = '200ms'")
    config = bridge_config(tmp_path, sandbox_url)
    alert = {"to": "+12025550143", "message": "disk full"}
    async with (
        running_bridge(config, clock) as (bridge, url),
        httpx.AsyncClient(base_url=url) as http,
    ):
        other = await asyncpg.connect(postgres_url)
        try:
            locked = other.transaction()
            await locked.start()
            await other.execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
            refused = await http.post("/api/v1/messages", json=alert)
            await locked.rollback()
        finally:
            await other.close()
        stored = await http.post("/api/v1/messages", json=alert)
        counts = await bridge.store.counts()
    assert refused.status_code == 503 and "retry-after" in refused.headers, refused.text
    assert "lock timeout" in refused.json()["error"]
    assert stored.status_code == 202 and counts == {"queued": 1}
