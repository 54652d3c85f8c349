"""The SQLite store's rate window: the provider requests booked (`provider_requests`)
and the pause every request honours (`rate_pause`).

One `serve` process owns the file, but the CLI (`sms-bridge provider ...`) books in it
too: counting and booking happen in one writer job, so nothing is booked between them.
The pause lives in the file rather than in memory so that a restart (and the CLI) still
honours a 429's Retry-After.
"""

from __future__ import annotations

from sqlite_utils import Database

from bridge.store.api import Booking, Pause
from bridge.store.sqlite.base import EngineBound
from bridge.store.window import Stamp, read_stamp, wait_to_book


def insert_booking(db: Database, at: float, kind: str) -> None:
    db.execute("INSERT INTO provider_requests (at, kind) VALUES (?, ?)", (at, kind))


def wait_in(db: Database, at: float, *, limit: int, window: float) -> float:
    """Inside a writer job: seconds until a request may be booked at `at` (0: now)."""
    booked = [
        r[0]
        for r in db.execute(
            "SELECT at FROM provider_requests WHERE at > ? ORDER BY at", (at - window,)
        )
    ]
    paused = db.execute("SELECT until FROM rate_pause WHERE id = 1").fetchone()
    return wait_to_book(
        booked, at, limit=limit, window=window, paused_until=paused[0] if paused else 0.0
    )


class RateOperations(EngineBound):
    async def record_request(self, at: float, kind: str) -> None:
        await self.engine.write(lambda db: insert_booking(db, at, kind))

    async def book_request(self, at: Stamp, kind: str, *, limit: int, window: float) -> float:
        """Count and book in one writer job: no other write runs between the two. A clock
        is read in the job: the wait for the writer does not age the booking."""

        def job(db: Database) -> float:
            stamped = read_stamp(at)
            wait = wait_in(db, stamped, limit=limit, window=window)
            if wait <= 0:
                insert_booking(db, stamped, kind)
            return wait

        return await self.engine.write(job)

    async def restamp_request(self, at: float, kind: str, to: float) -> None:
        await self.engine.write(
            lambda db: db.execute(
                "UPDATE provider_requests SET at = ? WHERE rowid = (SELECT rowid FROM"
                " provider_requests WHERE at = ? AND kind = ? ORDER BY rowid LIMIT 1)",
                (to, at, kind),
            )
        )

    async def request_rows(
        self, since: float, kind_prefix: str = "", after: int = 0
    ) -> list[Booking]:
        """Booked requests (`kind_prefix` picks another process's); `seq` is the rowid."""
        return await self.engine.read(
            lambda c: [
                Booking(r[0], r[1], r[2])
                for r in c.execute(
                    "SELECT rowid, at, kind FROM provider_requests WHERE at > ? AND rowid > ?"
                    " AND kind LIKE ? ORDER BY at",
                    (since, after, kind_prefix + "%"),
                )
            ]
        )

    async def prune_requests(self, before: float) -> None:
        await self.engine.write(
            lambda db: db.execute("DELETE FROM provider_requests WHERE at <= ?", (before,))
        )

    async def pause_requests(self, until: float, reason: str) -> None:
        await self.engine.write(
            lambda db: db.execute(
                "INSERT INTO rate_pause (id, until, reason) VALUES (1, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET until = excluded.until,"
                " reason = excluded.reason WHERE excluded.until > rate_pause.until",
                (until, reason),
            )
        )

    async def requests_paused_until(self, now: float) -> Pause | None:
        row = await self.engine.read(
            lambda c: c.execute(
                "SELECT until, reason FROM rate_pause WHERE id = 1 AND until > ?", (now,)
            ).fetchone()
        )
        return None if row is None else Pause(float(row[0]), str(row[1]))
