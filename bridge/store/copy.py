"""`sms-bridge store copy`: an existing SQLite store moved into PostgreSQL.

Every message (state, reason, provider ids, attempts, timestamps, ids), the events log,
the rate window's bookings, the provider's pause and the prices its bills taught, in
one PostgreSQL transaction, while SQLite's exclusive lock keeps every `serve` off the
source (`bridge.store.sqlite.export`). One-shot: a
second copy into the same database is refused (the target is no longer empty) unless
`replace`, which deletes the target's data first and so gives the same result again.
The source is only read; it stays where it was, a fallback until the cluster runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bridge.store.names import display_url


@dataclass(frozen=True, slots=True)
class CopySummary:
    source: str
    target: str  # password masked
    messages: int
    events: int
    bookings: int
    top_id: int

    def line(self) -> str:
        return (
            f"copied {self.messages} messages, {self.events} events and {self.bookings}"
            f" rate-window bookings from {self.source} into {self.target}"
            f" (message ids up to {self.top_id}; new ones continue after it)"
        )


async def copy_sqlite_to_postgres(source: str | Path, url: str, *, replace: bool) -> CopySummary:
    """Copy the SQLite store at `source` into the (migrated) PostgreSQL database `url`.

    StoreUnavailable, with nothing changed in the target, if the source is missing or in
    use, the target is unreachable, has no current schema, or holds data (no `replace`).
    """
    from bridge.store.postgres.load import load
    from bridge.store.postgres.store import PostgresStore
    from bridge.store.sqlite import SqliteStore
    from bridge.store.sqlite.export import exclusive_tables

    if _exists(source):  # a source written by an older release: its migrations (SQLite
        sqlite = SqliteStore(source)  # migrates at open; a file that does not exist is
        await sqlite.open()  # not created here: exclusive_tables names it)
        await sqlite.close()
    target = PostgresStore(url)
    await target.open()  # refuses a missing, older or newer schema: run migrate
    try:
        with exclusive_tables(source) as tables:
            loaded = await load(target.db, tables, replace=replace)
    finally:
        await target.close()
    return CopySummary(
        source=str(source),
        target=display_url(url),
        messages=loaded.counts.get("messages", 0),
        events=loaded.counts.get("events", 0),
        bookings=loaded.counts.get("provider_requests", 0),
        top_id=loaded.top_id,
    )


def _exists(path: str | Path) -> bool:
    return Path(path).is_file()
