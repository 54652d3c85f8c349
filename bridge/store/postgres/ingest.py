"""Ingest on PostgreSQL: decided and inserted in one transaction, race-free across
instances.

Before it reads anything, the transaction takes an advisory lock on every question the
decision asks (dedupe key + recipient, storm recipient), sorted, in one statement. The
lookups run after the locks are held, so under READ COMMITTED they see every ingest
that held one of those locks before and committed: when Alertmanager's HA pair posts
the same group to two instances at the same instant, one of them decides first and the
other finds its row (a duplicate, suppressed), whatever the timing. Unrelated alerts
share no lock and run in parallel. The locks go with the commit.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import bridge.store.totals as totals
from bridge.errors import StoreBusy, StoreUnavailable
from bridge.models import NewMessage, State
from bridge.store.api import (
    Decider,
    Held,
    IngestQuestions,
    Lookups,
    OriginalQuestion,
    Pending,
    Stored,
    StormQuestion,
    StormState,
)
from bridge.store.postgres.base import Base, dedupe_lock, key_lock, recipient_lock
from bridge.store.postgres.pool import Conn
from bridge.store.rows import row

# One statement answers every question of a batch (each statement is a round trip).
# With a scope (w.o) and an original found, the scope's last word to the phone: SQLite's
# _ORIGINALS, messages_recipient walked back from the newest to the first row of the
# scope, never past the original. In two steps, each in an index's own order: the
# newest such row's time (LIMIT 1 on (recipient, created_at) backward), then the highest
# id of that time (a tie of one clock reading). Ordered by (created_at, id) at once, the
# planner sorted every row of the phone since the original: a flood's whole, at each
# ingest (10,000 rows read for one, measured). The scope's test is a COALESCE because
# the planner takes an expression it cannot read for a coin toss, where it took the
# equality for a rare one (0.5 %): then LIMIT 1 seemed to need every row of the phone
# anyway, and it read them all through a bitmap and sorted them (tests/test_dedupe_flood.py).
# Read under the lock on (key, recipient) only: a text of another key from the scope
# that another instance commits meanwhile is unseen, and the repeat is decided as if it
# had arrived first (the two arrived at the same moment).
_IN_SCOPE = (
    "{t}.recipient = w.r AND {t}.state <> 'failed'"
    " AND coalesce(left({t}.dedupe_key, length(w.o)) = w.o, false)"
)
ORIGINALS = (
    "SELECT w.i, f.id, CASE WHEN w.o <> '' THEN (SELECT n.dedupe_key FROM messages n"
    f" WHERE {_IN_SCOPE.format(t='n')} AND n.created_at = (SELECT l.created_at FROM messages l"
    f" WHERE {_IN_SCOPE.format(t='l')} AND l.created_at >= f.created_at"
    " ORDER BY l.created_at DESC LIMIT 1) ORDER BY n.id DESC LIMIT 1) END"
    " FROM unnest($1::text[], $2::text[], $3::float8[], $4::text[])"
    " WITH ORDINALITY AS w(k, r, s, o, i)"
    " CROSS JOIN LATERAL (SELECT m.id, m.created_at FROM messages m WHERE m.dedupe_key = w.k"
    " AND m.recipient = w.r AND m.created_at >= w.s AND m.state <> 'failed'"
    " ORDER BY m.created_at LIMIT 1) f"
)
# When a message reaches its phone: its schedule_time (UTC text), else when it was stored
# (SQLite's EFFECTIVE); the pattern keeps a row of some other form from failing the cast.
EFFECTIVE = f"coalesce({totals.SCHEDULED_AT_POSTGRES.format(t='m.')}, m.created_at)"
_LET_THROUGH = "m.state IN ('queued', 'sending', 'sent', 'delivered') AND m.source <> 'digest'"


def _utc_text(epoch: str) -> str:
    return f"to_char(to_timestamp({epoch}) AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS')"


# For each question (SQLite's _STORMS): a message held at a time from h to a?, and when
# each text let through reaches the phone, from a - span to a + span.
STORMS = (
    "SELECT q.i, EXISTS (SELECT 1 FROM messages m WHERE m.recipient = q.r"
    f" AND m.state = 'held' AND {EFFECTIVE} BETWEEN q.h AND q.a),"
    " ARRAY(SELECT m.created_at FROM messages m WHERE m.recipient = q.r"
    " AND m.created_at BETWEEN q.a - q.span AND q.a + q.span"
    f" AND m.schedule_time IS NULL AND {_LET_THROUGH}"
    f" UNION ALL SELECT {EFFECTIVE} FROM messages m WHERE m.recipient = q.r"
    " AND m.schedule_time IS NOT NULL AND m.schedule_time BETWEEN"
    f" {_utc_text('q.a - q.span - 1')} AND {_utc_text('q.a + q.span + 1')}"
    f" AND {EFFECTIVE} BETWEEN q.a - q.span AND q.a + q.span AND {_LET_THROUGH})"
    " FROM unnest($1::text[], $2::float8[], $3::float8[], $4::float8[])"
    " WITH ORDINALITY AS q(r, a, span, h, i)"
)


def _settle(group: list[_Call], outcome: list[list[Stored]] | BaseException) -> None:
    for index, call in enumerate(group):
        if call.future.done():  # its caller went away; the messages are stored regardless
            continue
        if isinstance(outcome, BaseException):
            call.future.set_exception(outcome)
        else:
            call.future.set_result(outcome[index])


def lock_keys(questions: IngestQuestions) -> list[str]:
    """The advisory locks that serialise these questions across instances: (dedupe key,
    recipient) for each original asked, the recipient for each storm asked."""
    return [dedupe_lock(q[0], q[1]) for q in questions.originals] + [
        recipient_lock(q[0]) for q in questions.storms
    ]


async def answer(conn: Conn, questions: IngestQuestions) -> Lookups:
    originals: dict[OriginalQuestion, int] = {}
    last_words: dict[OriginalQuestion, str] = {}
    storms: dict[StormQuestion, StormState] = {}
    if asked := list(questions.originals):
        for i, found, last_word in await conn.fetch(
            ORIGINALS, *([q[k] for q in asked] for k in range(4))
        ):
            originals[asked[i - 1]] = int(found)
            if last_word is not None:
                last_words[asked[i - 1]] = last_word
    if asked_storms := list(questions.storms):
        for i, held, times in await conn.fetch(
            STORMS, *([q[k] for q in asked_storms] for k in range(4))
        ):
            storms[asked_storms[i - 1]] = StormState(bool(held), tuple(map(float, times)))
    return Lookups(originals=originals, storms=storms, last_words=last_words)


@dataclass
class _Call:
    pending: Sequence[Pending]
    decider: Decider
    future: asyncio.Future[list[Stored]]


class IngestOps(Base):
    """Ingest with group commit: up to `MAX_FLUSHERS` transactions run at once (in
    parallel on the pool); calls that arrive while they run wait and go together into
    the next one (up to `MAX_GROUP`). Under light load each call is its own transaction
    at once; under load a commit (a WAL flush) carries many acknowledgements."""

    MAX_FLUSHERS = 4  # leaves the rest of the pool to the dispatcher and the readers
    MAX_GROUP = 512  # calls per transaction: bounds the latency one commit adds

    def __init__(self, url: str, *, max_connections: int = 8) -> None:
        super().__init__(url, max_connections=max_connections)
        self._waiting: list[_Call] = []
        self._flushers: set[asyncio.Task[None]] = set()

    async def ingest(self, pending: Sequence[Pending], decider: Decider) -> list[Stored]:
        """Lock the questions, reserve ids, answer, decide, insert: one transaction
        (shared with concurrent calls), durable on return: the 202 / 250 comes after."""
        if not pending:
            return []
        call = _Call(pending, decider, asyncio.get_running_loop().create_future())
        self._waiting.append(call)
        if len(self._flushers) < self.MAX_FLUSHERS:
            # The store owns the task (`close` waits for it): a caller that goes away
            # cannot cancel a transaction that carries other callers' messages.
            task = asyncio.create_task(self._flush())
            self._flushers.add(task)
            task.add_done_callback(self._flushers.discard)
        return await call.future

    async def close_ingest(self) -> None:
        """Wait for the transactions under way (their callers are owed an answer)."""
        while self._flushers:
            await asyncio.gather(*self._flushers, return_exceptions=True)

    async def _flush(self) -> None:
        while self._waiting:
            group = self._waiting[: self.MAX_GROUP]
            del self._waiting[: self.MAX_GROUP]
            try:
                _settle(group, await self._ingest_group(group))
            except Exception as exc:
                unreachable = isinstance(exc, StoreUnavailable) and not isinstance(exc, StoreBusy)
                if len(group) == 1 or unreachable:
                    _settle(group, exc)
                    continue
                # One call's decider (or its data) failed the group, rolled back whole, or
                # the server refused it for now (a deadlock: StoreBusy): each call alone,
                # so that one bad call cannot sink the others, and a busy store gets its
                # second try before anyone is told to retry.
                for call in group:
                    try:
                        _settle([call], await self._ingest_group([call]))
                    except Exception as alone:
                        _settle([call], alone)
        # Out of the count in the turn it leaves the loop, not at its done callback (a
        # later turn): a call arriving in between must find room to start a transaction,
        # or it waits, unanswered, for some later call to start one.
        self._flushers.discard(asyncio.current_task())

    async def _ingest_group(self, group: list[_Call]) -> list[list[Stored]]:
        """The calls in one transaction; consecutive calls with one decider decided as
        one call (as SQLite's writer does), each run seeing the runs before it."""
        runs = [list(run) for _, run in itertools.groupby(group, key=lambda c: id(c.decider))]
        asked = [(run, [p for c in run for p in c.pending]) for run in runs]
        questions = [run[0].decider.questions(pending) for run, pending in asked]
        out: list[list[Stored]] = []
        async with self._write(writes=len(group)) as conn:
            await self._lock(conn, sorted({k for q in questions for k in lock_keys(q)}))
            for (run, pending), asking in zip(asked, questions, strict=True):
                ids = await self._reserve_ids(conn, len(pending))
                decided = run[0].decider.decide(await answer(conn, asking), pending, ids)
                await self._insert(
                    conn,
                    [row(i, m, at) for i, m, (_, at) in zip(ids, decided, pending, strict=True)],
                )
                stored = iter(map(Stored, ids, decided))
                out += [[next(stored) for _ in call.pending] for call in run]
            if any(s.message.state == State.QUEUED for stored in out for s in stored):
                await self._notify_work(conn)
        return out

    async def queue_once(self, messages: Sequence[NewMessage], now: float) -> bool:
        """Insert unless a message with the first one's dedupe key exists, under a lock
        on that key: two instances warning at once warn once."""
        if not messages:
            return False
        key = messages[0].dedupe_key
        async with self._write() as conn:
            if key is not None:
                await self._lock(conn, [key_lock(key)])
                if await conn.fetchval("SELECT 1 FROM messages WHERE dedupe_key = $1 LIMIT 1", key):
                    return False
            ids = await self._reserve_ids(conn, len(messages))
            await self._insert(conn, [row(i, m, now) for i, m in zip(ids, messages, strict=True)])
            await self._notify_work(conn)
        return True

    async def held_phones(self) -> list[tuple[str, float]]:
        return [
            (r[0], float(r[1]))
            for r in await self._fetch(
                f"SELECT m.recipient, min({EFFECTIVE}) FROM messages m WHERE m.state = 'held'"
                " GROUP BY m.recipient ORDER BY 2"
            )
        ]

    async def fold_held(
        self,
        recipient: str,
        now: float,
        digest: Callable[[list[Held]], NewMessage],
        reason: Callable[[int], str],
    ) -> tuple[int, int] | None:
        """Under the recipient's storm lock (an ingest to that phone waits), with the
        held rows locked: two leaders in turn cannot fold the same messages twice."""
        async with self._write() as conn:
            await self._lock(conn, [recipient_lock(recipient)])
            held = [
                Held(*r)
                for r in await conn.fetch(
                    "SELECT id, topic, text, instance, token, route FROM messages m"
                    f" WHERE recipient = $1 AND state = 'held' AND {EFFECTIVE} <= $2"
                    " ORDER BY id FOR UPDATE",
                    recipient,
                    now,
                )
            ]
            if not held:
                return None
            [digest_id] = await self._reserve_ids(conn, 1)
            await self._insert(conn, [row(digest_id, digest(held), now)])
            await conn.execute(
                "UPDATE messages SET state = $1, reason = $2, updated_at = $3"
                " WHERE id = ANY($4::bigint[])",
                str(State.SUPPRESSED),
                reason(digest_id),
                now,
                [h.id for h in held],
            )
            await self._notify_work(conn)
        return digest_id, len(held)
