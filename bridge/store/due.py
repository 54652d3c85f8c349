"""The dispatcher's read of the queue, in the SQL both backends speak.

A step reads the oldest due rows (up to `limit`) to plan its calls. While the rate
budget is spent, a request frees every 0.6 s and each step sends one call, but the read
of 5,000 rows it made for it held the GIL ~50 ms in the reader thread turning rows into
messages, competing with ingest (BENCHMARKS.md, issue #16). With `texts`, the step gets
only the rows of the first `texts` texts (text, sender, type) of those oldest rows, in
the same order: every call it can make now is among them, each with every recipient the
full read would have given it, and the grouping runs in the database, not in Python.
"""

from __future__ import annotations

DUE_WHERE = "state = 'queued' AND next_attempt_at <= {now}"


def due_sql(now: str, limit: str, texts: str | None = None) -> str:
    """The query, with each backend's placeholders for its three parameters; `texts`
    None: every row of the oldest `limit`."""
    where = DUE_WHERE.format(now=now)
    if texts is None:
        return f"SELECT * FROM messages WHERE {where} ORDER BY next_attempt_at, id LIMIT {limit}"
    # A text's place is its first row's (row_number over the oldest rows), so the texts
    # come in the order the full read's plan would meet them.
    return (
        "WITH head AS ("
        f" SELECT id, text, sender_id, message_type, next_attempt_at FROM messages WHERE {where}"
        f" ORDER BY next_attempt_at, id LIMIT {limit}),"
        " ranked AS (SELECT *, row_number() OVER (ORDER BY next_attempt_at, id) AS n FROM head),"
        " first AS (SELECT text, sender_id, message_type FROM ranked"
        f" GROUP BY text, sender_id, message_type ORDER BY min(n) LIMIT {texts})"
        " SELECT * FROM messages WHERE id IN (SELECT id FROM head"
        " WHERE (text, sender_id, message_type) IN (SELECT * FROM first))"
        " ORDER BY next_attempt_at, id"
    )
