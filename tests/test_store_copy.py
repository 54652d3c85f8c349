"""`sms-bridge store copy`, run as a process: a SQLite store with messages in every state
moved into a real PostgreSQL database, then a `serve` on PostgreSQL carries on from it
(queued and in-flight messages reach the sandbox, every history reads as before, new
ids continue after the copied ones). Refusals: a source in use, a target with data."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlite_utils import Database

from bridge.errors import StoreUnavailable
from bridge.models import NewMessage, State, events_json
from bridge.store.postgres.store import PostgresStore
from bridge.store.sqlite import SqliteStore
from bridge.store.sqlite.schema import migrations
from tests.postgres import run_async
from tests.processes import ANY_PORT, clean_env, process, wait_for
from tests.stores import aggregated, reported, seed
from tests.test_cli import run

pytestmark = pytest.mark.slow  # the CLI and serve run as processes
KEY = "copy-test-key"


def _message(n: int, state: State = State.QUEUED, reason: str | None = None) -> NewMessage:
    return NewMessage(
        recipient=f"+1202555{n:04d}",
        text=f"disk full on db-{n}",
        source="api",
        sender_id="Bridge",
        message_type=2,
        parts=1,
        dedupe_key=f"key-{n}",
        state=state,
        reason=reason,
        reason_kind="duplicate" if state == State.SUPPRESSED else None,
    )


async def _build_sqlite(path: Path) -> dict[str, list[int]]:
    """A store as a bridge stopped mid-flow leaves it: ids by the state each is in."""
    store = SqliteStore(path)
    await store.open()
    try:
        now = time.time() - 600  # ten minutes ago, as a real serve would have written
        queued = await seed(store, [_message(n) for n in range(100, 106)], now)
        held = await seed(store, [_message(200, State.HELD, "storm: held")], now)
        suppressed = await seed(
            store, [_message(300, State.SUPPRESSED, f"duplicate of #{queued[0]}")], now
        )
        # Claimed, sent and settled as the dispatcher does: attempts, provider ids, costs.
        worked = queued[3:]
        got = await store.claim(worked, now + 1, owner="old:1", lease_until=now + 31)
        assert got == worked
        sent, delivered, failed = worked
        await store.mark_sent(
            [(sent, "prov-sent", 0.05), (delivered, "prov-deliv", 0.05)], now + 2, owner="old:1"
        )
        await store.record_status([(delivered, State.DELIVERED, None)], now + 3)
        await store.finish(
            [(failed, State.FAILED, "provider said: invalid number")], now + 3, owner="old:1"
        )
        in_flight = await store.claim(queued[2:3], now + 4, owner="old:1", lease_until=now + 34)
        await store.record_request(now + 5, "status")
        return {
            "queued": queued[:2],
            "sending": in_flight,
            "sent": [sent],
            "delivered": [delivered],
            "failed": [failed],
            "held": held,
            "suppressed": suppressed,
        }
    finally:
        await store.close()


async def _histories(path: Path) -> dict[int, dict[str, Any]]:
    """What /api/v1/messages/{id} answered on the SQLite bridge, read from its store."""
    store = SqliteStore(path)
    await store.open()
    try:
        out = {}
        for message in await store.query(limit=1000):
            view = message.to_json()
            view["events"] = events_json(await store.events(message.id))
            out[message.id] = view
        return out
    finally:
        await store.close()


async def _pg_count(url: str, table: str) -> int:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
    finally:
        await conn.close()


async def _pg_rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        return [tuple(r) for r in await conn.fetch(sql)]
    finally:
        await conn.close()


async def _pg_read(url: str) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """The running totals' figures, and the same aggregated from every row."""
    store = PostgresStore(url)
    await store.open()
    try:
        return await reported(store), await aggregated(store)
    finally:
        await store.close()


# One queued text, as a release before SQLite 0014 stored it.
OLD_MESSAGE = (
    "INSERT INTO messages (recipient, text, source, sender_id, message_type, parts, state,"
    " created_at, updated_at, next_attempt_at)"
    " VALUES ('+12025550143', 'a', 'http', 'SMS', 1, 1, 'queued', 100, 100, 100)"
)


