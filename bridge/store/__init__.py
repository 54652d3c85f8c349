"""SQLite store: the single writer with group commit, claims and queries.

The schema and its migrations are in `bridge.store.schema`. One thread owns the write
connection (Datasette's pattern). Jobs from the event loop are queued to it; it takes
every job waiting, runs them in one `BEGIN IMMEDIATE` transaction (if one raises, the
group is rolled back and each job rerun alone, so one bad job cannot spoil the others),
commits with `synchronous=FULL`, and only then resolves each job's future. A caller that
awaited `write()` therefore holds a durable result: that is when SMTP may say 250 and
HTTP 202. Consecutive jobs for the same batch function (`write_batched`: every ingest)
run as one call, so a hundred concurrent ingests cost a handful of statements, not two
hundred: each statement is a trip into SQLite that hands the GIL to the event loop and
waits to get it back. Readers run on their own connections in a small thread pool; WAL
lets them read while the writer writes. Every state change is logged to `events` by
triggers, so no code path can change a state without leaving a row.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import queue
import sqlite3
import stat
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlite_utils import Database

from bridge.errors import StoreUnavailable
from bridge.models import MAX_ROW_ID, Message, NewMessage, State
from bridge.store.schema import INSERT_COLUMNS, ROW_MARKS, ROWS_PER_INSERT, migrations, row

log = logging.getLogger(__name__)
T = TypeVar("T")
# `sent` too: past status.give_up_after nothing will move it any more.
PURGEABLE_SQL = "('sent', 'delivered', 'failed', 'suppressed')"
MAX_GROUP = 512  # jobs per transaction: bounds the latency one commit adds
BUSY_TIMEOUT_MS = 5000


class _JobFailed(Exception):
    """A job raised something other than a storage error; carries it."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


Batch = Callable[[Database, list[Any]], list[Any]]  # items in, one result per item out


@dataclass
class _Job:
    batch: Batch
    item: Any
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


# Many rows changed by one statement: ids (or rows) passed as one JSON parameter, exact
# for integers and strings; each statement is one trip into SQLite, not one per row.
# Filters on state are written `+state` so that SQLite looks the ids up by rowid rather
# than walking every queued message through the state index.
_JSON_IDS = "(SELECT value FROM json_each(?))"
MIN_SQLITE = (3, 33, 0)  # UPDATE ... FROM; and the JSON functions, checked at open


def _call_each(db: Database, fns: list[Callable[[Database], Any]]) -> list[Any]:
    """The batch behind plain `write(fn)`: each function in turn."""
    return [fn(db) for fn in fns]


def _check_sqlite() -> None:
    needed = ".".join(map(str, MIN_SQLITE))
    if sqlite3.sqlite_version_info < MIN_SQLITE:
        raise StoreUnavailable(
            f"SQLite {needed} or later is needed; this Python has {sqlite3.sqlite_version}"
        )
    try:
        sqlite3.connect(":memory:").execute("SELECT json_array()").close()
    except sqlite3.Error as exc:
        raise StoreUnavailable(f"this Python's SQLite lacks the JSON functions: {exc}") from exc


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    return conn


def _create_private(path: str) -> None:
    """Create the store file 0600 before SQLite does: it holds numbers and texts.

    SQLite gives the WAL and SHM files the database file's mode, so they follow. A store
    that already exists keeps its mode (the owner may have chosen it); a world-readable
    one is named in the log.
    """
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        with contextlib.suppress(OSError):
            if os.stat(path).st_mode & stat.S_IROTH:
                log.warning("store %s is readable by every user: chmod 600 it", path)
    except OSError as exc:
        raise StoreUnavailable(f"cannot create the store: {exc.strerror or exc}") from exc


