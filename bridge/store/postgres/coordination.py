"""What instances agree through PostgreSQL besides the queue: who leads the singletons
(a session-level advisory lock), who is told that work arrived (LISTEN / NOTIFY), and
whose turn it is to spend the daily caps (a transaction-level advisory lock).

The leader's lock lives on a connection of its own, never a pooled one (a pooled
connection goes back to the pool still holding it). When the process dies, the kernel
closes that connection, the server ends the session and the lock is free for the next
instance that tries (every few seconds). A process that is alive but frozen (stopped,
its event loop blocked) would hold the lock for ever: its session is given an
`idle_session_timeout` (PostgreSQL 14+) and a keepalive in real time keeps a healthy
one busy, so a frozen leader's session is ended by the server after `idle_timeout`.
The leader also re-checks in `pg_locks` that its session still holds the lock, and
steps down when it cannot tell (a check that times out: the connection is dropped).

Notifications carry the notifying store's token: an instance is not woken by its own
ingest (that already woke its dispatcher). They are lost while the listening connection
is down: `check` reconnects and wakes once, and the dispatcher's idle poll stays the net.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg

from bridge.errors import StoreBusy, StoreUnavailable
from bridge.store.postgres.base import BUDGET_LOCK, WORK_CHANNEL
from bridge.store.postgres.pool import Database, unavailable

log = logging.getLogger(__name__)

LEADER_CLASS = 0x534D_5304  # "SMS" 4: first half of the two-int advisory key of a role
CHECK_TIMEOUT = 3.0  # seconds a check may take before the connection is given up
LEADER_IDLE_TIMEOUT = 10.0  # a leader's session idle this long is ended by the server
KEEPALIVE = 2.0  # real seconds between the leader's keepalives (well under the above)

TRY_LOCK = "SELECT pg_try_advisory_lock($1::int, $2::int)"
HOLDS_LOCK = (
    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted"
    " AND pid = pg_backend_pid() AND classid = $1::int::oid AND objid = $2::int::oid"
    " AND objsubid = 2)"
)


def role_key(role: str) -> int:
    """The second half of a role's lock key: a stable non-negative int4."""
    return zlib.crc32(role.encode()) & 0x7FFF_FFFF


def _lost(exc: BaseException) -> bool:
    """The connection is gone or going: the server ended the session (asyncpg may still
    be reading the server's goodbye: "another operation is in progress"), a timeout."""
    return unavailable(exc) or isinstance(exc, asyncpg.exceptions.InternalClientError)


async def _end(conn: asyncpg.Connection | None) -> None:
    """Say goodbye if the server answers in time, else just drop the connection (it may
    be half dead); either way the session, and any lock it held, ends."""
    if conn is None or conn.is_closed():
        return
    try:
        await asyncio.wait_for(conn.close(), CHECK_TIMEOUT)
    except Exception:
        conn.terminate()


class AdvisoryLeadership:
    """`bridge.store.api.Leadership` on `pg_try_advisory_lock(LEADER_CLASS, role)`."""

    def __init__(
        self, db: Database, role: str, *, holder: str, idle_timeout: float = LEADER_IDLE_TIMEOUT
    ) -> None:
        self.db = db
        self.role = role
        self.key = (LEADER_CLASS, role_key(role))
        self.holder = holder
        self.idle_timeout = idle_timeout
        self.leading = False
        self._conn: asyncpg.Connection | None = None
        self._keepalive: asyncio.Task[None] | None = None
        self._busy = asyncio.Lock()  # one statement at a time: checks and keepalives

    async def check(self) -> bool:
        """One try or confirmation. A leader whose session ended since the last check
        (the server ended it, the connection dropped) answers False even if the lock is
        free to take again at once: the role was lost, another instance may have led
        meanwhile, so its singletons must stop (and the log say so) before it leads
        again, on a new session (`Leader` asks again as soon as they have)."""
        try:
            async with self._busy:
                was_leading = self.leading
                conn = await self._connection()
                if was_leading and not self.leading:
                    held = False  # a new session: the old one took the lock with it
                else:
                    query = HOLDS_LOCK if self.leading else TRY_LOCK
                    held = bool(await conn.fetchval(query, *self.key, timeout=CHECK_TIMEOUT))
        except StoreUnavailable as exc:
            log.debug("leadership check failed: %s", exc)
            held = False
        except Exception as exc:
            if not _lost(exc):
                raise
            log.warning("leadership of %s: lost the connection (%s)", self.role, exc)
            await self._close()
            held = False
        if self.leading and not held:
            await self._close()  # whatever it still holds goes with the session
        self.leading = held
        if held and (self._keepalive is None or self._keepalive.done()):
            self._keepalive = asyncio.create_task(self._keep_alive(), name="leader-keepalive")
        return held

    async def resign(self) -> None:
        self.leading = False
        await self._close()

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self.leading = False  # a new session holds nothing
            conn = self._conn = await self.db.dedicated(f"sms-bridge leader {self.holder}"[:63])
            if conn.get_server_version() >= (14, 0):
                # A frozen leader stops the keepalive: the server ends its session.
                ms = int(self.idle_timeout * 1000)
                await conn.execute(f"SET idle_session_timeout = {ms}")
        return self._conn

    async def _keep_alive(self) -> None:
        """Real time on purpose: what it proves to the server is that this process runs."""
        while self.leading and self._conn is not None and not self._conn.is_closed():
            await asyncio.sleep(min(KEEPALIVE, self.idle_timeout / 3))
            with contextlib.suppress(Exception):  # the next check says what went wrong
                async with self._busy:
                    if self._conn is not None and not self._conn.is_closed():
                        await self._conn.execute("SELECT 1", timeout=CHECK_TIMEOUT)

    async def _close(self) -> None:
        task, self._keepalive = self._keepalive, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        conn, self._conn = self._conn, None
        await _end(conn)