def _copy(tmp_path: Path, db: Path, url: str, *extra: str) -> Any:
    env = {"SMS_BRIDGE_STORE_PATH": str(db), "SMS_BRIDGE_STORE_URL": url}
    return run("store", "copy", *extra, cwd=tmp_path, env=env)


def test_a_sqlite_store_copied_into_postgresql_carries_on_there(
    tmp_path: Path, postgres_url: str
) -> None:
    db = tmp_path / "bridge.db"
    ids = asyncio.run(_build_sqlite(db))
    assert {s for s in ids if ids[s]} == {str(s) for s in State}  # every state is there
    before = asyncio.run(_histories(db))
    top = max(before)

    copied = _copy(tmp_path, db, postgres_url)
    assert copied.returncode == 0, copied.stderr
    events = sum(len(v["events"]) for v in before.values())
    assert copied.stdout.strip() == (
        f"copied {len(before)} messages, {events} events and 3 rate-window bookings from"
        f" {db} into {postgres_url} (message ids up to {top}; new ones continue after it)"
    )
    assert run_async(lambda: _pg_count(postgres_url, "events")) == events
    # When each became due (not in the API's view: the retries' and the queue age's start).
    due = "SELECT id, due_at FROM messages ORDER BY id"
    source = sqlite3.connect(db)
    try:
        assert run_async(lambda: _pg_rows(postgres_url, due)) == source.execute(due).fetchall()
    finally:
        source.close()

    # One-shot: the same copy again is refused, nothing changed; --replace redoes it.
    again = _copy(tmp_path, db, postgres_url)
    assert again.returncode == 1
    assert "the target already holds data" in again.stderr and "--replace" in again.stderr
    assert run_async(lambda: _pg_count(postgres_url, "messages")) == len(before)
    replaced = _copy(tmp_path, db, postgres_url, "--replace")
    assert replaced.returncode == 0, replaced.stderr
    assert replaced.stdout == copied.stdout
    assert run_async(lambda: _pg_count(postgres_url, "events")) == events
    # The running totals behind /metrics and /api/v1/stats count the copy once, though
    # --replace truncated what the first copy had counted (TRUNCATE fires no trigger).
    totals, aggregate = run_async(lambda: _pg_read(postgres_url))
    assert totals == aggregate

    env = clean_env()
    log = tmp_path / "run.log"
    with process(["sandbox", "--listen", ANY_PORT, "--api-key", KEY], tmp_path, env, log) as sb:
        sandbox = sb.url("sandbox")
        config = tmp_path / "pg.toml"
        config.write_text(f"""
[http]
listen = "{ANY_PORT}"
[smtp]
listen = ""
[store]
url = "{postgres_url}"
[provider]
base_url = "{sandbox}/api/v1"
api_key = "{KEY}"
[cluster]
lease = "5s"
""")
        with process(["serve", "--config", str(config)], tmp_path, env, log) as serve:
            bridge = serve.url()

            def view(i: int) -> dict[str, Any]:
                return httpx.get(f"{bridge}/api/v1/messages/{i}").json()

            # Queued ones are sent; the one in flight when SQLite stopped is taken over
            # (no owner, no lease), looked for in /logs, and sent since it is not there.
            owed = ids["queued"] + ids["sending"]
            wait_for(
                lambda: all(view(i)["state"] in ("sent", "delivered") for i in owed),
                timeout=60,
                what="the copied queue sent from PostgreSQL",
            )
            for i, old in before.items():
                new = view(i)
                assert new["events"][: len(old["events"])] == old["events"], i
                if old["state"] in ("delivered", "failed", "suppressed"):
                    assert new == old  # settled: the very same answer as on SQLite
                else:
                    for key in ("text", "created_at", "route", "dedupe_key"):
                        assert new[key] == old[key]
            for i in ids["sent"] + ids["delivered"]:
                assert view(i)["provider_message_id"] == before[i]["provider_message_id"]
            posted = httpx.post(
                f"{bridge}/api/v1/messages", json={"to": "+12025559999", "message": "after"}
            )
            assert posted.status_code == 202, posted.text
            [new_id] = posted.json()["ids"]
            assert new_id > top  # the sequence moved past the copy (the digest of the
            # held message may have taken top + 1)
            wait_for(lambda: view(new_id)["state"] in ("sent", "delivered"), what="new sent")
        entries = httpx.get(f"{sandbox}/_sandbox/entries").json()
    sent_to = sorted(e["to"] for e in entries)
    held_phone = before[ids["held"][0]]["recipient"]  # its storm digest, queued on PostgreSQL
    assert sorted({before[i]["recipient"] for i in owed} | {"+12025559999", held_phone}) == sent_to


