"""Whether the store takes a write, for /readyz and /metrics.

Reads prove little: a full disk, a read-only remount, a PostgreSQL server in recovery
or out of space all answer reads and refuse the one thing ingest needs. Only a real,
durable write (`Store.heartbeat`) tells, so the probe writes. /readyz (the orchestrator's
question, "may I send you a message now?") writes on every call. /metrics, scraped every
15 s by each Prometheus server, wrote on every scrape too: now a scrape only reads, and
takes the last write's word while it is younger than `WRITE_PROOF_AGE`, writing only
when none is (once a minute at most, however many servers scrape; never while an
orchestrator asks /readyz more often than that). Anyone may ask /readyz: callers that
ask while a write is under way share it, so a flood of them makes one write at a time,
not (on PostgreSQL) a transaction each, queued on the heartbeat row's lock and holding
the pool's connections the ingests wait for.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from bridge.errors import StoreUnavailable
from bridge.store import Store

WRITE_PROOF_AGE = 60.0  # seconds a write that went through answers for /metrics


class StoreProbe:
    """The heartbeat write, and when it last went through."""

    def __init__(self, store: Store, now: Callable[[], float]) -> None:
        self.store = store
        self.now = now
        self.proven_at: float | None = None  # the last write that went through
        self._writing: asyncio.Task[None] | None = None  # the write under way, shared

    async def write(self) -> None:
        """Write now, or join the write under way; StoreUnavailable (with the store's
        words) if it is refused."""
        if self._writing is None:
            self._writing = asyncio.ensure_future(self._write())
            self._writing.add_done_callback(self._written)
        # Shielded: a caller that hangs up does not cancel the write the others wait for.
        await asyncio.shield(self._writing)

    def _written(self, task: asyncio.Task[None]) -> None:
        self._writing = None
        if not task.cancelled():
            task.exception()  # read: nobody may be left waiting (every caller hung up)

    async def _write(self) -> None:
        now = self.now()
        try:
            await self.store.heartbeat(now)
        except StoreUnavailable:
            self.proven_at = None  # the next question writes again: recovery shows at once
            raise
        self.proven_at = now

    async def recent_write(self) -> None:
        """As `write`, unless a write went through less than WRITE_PROOF_AGE ago."""
        proven = self.proven_at
        if proven is not None and 0 <= self.now() - proven < WRITE_PROOF_AGE:
            return
        await self.write()