class Store:
    """The bridge's only door to SQLite. `open()` before use, `close()` after."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._readers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="store-read")
        self._local = threading.local()
        self.commits = 0  # transactions committed: lets tests see group commit happen
        # Fault seam for tests: called in the writer thread before each transaction; raise
        # sqlite3.OperationalError from it to play a full or failing disk.
        self.inject_fault: Callable[[], None] | None = None
        self.jobs_committed = 0

    # -- lifecycle -----------------------------------------------------------------
    async def open(self) -> None:
        _check_sqlite()
        if self.path != ":memory:":
            try:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreUnavailable(f"cannot create the store's directory: {exc}") from exc
            _create_private(self.path)
        self._thread = threading.Thread(target=self._writer, name="store-writer", daemon=True)
        self._thread.start()
        await self.write(lambda db: None)  # surfaces a failed open or migration here

    async def close(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        self._readers.shutdown(wait=True)

    # -- the writer thread ---------------------------------------------------------
    def _writer(self) -> None:
        try:
            conn = _connect(self.path)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            db = Database(conn, execute_plugins=False)
            migrations.apply(db)
        except sqlite3.Error as exc:
            self._fail_all(StoreUnavailable(f"cannot open store {self.path}: {exc}"))
            return
        try:
            while True:
                first = self._jobs.get()
                if first is None:
                    return
                batch = [first]
                stop = False
                while len(batch) < MAX_GROUP:
                    try:
                        job = self._jobs.get_nowait()
                    except queue.Empty:
                        break
                    if job is None:
                        stop = True
                        break
                    batch.append(job)
                self._run_batch(conn, db, batch)
                if stop:
                    return
        finally:
            conn.close()

    def _run_batch(self, conn: sqlite3.Connection, db: Database, batch: list[_Job]) -> None:
        try:
            outcomes = self._transaction(conn, db, batch)
        except _JobFailed:
            # A job raised: its group was rolled back whole. Run each job in a transaction
            # of its own so that one bad job cannot sink the others (rare; jobs are plain
            # database functions, safe to run again after a rollback).
            outcomes = []
            for job in batch:
                try:
                    outcomes += self._transaction(conn, db, [job])
                except _JobFailed as failed:
                    outcomes.append((job, None, failed.error))
        self._settle(outcomes)

    def _transaction(
        self, conn: sqlite3.Connection, db: Database, jobs: list[_Job]
    ) -> list[tuple[_Job, Any, BaseException | None]]:
        """Run `jobs` in one BEGIN IMMEDIATE ... COMMIT; a storage error fails them all."""
        try:
            if self.inject_fault is not None:
                self.inject_fault()
            conn.execute("BEGIN IMMEDIATE")
            results: list[tuple[_Job, Any, BaseException | None]] = []
            for batch, group in itertools.groupby(jobs, key=lambda job: job.batch):
                run = list(group)
                try:
                    outs = batch(db, [job.item for job in run])
                    results += [(job, out, None) for job, out in zip(run, outs, strict=True)]
                except sqlite3.Error:
                    raise
                except Exception as exc:
                    conn.execute("ROLLBACK")
                    raise _JobFailed(exc) from exc
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            log.error("store commit failed: %s", exc)
            failure = StoreUnavailable(f"store commit failed: {exc}")
            return [(job, None, failure) for job in jobs]
        self.commits += 1
        self.jobs_committed += len(jobs)
        return results

    def _settle(self, outcomes: list[tuple[_Job, Any, BaseException | None]]) -> None:
        # One wake-up of the event loop per transaction, not one per job.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Any, ...]]] = {}
        for job, result, error in outcomes:
            by_loop.setdefault(job.loop, []).append((job.future, result, error))
        for loop, settled in by_loop.items():
            loop.call_soon_threadsafe(_settle_all, settled)

    def _fail_all(self, error: BaseException) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            job.loop.call_soon_threadsafe(_settle, job.future, None, error)

    # -- the async API -------------------------------------------------------------
    async def write(self, fn: Callable[[Database], T]) -> T:
        """Run `fn` in the writer's next transaction; return once it is durable."""
        result: T = await self.write_batched(_call_each, fn)
        return result

    async def write_batched(self, batch: Batch, item: Any) -> Any:
        """`batch(db, [item, ...])` in the next transaction, with the items of every job
        queued next to this one for the same `batch`; this item's result once durable."""
        if self._thread is None or not self._thread.is_alive():
            raise StoreUnavailable("store is not open")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._jobs.put(_Job(batch, item, future, loop))
        return await future

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, self._read_in_thread, fn)

    def _read_in_thread(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connect(self.path)
            self._local.conn = conn
        try:
            return fn(conn)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"store read failed: {exc}") from exc

    # -- ingest ----------------------------------------------------------------------
    @staticmethod
    def next_message_id(db: Database) -> int:
        """The id the next inserted message gets (inside a writer job: no other writer)."""
        return int(db.execute("SELECT coalesce(max(id), 0) + 1 FROM messages").fetchone()[0])

    @staticmethod
    def insert_messages(
        db: Database,
        messages: Sequence[NewMessage],
        now: float | Sequence[float],
        *,
        first_id: int | None = None,
    ) -> list[int]:
        """Insert inside a writer job (policy decided the states already), with ids
        `first_id`, `first_id + 1`, ... (default: the next free ones); `now` per message or
        one for all. A few rows per statement: each statement is a trip into SQLite."""
        first = Store.next_message_id(db) if first_id is None else first_id
        times = [now] * len(messages) if isinstance(now, float | int) else list(now)
        rows = [
            row(first + offset, m, at)
            for offset, (m, at) in enumerate(zip(messages, times, strict=True))
        ]
        for start in range(0, len(rows), ROWS_PER_INSERT):
            chunk = rows[start : start + ROWS_PER_INSERT]
            marks = ",".join([ROW_MARKS] * len(chunk))
            db.execute(
                f"INSERT INTO messages ({INSERT_COLUMNS}) VALUES {marks}",
                [value for row in chunk for value in row],
            )
        return [row[0] for row in rows]

    # -- dispatch --------------------------------------------------------------------
    async def due(self, now: float, limit: int) -> list[Message]:
        return await self.read(
            lambda c: [
                Message.from_row(r)
                for r in c.execute(
                    "SELECT * FROM messages WHERE state = 'queued' AND next_attempt_at <= ?"
                    " ORDER BY next_attempt_at, id LIMIT ?",
                    (now, limit),
                )
            ]
        )

    async def next_due_at(self) -> float | None:
        return await self.read(
            lambda c: c.execute(
                "SELECT min(next_attempt_at) FROM messages WHERE state = 'queued'"
            ).fetchone()[0]
        )

    async def in_state(self, state: State, limit: int = 10_000) -> list[Message]:
        return await self.read(
            lambda c: [
                Message.from_row(r)
                for r in c.execute(
                    "SELECT * FROM messages WHERE state = ? ORDER BY id LIMIT ?",
                    (str(state), limit),
                )
            ]
        )

    async def awaiting_status(
        self, *, since: float, limit: int, scheduled_after: str = ""
    ) -> list[Message]:
        """`sent` messages sent after `since`, or scheduled (UTC text) after
        `scheduled_after`, oldest first; with or without a provider id (the poller
        matches an id-less one by recipient and text, an unsettled outcome included:
        /logs may show it late)."""
        return await self.read(
            lambda c: [
                Message.from_row(r)
                for r in c.execute(
                    "SELECT * FROM messages WHERE state = 'sent' AND (sent_at > ?"
                    " OR (schedule_time IS NOT NULL AND schedule_time > ?))"
                    " ORDER BY sent_at, id LIMIT ?",
                    (since, scheduled_after or "9999", limit),
                )
            ]
        )

    async def known_provider_ids(self, provider_ids: Sequence[str]) -> set[str]:
        """Which of these provider ids a stored message already carries."""
        if not provider_ids:
            return set()
        marks = ",".join("?" * len(provider_ids))
        sql = f"SELECT provider_message_id FROM messages WHERE provider_message_id IN ({marks})"
        return await self.read(lambda c: {r[0] for r in c.execute(sql, list(provider_ids))})

    async def sent_after(self, message: Message) -> int:
        """How many messages reached the provider after `message`: its /logs position.

        A bulk call gives its messages one sent_at, so ids break the tie.
        """
        sent_at = message.sent_at or 0.0
        sql = "SELECT count(*) FROM messages WHERE sent_at > ? OR (sent_at = ? AND id > ?)"
        return await self.read(
            lambda c: int(c.execute(sql, (sent_at, sent_at, message.id)).fetchone()[0])
        )

    async def claim(self, ids: Sequence[int], now: float, kind: str) -> list[int]:
        """queued -> sending for `ids`, and one provider request booked, in one commit."""

        wanted = json.dumps(list(ids))

        def job(db: Database) -> list[int]:
            # A new attempt: what an earlier unknown outcome was (reason_kind) no longer holds.
            db.execute(
                "UPDATE messages SET reason_kind = NULL"
                f" WHERE id IN {_JSON_IDS} AND +state = 'queued'"
                " AND reason_kind IN ('unknown', 'provider-error')",
                (wanted,),
            )
            queued = set(
                json.loads(
                    db.execute(
                        "SELECT json_group_array(id) FROM messages"
                        f" WHERE id IN {_JSON_IDS} AND +state = 'queued'",
                        (wanted,),
                    ).fetchone()[0]
                )
            )
            db.execute(
                "UPDATE messages SET state = 'sending', attempts = attempts + 1,"
                f" claimed_at = ?, updated_at = ?, reason = NULL WHERE id IN {_JSON_IDS}"
                " AND +state = 'queued'",
                (now, now, wanted),
            )
            db.execute("INSERT INTO provider_requests (at, kind) VALUES (?, ?)", (now, kind))
            return [i for i in ids if i in queued]

        return await self.write(job)

    async def record_request(self, now: float, kind: str) -> None:
        await self.write(
            lambda db: db.execute(
                "INSERT INTO provider_requests (at, kind) VALUES (?, ?)", (now, kind)
            )
        )

    async def request_times(
        self, since: float, *, kind_prefix: str = "", after_rowid: int = 0
    ) -> list[tuple[float, str]]:
        return [
            (at, kind) for _, at, kind in await self.request_rows(since, kind_prefix, after_rowid)
        ]

    async def request_rows(
        self, since: float, kind_prefix: str = "", after_rowid: int = 0
    ) -> list[tuple[int, float, str]]:
        """(rowid, at, kind) of booked requests: `kind_prefix` picks another process's."""
        return await self.read(
            lambda c: [
                (r[0], r[1], r[2])
                for r in c.execute(
                    "SELECT rowid, at, kind FROM provider_requests WHERE at > ? AND rowid > ?"
                    " AND kind LIKE ? ORDER BY at",
                    (since, after_rowid, kind_prefix + "%"),
                )
            ]
        )

    async def prune_requests(self, before: float) -> None:
        await self.write(
            lambda db: db.execute("DELETE FROM provider_requests WHERE at <= ?", (before,))
        )

    async def mark_sent(
        self, results: Iterable[tuple[int, str | None, float | None]], now: float
    ) -> None:
        rows = json.dumps(list(results))
        await self.write(
            lambda db: db.execute(
                "UPDATE messages SET state = 'sent',"
                " provider_message_id = json_extract(r.value, '$[1]'),"
                " cost = json_extract(r.value, '$[2]'), sent_at = ?, updated_at = ?,"
                " reason = NULL FROM json_each(?) AS r"
                " WHERE messages.id = json_extract(r.value, '$[0]')",
                (now, now, rows),
            )
        )

    async def note_unknown(self, ids: Sequence[int], reason: str, kind: str) -> None:
        """A send whose outcome /logs must settle: stays `sending`, says why and how."""
        await self.write(
            lambda db: db.execute(
                "UPDATE messages SET reason = ?, reason_kind = ?"
                f" WHERE id IN {_JSON_IDS} AND +state = 'sending'",
                (reason, kind, json.dumps(list(ids))),
            )
        )

    async def resend_unknown(self, ids: Sequence[int], now: float, reason: str) -> None:
        """sending -> queued, due now, counting one resend of an unsettled outcome."""
        await self.write(
            lambda db: db.execute(
                "UPDATE messages SET state = 'queued', next_attempt_at = ?, updated_at = ?,"
                " reason = ?, unknown_resends = unknown_resends + 1"
                f" WHERE id IN {_JSON_IDS} AND +state = 'sending'",
                (now, now, reason, json.dumps(list(ids))),
            )
        )

    async def settle_unknown(self, ids: Sequence[int], now: float, reason: str) -> None:
        """sending -> sent with no provider id: the last word on an outcome nobody knows."""
        await self.write(
            lambda db: db.execute(
                "UPDATE messages SET state = 'sent', sent_at = ?, updated_at = ?, reason = ?,"
                " reason_kind = 'unknown', provider_message_id = NULL"
                f" WHERE id IN {_JSON_IDS} AND +state = 'sending'",
                (now, now, reason, json.dumps(list(ids))),
            )
        )

    async def set_provider_ids(self, rows: Iterable[tuple[int, str]]) -> None:
        """Provider ids found for id-less sent messages (matched in /logs)."""
        data = json.dumps(list(rows))
        await self.write(
            lambda db: db.execute(
                "UPDATE messages SET provider_message_id = json_extract(r.value, '$[1]')"
                " FROM json_each(?) AS r WHERE messages.id = json_extract(r.value, '$[0]')"
                " AND provider_message_id IS NULL",
                (data,),
            )
        )

    async def requeue(
        self,
        ids: Sequence[int],
        now: float,
        *,
        at: float,
        reason: str | None,
        refund_attempt: bool = False,
        solo: bool | None = None,
        reason_kind: str | None = None,
    ) -> None:
        """Back to queued, due at `at`; `refund_attempt` when the send never really ran."""

        args = (
            at,
            now,
            reason,
            1 if refund_attempt else 0,
            None if solo is None else int(solo),
            reason_kind,
            json.dumps(list(ids)),
        )
        await self.write(
            lambda db: db.execute(
                "UPDATE messages SET state = 'queued', next_attempt_at = ?, updated_at = ?,"
                " reason = ?, attempts = attempts - ?, solo = coalesce(?, solo),"
                f" reason_kind = coalesce(?, reason_kind) WHERE id IN {_JSON_IDS}"
                " AND +state IN ('sending', 'queued')",
                args,
            )
        )

    async def finish(
        self,
        updates: Iterable[tuple[int, State, str | None]],
        now: float,
        reason_kind: str | None = None,
    ) -> None:
        """Set final states (failed, delivered) with their reasons."""
        rows = json.dumps([(i, str(state), reason) for i, state, reason in updates])
        await self.write(
            lambda db: db.execute(
                "UPDATE messages SET state = json_extract(r.value, '$[1]'),"
                " reason = json_extract(r.value, '$[2]'), updated_at = ?,"
                " reason_kind = coalesce(?, reason_kind) FROM json_each(?) AS r"
                " WHERE messages.id = json_extract(r.value, '$[0]')",
                (now, reason_kind, rows),
            )
        )

    # -- queries -----------------------------------------------------------------------
    async def heartbeat(self, now: float) -> None:
        """Rewrite the one heartbeat row and commit: the readiness probe's real write."""
        await self.write(
            lambda db: db.execute(
                "INSERT INTO heartbeat (id, at) VALUES (1, ?)"
                " ON CONFLICT (id) DO UPDATE SET at = excluded.at",
                [now],
            )
        )

    async def get(self, message_id: int) -> Message | None:
        if not 0 < message_id <= MAX_ROW_ID:
            return None  # no such row, and SQLite could not even bind the number
        row = await self.read(
            lambda c: c.execute("SELECT * FROM messages WHERE id = ?", (message_id,)).fetchone()
        )
        return None if row is None else Message.from_row(row)

    async def events(self, message_id: int) -> list[dict[str, Any]]:
        return await self.read(
            lambda c: [
                dict(r)
                for r in c.execute(
                    "SELECT at, state, attempts, detail FROM events WHERE message_id = ? ORDER BY id",
                    (message_id,),
                )
            ]
        )

    async def query(
        self,
        *,
        state: str | None = None,
        limit: int = 100,
        before_id: int | None = None,
        reason_kind: str | None = None,
        route: str | None = None,
        source: str | None = None,
        recipient: str | None = None,
        text: str | None = None,
    ) -> list[Message]:
        """Newest first; `recipient` and `text` match anywhere in the field (any case)."""
        sql, args = "SELECT * FROM messages WHERE 1=1", list[object]()
        for column, value in (
            ("state", state),
            ("reason_kind", reason_kind),
            ("route", route),
            ("source", source),
        ):
            if value:
                sql += f" AND {column} = ?"  # column names from this list only
                args.append(value)
        for column, value in (("recipient", recipient), ("text", text)):
            if value:
                sql += f" AND {column} LIKE ? ESCAPE '\\'"
                args.append("%" + _like_escape(value) + "%")
        if before_id and before_id <= MAX_ROW_ID:  # beyond it, every row is "before"
            sql += " AND id < ?"
            args.append(before_id)
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(limit)
        return await self.read(lambda c: [Message.from_row(r) for r in c.execute(sql, args)])

    async def purge(self, before: float) -> int:
        """Delete messages that reached their end before `before`, with their events."""

        def job(db: Database) -> int:
            doomed = "SELECT id FROM messages WHERE created_at < ? AND state IN " + PURGEABLE_SQL
            db.execute(f"DELETE FROM events WHERE message_id IN ({doomed})", (before,))
            return int(
                db.execute(
                    "DELETE FROM messages WHERE created_at < ? AND state IN " + PURGEABLE_SQL,
                    (before,),
                ).rowcount
            )

        return await self.write(job)

    async def retry(
        self, ids: Sequence[int] | None, now: float, *, by: str | None = None
    ) -> list[int]:
        """Failed messages (these ids, or all when None) back to queued, due now; `by`
        names who asked, for the event log."""
        reason = f"retried by {by}" if by else "retried by the operator"

        def job(db: Database) -> list[int]:
            if ids is None:
                chosen = [
                    r[0]
                    for r in db.execute(
                        "SELECT id FROM messages WHERE state = 'failed' ORDER BY id"
                    )
                ]
            else:
                chosen = [
                    i
                    for i in ids
                    if 0 < i <= MAX_ROW_ID
                    and db.execute(
                        "SELECT 1 FROM messages WHERE id = ? AND state = 'failed'", (i,)
                    ).fetchone()
                ]
            for message_id in chosen:
                db.execute(
                    "UPDATE messages SET state = 'queued', next_attempt_at = ?, updated_at = ?,"
                    " reason = ?, solo = 1 WHERE id = ?",
                    (now, now, reason, message_id),
                )
            return chosen

        return await self.write(job)

    async def counts_by_reason(self) -> dict[str, dict[str, int]]:
        """{state: {reason kind: count}} for held, suppressed and failed messages."""
        rows = await self.read(
            lambda c: c.execute(
                "SELECT state, coalesce(reason_kind, 'other'), count(*) FROM messages"
                " WHERE state IN ('held', 'suppressed', 'failed') GROUP BY 1, 2"
            ).fetchall()
        )
        out: dict[str, dict[str, int]] = {}
        for state, kind, count in rows:
            out.setdefault(state, {})[kind] = count
        return out

    async def counts(self) -> dict[str, int]:
        return await self.read(
            lambda c: {
                r[0]: r[1] for r in c.execute("SELECT state, count(*) FROM messages GROUP BY state")
            }
        )

    # -- the console's queries (bridge.console): kept together -------------------------
    async def cancel(self, ids: Sequence[int], now: float, *, by: str) -> list[int]:
        """Queued or held messages -> failed, reason "cancelled by BY"; the ids changed.

        A message the dispatcher already claimed (`sending`) is not cancelled: the
        provider may have it, and only its answer can tell.
        """
        wanted = json.dumps([i for i in ids if 0 < i <= MAX_ROW_ID])

        def job(db: Database) -> list[int]:
            chosen = json.loads(
                db.execute(
                    "SELECT json_group_array(id) FROM messages"
                    f" WHERE id IN {_JSON_IDS} AND +state IN ('queued', 'held')",
                    (wanted,),
                ).fetchone()[0]
            )
            db.execute(
                "UPDATE messages SET state = 'failed', reason = ?, reason_kind = 'cancelled',"
                f" updated_at = ? WHERE id IN {_JSON_IDS} AND +state IN ('queued', 'held')",
                (f"cancelled by {by}", now, wanted),
            )
            return [int(i) for i in chosen]

        return await self.write(job)

    async def note(self, ids: Sequence[int], detail: str, now: float) -> None:
        """An event row for each message that changes no state (who did what)."""
        await self.write(
            lambda db: db.execute(
                "INSERT INTO events (message_id, at, state, attempts, detail)"
                f" SELECT id, ?, state, attempts, ? FROM messages WHERE id IN {_JSON_IDS}",
                (now, detail, json.dumps(list(ids))),
            )
        )

    async def activity(self, since: float, bucket: float) -> dict[str, dict[int, int]]:
        """Per `bucket` seconds since `since`: provider requests by kind, messages sent."""

        def read(c: sqlite3.Connection) -> dict[str, dict[int, int]]:
            out: dict[str, dict[int, int]] = {"messages": {}}
            for index, kind, count in c.execute(
                "SELECT CAST((at - ?) / ? AS INTEGER), kind, count(*) FROM provider_requests"
                " WHERE at >= ? GROUP BY 1, 2",
                (since, bucket, since),
            ):
                out.setdefault(kind, {})[index] = count
            for index, count in c.execute(
                "SELECT CAST((sent_at - ?) / ? AS INTEGER), count(*) FROM messages"
                " WHERE sent_at >= ? GROUP BY 1",
                (since, bucket, since),
            ):
                out["messages"][index] = count
            return out

        return await self.read(read)

    async def overview(self, *, now: float, day_start: float, since: float) -> dict[str, Any]:
        """Queue age, delivery answers since `since`, and the day's sends and spend.

        Budget warnings (source `budget`) are counted apart: the daily caps ignore them.
        """

        def read(c: sqlite3.Connection) -> dict[str, Any]:
            queue = c.execute(
                "SELECT min(created_at), count(*), coalesce(sum(next_attempt_at <= ?), 0),"
                " min(CASE WHEN next_attempt_at > ? THEN next_attempt_at END)"
                " FROM messages WHERE state = 'queued'",
                (now, now),
            ).fetchone()
            answers = dict(
                c.execute(
                    "SELECT state, count(*) FROM messages WHERE created_at >= ?"
                    " AND state IN ('sent', 'delivered', 'failed')"
                    " AND NOT (state = 'failed' AND coalesce(reason_kind, '') = 'cancelled')"
                    " GROUP BY state",
                    (since,),
                ).fetchall()
            )
            day = c.execute(
                "SELECT count(*), coalesce(sum(parts), 0), sum(cost), sum(estimated_cost),"
                " coalesce(sum(source = 'budget'), 0)"
                " FROM messages WHERE sent_at >= ?",
                (day_start,),
            ).fetchone()
            routes = dict(
                c.execute(
                    "SELECT route, count(*) FROM messages WHERE sent_at >= ?"
                    " AND route IS NOT NULL GROUP BY route",
                    (day_start,),
                ).fetchall()
            )
            return {
                "queue": {
                    "oldest_created_at": queue[0],
                    "queued": queue[1],
                    "due": queue[2],
                    "next_retry_at": queue[3],
                },
                "answers": answers,
                "today": {
                    "texts": day[0] - day[4],
                    "parts": day[1],
                    "cost": day[2],
                    "estimated_cost": day[3],
                    "warnings": day[4],
                    "routes": routes,
                },
            }

        return await self.read(read)

    async def held_storms(self) -> list[dict[str, Any]]:
        """Phones with messages held by storm control: how many, since when."""
        return await self.read(
            lambda c: [
                dict(r)
                for r in c.execute(
                    "SELECT recipient, count(*) AS held, min(created_at) AS first_at"
                    " FROM messages WHERE state = 'held' GROUP BY recipient ORDER BY 3"
                )
            ]
        )

    async def route_last_messages(self) -> dict[str, dict[str, Any]]:
        """Each route's newest stored message: survives a restart, unlike call records."""
        return await self.read(
            lambda c: {
                r["route"]: dict(r)
                for r in c.execute(
                    "SELECT route, id, state, created_at FROM messages WHERE id IN"
                    " (SELECT max(id) FROM messages WHERE route IS NOT NULL GROUP BY route)"
                )
            }
        )

    async def mentioned_by(self, message_id: int, limit: int = 200) -> list[dict[str, Any]]:
        """Suppressed messages whose reason names this one: its duplicates, or what a
        digest folded. Reasons say "message N" (policy, storm digests)."""
        return await self.read(
            lambda c: [
                dict(r)
                for r in c.execute(
                    "SELECT id, recipient, reason, created_at FROM messages"
                    " WHERE state = 'suppressed' AND (reason LIKE ? OR reason LIKE ?)"
                    " ORDER BY id LIMIT ?",
                    (f"% message {message_id} %", f"% message {message_id}", limit),
                )
            ]
        )

    # -- end of the console's queries ---------------------------------------------------


def _like_escape(value: str) -> str:
    """`value` as a literal inside a LIKE pattern (ESCAPE '\\')."""
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _settle_all(settled: list[tuple[Any, ...]]) -> None:
    for future, result, error in settled:
        _settle(future, result, error)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the waiter was cancelled; the write happened regardless
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