def test_copy_refuses_a_store_a_serve_has_open_and_a_target_without_schema(
    tmp_path: Path, postgres_url: str, postgres_empty_url: str
) -> None:
    db = tmp_path / "bridge.db"
    env = clean_env(SMS_BRIDGE_STORE_PATH=str(db), SMS_BRIDGE_HTTP_LISTEN=ANY_PORT)
    env["SMS_BRIDGE_SMTP_LISTEN"] = ""
    with process(["serve"], tmp_path, env, tmp_path / "serve.log") as serve:
        bridge = serve.url()
        posted = httpx.post(
            f"{bridge}/api/v1/messages", json={"to": "+12025550100", "message": "x"}
        )
        assert posted.status_code == 202
        refused = _copy(tmp_path, db, postgres_url)
        assert refused.returncode == 1
        assert "the store is in use (is `sms-bridge serve` running on it?)" in refused.stderr
        assert run_async(lambda: _pg_count(postgres_url, "messages")) == 0
    missing = _copy(tmp_path, db, postgres_empty_url)
    assert missing.returncode == 1 and "run `sms-bridge migrate`" in missing.stderr
    nowhere = run("store", "copy", cwd=tmp_path, env={"SMS_BRIDGE_STORE_PATH": str(db)})
    assert nowhere.returncode == 1 and "no PostgreSQL target" in nowhere.stderr
    absent = _copy(tmp_path, tmp_path / "nope.db", postgres_url)
    assert absent.returncode == 1 and f"no SQLite store at {tmp_path / 'nope.db'}" in absent.stderr
    assert not (tmp_path / "nope.db").exists()
    done = _copy(tmp_path, db, postgres_url)  # serve stopped: now it goes
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("copied 1 messages")


@pytest.mark.parametrize(
    ("source", "why"),
    [
        ("file:bridge.db", "an SQLite URI"),
        ("file:bridge.db?mode=ro", "an SQLite URI"),
        (":memory:", "a store in memory keeps nothing"),
        ("", "is empty"),
        ("  ", "is empty"),
    ],
)
def test_copy_refuses_a_from_that_store_path_would_refuse(
    tmp_path: Path, postgres_url: str, source: str, why: str
) -> None:
    """`--from` went straight to SQLite, past the refusals `store.path` has: a URI was
    checked as a file name and opened as another file ("no SQLite store at file:..."
    though the store was there), `:memory:` said the same without why, and an empty
    path copied store.path instead. Each is a usage error now, saying why."""
    db = tmp_path / "bridge.db"
    asyncio.run(_build_sqlite(db))
    refused = _copy(tmp_path, db, postgres_url, "--from", source)
    assert refused.returncode == 2, refused.stderr
    assert f"argument --from: {source!r}: {why}" in refused.stderr
    assert "Traceback" not in refused.stderr and refused.stdout == ""
    assert run_async(lambda: _pg_count(postgres_url, "messages")) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bridge.db"]  # no stray file
    # A file whose name starts with file: is named as a path, as the message says.
    named = _copy(tmp_path, db, postgres_url, "--from", "./file:bridge.db")
    assert named.returncode == 1 and "no SQLite store at ./file:bridge.db" in named.stderr


