"""The store's engine: one writer thread with group commit, and readers.

One thread owns the write connection (Datasette's pattern). Jobs from the event loop are
queued to it; it takes every job waiting, runs them in one `BEGIN IMMEDIATE` transaction
(if one raises, the group is rolled back and each job rerun alone, so one bad job cannot
spoil the others: an SQLite error too, when it is the job's, such as a constraint it
breaks, and not the database's, such as a full disk, a lock or a corrupt file) and
commits. A second thread, the syncer, then makes the commit durable (`fdatasync` of the
WAL) and only then resolves each job's future. A caller that awaited `write()` therefore
holds a durable result: that is when SMTP may say 250 and HTTP 202.

Why two threads (pipelined group commit): with `synchronous=FULL` the writer itself
waited for the disk at every COMMIT and took the GIL back after it, while the next jobs
queued behind; with `synchronous=NORMAL` a commit only writes its frames to the WAL file,
and the syncer's one `fdatasync` covers every group committed before it started, while
the writer already runs the next group. The file is the same as with FULL at every sync:
SQLite's NORMAL never corrupts a WAL database (a power loss rolls back to the last frame
on disk), and every acknowledged commit's frames were on disk before its acknowledgement
(BENCHMARKS.md, issue #16). A failed `fdatasync` cannot be retried safely (the kernel
may have dropped the pages it could not write, and a later sync succeed without them):
the jobs it covered fail, and so does every write after it until the bridge restarts.

Consecutive jobs for the same batch function (`write_batched`: every ingest) run as one
call, so a hundred concurrent ingests cost a handful of statements, not two hundred:
each statement is a trip into SQLite that hands the GIL to the event loop and waits to
get it back. The loop hands its jobs over in bursts: those issued in one turn of the
loop go to the queue together at the start of the next, so the writer wakes once for
them and takes them as one group, not the first alone while the rest queue behind its
commit (each wake-up of the writer, and each time it takes the GIL back, waits on the
busy loop). A group of one such batch alone may go without the transaction
(`write_batched`'s `unlocked`: its reads, then one statement that commits itself, or
nothing written and the transaction after all), which saves two of those trips. Readers
run on their own connections in a small thread pool; WAL lets them read while the writer
writes.

Knows nothing of messages: `bridge.store.sqlite.store.SqliteStore` builds the operations
on it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import queue
import sqlite3
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

from sqlite_utils import Database

from bridge.errors import StoreUnavailable
from bridge.permissions import readable_by_everyone
from bridge.store.sqlite.schema import migrations

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_GROUP = 512  # jobs per transaction: bounds the latency one commit adds
BUSY_TIMEOUT_MS = 5000
# SQLite's primary result codes that say the database cannot be written, whichever job
# runs (https://sqlite.org/rescode.html): PERM, ABORT, BUSY, LOCKED, NOMEM, READONLY,
# INTERRUPT, IOERR, CORRUPT, FULL, CANTOPEN, PROTOCOL, NOTADB. Rerunning each job of the
# group alone would only fail each again, slowly. Any other code (CONSTRAINT, TOOBIG,
# MISMATCH, RANGE, a plain ERROR in one job's statement) is the job's own.
WHOLE_DATABASE_CODES = frozenset({3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 26})

# None binds as NULL either way, but Python's sqlite3 looks for an adapter for every
# value that is not an int, float, str or bytes: for None it finds none, then raises and
# clears two AttributeErrors (`__adapt__`, `__conform__`) before binding NULL as it
# would have. An ingest binds ~7 NULLs a message in the writer thread, with the GIL
# held: the lookups were 14 % of that thread's instructions (BENCHMARKS.md). A C
# builtin that returns None makes the lookup one dict hit; process-wide, as sqlite3's
# adapters are, and the same NULL for every connection.
sqlite3.register_adapter(type(None), cast(Callable[[None], None], {}.get))


class _JobFailed(Exception):
    """A job raised something other than a storage error; carries it."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


