"""Connections to PostgreSQL: one asyncpg pool per process, and the driver's failures
turned into the bridge's `StoreUnavailable`.

asyncpg over psycopg 3 by measurement (bench/pg_driver.py, BENCHMARKS.md): the same
ingest transaction costs the bridge's event loop ~40 % less CPU, and the loop is what
the bridge's ingest is short of. What psycopg_pool would have given is here or in
asyncpg's pool: a dead server surfaces as `StoreUnavailable` (ingress answers 503 / 451,
the dispatcher waits); a connection the server closed is noticed by the pool and
replaced on the next acquire, so the bridge recovers without a restart (tested with a
real server restarted). Timeouts bound every wait: a server that hangs fails
operations, it does not hang ingress.

No automatic retry of a failed transaction: if the connection died around COMMIT the
outcome is unknown, and the sender's retry (after a 503) meets the dedupe window.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from contextvars import ContextVar
from typing import Any, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from bridge.errors import StoreBusy, StoreUnavailable
from bridge.store.names import display_url

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0  # seconds to open one connection
COMMAND_TIMEOUT = 15.0  # seconds one statement may take before the operation fails
ACQUIRE_TIMEOUT = 10.0  # seconds to wait for a free connection in the pool
# SQLSTATE classes that mean "the server or the connection", not "this statement":
# 08 connection exception, 53 insufficient resources, 57 operator intervention (shutdown,
# cannot connect now), 58 system error. Anything else is a bug and propagates as is.
UNAVAILABLE_CLASSES = ("08", "53", "57", "58")
# SQLSTATEs of a transaction the server gave up on that passes when tried again: class
# 40 (40001 serialization failure, 40P01 deadlock detected, ...) and 55P03 (a lock not
# had within lock_timeout). Not "unavailable", but not a bug either: taken for one, an
# ingest that met one alone answered HTTP 500 and SMTP "internal error", not "retry".
TRANSIENT_CLASSES = ("40",)
TRANSIENT_STATES = ("55P03",)
# What the operations run their statements on: a pooled connection, or a dedicated one.
Conn: TypeAlias = "asyncpg.Connection[Any] | PoolConnectionProxy[Any]"


# The connection whose transaction a task's operations run in (`Database.holding`): the
# database, the connection, and the task that holds it (a task it starts copies the
# variable, and must not share the connection: it runs on the pool).
_HELD: ContextVar[tuple[Database, Conn, asyncio.Task[Any] | None] | None] = ContextVar(
    "sms_bridge_held_connection", default=None
)


def transient(exc: BaseException) -> bool:
    """Whether `exc` is a transaction the server refused for now (TRANSIENT_CLASSES)."""
    state = str(getattr(exc, "sqlstate", "") or "")
    return isinstance(exc, asyncpg.PostgresError) and (
        state[:2] in TRANSIENT_CLASSES or state in TRANSIENT_STATES
    )


def unavailable(exc: BaseException) -> bool:
    """Whether `exc` says the database cannot be reached (rather than a wrong statement)."""
    if isinstance(exc, asyncpg.PostgresError):
        return str(getattr(exc, "sqlstate", "") or "")[:2] in UNAVAILABLE_CLASSES
    # InternalClientError: asyncpg's protocol lost track of a connection the server cut
    # mid-statement ("cannot switch to state 15; another operation is in progress", seen
    # on COMMIT while the server restarted, tests/test_chaos.py): the connection, not
    # the statement, is broken, and the pool replaces it.
    return isinstance(
        exc, asyncpg.InterfaceError | asyncpg.InternalClientError | OSError | TimeoutError
    )


class Database:
    """A pool of connections to one PostgreSQL database. `open()` before use, `close()` after."""

    def __init__(
        self,
        url: str,
        *,
        min_size: int = 1,
        max_size: int = 8,
        command_timeout: float = COMMAND_TIMEOUT,
    ) -> None:
        self.url = url
        self.shown = display_url(url)
        self.min_size = min_size
        self.max_size = max_size
        self.command_timeout = command_timeout
        self._pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        """Connect `min_size` connections now: a wrong URL or a server that is down is
        said at start (and `serve` exits 1), not at the first alert."""
        try:
            self._pool = await asyncpg.create_pool(
                self.url,
                min_size=self.min_size,
                max_size=self.max_size,
                timeout=CONNECT_TIMEOUT,
                command_timeout=self.command_timeout,
                server_settings={"application_name": "sms-bridge"},
            )
        except Exception as exc:
            raise StoreUnavailable(f"cannot connect to {self.shown}: {_why(exc)}") from exc

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            with contextlib.suppress(Exception):  # a dead server cannot be said goodbye to
                await pool.close()

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreUnavailable("store is not open")
        return self._pool

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Conn]:
        """A pooled connection, each statement its own transaction (reads); inside
        `holding`, the held one (its transaction's)."""
        held = self._held()
        if held is not None:
            async with self._failures():
                yield held
            return
        async with self._failures(), self.pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn:
            yield conn

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Conn]:
        """A pooled connection inside one transaction, committed when the block ends.

        The commit is done when the block has left: that is when ingress may say 202/250.
        Inside `holding`, a savepoint of the held transaction: committed with it.
        """
        held = self._held()
        if held is not None:
            async with self._failures(), held.transaction():
                yield held
            return
        async with (
            self._failures(),
            self.pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn,
            conn.transaction(),
        ):
            yield conn

    @contextlib.contextmanager
    def holding(self, conn: Conn) -> Iterator[None]:
        """Every operation of this task on this database runs on `conn`, in the
        transaction open on it, until the block ends (the daily caps' turn,
        bridge.store.postgres.coordination): what they write stands only if it commits."""
        token = _HELD.set((self, conn, asyncio.current_task()))
        try:
            yield
        finally:
            _HELD.reset(token)

    def _held(self) -> Conn | None:
        held = _HELD.get()
        if held is None or held[0] is not self or held[2] is not asyncio.current_task():
            return None
        return held[1]

    async def dedicated(self, name: str = "sms-bridge") -> asyncpg.Connection:
        """A connection of its own, outside the pool: for a session-level lock held as
        long as the connection lives (the leader's) or a LISTEN, never returned to a
        pool. `name`: its application_name, so pg_stat_activity tells which is which."""
        try:
            conn: asyncpg.Connection = await asyncpg.connect(
                self.url,
                timeout=CONNECT_TIMEOUT,
                command_timeout=self.command_timeout,
                server_settings={"application_name": name},
            )
        except Exception as exc:
            raise StoreUnavailable(f"cannot connect to {self.shown}: {_why(exc)}") from exc
        return conn

    @contextlib.asynccontextmanager
    async def _failures(self) -> AsyncIterator[None]:
        try:
            yield
        except StoreUnavailable:
            raise
        except Exception as exc:
            if transient(exc):
                log.warning("store busy (%s): %s", self.shown, _why(exc))
                raise StoreBusy(f"store busy: {_why(exc)}") from exc
            if not unavailable(exc):
                raise
            log.error("store unavailable (%s): %s", self.shown, _why(exc))
            raise StoreUnavailable(f"store unavailable: {_why(exc)}") from exc


def _why(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
