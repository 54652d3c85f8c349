"""What the PostgreSQL store's parts share: the pool, the write counters, the row
layout of an insert, and the advisory-lock keys that make cluster decisions race-free.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from bridge.models import Message
from bridge.store.postgres.pool import Conn, Database
from bridge.store.rows import INSERTED

# The array type each inserted column is passed as (one unnest per insert: one
# statement, however many messages, and one prepared plan for every batch size).
ARRAY_TYPES = {"id": "bigint", "message_type": "integer", "parts": "integer"}
ARRAY_TYPES |= dict.fromkeys(("created_at", "updated_at", "next_attempt_at", "due_at"), "float8")
ARRAY_TYPES["estimated_cost"] = "float8"
INSERT_COLUMNS = tuple((c, ARRAY_TYPES.get(c, "text")) for c in INSERTED)
INSERT_SQL = (
    f"INSERT INTO messages ({', '.join(c for c, _ in INSERT_COLUMNS)}) SELECT * FROM unnest("
    + ", ".join(f"${i}::{t}[]" for i, (_, t) in enumerate(INSERT_COLUMNS, 1))
    + ")"
)
RESERVE_IDS = "SELECT nextval('messages_id_seq') FROM generate_series(1, $1)"
# Transaction-scoped advisory locks on text keys, taken in one statement in sorted order:
# two transactions wanting overlapping keys queue on the first they share, never deadlock.
LOCK_KEYS = (
    "SELECT count(pg_advisory_xact_lock(h)) FROM (SELECT DISTINCT"
    " hashtextextended(k, 0) AS h FROM unnest($1::text[]) AS k ORDER BY 1) AS keys"
)
TOTALS_LOCK = 0x534D_5302  # "SMS" 2: folding the running totals of gone connections
RATE_LOCK = 0x534D_5303  # "SMS" 3: booking in the provider's shared rate window
BUDGET_LOCK = 0x534D_5305  # "SMS" 5: the daily caps' decision and the claim after it
# Tells every listening instance that messages became due (bridge.store.postgres.coordination
# listens); sent inside the transaction, so it is delivered at its commit, or never.
WORK_CHANNEL = "sms_bridge_work"
NOTIFY_WORK = f"SELECT pg_notify('{WORK_CHANNEL}', $1)"


def columns(rows: Sequence[tuple[Any, ...]]) -> list[list[Any]]:
    """Rows -> one list per column, as `INSERT_SQL` takes them."""
    return [list(column) for column in zip(*rows, strict=True)] or [[] for _ in INSERT_COLUMNS]


async def one(conn: Conn, sql: str, *args: Any) -> Any:
    """The one row an aggregate query answers."""
    return (await conn.fetch(sql, *args))[0]


# Lock names: a kind, then the values, split by the unit separator (PostgreSQL text
# cannot hold NUL). Two names hashing alike only make two ingests wait for each other.
def dedupe_lock(dedupe_key: str, recipient: str) -> str:
    return f"dedupe\x1f{dedupe_key}\x1f{recipient}"


def recipient_lock(recipient: str) -> str:
    return f"phone\x1f{recipient}"


def key_lock(dedupe_key: str) -> str:
    return f"key\x1f{dedupe_key}"


class Base:
    """The pool and the counters; the operation mixins build on it."""

    def __init__(self, url: str, *, max_connections: int = 8) -> None:
        self.db = Database(url, max_size=max_connections)
        self.transactions = 0
        self.writes = 0
        self.token = uuid.uuid4().hex  # signs this store's notifications (not news to it)

    @contextlib.asynccontextmanager
    async def _write(self, writes: int = 1) -> AsyncIterator[Conn]:
        """A transaction whose commit is counted (for `stats`, as SQLite's writer counts):
        one transaction, carrying `writes` operations."""
        async with self.db.transaction() as conn:
            yield conn
        self.transactions += 1
        self.writes += writes

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        async with self.db.connection() as conn:
            return list(await conn.fetch(sql, *args))

    async def _fetchval(self, sql: str, *args: Any) -> Any:
        async with self.db.connection() as conn:
            return await conn.fetchval(sql, *args)

    async def _time(self, sql: str, *args: Any) -> float | None:
        """One time (a `min(...)` over messages), None when no row has one."""
        found = await self._fetchval(sql, *args)
        return None if found is None else float(found)

    async def _execute(self, sql: str, *args: Any) -> None:
        async with self._write() as conn:
            await conn.execute(sql, *args)

    async def _messages(self, sql: str, *args: Any) -> list[Message]:
        return [Message.from_row(r) for r in await self._fetch(sql, *args)]

    @staticmethod
    async def _insert(conn: Conn, rows: Sequence[tuple[Any, ...]]) -> None:
        if rows:
            await conn.execute(INSERT_SQL, *columns(rows))

    @staticmethod
    async def _reserve_ids(conn: Conn, count: int) -> list[int]:
        if count == 0:
            return []
        return sorted(int(r[0]) for r in await conn.fetch(RESERVE_IDS, count))

    @staticmethod
    async def _lock(conn: Conn, keys: Sequence[str]) -> None:
        if keys:
            await conn.execute(LOCK_KEYS, list(keys))

    async def _notify_work(self, conn: Conn) -> None:
        """Other instances: messages are due now (delivered when this transaction commits)."""
        await conn.execute(NOTIFY_WORK, self.token)