Batch = Callable[[Database, list[Any]], list[Any]]  # items in, one result per item out
# A batch's form outside a transaction: its writes one statement that commits itself,
# the last thing it does (nothing after it may raise); None, having written nothing, when
# it cannot stand for the batch this time.
Unlocked = Callable[[Database, list[Any]], list[Any] | None]


@dataclass
class _Job:
    batch: Batch
    item: Any
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    unlocked: Unlocked | None = None


_Outcome = tuple[_Job, Any, BaseException | None]  # a job, its result, or its error

MIN_SQLITE = (3, 33, 0)  # UPDATE ... FROM; and the JSON functions, checked at open


def whole_database(exc: sqlite3.Error) -> bool:
    """Whether `exc` fails every job alike (a full disk, a lock, a corrupt file) rather
    than the one job that ran into it."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:  # raised without a result code: trust the class
        return isinstance(exc, sqlite3.OperationalError)
    return code & 0xFF in WHOLE_DATABASE_CODES


def _take(items: queue.SimpleQueue[list[T] | None], most: int) -> tuple[list[T], bool] | None:
    """Wait for the next list put on `items`, then add the lists waiting behind it until
    `most` items, the queue empty or the stop (None). None if the stop came first; else
    the items and whether the stop came after them."""
    first = items.get()
    if first is None:
        return None
    taken, stop = first, False
    while len(taken) < most:
        try:
            more = items.get_nowait()
        except queue.Empty:
            break
        if more is None:
            stop = True
            break
        taken += more
    return taken, stop


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


def _wal_of(conn: sqlite3.Connection) -> str | None:
    """The WAL file of `conn`'s main database, as SQLite names it: the file it opened
    (symbolic links followed: a store reached by a link has its WAL next to the link's
    target, not next to the link) with "-wal" added; None if SQLite names no file."""
    for _, name, file in conn.execute("PRAGMA database_list"):
        if name == "main" and file:
            return f"{file}-wal"
    return None


def _create_private(path: str) -> None:
    """Create the store file 0600 before SQLite does: it holds numbers and texts.

    SQLite gives the WAL and SHM files the database file's mode, so they follow. A store
    that already exists keeps its mode (the owner may have chosen it); one every user
    may read (its mode and its directories': `readable_by_everyone`) is named in the log.
    """
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        if readable_by_everyone(path):
            log.warning("store %s is readable by every user: chmod 600 it", path)
    except OSError as exc:
        raise StoreUnavailable(f"cannot create the store: {exc.strerror or exc}") from exc


class Engine:
    """SQLite behind one writer thread and a reader pool. `open()` before use, `close()` after."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        # Each item a burst: the jobs one turn of an event loop issued (`write_batched`).
        self._jobs: queue.SimpleQueue[list[_Job] | None] = queue.SimpleQueue()
        # Jobs issued in the current turn of each loop, not yet queued (`_hand_over`).
        self._pending: dict[asyncio.AbstractEventLoop, list[_Job]] = {}
        self._thread: threading.Thread | None = None
        # Each item a committed group's outcomes, to settle once the WAL is on disk.
        self._unsynced: queue.SimpleQueue[list[_Outcome] | None] = queue.SimpleQueue()
        self._syncer: threading.Thread | None = None
        # The WAL SQLite writes (`_wal_of`), set by the writer before its first commit;
        # None where SQLite refused WAL mode.
        self._wal_path: str | None = None
        self._wal_fd: int | None = None  # the syncer's descriptor of it (`_open_wal`)
        self.sync_failed: StoreUnavailable | None = None  # writes end until a restart
        self._readers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="store-read")
        self._local = threading.local()
        # Every reader's connection, closed by close(): left to the garbage collector, a
        # closed store would keep the file open (and `store copy` would find it in use).
        self._reader_conns: list[sqlite3.Connection] = []
        self.commits = 0  # transactions committed (a metric: writes per fsync)
        self.jobs_committed = 0
        self.handed_over = 0  # jobs queued to the writer so far (the loop's count)
        self.migrated: list[str] = []  # migrations the last open applied

    # -- lifecycle -----------------------------------------------------------------
    async def open(self) -> None:
        _check_sqlite()
        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(f"cannot create the store's directory: {exc}") from exc
        _create_private(self.path)
        self._thread = threading.Thread(target=self._writer, name="store-writer", daemon=True)
        self._thread.start()
        self._syncer = threading.Thread(target=self._sync_loop, name="store-sync", daemon=True)
        self._syncer.start()
        try:
            await self.write(lambda db: None)  # surfaces a failed open or migration here
        except BaseException:
            # A caller whose open failed has no store to close (the CLI's commands return
            # at once): the writer, left to fail the jobs that would come, and the syncer
            # stayed behind, each waiting on its queue for good.
            await self._stop_threads()
            raise

    async def close(self) -> None:
        await self._stop_threads()
        self._readers.shutdown(wait=True)
        while self._reader_conns:
            self._reader_conns.pop().close()

    async def _stop_threads(self) -> None:
        """End the writer (after the jobs queued so far) and then the syncer."""
        if self._thread is not None:
            for loop in list(self._pending):  # jobs of this turn go before the stop
                self._hand_over(loop)
            self._jobs.put(None)
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        if self._syncer is not None:  # after the writer: every commit is queued to it
            self._unsynced.put(None)
            await asyncio.to_thread(self._syncer.join)
            self._syncer = None
            self._close_wal()

    # -- the writer thread ---------------------------------------------------------
    def _writer(self) -> None:
        try:
            conn = _connect(self.path)
            if conn.execute("PRAGMA journal_mode = WAL").fetchone()[0] == "wal":
                # Durable at the syncer's fdatasync of the WAL, not at each COMMIT (above).
                conn.execute("PRAGMA synchronous = NORMAL")
                self._wal_path = _wal_of(conn)
            else:  # WAL refused: NORMAL would not be durable here
                conn.execute("PRAGMA synchronous = FULL")
            db = Database(conn, execute_plugins=False)
            self.migrated = [m.name for m in migrations.pending(db)]
            migrations.apply(db)
        except Exception as exc:
            # Not SQLite's alone: a migration's own error ended the thread with the jobs
            # unanswered, open() among them, waiting for good.
            if not isinstance(exc, sqlite3.Error):
                log.exception("store %s: opening it failed", self.path)
            failure = StoreUnavailable(f"cannot open store {self.path}: {exc}")
            failure.__cause__ = exc
            self._fail_all(failure)
            return
        try:
            # A burst may take a group past MAX_GROUP: one loop turn's jobs at most.
            while (taken := _take(self._jobs, MAX_GROUP)) is not None:
                batch, stop = taken
                self._run_batch(conn, db, batch)
                if stop:
                    return
        finally:
            conn.close()

    def _run_batch(self, conn: sqlite3.Connection, db: Database, batch: list[_Job]) -> None:
        outcomes = self._unlocked(conn, db, batch)
        if outcomes is not None:
            self._settle(outcomes)
            return
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

    def _unlocked(
        self, conn: sqlite3.Connection, db: Database, jobs: list[_Job]
    ) -> list[_Outcome] | None:
        """The group in its batch's unlocked form, when every job is of one batch that has
        one: without BEGIN and COMMIT, each a trip into SQLite that lets the GIL go and
        waits for the busy event loop to hand it back (BENCHMARKS.md, issue #16). None
        when the group must take a transaction, nothing written: the form declined, or a
        job failed on its own (the transaction finds which one and spares the others)."""
        unlocked = jobs[0].unlocked
        if unlocked is None or any(job.batch is not jobs[0].batch for job in jobs):
            return None
        try:
            self._before_write()
            self._still_synced()
            outs = unlocked(db, [job.item for job in jobs])
        except sqlite3.Error as exc:
            if conn.in_transaction:  # never, outside one; but never leave one open
                conn.execute("ROLLBACK")
            if not whole_database(exc):
                return None
            log.error("store commit failed: %s", exc)
            failure = StoreUnavailable(f"store commit failed: {exc}")
            failure.__cause__ = exc
            return [(job, None, failure) for job in jobs]
        except Exception:  # raised before its statement wrote (`Unlocked`)
            return None
        if outs is None:
            return None
        self.commits += 1
        self.jobs_committed += len(jobs)
        return [(job, out, None) for job, out in zip(jobs, outs, strict=True)]

    def _transaction(
        self, conn: sqlite3.Connection, db: Database, jobs: list[_Job]
    ) -> list[_Outcome]:
        """Run `jobs` in one BEGIN IMMEDIATE ... COMMIT; a storage error fails them all."""
        try:
            self._before_write()
            self._still_synced()
            conn.execute("BEGIN IMMEDIATE")
            results: list[_Outcome] = []
            for batch, group in itertools.groupby(jobs, key=lambda job: job.batch):
                run = list(group)
                try:
                    outs = batch(db, [job.item for job in run])
                    results += [(job, out, None) for job, out in zip(run, outs, strict=True)]
                except sqlite3.Error as exc:
                    if whole_database(exc):
                        raise
                    # This job's: rolled back and rerun alone like any other job's error;
                    # alone, its caller gets what every storage failure gives (451/503).
                    conn.execute("ROLLBACK")
                    log.error("store write failed: %s", exc)
                    raise _JobFailed(StoreUnavailable(f"store write failed: {exc}")) from exc
                except Exception as exc:
                    conn.execute("ROLLBACK")
                    raise _JobFailed(exc) from exc
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            log.error("store commit failed: %s", exc)
            failure = StoreUnavailable(f"store commit failed: {exc}")
            failure.__cause__ = exc
            return [(job, None, failure) for job in jobs]
        self.commits += 1
        self.jobs_committed += len(jobs)
        return results

    def _before_write(self) -> None:
        """Runs in the writer before each group writes, in a transaction or not. A storage
        error raised here fails the whole group as a failed commit would: tests override
        it to play a full or failing disk."""

    def _still_synced(self) -> None:
        """Raise, as a storage error fails the group, once a sync has failed: a job queued
        before the failure was seen is not written (only to be answered 503 and found
        after the restart, where its retry would meet it as a duplicate)."""
        if self.sync_failed is not None:
            raise sqlite3.OperationalError(str(self.sync_failed))

    def _settle(self, outcomes: list[_Outcome]) -> None:
        """Hand a committed group to the syncer, which settles it once durable."""
        self._unsynced.put(outcomes)

    # -- the syncer thread ---------------------------------------------------------
    def _sync_loop(self) -> None:
        # Every group committed so far: one fdatasync covers them all.
        while (taken := _take(self._unsynced, sys.maxsize)) is not None:
            outcomes, stop = taken
            if failure := self.sync_failed or self._sync_wal():
                outcomes = [(job, None, error or failure) for job, _, error in outcomes]
            self._resolve(outcomes)
            if stop:
                return

    def _sync_wal(self) -> StoreUnavailable | None:
        """fdatasync the WAL (and its directory, for a WAL file not synced before); the
        failure that ends writing, or None."""
        if self._wal_path is None:  # no WAL: each COMMIT synced itself (synchronous FULL)
            return None
        try:
            new = self._open_wal()
            if self._wal_fd is None:  # nothing written in WAL mode yet, or the last
                return None  # connection's close checkpointed it (synced) and deleted it
            self._sync_file(self._wal_fd)
            if new:  # a new file: its name must survive a power loss
                directory = os.open(os.path.dirname(self._wal_path), os.O_RDONLY)
                try:
                    self._sync_file(directory)
                finally:
                    os.close(directory)
        except OSError as exc:
            return self._fail_sync(exc)
        return None

    def _open_wal(self) -> bool:
        """Hold the file at `_wal_path` open in `_wal_fd` (None if there is none);
        whether it was opened now. Kept open from one sync to the next, not opened for
        each: Linux reports a failed write-back to every descriptor open when it failed,
        but to one opened after it only if no descriptor saw it yet, and SQLite's own
        (a checkpoint's fsync) or another process's may have. A fresh descriptor's
        fdatasync could then succeed over pages the kernel dropped."""
        assert self._wal_path is not None
        try:
            inode = os.stat(self._wal_path).st_ino
        except FileNotFoundError:
            inode = None
        if self._wal_fd is not None and os.fstat(self._wal_fd).st_ino == inode:
            return False
        self._close_wal()
        if inode is None:
            return False
        try:
            self._wal_fd = os.open(self._wal_path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        return True

    def _close_wal(self) -> None:
        if self._wal_fd is not None:
            os.close(self._wal_fd)
            self._wal_fd = None

    def _sync_file(self, fd: int) -> None:
        """`os.fdatasync(fd)`; tests override it to play a slow or failing disk."""
        os.fdatasync(fd)

    def _fail_sync(self, exc: OSError) -> StoreUnavailable:
        log.error("store sync failed, no more writes until a restart: %s", exc)
        self.sync_failed = StoreUnavailable(
            f"store sync failed ({exc.strerror or exc}): restart the bridge once the disk is sound"
        )
        self.sync_failed.__cause__ = exc
        return self.sync_failed

    def _resolve(self, outcomes: list[_Outcome]) -> None:
        # One wake-up of the event loop per group, not one per job.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Any, ...]]] = {}
        for job, result, error in outcomes:
            by_loop.setdefault(job.loop, []).append((job.future, result, error))
        for loop, settled in by_loop.items():
            loop.call_soon_threadsafe(_settle_all, settled)

    def _fail_all(self, error: BaseException) -> None:
        while True:
            burst = self._jobs.get()
            if burst is None:
                return
            for job in burst:
                job.loop.call_soon_threadsafe(_settle, job.future, None, error)

    # -- the async API -------------------------------------------------------------
    async def write(self, fn: Callable[[Database], T]) -> T:
        """Run `fn` in the writer's next transaction; return once it is durable."""
        result: T = await self.write_batched(_call_each, fn)
        return result

    async def write_batched(
        self, batch: Batch, item: Any, *, unlocked: Unlocked | None = None
    ) -> Any:
        """`batch(db, [item, ...])` in the next transaction, with the items of every job
        queued next to this one for the same `batch`; this item's result once durable.
        `unlocked`, if given, is the same batch outside a transaction (`Unlocked`), tried
        first when every job of the group is of this batch."""
        if self._thread is None or not self._thread.is_alive():
            raise StoreUnavailable("store is not open")
        if self.sync_failed is not None:
            raise StoreUnavailable(str(self.sync_failed))
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        job = _Job(batch, item, future, loop, unlocked)
        pending = self._pending.get(loop)
        if pending is None:
            # The first job of this turn: queue it, with every job the turn adds, as soon
            # as the turn ends. A lone job waits no longer than that.
            self._pending[loop] = [job]
            loop.call_soon(self._hand_over, loop)
        else:
            pending.append(job)
        return await future

    def _hand_over(self, loop: asyncio.AbstractEventLoop) -> None:
        """Queue the jobs `loop` issued since its last hand-over as one burst."""
        burst = self._pending.pop(loop, None)
        if burst:
            self.handed_over += len(burst)
            self._jobs.put(burst)

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, self._read_in_thread, fn)

    def _read_in_thread(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connect(self.path)
            self._local.conn = conn
            self._reader_conns.append(conn)  # list.append is atomic: readers may race
        try:
            return fn(conn)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"store read failed: {exc}") from exc


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
