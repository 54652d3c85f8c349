"""Stores for tests: one factory per backend, and the SQLite seams the tests need.

The `store` fixture (tests/conftest.py) is parametrised by `BACKENDS`; a backend is one
more name here and one more factory in `FACTORIES` (an async context manager that yields
a fresh, empty, unopened store and cleans up after it). Test seams live here, not on the
production classes: `FaultySqliteStore` plays a failing disk and runs raw SQL.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from bridge.models import NewMessage, State
from bridge.store import Store
from bridge.store.api import IngestQuestions, Lookups, Pending
from bridge.store.postgres.store import PostgresStore
from bridge.store.sqlite import SqliteStore
from bridge.store.sqlite.engine import Engine

BACKENDS = ["sqlite", "postgresql"]


@contextlib.asynccontextmanager
async def sqlite_store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    yield SqliteStore(request.getfixturevalue("tmp_path") / "store.db")


@contextlib.asynccontextmanager
async def postgres_store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    """A database of the test's own on the test server, migrated (tests/postgres.py)."""
    yield PostgresStore(request.getfixturevalue("postgres_url"))


# Each factory gets the test's request and asks for the fixtures it needs (a temporary
# directory, a PostgreSQL database): a backend's setup is only paid by its own tests.
FACTORIES: dict[
    str, Callable[[pytest.FixtureRequest], contextlib.AbstractAsyncContextManager[Store]]
] = {
    "sqlite": sqlite_store,
    "postgresql": postgres_store,
}


class AsGiven:
    """A decider that stores messages exactly as given: seeds rows in a chosen state."""

    def questions(self, pending: Sequence[Pending]) -> IngestQuestions:
        return IngestQuestions()

    def decide(
        self, lookups: Lookups, pending: Sequence[Pending], ids: Sequence[int]
    ) -> list[NewMessage]:
        return [m for m, _ in pending]


AS_GIVEN = AsGiven()


async def seed(store: Store, messages: Sequence[NewMessage], now: float) -> list[int]:
    """Insert `messages` as given (their states too) at `now`; their ids."""
    return [s.id for s in await store.ingest([(m, now) for m in messages], AS_GIVEN)]


class FaultyEngine(Engine):
    """The engine with a fault seam: `fault` runs in the writer before each transaction."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self.fault: Callable[[], None] | None = None
        self.sync_fault: Callable[[int], None] | None = None

    def _before_write(self) -> None:
        if self.fault is not None:
            self.fault()

    def _sync_file(self, fd: int) -> None:
        if self.sync_fault is not None:
            self.sync_fault(fd)
        super()._sync_file(fd)


class FaultySqliteStore(SqliteStore):
    """SQLite with the seams tests need: a failing disk, SQL run on the writer."""

    engine_type = FaultyEngine

    def fail_commits(self, fault: Callable[[], None] | None) -> None:
        """Call `fault` before each transaction (raise sqlite3.OperationalError from it
        to play a full disk); None: the disk recovers."""
        assert isinstance(self.engine, FaultyEngine)
        self.engine.fault = fault

    def fail_syncs(self, fault: Callable[[int], None] | None) -> None:
        """Call `fault(fd)` in the syncer before each fdatasync of the WAL or its
        directory (block in it to play a slow disk, raise OSError for a failing one)."""
        assert isinstance(self.engine, FaultyEngine)
        self.engine.sync_fault = fault

    def disk_full(self) -> None:
        def full() -> None:
            raise sqlite3.OperationalError("database or disk is full")

        self.fail_commits(full)

    async def on_writer(self, fn: Callable[[Any], Any]) -> Any:
        """`fn(db)` on the writer's connection, in a transaction of its own."""
        return await self.engine.write(fn)


class HeldDisk:
    """A `fail_syncs` fault: every fdatasync of the syncer waits until `release()` (a slow
    disk); `synced` names each file it was asked to sync, in order."""

    def __init__(self) -> None:
        self.synced: list[str] = []
        self._released = threading.Event()

    def __call__(self, fd: int) -> None:
        self.synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        self._released.wait(10)

    def release(self) -> None:
        self._released.set()


def faulty_store(config: Any) -> FaultySqliteStore:
    """The store `config` names, with the test seams (the bridge opens it)."""
    return FaultySqliteStore(config.store.path)


async def aggregated(store: Store, purged_parts: int = 0, purged_cost: float = 0.0) -> tuple:
    """What /metrics and /api/v1/stats report, aggregated here from every stored row (as
    the store did before it kept running totals); plus what retention purged of "sent"."""
    rows = await store.query(limit=10_000)
    by_source_state: dict[tuple[str, str], int] = {}
    by_state: dict[str, int] = {}
    reasons: dict[str, dict[str, int]] = {}
    for m in rows:
        key = (m.source, str(m.state))
        by_source_state[key] = by_source_state.get(key, 0) + 1
        by_state[str(m.state)] = by_state.get(str(m.state), 0) + 1
        if m.state in (State.HELD, State.SUPPRESSED, State.FAILED):
            kinds = reasons.setdefault(str(m.state), {})
            kinds[m.reason_kind or "other"] = kinds.get(m.reason_kind or "other", 0) + 1
    sent = [m for m in rows if m.sent_at is not None]
    return (
        sorted((s, st, n) for (s, st), n in by_source_state.items()),
        by_state,
        reasons,
        sum(m.parts for m in sent) + purged_parts,
        pytest.approx(sum(m.cost or 0 for m in sent) + purged_cost),
    )


async def reported(store: Store) -> tuple:
    metrics = await store.counts_for_metrics()
    stats_reasons = await store.counts_by_reason()
    metric_reasons: dict[str, dict[str, int]] = {}
    for state, kind, n in metrics.by_reason:
        metric_reasons.setdefault(state, {})[kind] = n
    assert metric_reasons == stats_reasons  # /metrics and /api/v1/stats agree
    return (
        sorted(metrics.by_source_state),
        await store.counts(),
        stats_reasons,
        metrics.parts_sent,
        metrics.cost,
    )
