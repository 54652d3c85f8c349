"""Reads of `message_totals`, the running totals both backends keep by triggers (SQLite
migration 0009, PostgreSQL version 5): what /metrics and /api/v1/stats report, read
from a few dozen rows instead of aggregated over every message at each request.

A row is (source, state, reason kind or 'other', sent_at set) with n (messages stored
there now), parts and cost (of every message that was there, purged ones included:
"sent" never goes down when retention deletes old messages; cost in whole millionths,
so that a message moving between rows moves an integer). PostgreSQL keeps one row
per key and server connection (`slot`), so that concurrent writers never wait for one
another on a counter row; these reads sum the slots.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from bridge.store.values import MetricCounts

BY_SOURCE_STATE = (
    "SELECT source, state, sum(n) FROM message_totals GROUP BY source, state"
    " HAVING sum(n) > 0 ORDER BY 1, 2"
)
BY_STATE = "SELECT state, sum(n) FROM message_totals GROUP BY state HAVING sum(n) > 0"
BY_REASON = (
    "SELECT state, reason_kind, sum(n) FROM message_totals"
    " WHERE state IN ('held', 'suppressed', 'failed') GROUP BY state, reason_kind"
    " HAVING sum(n) > 0 ORDER BY 1, 2"
)
# The messages BY_REASON counts as 'other' (a query's reason_kind=OTHER_REASON).
OTHER_REASON_SQL = "reason_kind IS NULL AND state IN ('held', 'suppressed', 'failed')"
# Failed by the provider, a budget or retries given up; not cancelled by an operator
# (the console's delivery ratio and its recent failures both leave those out).
FAILED_NOT_CANCELLED = "state = 'failed' AND coalesce(reason_kind, '') <> 'cancelled'"
SENT = (
    "SELECT coalesce(sum(parts), 0), coalesce(sum(cost_micros), 0) FROM message_totals WHERE sent"
)
# Not a total: the queued few, through messages_due (state, next_attempt_at, id).
# When a queued message became due (its due_at): its schedule time, or the end of a
# daily budget's hold (00:00, or the reload that released it), else when it was stored. A
# text scheduled for later or held for tomorrow is not waiting, and a retry's backoff does not
# move it (one failing for an hour has waited an hour). min(created_at) alone counted the
# held and the scheduled as waiting since they were stored: the `> 600` alert fired for
# nothing. Not a lone min(created_at) either: PostgreSQL turned that into a walk of
# messages_created_at from the oldest message until one is queued, i.e. the whole index
# when none is (260 ms on a million messages, at every scrape).
# A message's schedule_time (UTC text) as epoch seconds, NULL when it has none; `{t}`
# the table's alias and dot, or "". PostgreSQL's cast raises on a row of some other form
# (the pattern keeps it from failing the statement); SQLite's strftime gives NULL.
SCHEDULED_AT_SQLITE = "CAST(strftime('%s', {t}schedule_time) AS REAL)"
SCHEDULED_AT_POSTGRES = (
    "CASE WHEN {t}schedule_time ~ '^[0-9]{{4}}-[0-9]{{2}}-[0-9]{{2}} [0-9:]{{8}}$'"
    " THEN extract(epoch FROM {t}schedule_time::timestamp)::float8 END"
)
# Kept in the row (Message.due_at) since SQLite's 0013 and PostgreSQL's version 9: worked
# out here from reason_kind and next_attempt_at, a held text lost its hold's end when its
# claim cleared reason_kind, and read as waiting since it was stored.
OLDEST_DUE = "SELECT min(due_at) FROM messages WHERE state = 'queued'"


def metric_counts(
    by_source_state: Iterable[Any], by_reason: Iterable[Any], oldest: Any, sent: Any
) -> MetricCounts:
    """The rows of the reads above as `MetricCounts`."""
    return MetricCounts(
        by_source_state=[(s, st, int(n)) for s, st, n in by_source_state],
        by_reason=[(st, k, int(n)) for st, k, n in by_reason],
        oldest_due=oldest,
        parts_sent=int(sent[0]),
        cost=int(sent[1]) / 1_000_000,  # whole millionths: exact sums, never a drop
    )


def reasons(rows: Iterable[Any]) -> dict[str, dict[str, int]]:
    """BY_REASON's rows as {state: {reason kind: count}}."""
    out: dict[str, dict[str, int]] = {}
    for state, kind, count in rows:
        out.setdefault(state, {})[kind] = int(count)
    return out