class NotifiedWork:
    """`bridge.store.api.WorkWatch`: LISTEN on a connection of its own."""

    def __init__(self, db: Database, wake: Callable[[], None], token: str) -> None:
        self.db = db
        self.wake = wake
        self.token = token  # this store's notifications: not news to it
        self._conn: asyncpg.Connection | None = None

    async def check(self) -> bool:
        try:
            if self._conn is None or self._conn.is_closed():
                conn = await self.db.dedicated("sms-bridge listen")
                self._conn = conn
                await conn.add_listener(WORK_CHANNEL, self._heard)
                self.wake()  # what was notified while nobody listened is lost: look now
            else:
                await self._conn.fetchval("SELECT 1", timeout=CHECK_TIMEOUT)
            return True
        except StoreUnavailable:
            return False
        except Exception as exc:
            if not _lost(exc):
                raise
            log.warning("listening for work elsewhere: lost the connection (%s)", exc)
            await self.close()
            return False

    def _heard(self, conn: Any, pid: int, channel: str, payload: object) -> None:
        if payload != self.token:
            self.wake()

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        await _end(conn)


# The caps' turn is a transaction in which its holder counts today's use and claims. A
# holder that stops there (frozen, cut off) would keep every instance's capped texts
# waiting until TCP noticed, hours later: the server ends a session idle in its turn this
# long, which frees the lock, as the leader's idle_session_timeout does for the leader's.
TURN_IDLE_LIMIT = 10.0
# An instance waits this long for the turn, then its dispatcher step fails (and is tried
# again) saying why; below the pool's COMMAND_TIMEOUT, which would only say "timeout".
TURN_WAIT_LIMIT = 10.0

TURN_LOST = (
    "the daily caps' turn was lost (ended by the server past its idle limit, or the"
    " connection dropped): what this instance decided and claimed in it is undone"
)


@contextlib.asynccontextmanager
async def budget_turn(db: Database) -> AsyncIterator[None]:
    """`bridge.store.api.Coordination.budget_turn`: a transaction holding BUDGET_LOCK in
    which every operation of the caller's task runs (`Database.holding`: its counts and
    its claims), committed when the block ends. The lock is the transaction's, so its
    end frees it whatever happens: an exception, a lost connection, the server's idle
    limit. Always taken before the rate window's lock, never after.

    The claims are the turn's: made on connections of their own, a holder that waited
    past TURN_IDLE_LIMIT inside its turn (for the pool, for the rate lock) lost it to the
    server, another instance counted today's use without these claims, and both spent
    the last of a cap. A turn lost so undoes what it decided: its end raises
    StoreUnavailable, nothing it claimed stands, nothing is sent."""
    async with db.connection() as conn:
        turn = conn.transaction()
        await turn.start()
        try:
            await conn.execute(
                f"SET LOCAL idle_in_transaction_session_timeout = {TURN_IDLE_LIMIT * 1000:.0f};"
                f" SET LOCAL lock_timeout = {TURN_WAIT_LIMIT * 1000:.0f};"
                f" SELECT pg_advisory_xact_lock({BUDGET_LOCK})"
            )
        except asyncpg.LockNotAvailableError as exc:
            await _undo(turn)
            raise StoreUnavailable(
                f"another instance has held the daily caps' turn for {TURN_WAIT_LIMIT:g} s"
            ) from exc
        except BaseException:
            await _undo(turn)
            raise
        try:
            with db.holding(conn):
                yield
            await turn.commit()
        except BaseException as exc:
            await _undo(turn)
            busy = isinstance(exc, StoreBusy)  # a lock not had in time: the turn is fine
            if not busy and (isinstance(exc, StoreUnavailable) or _lost(exc)):
                raise StoreUnavailable(f"{TURN_LOST}: {exc}") from exc
            raise


async def _undo(turn: Any) -> None:
    """Roll the turn back. A session the server already ended (the idle limit, a lost
    connection) took the lock and the turn's writes with it: nothing left to undo."""
    with contextlib.suppress(Exception):
        await turn.rollback()
