"""`PostgresStore`: the store interface (`bridge.store.api.Store`) on a PostgreSQL
database that any number of bridge instances share.

`open()` connects and checks the schema (it never changes it: `migrate()` does, from
`sms-bridge migrate`); the operations are the mixins' (ingest, delivery and the rate
window, queries). Every write is one transaction whose commit has returned before the
operation does: a caller that got its answer may acknowledge.
"""

from __future__ import annotations

from bridge.store.api import StoreStats
from bridge.store.postgres.delivery import DeliveryOps
from bridge.store.postgres.ingest import IngestOps
from bridge.store.postgres.migrate import check_schema, migrate
from bridge.store.postgres.queries import QueryOps


class PostgresStore(IngestOps, DeliveryOps, QueryOps):
    """`open()` before use, `close()` after."""

    async def open(self) -> None:
        """Connect; refuse (SchemaError) a schema missing, older or newer than this build's."""
        await self.db.open()
        try:
            await check_schema(self.db)
        except BaseException:
            await self.db.close()
            raise

    async def open_for_migration(self) -> None:
        """Connect without the schema check: `migrate()` comes next."""
        await self.db.open()

    async def migrate(self) -> list[str]:
        return [f"{m.version:04d}_{m.name}" for m in await migrate(self.db)]

    async def close(self) -> None:
        await self.db.close()

    def stats(self) -> StoreStats:
        return StoreStats(transactions=self.transactions, writes=self.writes)

    async def heartbeat(self, now: float) -> None:
        await self._execute(
            "INSERT INTO heartbeat (id, at) VALUES (1, $1)"
            " ON CONFLICT (id) DO UPDATE SET at = excluded.at",
            now,
        )
