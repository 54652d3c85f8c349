"""`PostgresStore`: the store interface (`bridge.store.api.Store`) on a PostgreSQL
database that any number of bridge instances share.

`open()` connects and checks the schema (it never changes it: `migrate()` does, from
`sms-bridge migrate`); the operations are the mixins' (ingest, delivery and the rate
window, queries). Every write is one transaction whose commit has returned before the
operation does: a caller that got its answer may acknowledge.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from bridge.store.api import StoreStats
from bridge.store.postgres.coordination import (
    LEADER_IDLE_TIMEOUT,
    AdvisoryLeadership,
    NotifiedWork,
    budget_turn,
)
from bridge.store.postgres.delivery import DeliveryOps
from bridge.store.postgres.ingest import IngestOps
from bridge.store.postgres.migrate import check_not_newer, check_schema, migrate
from bridge.store.postgres.queries import QueryOps
from bridge.store.postgres.rate import RateOps


class PostgresStore(IngestOps, DeliveryOps, RateOps, QueryOps):
    """`open()` before use, `close()` after. `migrating`: `sms-bridge migrate`'s store,
    whose `open()` accepts a missing or older schema (`migrate()` comes next)."""

    def __init__(self, url: str, *, max_connections: int = 8, migrating: bool = False) -> None:
        super().__init__(url, max_connections=max_connections)
        self.migrating = migrating
        self.leader_idle_timeout = LEADER_IDLE_TIMEOUT  # tests shorten it

    async def open(self) -> None:
        """Connect; refuse (SchemaError) a schema newer than this build's, and, unless
        migrating, one that is missing or older (the message says to run migrate)."""
        await self.db.open()
        try:
            if self.migrating:
                await check_not_newer(self.db)
            else:
                await check_schema(self.db)
        except BaseException:
            await self.db.close()
            raise

    async def migrate(self) -> list[str]:
        return [f"{m.version:04d}_{m.name}" for m in await migrate(self.db)]

    async def close(self) -> None:
        await self.close_ingest()
        await self.db.close()

    def stats(self) -> StoreStats:
        return StoreStats(transactions=self.transactions, writes=self.writes)

    async def heartbeat(self, now: float) -> None:
        await self._execute(
            "INSERT INTO heartbeat (id, at) VALUES (1, $1)"
            " ON CONFLICT (id) DO UPDATE SET at = excluded.at",
            now,
        )

    # -- coordination (bridge.store.postgres.coordination) ---------------------------
    def leadership(self, role: str, *, holder: str) -> AdvisoryLeadership:
        return AdvisoryLeadership(
            self.db, role, holder=holder, idle_timeout=self.leader_idle_timeout
        )

    def watch_work(self, wake: Callable[[], None]) -> NotifiedWork:
        return NotifiedWork(self.db, wake, self.token)

    def budget_turn(self) -> AbstractAsyncContextManager[None]:
        return budget_turn(self.db)
