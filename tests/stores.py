"""Stores for tests: one factory per backend, and the SQLite seams the tests need.

The `store` fixture (tests/conftest.py) is parametrised by `BACKENDS`; a backend is one
more name here and one more factory in `FACTORIES` (an async context manager that yields
a fresh, empty, unopened store and cleans up after it). Test seams live here, not on the
production classes: `FaultySqliteStore` plays a failing disk and runs raw SQL.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from bridge.models import NewMessage
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

    def _begin(self, conn: sqlite3.Connection) -> None:
        if self.fault is not None:
            self.fault()
        super()._begin(conn)


class FaultySqliteStore(SqliteStore):
    """SQLite with the seams tests need: a failing disk, SQL run on the writer."""

    engine_type = FaultyEngine

    def fail_commits(self, fault: Callable[[], None] | None) -> None:
        """Call `fault` before each transaction (raise sqlite3.OperationalError from it
        to play a full disk); None: the disk recovers."""
        assert isinstance(self.engine, FaultyEngine)
        self.engine.fault = fault

    def disk_full(self) -> None:
        def full() -> None:
            raise sqlite3.OperationalError("database or disk is full")

        self.fail_commits(full)

    async def on_writer(self, fn: Callable[[Any], Any]) -> Any:
        """`fn(db)` on the writer's connection, in a transaction of its own."""
        return await self.engine.write(fn)


def faulty_store(config: Any) -> FaultySqliteStore:
    """The store `config` names, with the test seams (the bridge opens it)."""
    return FaultySqliteStore(config.store.path)
