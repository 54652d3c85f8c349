"""The one leader of a cluster: the instance that runs the singletons (status polling,
storm digests, retention, budget warnings), chosen by a PostgreSQL session advisory lock.

The lock lives on a connection of its own, never a pooled one (a pooled connection goes
back to the pool with the lock still held, or to another task). While that connection
lives, this instance leads; when it dies (the instance crashed, the network cut it off,
the server restarted) the server releases the lock, and another instance takes it on
its next try: within one `LEADER_RETRY`. A leader that loses its connection stops
leading at its next check: it never believes it leads without a live lock.
"""

from __future__ import annotations

import contextlib
import logging

from bridge.store.postgres.pool import Conn, Database
from bridge.store.postgres.schema import LEADER_LOCK

log = logging.getLogger(__name__)


class Leadership:
    """`leading()` on every step of a singleton; `release()` at shutdown."""

    def __init__(self, db: Database, *, lock: int = LEADER_LOCK) -> None:
        self.db = db
        self.lock = lock
        self._conn: Conn | None = None
        self._leading = False

    async def leading(self) -> bool:
        """Whether this instance leads now; takes the lead when nobody holds it."""
        try:
            if self._conn is None or self._conn.is_closed():
                self._leading = False
                self._conn = await self.db.dedicated()
            if self._leading:
                # A round trip proves the connection (and so the lock) is still there.
                await self._conn.fetchval("SELECT 1")
                return True
            self._leading = bool(
                await self._conn.fetchval("SELECT pg_try_advisory_lock($1)", self.lock)
            )
            if self._leading:
                log.info("this instance leads the cluster now (status, digests, retention)")
            return self._leading
        except Exception as exc:  # any failure means: not leading, try again later
            if self._leading:
                log.warning("lost the cluster's lead: %s", exc)
            await self.release()
            return False

    async def release(self) -> None:
        conn, self._conn, self._leading = self._conn, None, False
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()  # closing the session releases the lock
