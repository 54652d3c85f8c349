"""The SQLite store's queries that a store of months walked whole now read through an
index (BENCHMARKS.md, "A store after months of traffic").

The bridge never runs ANALYZE, so SQLite plans from the schema alone: the plan a query
gets on an empty store is the plan it gets on a million messages. Every statement the
store runs is recorded (a trace callback on its connections, parameters filled in) and
asked for its plan.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable

import pytest

from bridge.models import NewMessage
from bridge.policy.decide import Rules, scoped_key, text_key
from bridge.store.sqlite import SqliteStore, engine

Traced = tuple[SqliteStore, Callable[[str], list[list[str]]]]


@pytest.fixture
async def traced(tmp_path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Traced]:
    """A migrated store, and `plans(fragment)`: the plan of each statement it ran since
    opening whose SQL contains `fragment` (one list of plan lines per statement)."""
    statements: list[str] = []
    connect = engine._connect

    def traced_connect(path: str) -> sqlite3.Connection:
        conn = connect(path)
        conn.set_trace_callback(statements.append)
        return conn

    monkeypatch.setattr(engine, "_connect", traced_connect)
    store = SqliteStore(tmp_path / "s.db")
    await store.open()
    explain = sqlite3.connect(tmp_path / "s.db")

    def plans(fragment: str) -> list[list[str]]:
        found = [s for s in statements if fragment in s]
        assert found, f"the store ran no statement with {fragment!r}"
        return [[r[3] for r in explain.execute(f"EXPLAIN QUERY PLAN {s}")] for s in found]

    yield store, plans
    explain.close()
    await store.close()


def on_messages(plan: list[str]) -> list[str]:
    return [line for line in plan if " messages " in f"{line} "]


async def test_the_days_spend_reads_the_days_rows(traced: Traced) -> None:
    # Grouped by recipient as written, SQLite walked the whole table in
    # messages_recipient's order (1.3 s a call on a million messages, every dispatch).
    store, plans = traced
    await store.spent_since(86400.0, "budget")
    for plan in plans("FROM messages WHERE ((sent_at >="):
        assert all(line.startswith("SEARCH") for line in on_messages(plan)), plan


async def test_the_days_use_reads_the_days_rows_and_the_resent(traced: Traced) -> None:
    # Every attempt's parts (the resent rows by messages_resent), through the indexes.
    store, plans = traced
    await store.used_since(86400.0, "budget")
    [plan] = plans("THEN 1 ELSE 0 END), 0), coalesce(sum(parts")
    assert all(line.startswith("SEARCH") for line in on_messages(plan)), plan


async def test_the_overviews_day_reads_the_days_rows_as_the_caps_do(traced: Traced) -> None:
    # Its texts, parts and cost in flight too, as the caps count them (`SPENT`): the OR
    # still reads through the indexes, not the whole table.
    store, plans = traced
    await store.overview(now=90000.0, day_start=86400.0, since=86400.0)
    found = plans("FROM messages WHERE (sent_at >=")
    assert len(found) == 3  # the day's totals, per route, per token
    for plan in found:
        assert all(line.startswith("SEARCH") for line in on_messages(plan)), plan


async def test_retention_finds_old_messages_by_creation_time(traced: Traced) -> None:
    store, plans = traced
    await store.purge(86400.0)
    found = plans("created_at <")
    assert len(found) == 2  # the events, then the messages
    for plan in found:
        assert on_messages(plan) == [
            "SEARCH messages USING INDEX messages_created_at (created_at<?)"
        ], plan


async def test_the_overview_counts_the_last_hour_by_creation_time(traced: Traced) -> None:
    store, plans = traced
    await store.overview(now=90000.0, day_start=86400.0, since=86400.0)
    [plan] = plans("created_at >=")
    assert on_messages(plan) == ["SEARCH messages USING INDEX messages_created_at (created_at>?)"]


async def test_known_provider_ids_are_looked_up_not_scanned(traced: Traced) -> None:
    store, plans = traced
    await store.known_provider_ids(["a1", "b2"])
    [plan] = plans("provider_message_id IN")
    assert all("USING COVERING INDEX messages_provider_id" in line for line in plan), plan


async def test_sends_without_an_id_are_looked_up_by_when_they_went(traced: Traced) -> None:
    # Every /logs walk of the reconciler asks it: a few minutes' sends, not the table.
    store, plans = traced
    await store.sent_without_id(["+12025550143"], since=1.0, until=2.0)
    [plan] = plans("provider_message_id IS NULL")
    assert all(line.startswith("SEARCH") for line in on_messages(plan)), plan


async def test_a_phones_page_looks_its_number_up(traced: Traced) -> None:
    # A substring search read rows newest first until the page was full: 110-155 ms on
    # a million messages for a rare number. In the index's own order, a busy number's
    # page reads no more rows than it shows (no sort of all its messages).
    store, plans = traced
    await store.query(number="+12025550142", limit=51)
    await store.query(number="+12025550142", before_id=7, limit=51)
    first, after = plans("recipient = '+12025550142'")
    assert first == ["SEARCH messages USING INDEX messages_recipient (recipient=?)"]  # no sort
    assert on_messages(after)[0] == (
        "SEARCH messages USING INDEX messages_recipient (recipient=? AND created_at<?)"
    )


async def test_the_routes_page_looks_each_route_up(traced: Traced) -> None:
    # `max(id) GROUP BY route` walked the whole table (160 ms on a million messages at
    # each view of /ui/routes); each configured route is now one step into messages_route.
    store, plans = traced
    await store.route_last_messages(["am", "ci"])
    [plan] = plans("WHERE route = j.value")
    assert on_messages(plan) == [
        "SEARCH messages USING INTEGER PRIMARY KEY (rowid=?)",
        "SEARCH messages USING COVERING INDEX messages_route (route=?)",
    ], plan


async def test_metrics_and_stats_read_running_totals_not_messages(traced: Traced) -> None:
    # Aggregates over every message at each scrape: 0.8-1.4 s for /metrics, 0.2-0.3 s
    # for /api/v1/stats on a million. Now a few rows of message_totals, and the queued.
    store, plans = traced
    before = len(plans("SELECT"))
    await store.counts_for_metrics()
    await store.counts()
    await store.counts_by_reason()
    ran = plans("SELECT")[before:]  # every statement the three calls ran
    queued = ["SEARCH messages USING INDEX messages_due (state=?)"]  # the oldest queued
    assert len(ran) >= 4 and queued in ran
    for plan in ran:
        assert plan == queued or (on_messages(plan) == [] and "message_totals" in str(plan)), plan


async def test_a_message_page_looks_up_what_names_it(traced: Traced) -> None:
    # `reason LIKE '% message N%'` over every suppressed message: 60-120 ms on a million
    # at each message page. The number a reason names is indexed (0010).
    store, plans = traced
    await store.mentioned_by(12)
    [plan] = plans("reason GLOB")
    assert plan == ["SEARCH messages USING INDEX messages_mentions (<expr>=?)"]


async def test_the_overviews_recent_failures_read_the_latest_failed_only(traced: Traced) -> None:
    # Through messages_due, every failed message was read and sorted by when it failed
    # (~100 ms on a million, at each overview); 0011 indexes failed messages by that time.
    store, plans = traced
    await store.recent_failures(10)
    [plan] = plans("ORDER BY updated_at DESC")
    assert plan == ["SCAN messages USING INDEX messages_failed"]


async def test_the_dispatchers_read_of_its_first_texts_searches(traced: Traced) -> None:
    # The oldest due rows through messages_due, their messages by id: a backlog of
    # 100,000 is never walked to send one call.
    store, plans = traced
    await store.due(1.0, 5000, texts=10)
    for plan in plans("WITH head AS"):
        assert on_messages(plan) == [
            "SEARCH messages USING INTEGER PRIMARY KEY (rowid=?)",
            "SEARCH messages USING INDEX messages_due (state=? AND next_attempt_at<?)",
        ], plan


async def test_a_repeats_original_and_its_scopes_last_word_are_looked_up(traced: Traced) -> None:
    # The flap rule's first SQL read every later message to the phone for each
    # candidate original (BENCHMARKS.md): now the original by messages_dedupe, its row by
    # id, and the scope's last word by messages_recipient in its order (LIMIT 1), no sort.
    store, plans = traced
    key = scoped_key("route@kuma", text_key("disk full"))
    message = NewMessage("+12025550143", "disk full", "hook", "Bridge", 1, 1, dedupe_key=key)
    for now in (1.0, 2.0):
        await store.ingest([(message, now)], Rules(dedupe_window=600.0))
    [*_, plan] = plans("json_group_array(json_array(o.i")
    assert not [line for line in plan if "TEMP B-TREE" in line], plan  # no sort
    looked_up = [
        "SEARCH f USING INTEGER PRIMARY KEY (rowid=?)",
        "SEARCH messages USING INDEX messages_dedupe (dedupe_key=? AND recipient=? AND created_at>?)",
        "SEARCH n USING INDEX messages_recipient (recipient=? AND created_at>?)",
    ]
    assert [line for line in plan if line in looked_up] == looked_up, plan
    assert not [line for line in plan if line.startswith(("SCAN f", "SCAN n", "SCAN messages"))]
