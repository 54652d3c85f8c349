"""The SQL behind the operations that run inside one reader or writer job: ingest (ids,
policy lookups, inserts), budget warnings, storm digests, budgets and metrics.

Each takes the connection the engine hands a job, so `SqliteStore` composes them into
one transaction where an operation must be atomic; nothing outside the package sees them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

from sqlite_utils import Database

from bridge.models import NewMessage, State
from bridge.store.api import (
    Held,
    IngestQuestions,
    Lookups,
    MetricCounts,
    OriginalQuestion,
    StormQuestion,
    StormState,
)
from bridge.store.rows import row
from bridge.store.sqlite.schema import INSERT_COLUMNS, ROW_MARKS, ROWS_PER_INSERT

LOOKUPS_PER_STATEMENT = 200  # up to four parameters each: under SQLite's oldest limit (999)


# -- ingest -------------------------------------------------------------------------
def next_message_id(db: Database) -> int:
    """The id the next inserted message gets (inside a writer job: no other writer)."""
    return int(db.execute("SELECT coalesce(max(id), 0) + 1 FROM messages").fetchone()[0])


def insert_messages(
    db: Database,
    messages: Sequence[NewMessage],
    now: float | Sequence[float],
    *,
    first_id: int | None = None,
) -> list[int]:
    """Insert inside a writer job (states decided already), with ids `first_id`,
    `first_id + 1`, ... (default: the next free ones); `now` per message or one for all.
    A few rows per statement: each statement is a trip into SQLite."""
    first = next_message_id(db) if first_id is None else first_id
    times = [now] * len(messages) if isinstance(now, float | int) else list(now)
    rows = [
        row(first + offset, m, at)
        for offset, (m, at) in enumerate(zip(messages, times, strict=True))
    ]
    for start in range(0, len(rows), ROWS_PER_INSERT):
        chunk = rows[start : start + ROWS_PER_INSERT]
        marks = ",".join([ROW_MARKS] * len(chunk))
        db.execute(
            f"INSERT INTO messages ({INSERT_COLUMNS}) VALUES {marks}",
            [value for row in chunk for value in row],
        )
    return [row[0] for row in rows]


def answer(db: Database, questions: IngestQuestions) -> Lookups:
    """Policy's questions for one ingest transaction, in two statements or so."""
    return Lookups(
        originals=stored_originals(db, questions.originals),
        storms=stored_storms(db, questions.storms),
    )


# -- policy: dedupe and storm lookups for a whole ingest batch ----------------------------
def _lookup(
    db: Database,
    wanted: Sequence[tuple[Any, ...]],
    columns: str,
    answer: str,
    source: str = "wanted",
) -> Iterator[tuple[tuple[Any, ...], list[Any]]]:
    """Ask about many rows in one statement, answered in one row (each row is a trip into
    SQLite): `wanted` becomes the table `wanted(i, <columns>)`; yield each wanted row with
    what `answer` gave for it, for the rows `source` keeps."""
    marks = "(" + ",".join("?" * (len(columns.split(",")) + 1)) + ")"
    for start in range(0, len(wanted), LOOKUPS_PER_STATEMENT):
        chunk = wanted[start : start + LOOKUPS_PER_STATEMENT]
        row = db.execute(
            f"WITH wanted(i, {columns}) AS (VALUES {','.join([marks] * len(chunk))})"
            f" SELECT json_group_array(json_array(i, {answer})) FROM {source}",
            [value for i, asked in enumerate(chunk) for value in (i, *asked)],
        ).fetchone()
        for i, *answers in json.loads(row[0]):
            yield chunk[i], answers


def stored_originals(
    db: Database, wanted: Sequence[OriginalQuestion]
) -> dict[OriginalQuestion, int]:
    """For each (key, recipient, since): the first stored message it repeats, if any,
    ordered as the index is, so the first hit answers however many repeats exist."""
    found = _lookup(
        db,
        wanted,
        "key, recipient, since",
        "original",
        "(SELECT i, (SELECT id FROM messages WHERE dedupe_key = key"
        " AND dedupe_key IS NOT NULL AND recipient = wanted.recipient"
        " AND created_at >= since AND state != 'failed'"
        " ORDER BY created_at LIMIT 1) AS original FROM wanted) WHERE original IS NOT NULL",
    )
    # `asked` is the question object itself (a NamedTuple): no need to build it again.
    return {cast(OriginalQuestion, asked): int(original) for asked, (original,) in found}


