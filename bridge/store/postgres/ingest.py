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

from collections.abc import Callable, Sequence

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
from bridge.store.postgres.base import Base, dedupe_lock, key_lock, recipient_lock, row
from bridge.store.postgres.pool import Conn

# One statement answers every question of a batch (each statement is a round trip).
ORIGINALS = (
    "SELECT w.i, (SELECT m.id FROM messages m WHERE m.dedupe_key = w.k"
    " AND m.recipient = w.r AND m.created_at >= w.s AND m.state <> 'failed'"
    " ORDER BY m.created_at LIMIT 1) FROM unnest($1::text[], $2::text[], $3::float8[])"
    " WITH ORDINALITY AS w(k, r, s, i)"
)
STORMS = (
    "SELECT w.i, EXISTS (SELECT 1 FROM messages m WHERE m.recipient = w.r"
    " AND m.state = 'held'), (SELECT count(*) FROM messages m WHERE m.recipient = w.r"
    " AND m.created_at >= w.s AND m.state IN ('queued', 'sending', 'sent', 'delivered')"
    " AND m.source <> 'digest') FROM unnest($1::text[], $2::float8[])"
    " WITH ORDINALITY AS w(r, s, i)"
)


def lock_keys(questions: IngestQuestions) -> list[str]:
    return [dedupe_lock(q.dedupe_key, q.recipient) for q in questions.originals] + [
        recipient_lock(q.recipient) for q in questions.storms
    ]


async def answer(conn: Conn, questions: IngestQuestions) -> Lookups:
    originals: dict[OriginalQuestion, int] = {}
    storms: dict[StormQuestion, StormState] = {}
    if asked := list(questions.originals):
        for i, found in await conn.fetch(
            ORIGINALS,
            [q.dedupe_key for q in asked],
            [q.recipient for q in asked],
            [q.since for q in asked],
        ):
            if found is not None:
                originals[asked[i - 1]] = int(found)
    if asked_storms := list(questions.storms):
        for i, held, recent in await conn.fetch(
            STORMS, [q.recipient for q in asked_storms], [q.since for q in asked_storms]
        ):
            storms[asked_storms[i - 1]] = StormState(bool(held), int(recent))
    return Lookups(originals=originals, storms=storms)


class IngestOps(Base):
    async def ingest(self, pending: Sequence[Pending], decider: Decider) -> list[Stored]:
        """Lock the questions, reserve ids, answer, decide, insert: one transaction,
        durable on return (the caller's 202 / 250 comes after this)."""
        if not pending:
            return []
        questions = decider.questions(pending)
        async with self._write() as conn:
            await self._lock(conn, lock_keys(questions))
            ids = await self._reserve_ids(conn, len(pending))
            decided = decider.decide(await answer(conn, questions), pending, ids)
            await self._insert(
                conn,
                [
                    row(message_id, message, arrival)
                    for message_id, message, (_, arrival) in zip(ids, decided, pending, strict=True)
                ],
            )
        return [Stored(i, m) for i, m in zip(ids, decided, strict=True)]

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
        return True

    async def held_phones(self) -> list[tuple[str, float]]:
        return [
            (r[0], float(r[1]))
            for r in await self._fetch(
                "SELECT recipient, min(created_at) FROM messages WHERE state = 'held'"
                " GROUP BY recipient ORDER BY 2"
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
                    "SELECT id, topic, text, instance FROM messages WHERE recipient = $1"
                    " AND state = 'held' ORDER BY id FOR UPDATE",
                    recipient,
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
        return digest_id, len(held)
