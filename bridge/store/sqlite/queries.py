"""The SQL behind the operations that run inside one reader or writer job: ingest (ids,
policy lookups, inserts), budget warnings, storm digests, budgets and metrics.

Each takes the connection the engine hands a job, so `SqliteStore` composes them into
one transaction where an operation must be atomic; nothing outside the package sees them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from sqlite_utils import Database

import bridge.store.totals as totals
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
from bridge.store.sqlite.schema import (
    INSERT_COLUMNS,
    JSON_IDS,
    NEXT_ID,
    ROW_MARKS,
    ROWS_PER_INSERT,
)

# The columns of each kind of question (`_values` adds its index to each row).
ORIGINAL_COLUMNS = ("key", "recipient", "since", "last_of")
STORM_COLUMNS = ("recipient", "at", "window", "held_since")
# Questions of each kind per statement: 5 + 5 parameters a pair, under SQLite's oldest
# limit of 999 parameters. Left at 140 when a storm question grew from 2 values to 4,
# a request to 112 phones or more was a 503 ("too many SQL variables") there.
QUESTIONS_PER_STATEMENT = 999 // (len(ORIGINAL_COLUMNS) + len(STORM_COLUMNS) + 2)


# -- ingest -------------------------------------------------------------------------
def next_message_id(db: Database) -> int:
    """The id the next inserted message gets (inside a writer job: no other writer)."""
    return int(db.execute(f"SELECT {NEXT_ID}").fetchone()[0])


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
    rows = _rows(messages, now, first)
    for start in range(0, len(rows), ROWS_PER_INSERT):
        chunk = rows[start : start + ROWS_PER_INSERT]
        marks = ",".join([ROW_MARKS] * len(chunk))
        db.execute(
            f"INSERT INTO messages ({INSERT_COLUMNS}) VALUES {marks}",
            [value for row in chunk for value in row],
        )
    return [row[0] for row in rows]


def _rows(
    messages: Sequence[NewMessage], now: float | Sequence[float], first: int
) -> list[tuple[Any, ...]]:
    times = [now] * len(messages) if isinstance(now, float | int) else list(now)
    return [
        row(first + offset, m, at)
        for offset, (m, at) in enumerate(zip(messages, times, strict=True))
    ]


# What `PRAGMA data_version` says: it changes between two reads of one connection when
# another connection (another process: `sms-bridge retry`, `purge`) committed between
# them, and never for the connection's own commits.
DATA_VERSION = "(SELECT data_version FROM pragma_data_version)"


def unlocked_fits(questions: IngestQuestions, messages: int) -> bool:
    """Whether one ingest's lookups and insert are one statement each (`unlocked_lookups`,
    `insert_unless_changed`)."""
    most = max(len(questions.originals), len(questions.storms))
    return most <= QUESTIONS_PER_STATEMENT and 0 < messages <= ROWS_PER_INSERT


def unlocked_lookups(db: Database, questions: IngestQuestions) -> tuple[int, Lookups, int]:
    """`ingest_lookups` in one statement of its own, outside a transaction, and the data
    version it read (for `insert_unless_changed`). Only when `unlocked_fits`."""
    return _lookups(db, questions, DATA_VERSION)


def insert_unless_changed(
    db: Database, messages: Sequence[NewMessage], now: Sequence[float], first_id: int, version: int
) -> bool:
    """Insert `messages` (one statement: `unlocked_fits`) with ids from `first_id`, as
    `insert_messages` does, unless another connection committed since the read that
    returned `version`: then nothing is written. Whether it inserted.

    Outside a transaction the statement commits itself (all of it or nothing; durable at
    the engine's next sync of the WAL, as every commit is); the data version is read inside that commit's own write transaction,
    so nothing another process writes can slip between the check and the insert."""
    rows = _rows(messages, now, first_id)
    marks = ",".join([ROW_MARKS] * len(rows))
    inserted = db.execute(
        f"INSERT INTO messages ({INSERT_COLUMNS}) SELECT * FROM (VALUES {marks})"
        f" WHERE {DATA_VERSION} = ?",
        [*(value for row in rows for value in row), version],
    ).rowcount
    return bool(inserted == len(rows))


def ingest_lookups(db: Database, questions: IngestQuestions) -> tuple[int, Lookups]:
    """The id the batch's first message gets, and policy's answers, read in one statement
    (one per `QUESTIONS_PER_STATEMENT` questions of each kind in a big batch).

    Each statement is a trip into SQLite from the writer thread: SQLite runs without the
    GIL, and every return waits for it while the event loop is busy (about one loop
    iteration, ~0.7 ms measured). Asked one by one (the next id, the originals, the
    storms), those waits made a large part of a group's wall time, and requests waited
    for its commit while the loop sat idle (BENCHMARKS.md, issue #16).
    """
    first_id, lookups, _ = _lookups(db, questions, "0")
    return first_id, lookups


def _lookups(db: Database, questions: IngestQuestions, version: str) -> tuple[int, Lookups, int]:
    originals: dict[OriginalQuestion, int] = {}
    last_words: dict[OriginalQuestion, str] = {}
    storms: dict[StormQuestion, StormState] = {}
    first_id = 0
    data_version = 0
    wanted_originals, wanted_storms = questions.originals, questions.storms
    most = max(len(wanted_originals), len(wanted_storms), 1)
    for start in range(0, most, QUESTIONS_PER_STATEMENT):
        chunk_o = wanted_originals[start : start + QUESTIONS_PER_STATEMENT]
        chunk_s = wanted_storms[start : start + QUESTIONS_PER_STATEMENT]
        o_table, o_args = _values("o", ORIGINAL_COLUMNS, chunk_o)
        s_table, s_args = _values("s", STORM_COLUMNS, chunk_s)
        next_id, found_o, found_s, data_version = db.execute(
            f"WITH {o_table}, {s_table} SELECT {NEXT_ID}, ({_ORIGINALS}), ({_STORMS}), {version}",
            o_args + s_args,
        ).fetchone()
        first_id = first_id or int(next_id)
        for i, original, last_word in json.loads(found_o):
            originals[chunk_o[i]] = int(original)
            if last_word is not None:
                last_words[chunk_o[i]] = last_word
        storms.update(
            (chunk_s[i], StormState(bool(held), tuple(float(t) for t in times)))
            for i, held, times in json.loads(found_s)
        )
    lookups = Lookups(originals=originals, storms=storms, last_words=last_words)
    return first_id, lookups, int(data_version)


# The answers, one JSON array of [i, answer...] per kind. Originals: for each (key,
# recipient, since, last_of) the first stored message it repeats, if any, ordered as the
# index is (so the first hit answers however many repeats exist); absent when none. With
# last_of, and an original found, the key of the newest message to the recipient from
# that scope (`Lookups.last_words`): messages_recipient walked back from the newest, the
# first row of the scope ends it (LIMIT 1), and never past the original, itself one. So
# it reads one row in a flood of one text to a phone (its suppressed repeats are the
# newest), and at most the phone's other scopes' rows since the scope last spoke, each
# once: the next ingest of that scope stops at the row this one adds (the flap rule's
# first SQL asked, for every candidate, whether any later row differed: quadratic,
# BENCHMARKS.md). The original is joined by its id, so its time bounds the walk without
# finding it twice. Storms: for each
# (recipient, at, window, held_since): a message held at a time from held_since to at?,
# and when each text let through reaches the phone, from at - window to at + window (a
# scheduled one at its time: EFFECTIVE; found through messages_scheduled by its UTC text,
# a second either side, then exactly).
_ORIGINALS = (
    "SELECT json_group_array(json_array(o.i, f.id, CASE WHEN o.last_of != '' THEN"
    " (SELECT n.dedupe_key FROM messages n WHERE n.recipient = o.recipient"
    " AND n.created_at >= f.created_at AND n.state != 'failed'"
    " AND substr(n.dedupe_key, 1, length(o.last_of)) = o.last_of"
    " ORDER BY n.created_at DESC, n.id DESC LIMIT 1) END))"
    " FROM o JOIN messages f ON f.id = (SELECT id FROM messages"
    " WHERE dedupe_key = o.key AND dedupe_key IS NOT NULL AND recipient = o.recipient"
    " AND created_at >= o.since AND state != 'failed' ORDER BY created_at LIMIT 1)"
)
EFFECTIVE = f"coalesce({totals.SCHEDULED_AT_SQLITE.format(t='')}, created_at)"
_LET_THROUGH = "state IN ('queued', 'sending', 'sent', 'delivered') AND source != 'digest'"
_STORMS = (
    "SELECT json_group_array(json_array(i,"
    " EXISTS(SELECT 1 FROM messages WHERE recipient = s.recipient AND state = 'held'"
    f" AND {EFFECTIVE} BETWEEN s.held_since AND s.at),"
    " json((SELECT json_group_array(t) FROM ("
    " SELECT created_at AS t FROM messages WHERE recipient = s.recipient"
    " AND created_at BETWEEN s.at - s.window AND s.at + s.window"
    f" AND schedule_time IS NULL AND {_LET_THROUGH}"
    f" UNION ALL SELECT {EFFECTIVE} FROM messages WHERE recipient = s.recipient"
    " AND schedule_time IS NOT NULL AND schedule_time BETWEEN"
    " strftime('%Y-%m-%d %H:%M:%S', s.at - s.window - 1, 'unixepoch')"
    " AND strftime('%Y-%m-%d %H:%M:%S', s.at + s.window + 1, 'unixepoch')"
    f" AND {EFFECTIVE} BETWEEN s.at - s.window AND s.at + s.window AND {_LET_THROUGH})))))"
    " FROM s"
)


def _values(
    name: str, columns: Sequence[str], rows: Sequence[tuple[Any, ...]]
) -> tuple[str, list[Any]]:
    """`rows` as the table `name(i, columns...)` of a WITH clause (`i`: each row's index;
    no rows, an empty table), and its parameters."""
    header = f"{name}(i, {', '.join(columns)})"
    if not rows:
        return f"{header} AS (SELECT {', '.join(['NULL'] * (len(columns) + 1))} WHERE 0)", []
    marks = "(" + ",".join("?" * (len(columns) + 1)) + ")"
    values = [value for i, row in enumerate(rows) for value in (i, *row)]
    return f"{header} AS (VALUES {','.join([marks] * len(rows))})", values


# -- budgets --------------------------------------------------------------------------
# Today's use: sent since the day began, or in flight (another instance's call under
# way spends the same budget), whenever claimed: its send is stamped when it is
# answered, today. Its lease bounds how long a row stays `sending`. Parameter: since.
SPENT = "(sent_at >= ? OR state = 'sending')"
# What the cost cap counts besides: a text of an unknown outcome that was sent again
# (its answer was lost, maybe not the provider's bill), by its latest claim, until its
# resend is answered or whatever it ends as. Parameter: since (messages_resent).
RESENT = "(unknown_resends > 0 AND claimed_at >= ?)"
# How many times the provider may have billed a row of today's: its send or the call in
# flight, and each attempt before a resend. Parameters: since, since.
BILLED = (
    "(CASE WHEN sent_at >= ? OR state = 'sending' THEN 1 ELSE 0 END"
    " + CASE WHEN claimed_at >= ? THEN unknown_resends ELSE 0 END)"
)


def spent_since(c: Any, since: float, exclude_source: str) -> tuple[float, list[tuple[str, int]]]:
    """Cost of what was sent since `since` where a cost or estimate is stored, and the
    (recipient, parts) of the rare rows with neither, for the caller to estimate; each
    as often as the provider may have billed it (`BILLED`)."""
    where = f"WHERE ({SPENT} OR {RESENT}) AND source != ?"
    args = (since, since, since, since, exclude_source)
    known = c.execute(
        f"SELECT coalesce(sum(coalesce(cost, estimated_cost) * {BILLED}), 0) FROM messages {where}",
        args,
    ).fetchone()[0]
    # `+recipient`: grouped by the column itself, SQLite walks the whole table in
    # messages_recipient's order to skip a sort (1.3 s on a million rows) instead of
    # reading today's rows through messages_sent_at and sorting the few it finds.
    unknown = c.execute(
        f"SELECT recipient, sum(parts * {BILLED}) FROM messages {where}"
        " AND cost IS NULL AND estimated_cost IS NULL GROUP BY +recipient",
        args,
    ).fetchall()
    return float(known), [(r, int(p)) for r, p in unknown if p]


# The most any part was billed is kept under country code 0 (`record_billed`), with
# when: raised by a higher bill, replaced by any once it is `pricing.BILLED_MAX_FOR` old
# (raised only, a price cut never lowered it). Any other country's price is the latest
# bill's. Parameters: code, price, now, BILLED_MAX_FOR (the SET reads the old row).
_REPLACES = "(country_code <> 0 OR excluded.price >= price OR billed_at <= excluded.billed_at - ?4)"
RECORD_BILLED = (
    "INSERT INTO billed_prices (country_code, price, billed_at) VALUES (?1, ?2, ?3)"
    f" ON CONFLICT (country_code) DO UPDATE SET"
    f" billed_at = CASE WHEN {_REPLACES} THEN excluded.billed_at ELSE billed_at END,"
    f" price = CASE WHEN {_REPLACES} THEN excluded.price ELSE price END"
)


def used_since(
    c: Any,
    since: float,
    exclude_source: str,
    route: str | None = None,
    token: str | None = None,
) -> tuple[int, int]:
    """Texts and parts sent since `since` (of one route and/or one API token, if given).
    The parts as often as the provider may have billed them (`BILLED`), as the cost cap
    counts: a text of an unknown outcome sent again is one text, but every attempt's
    parts (the provider bills each; counted once, a resend went past `parts_per_day`)."""
    sql = (
        f"SELECT coalesce(sum(CASE WHEN {SPENT} THEN 1 ELSE 0 END), 0),"
        f" coalesce(sum(parts * {BILLED}), 0) FROM messages"
        f" WHERE ({SPENT} OR {RESENT}) AND source != ?"
    )
    args: list[object] = [since, since, since, since, since, exclude_source]
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
    """Each phone with held messages and the earliest time one of them was to reach it
    (stored, or scheduled for)."""
    return [
        (r, float(t))
        for r, t in c.execute(
            f"SELECT recipient, min({EFFECTIVE}) FROM messages WHERE state = 'held'"
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
    the digest is queued, each held one suppressed with `reason(digest_id)`. Those
    scheduled for later wait for a digest after their time. The digest's id and how
    many it folded; None if none was held."""
    held = [
        Held(*row)
        for row in db.execute(
            "SELECT id, topic, text, instance, token, route FROM messages WHERE recipient = ?"
            f" AND state = 'held' AND {EFFECTIVE} <= ? ORDER BY id",
            (recipient, now),
        ).fetchall()
    ]
    if not held:
        return None
    [digest_id] = insert_messages(db, [digest(held)], now)
    db.execute(
        f"UPDATE messages SET state = ?, reason = ?, updated_at = ? WHERE id IN {JSON_IDS}",
        (str(State.SUPPRESSED), reason(digest_id), now, json.dumps([h.id for h in held])),
    )
    return digest_id, len(held)


# -- metrics --------------------------------------------------------------------------
def counts_for_metrics(c: Any) -> MetricCounts:
    """What /metrics reports, read in one go at scrape time: the running totals (a few
    dozen rows, bridge.store.totals) and when the oldest due of the queued few became due."""
    return totals.metric_counts(
        c.execute(totals.BY_SOURCE_STATE).fetchall(),
        c.execute(totals.BY_REASON).fetchall(),
        c.execute(totals.OLDEST_DUE).fetchone()[0],
        c.execute(totals.SENT).fetchone(),
    )