RAW_SLASH = "postgresql://bridge:hunter/2x@127.0.0.1:1/bridge"  # the password: hunter/2x


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--to", RAW_SLASH], 'argument --to: postgresql://***: a "/"'),
        (["--to", "mysql://bridge@127.0.0.1:1/bridge"], "must be a postgresql:// URL"),
        (
            ["--from", RAW_SLASH, "--to", "postgresql://bridge@127.0.0.1:1/bridge"],
            "argument --from: postgresql://***: a URL",
        ),
    ],
)
def test_copy_refuses_a_url_the_config_would_refuse_and_never_shows_its_password(
    tmp_path: Path, args: list[str], said: str
) -> None:
    """`--to postgresql://bridge:hunter/2x@...` went past the check store.url has (a raw
    "/" in the password), and the driver's error quoted "hunter"; a URL given to
    `--from` was named whole as a missing file. Both are usage errors now, the URL
    shown without its password."""
    db = tmp_path / "bridge.db"
    asyncio.run(_build_sqlite(db))
    refused = run("store", "copy", *args, cwd=tmp_path, env={"SMS_BRIDGE_STORE_PATH": str(db)})
    assert refused.returncode == 2, refused.stderr
    assert said in refused.stderr
    assert "hunter" not in refused.stderr + refused.stdout


async def test_what_was_sent_before_retention_stays_counted_after_the_copy(
    tmp_path: Path, postgres_url: str
) -> None:
    """Parts and cost sent count messages retention has purged (they never go down):
    the copy brings the source's running totals, not a count of the rows it copies."""
    from bridge.store.copy import copy_sqlite_to_postgres

    owner = {"owner": "test:1", "lease_until": 1e12}
    source = SqliteStore(tmp_path / "s.db")
    await source.open()
    ids = await seed(source, [_message(n)._replace(parts=2) for n in range(4)], 1.0)
    await source.claim(ids, 2.0, **owner)
    await source.mark_sent([(i, f"p{i}", 0.5) for i in ids], 3.0, owner="test:1")
    [kept] = await seed(source, [_message(9)], 5.0)  # stays, and is counted as it is
    assert await source.purge(4.0) == 4
    counted = await reported(source)
    await source.close()
    assert counted[3:] == (8, 2.0)

    await copy_sqlite_to_postgres(tmp_path / "s.db", postgres_url, replace=False)
    target = PostgresStore(postgres_url)
    await target.open()
    try:
        assert await reported(target) == counted
        assert [m.id for m in await target.query(limit=10)] == [kept]
    finally:
        await target.close()


async def _edited_by_hand(path: Path, messages: list[NewMessage], edit: str) -> list[int]:
    """A SQLite store of `messages`, then `edit` run on it as a hand would (no trigger
    of the bridge's own code): a source the bridge could not have written itself."""
    source = SqliteStore(path)
    await source.open()
    ids = await seed(source, messages, 1.0)
    await source.close()
    db = sqlite3.connect(path)
    db.execute(edit)
    db.commit()
    db.close()
    return ids


async def test_the_copy_counts_stored_messages_from_its_rows(
    tmp_path: Path, postgres_url: str
) -> None:
    """The source's totals bring what it sent before retention; the messages stored now
    are counted from the copied rows, so a source whose totals disagree with its rows
    (a hand edit, a bulk load that skipped the rebuild) does not pass its error on."""
    from bridge.store.copy import copy_sqlite_to_postgres

    edit = "DELETE FROM message_totals WHERE state = 'queued'"
    await _edited_by_hand(tmp_path / "s.db", [_message(n) for n in range(3)], edit)

    await copy_sqlite_to_postgres(tmp_path / "s.db", postgres_url, replace=False)
    target = PostgresStore(postgres_url)
    await target.open()
    try:
        assert await target.counts() == {"queued": 3}
        assert await reported(target) == await aggregated(target)
    finally:
        await target.close()


