"""Reading a whole SQLite store out, for `sms-bridge store copy` (into PostgreSQL).

The read holds SQLite's exclusive lock from the first row to the caller's last: a `serve`
that has the file open (its connections hold WAL's shared lock for as long as they
live) makes the lock fail at once, and one that starts while the copy runs cannot open
the file. So the copy is of one consistent store that nothing is writing, not of a
snapshot a running bridge has already moved past (an alert it acknowledged after the
snapshot would be lost to the target).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bridge.errors import StoreUnavailable

CHUNK = 5000  # rows per fetch: a million-row store never sits in memory at once
# What is copied, in this order (events refer to messages). The readiness heartbeat is
# the database's own, not the store's data. The running totals (0009) go too: they hold
# what was sent before retention purged it, which the copied rows no longer tell. So does
# the pause the provider asked for (0006: a 429's Retry-After, a refused key), which a
# restart honours: the cluster must not call the provider the moment it starts. And the
# prices the provider's bills taught (0014), which price the cost cap without a list.
# And the highest message id ever given (0016): the target's ids continue after it, not
# after the newest row copied (retention may have purged the newest).
TABLES = (
    "messages",
    "events",
    "provider_requests",
    "message_totals",
    "rate_pause",
    "billed_prices",
    "message_ids",
)
STORE_TABLES = TABLES[:3]  # what makes a file an sms-bridge store (0009 adds the totals)
IN_USE = (
    "the store is in use (is `sms-bridge serve` running on it?): stop every process using"
    " it, then copy"
)


@dataclass(frozen=True, slots=True)
class Table:
    """One table's rows in id order, `columns` naming each value of a row."""

    name: str
    columns: tuple[str, ...]
    count: int
    rows: Iterator[tuple[Any, ...]]


def _columns(conn: sqlite3.Connection, table: str) -> tuple[str, ...]:
    return tuple(r[1] for r in conn.execute(f"PRAGMA table_info({table})"))


def _rows(
    conn: sqlite3.Connection, table: str, columns: tuple[str, ...]
) -> Iterator[tuple[Any, ...]]:
    # provider_requests has no id column: SQLite's rowid is its insertion order. The
    # totals have no order (and no rowid).
    order = "id" if "id" in columns else "" if table == "message_totals" else "rowid"
    by = f" ORDER BY {order}" if order else ""
    cursor = conn.execute(f"SELECT {', '.join(columns)} FROM {table}{by}")
    while chunk := cursor.fetchmany(CHUNK):
        yield from (tuple(r) for r in chunk)


@contextlib.contextmanager
def exclusive_tables(path: str | Path) -> Iterator[list[Table]]:
    """The store's tables, read under SQLite's exclusive lock held until the block ends.

    StoreUnavailable if the file is missing, not an sms-bridge store, or in use.
    """
    if not Path(path).is_file():
        raise StoreUnavailable(f"no SQLite store at {path}")
    conn = sqlite3.connect(str(path), isolation_level=None, timeout=0.5)
    try:
        # EXCLUSIVE locking mode keeps the lock until the connection closes; BEGIN
        # EXCLUSIVE takes it now, and fails while any other connection has the file open.
        conn.execute("PRAGMA locking_mode = EXCLUSIVE")
        try:
            conn.execute("BEGIN EXCLUSIVE")
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise StoreUnavailable(IN_USE) from exc
            raise StoreUnavailable(f"cannot read {path}: {exc}") from exc
        try:
            present = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        except sqlite3.DatabaseError as exc:  # not a database at all
            raise StoreUnavailable(f"cannot read {path}: {exc}") from exc
        if missing := [t for t in STORE_TABLES if t not in present]:
            raise StoreUnavailable(f"{path} is not an sms-bridge store (no {', '.join(missing)})")
        tables = []
        for name in (t for t in TABLES if t in present):
            columns = _columns(conn, name)
            count = int(conn.execute(f"SELECT count(*) FROM {name}").fetchone()[0])
            tables.append(Table(name, columns, count, _rows(conn, name, columns)))
        yield tables
        conn.execute("ROLLBACK")  # read only: nothing to keep
    finally:
        conn.close()