def stored_storms(db: Database, wanted: Sequence[StormQuestion]) -> dict[StormQuestion, StormState]:
    """For each (recipient, since): a digest pending?, and texts let through since then."""
    found = _lookup(
        db,
        wanted,
        "recipient, since",
        "EXISTS(SELECT 1 FROM messages WHERE recipient = wanted.recipient AND state = 'held'),"
        " (SELECT count(*) FROM messages WHERE recipient = wanted.recipient"
        " AND created_at >= since AND state IN ('queued', 'sending', 'sent', 'delivered')"
        " AND source != 'digest')",
    )
    return {
        cast(StormQuestion, asked): StormState(bool(held), int(recent))
        for asked, (held, recent) in found
    }


# -- budgets --------------------------------------------------------------------------
def spent_since(c: Any, since: float, exclude_source: str) -> tuple[float, list[tuple[str, int]]]:
    """Cost of what was sent since `since` where a cost or estimate is stored, and the
    (recipient, parts) of the rare rows with neither, for the caller to estimate."""
    where = "WHERE sent_at >= ? AND source != ?"
    args = (since, exclude_source)
    known = c.execute(
        f"SELECT coalesce(sum(coalesce(cost, estimated_cost)), 0) FROM messages {where}", args
    ).fetchone()[0]
    unknown = c.execute(
        f"SELECT recipient, sum(parts) FROM messages {where}"
        " AND cost IS NULL AND estimated_cost IS NULL GROUP BY recipient",
        args,
    ).fetchall()
    return float(known), [(r, int(p)) for r, p in unknown]


def used_since(
    c: Any,
    since: float,
    exclude_source: str,
    route: str | None = None,
    token: str | None = None,
) -> tuple[int, int]:
    """Texts and parts sent since `since` (of one route and/or one API token, if given)."""
    sql = (
        "SELECT count(*), coalesce(sum(parts), 0) FROM messages WHERE sent_at >= ? AND source != ?"
    )
    args: list[object] = [since, exclude_source]
    if route is not None:
        sql += " AND route = ?"
        args.append(route)
    if token is not None:
        sql += " AND token = ?"
        args.append(token)
    row = c.execute(sql, args).fetchone()
    return int(row[0]), int(row[1])


def insert_once(db: Database, messages: Sequence[NewMessage], now: float) -> bool:
    """Insert `messages` unless a row with their dedupe key exists; whether it did."""
    key = messages[0].dedupe_key
    if db.execute("SELECT 1 FROM messages WHERE dedupe_key = ? LIMIT 1", (key,)).fetchone():
        return False
    insert_messages(db, messages, now)
    return True


# -- storm digests --------------------------------------------------------------------
def held_phones(c: Any) -> list[tuple[str, float]]:
    """Each phone with held messages and when its oldest was stored."""
    return [
        (r, float(t))
        for r, t in c.execute(
            "SELECT recipient, min(created_at) FROM messages WHERE state = 'held'"
            " GROUP BY recipient"
        ).fetchall()
    ]


def fold_held(
    db: Database,
    recipient: str,
    now: float,
    digest: Callable[[list[Held]], NewMessage],
    reason: Callable[[int], str],
) -> tuple[int, int] | None:
    """Replace the phone's held messages by one digest (built by `digest` from them):
    the digest is queued, each held one suppressed with `reason(digest_id)`. The
    digest's id and how many it folded; None if none was held."""
    held = [
        Held(*row)
        for row in db.execute(
            "SELECT id, topic, text, instance, token, route FROM messages WHERE recipient = ?"
            " AND state = 'held' ORDER BY id",
            (recipient,),
        ).fetchall()
    ]
    if not held:
        return None
    [digest_id] = insert_messages(db, [digest(held)], now)
    db.execute(
        "UPDATE messages SET state = ?, reason = ?, updated_at = ? WHERE recipient = ?"
        " AND state = 'held' AND id <= ?",
        (str(State.SUPPRESSED), reason(digest_id), now, recipient, held[-1].id),
    )
    return digest_id, len(held)


# -- metrics --------------------------------------------------------------------------
def counts_for_metrics(c: Any) -> MetricCounts:
    """What /metrics reports from the messages table, read in one go at scrape time."""
    oldest = c.execute("SELECT min(created_at) FROM messages WHERE state = 'queued'").fetchone()
    sent = c.execute(
        "SELECT coalesce(sum(parts), 0), coalesce(sum(cost), 0) FROM messages"
        " WHERE sent_at IS NOT NULL"
    ).fetchone()
    return MetricCounts(
        by_source_state=[
            tuple(r)
            for r in c.execute("SELECT source, state, count(*) FROM messages GROUP BY 1, 2")
        ],
        by_reason=[
            tuple(r)
            for r in c.execute(
                "SELECT state, coalesce(reason_kind, 'other'), count(*) FROM messages"
                " WHERE state IN ('held', 'suppressed', 'failed') GROUP BY 1, 2"
            )
        ],
        oldest_queued=oldest[0],
        parts_sent=int(sent[0]),
        cost=float(sent[1]),
    )