async def test_a_nul_an_older_bridge_stored_does_not_stop_the_copy(
    tmp_path: Path, postgres_url: str
) -> None:
    """SQLite's text holds NUL, PostgreSQL's cannot: a reason or provider id an older
    bridge stored with one (from a provider's answer, before they were read with NUL
    shown as U+FFFD) failed the whole copy, naming no row. It is copied as U+FFFD."""
    from bridge.store.copy import copy_sqlite_to_postgres

    refused = _message(1, State.FAILED, "refused: bad\x00sender")
    edit = "UPDATE messages SET provider_message_id = 'ab' || char(0) || 'c'"
    [failed] = await _edited_by_hand(tmp_path / "s.db", [refused], edit)

    await copy_sqlite_to_postgres(tmp_path / "s.db", postgres_url, replace=False)
    target = PostgresStore(postgres_url)
    await target.open()
    try:
        copied = await target.get(failed)
    finally:
        await target.close()
    assert copied is not None
    assert (copied.reason, copied.provider_message_id) == ("refused: bad\ufffdsender", "ab\ufffdc")


async def test_replace_is_refused_while_bridges_serve_the_target(
    tmp_path: Path, postgres_url: str
) -> None:
    """`--replace` deletes the target's messages: into a database a cluster still runs
    on, it deleted the texts its instances had acknowledged and not sent yet."""
    from bridge.store.copy import copy_sqlite_to_postgres
    from tests.test_pg_leader import instance

    source = SqliteStore(tmp_path / "s.db")
    await source.open()
    await seed(source, [_message(1)], 1.0)
    await source.close()
    async with instance(tmp_path, postgres_url, "live") as (bridge, clock, _):
        [queued] = await seed(bridge.store, [_message(2)], clock.now())
        with pytest.raises(StoreUnavailable, match="1 bridge instance"):
            await copy_sqlite_to_postgres(tmp_path / "s.db", postgres_url, replace=True)
        kept = await bridge.store.get(queued)
    assert kept is not None and kept.text == "disk full on db-2"
    # Once it stopped, the same copy replaces.
    await copy_sqlite_to_postgres(tmp_path / "s.db", postgres_url, replace=True)


async def _pg_pause(url: str, now: float) -> Any:
    store = PostgresStore(url)
    await store.open()
    try:
        return await store.requests_paused_until(now)
    finally:
        await store.close()


def test_a_pause_the_provider_asked_for_holds_on_the_copy(
    tmp_path: Path, postgres_url: str
) -> None:
    """A 429's Retry-After (or a refused key) paused every request in the SQLite file, so
    that a restart honours it: the copy is such a restart, onto PostgreSQL."""
    db = tmp_path / "bridge.db"
    until = time.time() + 3600

    async def paused() -> None:
        store = SqliteStore(db)
        await store.open()
        try:
            await seed(store, [_message(1)], time.time())
            await store.pause_requests(until, "429 from the provider")
        finally:
            await store.close()

    asyncio.run(paused())
    copied = _copy(tmp_path, db, postgres_url)
    assert copied.returncode == 0, copied.stderr
    pause = run_async(lambda: _pg_pause(postgres_url, time.time()))
    assert pause is not None and (pause.until, pause.reason) == (until, "429 from the provider")
    # --replace gives the same result again (the target's own pause, if later, stays).
    replaced = _copy(tmp_path, db, postgres_url, "--replace")
    assert replaced.returncode == 0, replaced.stderr
    assert run_async(lambda: _pg_pause(postgres_url, time.time())) == pause


def test_the_prices_bills_taught_go_with_the_copy(tmp_path: Path, postgres_url: str) -> None:
    """The prices learnt from the provider's bills (kept since SQLite 0014) price the cost
    cap where no price list is known: a copy onto PostgreSQL that left them behind made
    the cluster's first texts go one at a time, unpriced, as on a first start."""
    db = tmp_path / "bridge.db"

    async def billed() -> None:
        store = SqliteStore(db)
        await store.open()
        try:
            await seed(store, [_message(1)], time.time())
            await store.record_billed({0: 1.5, 961: 1.5, 1: 0.5}, time.time())
        finally:
            await store.close()

    async def pg_prices() -> dict[int, float]:
        store = PostgresStore(postgres_url)
        await store.open()
        try:
            return {code: price for code, (price, _) in (await store.billed_prices()).items()}
        finally:
            await store.close()

    asyncio.run(billed())
    for extra in ((), ("--replace",)):  # and again, replacing what the first copy left
        copied = _copy(tmp_path, db, postgres_url, *extra)
        assert copied.returncode == 0, copied.stderr
        assert run_async(pg_prices) == {0: 1.5, 961: 1.5, 1: 0.5}


