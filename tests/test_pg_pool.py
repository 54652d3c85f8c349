"""The PostgreSQL pool against a real server that goes away: operations fail with the
bridge's StoreUnavailable (what ingress turns into 503 / 451) in bounded time, and work
again once the server is back, with the same `Database` object, no restart.

The tests that restart the server run on a private one of their own (never on the
shared `SMS_BRIDGE_TEST_POSTGRES`, nor the session's); the others on a database of their
own on the session's server: the private one costs a worker an initdb and a start,
which the tests of `make test-fast` (not slow) here do not need.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import asyncpg
import httpx
import pytest

from bridge.errors import StoreUnavailable
from bridge.store.names import display_url
from bridge.store.postgres.pool import Database
from tests import helpers
from tests.helpers import bridge_config, running_bridge
from tests.postgres import (
    PrivateServer,
    fresh_database,
    migrate_sync,
    private_server,
    wait_until_up,
)
from tests.processes import free_port


@pytest.fixture(scope="module")
def server() -> Iterator[PrivateServer]:
    try:
        with private_server() as started:
            yield started
    except RuntimeError as exc:
        pytest.skip(f"no private PostgreSQL server: {exc}")


@pytest.fixture
async def db(server: PrivateServer) -> AsyncIterator[Database]:
    database = Database(server.url, min_size=2, max_size=4)
    await database.open()
    yield database
    await database.close()


async def one(db: Database) -> int:
    async with db.transaction() as conn:
        return int(await conn.fetchval("SELECT 1"))


async def restart(server: PrivateServer, down: asyncio.Event | None = None) -> None:
    await asyncio.to_thread(server.stop)
    if down is not None:
        down.set()
    await asyncio.to_thread(server.start)
    await asyncio.to_thread(wait_until_up, server.url)


@pytest.mark.slow
async def test_a_restart_fails_operations_as_unavailable_then_they_recover(
    db: Database, server: PrivateServer
) -> None:
    assert await one(db) == 1
    await asyncio.to_thread(server.stop)
    try:
        for _ in range(3):  # every attempt while it is down, not only the first
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await one(db)
            assert time.monotonic() - started < 10
    finally:
        await asyncio.to_thread(server.start)
    # Back: the very first operation works on the same pool, no reopen.
    assert await one(db) == 1
    assert await asyncio.gather(*(one(db) for _ in range(8))) == [1] * 8


@pytest.mark.slow
async def test_connections_broken_by_a_quick_restart_are_replaced(
    db: Database, server: PrivateServer
) -> None:
    """The pool's idle connections all died while nobody used them: the pool notices
    and reconnects; not even the first operation after the restart fails."""
    await asyncio.gather(*(one(db) for _ in range(4)))
    await restart(server)
    outcomes = []
    for _ in range(4):
        try:
            outcomes.append(await one(db))
        except StoreUnavailable:
            outcomes.append(0)
    assert outcomes == [1, 1, 1, 1], outcomes


async def test_a_statement_error_is_not_unavailability(postgres_empty_url: str) -> None:
    """A wrong statement is a bug to see, not an outage to answer 503 for forever."""
    db = Database(postgres_empty_url, min_size=2, max_size=4)
    await db.open()
    try:
        with pytest.raises(asyncpg.UndefinedTableError):
            async with db.transaction() as conn:
                await conn.execute("SELECT * FROM no_such_table")
        assert await one(db) == 1
    finally:
        await db.close()


async def test_a_stuck_statement_fails_as_unavailable_in_bounded_time(
    postgres_empty_url: str,
) -> None:
    """A lock held elsewhere (a hung server, a long migration): the operation gives up."""
    db = Database(postgres_empty_url, max_size=2, command_timeout=0.5)
    await db.open()
    holder = await asyncpg.connect(postgres_empty_url)
    try:
        await holder.execute("SELECT pg_advisory_lock(42)")
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            async with db.transaction() as conn:
                await conn.execute("SELECT pg_advisory_lock(42)")
        assert time.monotonic() - started < 5
    finally:
        await holder.close()
        await db.close()


async def test_a_server_that_is_not_there_is_said_at_open_without_the_password() -> None:
    url = f"postgresql://bridge:s3cret@127.0.0.1:{free_port()}/nowhere"  # nobody listens
    db = Database(url)
    with pytest.raises(StoreUnavailable, match="cannot connect to") as caught:
        await db.open()
    assert "s3cret" not in str(caught.value)
    assert "bridge:***@127.0.0.1" in str(caught.value)


def test_display_url_hides_only_the_password() -> None:
    assert display_url("postgresql://u:p@db:6543/x?sslmode=require") == (
        "postgresql://u:***@db:6543/x?sslmode=require"
    )
    assert display_url("postgresql://u@db/x") == "postgresql://u@db/x"


@pytest.mark.slow
async def test_the_bridge_answers_503_while_postgres_is_down_and_resumes_by_itself(
    tmp_path, server: PrivateServer, clock, sandbox_url: str
) -> None:
    """The whole bridge on a server that is restarted: POST and /readyz answer 503 while
    it is down (nothing acknowledged that is not committed), then 202 again, with no
    restart of the bridge; what was acknowledged before is still there."""
    with fresh_database(server.url) as url:
        migrate_sync(url)
        helpers.STORE_URL["url"] = url
        try:
            config = bridge_config(tmp_path, sandbox_url)
        finally:
            helpers.STORE_URL["url"] = ""
        body = {"to": "+12025550143", "message": "disk full"}
        async with running_bridge(config, clock) as (bridge, web), httpx.AsyncClient() as http:
            before = await http.post(f"{web}/api/v1/messages", json=body)
            assert before.status_code == 202
            await asyncio.to_thread(server.stop)
            try:
                down = await http.post(f"{web}/api/v1/messages", json=body | {"message": "b"})
                assert down.status_code == 503 and "retry" in down.json()["error"]
                ready = await http.get(f"{web}/readyz")
                assert ready.status_code == 503 and "store" in ready.json()["problems"]
                # A scrape still answers (a 503 read as every instance down) and says why.
                scraped = await http.get(f"{web}/metrics")
                assert scraped.status_code == 200, scraped.text
                assert "\nsms_bridge_store_up 0.0\n" in scraped.text
            finally:
                await asyncio.to_thread(server.start)
            after = await http.post(f"{web}/api/v1/messages", json=body | {"message": "c"})
            assert after.status_code == 202
            assert (await http.get(f"{web}/readyz")).status_code == 200
            assert "\nsms_bridge_store_up 1.0\n" in (await http.get(f"{web}/metrics")).text
            stored = {m.text for m in await bridge.store.query()}
            assert stored == {"disk full", "c"}  # "b" was refused, not half-stored


READER = "reader-token-0123456789abcdef"
SENDER = "sender-token-0123456789abcdef"
HOOK = "hook-token-0123456789abcdef01"
TOKENS = f"""
[tokens.reader]
token = "{READER}"
scopes = ["read"]
[tokens.sender]
token = "{SENDER}"
scopes = ["send"]
[routes.am]
format = "generic"
to = ["+12025550143"]
token = "{HOOK}"
"""


@pytest.mark.slow
async def test_only_a_reader_sees_where_the_store_is_when_it_is_down(
    tmp_path, server: PrivateServer, clock, sandbox_url: str
) -> None:
    """/readyz (open to anyone) and every 503 quoted the driver: `Connect call failed
    ('127.0.0.1', 46913)`, the database's address for any caller, where SMTP says only
    that the store is unavailable. Anonymous callers, a hook's and a sender's token get
    that reason; a token that may read the messages gets the store's words, as the log."""
    with fresh_database(server.url) as url:
        migrate_sync(url)
        helpers.STORE_URL["url"] = url
        try:
            config = bridge_config(tmp_path, sandbox_url, TOKENS)
        finally:
            helpers.STORE_URL["url"] = ""
        port = str(server.port)
        body = {"to": "+12025550143", "message": "db down"}
        async with running_bridge(config, clock) as (_, web), httpx.AsyncClient() as http:
            await asyncio.to_thread(server.stop)
            try:
                answers = [
                    await http.get(f"{web}/readyz"),
                    await http.post(
                        f"{web}/hooks/am", json=body, headers={"Authorization": f"Bearer {HOOK}"}
                    ),
                    await http.post(
                        f"{web}/api/v1/messages",
                        json=body,
                        headers={"Authorization": f"Bearer {SENDER}"},
                    ),
                ]
                read = await http.get(
                    f"{web}/readyz", headers={"Authorization": f"Bearer {READER}"}
                )
            finally:
                await asyncio.to_thread(server.start)
        for answer in answers:
            assert answer.status_code == 503, answer.text
            assert port not in answer.text and "127.0.0.1" not in answer.text, answer.text
        assert answers[0].json()["problems"]["store"] == "the store is unavailable"
        for refused in answers[1:]:
            assert refused.json()["error"] == "not accepted, retry later: the store is unavailable"
        assert read.status_code == 503
        assert port in read.json()["problems"]["store"], read.text


def test_a_connection_the_protocol_lost_track_of_is_unavailability() -> None:
    """asyncpg raises InternalClientError on COMMIT over a connection the server cut in
    the middle of a statement (a restart under load): an outage, not a bug to crash on
    (it ended `serve` once, tests/test_chaos.py)."""
    from bridge.store.postgres.pool import unavailable

    assert unavailable(asyncpg.InternalClientError("cannot switch to state 15"))
    assert not unavailable(ValueError("a bug"))
