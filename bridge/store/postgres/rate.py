"""The provider's rate window on PostgreSQL: one for the whole cluster.

The provider counts requests per API key, not per instance, so every instance books
in one table under one lock (`RATE_LOCK`, a transaction-scoped advisory lock held to
the commit): count the window, read the pause, insert the booking, commit, and only
then call the provider. Held to the commit, the lock also makes bookings commit in the
order of their `seq`. The pause (a 429's Retry-After, a refused key) is the one row of
`rate_keys` (key ''): written under the same lock, read by every booking, so a 429 seen
by one instance holds every instance's next booking.
"""

from __future__ import annotations

from bridge.store.api import Booking, Pause
from bridge.store.postgres.base import RATE_LOCK, Base
from bridge.store.postgres.pool import Conn
from bridge.store.window import Stamp, read_stamp, wait_to_book

TAKE_RATE_LOCK = f"SELECT pg_advisory_xact_lock({RATE_LOCK})"
KEY = ""  # one provider key per cluster (rate_keys has room for more)
# A pause (key, until, reason), taken under the rate lock; a later one already there stays.
PAUSE = (
    "INSERT INTO rate_keys (key, paused_until, pause_reason) VALUES ($1, $2, $3)"
    " ON CONFLICT (key) DO UPDATE SET paused_until = excluded.paused_until,"
    " pause_reason = excluded.pause_reason WHERE rate_keys.paused_until < excluded.paused_until"
)
# Read after the lock is taken (a statement of its own: its snapshot then sees every
# booking and pause committed before the lock came free).
WINDOW_AND_PAUSE = (
    "SELECT coalesce((SELECT paused_until FROM rate_keys WHERE key = $2), 0),"
    " array(SELECT at FROM provider_requests WHERE at > $1 ORDER BY at)"
)


async def book(conn: Conn, at: Stamp, kind: str) -> float:
    """Insert a booking under the rate lock (held to the commit): bookings commit in the
    order of their `seq`, so a reader's cursor (`request_rows(after=seq)`) never skips
    one that commits late. Bookings are a few a second at most: the lock costs nothing.
    Its time (returned) is read once the lock is held."""
    await conn.execute(TAKE_RATE_LOCK)
    stamped = read_stamp(at)
    await insert_booking(conn, stamped, kind)
    return stamped


async def insert_booking(conn: Conn, at: float, kind: str) -> None:
    """Insert a booking; the caller holds the rate lock (`wait_locked` took it)."""
    await conn.execute("INSERT INTO provider_requests (at, kind) VALUES ($1, $2)", at, kind)


async def wait_locked(conn: Conn, at: Stamp, *, limit: int, window: float) -> tuple[float, float]:
    """Take the rate lock and say how long until a request may be booked (0: now), and
    at what time: `at`, read once the connection and the lock are held (a clock's time
    then, not when the caller started waiting for them). The lock stays held to the
    commit: book in the same transaction."""
    await conn.execute(TAKE_RATE_LOCK)
    stamped = read_stamp(at)
    paused, booked = (await conn.fetch(WINDOW_AND_PAUSE, stamped - window, KEY))[0]
    wait = wait_to_book(booked, stamped, limit=limit, window=window, paused_until=float(paused))
    return wait, stamped


class RateOps(Base):
    async def record_request(self, at: float, kind: str) -> None:
        async with self._write() as conn:
            await book(conn, at, kind)

    async def book_request(self, at: Stamp, kind: str, *, limit: int, window: float) -> float:
        """Count and book under one advisory lock: N instances never book past `limit`."""
        async with self._write() as conn:
            wait, stamped = await wait_locked(conn, at, limit=limit, window=window)
            if wait <= 0:
                await insert_booking(conn, stamped, kind)
        return wait

    async def restamp_request(self, at: float, kind: str, to: float) -> None:
        """Without the rate lock: a booking only moves later, so a count that read it
        before the move counted it already (it was in the window), and one after counts
        it longer. Its `id` stays: cursors by `seq` see no new row."""
        await self._execute(
            "UPDATE provider_requests SET at = $3 WHERE id = (SELECT id FROM provider_requests"
            " WHERE at = $1 AND kind = $2 ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)",
            at,
            kind,
            to,
        )

    async def request_rows(
        self, since: float, kind_prefix: str = "", after: int = 0
    ) -> list[Booking]:
        return [
            Booking(int(r[0]), float(r[1]), r[2])
            for r in await self._fetch(
                "SELECT id, at, kind FROM provider_requests WHERE at > $1 AND id > $2"
                " AND starts_with(kind, $3) ORDER BY at",
                since,
                after,
                kind_prefix,
            )
        ]

    async def prune_requests(self, before: float) -> None:
        await self._execute("DELETE FROM provider_requests WHERE at <= $1", before)

    async def pause_requests(self, until: float, reason: str) -> None:
        """Under the rate lock: a booking either committed before the pause or sees it."""
        async with self._write() as conn:
            await conn.execute(TAKE_RATE_LOCK)
            await conn.execute(PAUSE, KEY, until, reason)

    async def requests_paused_until(self, now: float) -> Pause | None:
        rows = await self._fetch(
            "SELECT paused_until, pause_reason FROM rate_keys WHERE key = $1 AND paused_until > $2",
            KEY,
            now,
        )
        return None if not rows else Pause(float(rows[0][0]), rows[0][1] or "")