def test_replacing_from_a_store_older_than_billed_prices_leaves_no_prices_behind(
    tmp_path: Path, postgres_url: str
) -> None:
    """`--replace` from a store an older release wrote (before SQLite 0014, no prices
    kept): the target's prices, taught by another store's bills, must not stay and price
    the cost cap of the copied store's sends. The copy replaces them with the source's:
    none."""
    priced, old = tmp_path / "priced.db", tmp_path / "old.db"

    async def build() -> None:
        store = SqliteStore(priced)
        await store.open()
        try:
            await seed(store, [_message(1)], time.time())
            await store.record_billed({0: 1.5, 961: 1.5}, time.time())
        finally:
            await store.close()

    asyncio.run(build())
    db = Database(sqlite3.connect(old))
    migrations.apply(db, stop_before="0014_billed_prices")
    db.execute(OLD_MESSAGE)
    db.conn.commit()
    db.conn.close()
    assert _copy(tmp_path, priced, postgres_url).returncode == 0
    count = "SELECT count(*) FROM billed_prices"
    assert run_async(lambda: _pg_rows(postgres_url, count)) == [(2,)]
    replaced = _copy(tmp_path, old, postgres_url, "--replace")
    assert replaced.returncode == 0, replaced.stderr
    assert run_async(lambda: _pg_rows(postgres_url, count)) == [(0,)]
    assert run_async(lambda: _pg_count(postgres_url, "messages")) == 1


def test_ids_continue_after_the_highest_the_source_gave_not_its_newest_row(
    tmp_path: Path, postgres_url: str
) -> None:
    """Retention purged the source's newest messages: the target's sequence moved past
    the highest id copied only, and its first messages got the purged ones' ids again (an
    id a caller held, answered with another text). It continues after the highest the
    source ever gave (SQLite's message_ids)."""
    db = tmp_path / "bridge.db"

    async def purged() -> list[int]:
        store = SqliteStore(db)
        await store.open()
        try:
            ids = await seed(store, [_message(n, State.SUPPRESSED) for n in range(3)], 1.0)
            assert await store.purge(2.0) == 3
            return ids
        finally:
            await store.close()

    async def next_on_target() -> list[int]:
        store = PostgresStore(postgres_url)
        await store.open()
        try:
            return await seed(store, [_message(9)], time.time())
        finally:
            await store.close()

    given = asyncio.run(purged())
    copied = _copy(tmp_path, db, postgres_url)
    assert copied.returncode == 0, copied.stderr
    assert f"message ids up to {max(given)};" in copied.stdout
    [new] = run_async(next_on_target)
    assert new > max(given)


def test_replace_never_moves_the_id_sequence_back(tmp_path: Path, postgres_url: str) -> None:
    """`--replace` into a database whose cluster gave more ids than the source ever did:
    the sequence was set to the source's highest id, back below ids the cluster had
    handed out (a caller holding #12 was then answered with another text). It goes to
    the greater of the two."""
    db = tmp_path / "bridge.db"

    async def source() -> list[int]:
        store = SqliteStore(db)
        await store.open()
        try:
            return await seed(store, [_message(n) for n in range(3)], 1.0)
        finally:
            await store.close()

    async def on_target(count: int) -> list[int]:
        store = PostgresStore(postgres_url)
        await store.open()
        try:
            return await seed(store, [_message(50 + n) for n in range(count)], time.time())
        finally:
            await store.close()

    copied_ids = asyncio.run(source())
    cluster_ids = run_async(lambda: on_target(12))  # the cluster ran ahead of the source
    assert max(cluster_ids) > max(copied_ids)
    replaced = _copy(tmp_path, db, postgres_url, "--replace")
    assert replaced.returncode == 0, replaced.stderr
    assert f"message ids up to {max(cluster_ids)};" in replaced.stdout
    [new] = run_async(lambda: on_target(1))
    assert new > max(cluster_ids) and new > max(copied_ids)
