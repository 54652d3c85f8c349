"""The SQLite store: `bridge.store.api.Store` on one file, the embedded default.

The engine (one writer with group commit, readers) is `engine`; the schema and its
migrations `schema`; the SQL run inside one job `queries`; delivery's operations
`delivery`; the API's and console's queries and actions `console`. Every state change is
logged to `events` by triggers, so no code path can change a state without leaving a row.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path

from sqlite_utils import Database

import bridge.store.sqlite.queries as queries
from bridge.models import NewMessage
from bridge.pricing import BILLED_MAX_FOR
from bridge.store.api import Decider, Held, MetricCounts, Pending, Stored, StoreStats
from bridge.store.sqlite.console import ConsoleQueries
from bridge.store.sqlite.delivery import DeliveryOperations
from bridge.store.sqlite.engine import Engine
from bridge.store.sqlite.rate import RateOperations
from bridge.store.sqlite.solo import NoOtherWork, SoleLeader

log = logging.getLogger(__name__)


class SqliteStore(DeliveryOperations, RateOperations, ConsoleQueries):
    """`open()` before use, `close()` after."""

    engine_type: type[Engine] = Engine  # a subclass may run a subclass (tests: faults)

    def __init__(self, path: str | Path) -> None:
        self.engine = self.engine_type(path)
        self.path = self.engine.path
        # The caps' turn among this process's own tasks (one dispatcher takes it today).
        self._budget_turn = asyncio.Lock()

    # -- lifecycle -------------------------------------------------------------------
    async def open(self) -> None:
        await self.engine.open()

    async def migrate(self) -> list[str]:
        """Migrations run at open (embedded: nobody else would): what that open applied."""
        applied, self.engine.migrated = self.engine.migrated, []
        return applied

    async def close(self) -> None:
        await self.engine.close()

    def stats(self) -> StoreStats:
        failed = self.engine.sync_failed
        return StoreStats(
            transactions=self.engine.commits,
            writes=self.engine.jobs_committed,
            broken=None if failed is None else str(failed),
        )

    async def heartbeat(self, now: float) -> None:
        """Rewrite the one heartbeat row and commit: the readiness probe's real write."""
        await self.engine.write(
            lambda db: db.execute(
                "INSERT INTO heartbeat (id, at) VALUES (1, ?)"
                " ON CONFLICT (id) DO UPDATE SET at = excluded.at",
                [now],
            )
        )

    # -- coordination: one process ---------------------------------------------------
    def leadership(self, role: str, *, holder: str) -> SoleLeader:
        del role, holder
        return SoleLeader()

    def watch_work(self, wake: Callable[[], None]) -> NoOtherWork:
        del wake
        return NoOtherWork()

    def budget_turn(self) -> AbstractAsyncContextManager[None]:
        return self._budget_turn

    # -- ingest ----------------------------------------------------------------------
    async def ingest(self, pending: Sequence[Pending], decider: Decider) -> list[Stored]:
        """Queued with every other ingest waiting for the writer: decided and inserted in
        one transaction with them (one lookup and one insert for all)."""
        stored: list[Stored] = await self.engine.write_batched(
            ingest_all, (pending, decider), unlocked=ingest_unlocked
        )
        return stored

    async def queue_once(self, messages: Sequence[NewMessage], now: float) -> bool:
        return await self.engine.write(lambda db: queries.insert_once(db, messages, now))

    async def held_phones(self) -> list[tuple[str, float]]:
        return await self.engine.read(queries.held_phones)

    async def fold_held(
        self,
        recipient: str,
        now: float,
        digest: Callable[[list[Held]], NewMessage],
        reason: Callable[[int], str],
    ) -> tuple[int, int] | None:
        return await self.engine.write(
            lambda db: queries.fold_held(db, recipient, now, digest, reason)
        )

    # -- budgets and metrics ---------------------------------------------------------
    async def spent_since(
        self, since: float, exclude_source: str
    ) -> tuple[float, list[tuple[str, int]]]:
        return await self.engine.read(lambda c: queries.spent_since(c, since, exclude_source))

    async def used_since(
        self,
        since: float,
        exclude_source: str,
        route: str | None = None,
        *,
        token: str | None = None,
    ) -> tuple[int, int]:
        return await self.engine.read(
            lambda c: queries.used_since(c, since, exclude_source, route, token)
        )

    async def billed_prices(self) -> dict[int, tuple[float, float]]:
        return await self.engine.read(
            lambda c: {
                int(code): (float(price), float(at))
                for code, price, at in c.execute(
                    "SELECT country_code, price, billed_at FROM billed_prices"
                )
            }
        )

    async def record_billed(self, prices: Mapping[int, float], now: float) -> None:
        def job(db: Database) -> None:
            for code, price in prices.items():  # a country and 0 at most
                db.execute(queries.RECORD_BILLED, (code, price, now, BILLED_MAX_FOR))

        await self.engine.write(job)

    async def counts_for_metrics(self) -> MetricCounts:
        return await self.engine.read(queries.counts_for_metrics)


def ingest_all(db: Database, calls: list[tuple[Sequence[Pending], Decider]]) -> list[list[Stored]]:
    """The writer's batch for `ingest`: the calls queued for one transaction, decided
    together (per decider, in call order) and inserted together."""
    out: list[list[Stored]] = []
    for _, group in itertools.groupby(calls, key=lambda call: id(call[1])):
        run = list(group)
        decider = run[0][1]
        pending = [p for messages, _ in run for p in messages]
        first_id, lookups = queries.ingest_lookups(db, decider.questions(pending))
        ids = range(first_id, first_id + len(pending))
        decided = decider.decide(lookups, pending, ids)
        queries.insert_messages(db, decided, [now for _, now in pending], first_id=first_id)
        stored = iter(map(Stored, ids, decided))
        out += [[next(stored) for _ in messages] for messages, _ in run]
    return out


def ingest_unlocked(
    db: Database, calls: list[tuple[Sequence[Pending], Decider]]
) -> list[list[Stored]] | None:
    """`ingest_all` in two trips into SQLite instead of four: the lookups read outside a
    transaction, then the insert, which commits itself, guarded by the data version the
    lookups read. None, having written nothing, when that cannot stand for `ingest_all`:
    several deciders, more than one statement of lookups or rows, or another process
    committed between the two (the engine then runs `ingest_all` in its transaction).

    Each trip lets the GIL go and waits for the busy event loop to hand it back; BEGIN
    and COMMIT were two of the four (BENCHMARKS.md, issue #16)."""
    decider = calls[0][1]
    if any(other is not decider for _, other in calls):
        return None
    pending = [p for messages, _ in calls for p in messages]
    questions = decider.questions(pending)
    if not queries.unlocked_fits(questions, len(pending)):
        return None
    first_id, lookups, version = queries.unlocked_lookups(db, questions)
    ids = range(first_id, first_id + len(pending))
    decided = decider.decide(lookups, pending, ids)
    # Built before the insert: nothing may raise once it committed, or the engine would
    # take the transaction and store the group a second time.
    stored = iter(map(Stored, ids, decided))
    answers = [[next(stored) for _ in messages] for messages, _ in calls]
    times = [now for _, now in pending]
    return answers if queries.insert_unless_changed(db, decided, times, first_id, version) else None
