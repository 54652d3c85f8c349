"""Delivery on PostgreSQL: claims with an owner and a lease (and their booking in the
rate window every instance shares, `bridge.store.postgres.rate`), outcomes, reconcile
lookups.

A claim locks the rows it asks for that are still queued and due, skipping those another
instance is claiming at that moment (`FOR UPDATE SKIP LOCKED`: no instance waits for
another), and moves them to `sending` in the same statement; a row claimed and
committed by another is no longer queued. So a message is never claimed twice, and an
instance that planned the same bulk as another gets what is left of it, or nothing. `unsettled` hands an instance its own
`sending` messages and takes over, in the same statement, those whose owner's lease
passed (that owner stopped renewing: dead or cut off); the caller reconciles them
against /logs before any resend, as after a crash.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from bridge.models import Message, State
from bridge.store.due import due_sql
from bridge.store.postgres.base import Base
from bridge.store.postgres.pool import Conn
from bridge.store.postgres.rate import TAKE_RATE_LOCK, insert_booking, wait_locked
from bridge.store.values import ended, not_applied, requeued, sent_late
from bridge.store.window import Stamp, read_stamp

UNSETTLED_LIMIT = 10_000  # per reconcile step; the rest waits for the next one
# What `unsettled` hands the instance $1 at $2: its own `sending` rows and, with $3
# (a takeover), those whose lease passed.
UNSETTLED = (
    "state = 'sending' AND (claimed_by = $1"
    " OR ($3 AND (claimed_by IS NULL OR lease_until IS NULL OR lease_until < $2)))"
)
UNSETTLED_ANY = f"SELECT EXISTS (SELECT 1 FROM messages WHERE {UNSETTLED})"
# A new attempt: what an earlier outcome was, and the daily caps that held it back (they
# let it go now), no longer hold. `budget` kept past the claim showed a text the provider
# refused as failed by the budget, and a reload that raised a cap "released" it from a
# retry's backoff (`release_budget_holds` picks waiting texts by that kind).
RETRIED_KINDS = "('unknown', 'provider-error', 'budget')"
# Rows an outcome of `owner` (a parameter of the statement) may write: its own claims.
# Anything else is another instance's, or moved on.
HELD = "(m.state = 'sending' AND m.claimed_by = {})"
# A send the provider accepted also lands on a queued row (nobody's): it saves a resend.
OWNED = f"(m.state = 'queued' OR {HELD})"
# `finish` and `requeue`: with `queued` (a boolean parameter), rows still queued, which
# the caller decided on without claiming them (a daily cap); else its own claims.
DECIDED = "(CASE WHEN {queued}::boolean THEN m.state = 'queued' ELSE " + HELD + " END)"


async def note_late(conn: Conn, now: float, notes: Sequence[tuple[int, str]]) -> list[int]:
    """(id, detail) as events on the messages, in their current state: what a caller
    learnt too late to write it (`not_applied`, `sent_late`); the ids noted (those that
    still exist), in the order given."""
    if not notes:
        return []
    noted = {
        int(r[0])
        for r in await conn.fetch(
            "INSERT INTO events (message_id, at, state, attempts, detail)"
            " SELECT m.id, $1, m.state, m.attempts, r.detail FROM messages m"
            " JOIN unnest($2::bigint[], $3::text[]) AS r(id, detail) ON m.id = r.id"
            " ORDER BY m.id RETURNING message_id",
            now,
            [i for i, _ in notes],
            [d for _, d in notes],
        )
    }
    return [i for i, _ in notes if i in noted]


class DeliveryOps(Base):
    async def due(self, now: float, limit: int, *, texts: int | None = None) -> list[Message]:
        if texts is None:
            return await self._messages(due_sql("$1", "$2"), now, limit)
        return await self._messages(due_sql("$1", "$2", "$3"), now, limit, texts)

    async def next_due_at(self) -> float | None:
        return await self._time("SELECT min(next_attempt_at) FROM messages WHERE state = 'queued'")

    async def next_due_after(self, after: float) -> float | None:
        return await self._time(
            "SELECT min(next_attempt_at) FROM messages"
            " WHERE state = 'queued' AND next_attempt_at > $1",
            after,
        )

    async def claim(
        self,
        ids: Sequence[int],
        now: Stamp,
        *,
        owner: str,
        lease_until: float,
        request_kind: str = "send",
        limit: int | None = None,
        window: float = 0.0,
    ) -> list[int]:
        asked = read_stamp(now)
        async with self._write() as conn:
            # The rate lock first, then the time: a wait for the pool or the lock must
            # not age the booking (the request goes after this commit).
            if limit is not None:
                wait, stamped = await wait_locked(conn, now, limit=limit, window=window)
                if wait:
                    return []  # the window is full or paused: claim nothing, book nothing
            else:
                await conn.execute(TAKE_RATE_LOCK)
                stamped = read_stamp(now)
            lease_until += stamped - asked
            now = stamped
            claimed = {
                int(r[0])
                for r in await conn.fetch(
                    "UPDATE messages SET state = 'sending', attempts = attempts + 1,"
                    " claimed_at = $2, updated_at = $2, reason = NULL, claimed_by = $3,"
                    " lease_until = $4, reason_kind = CASE WHEN reason_kind IN"
                    f" {RETRIED_KINDS} THEN NULL ELSE reason_kind END WHERE id IN (SELECT id"
                    " FROM messages WHERE id = ANY($1::bigint[]) AND state = 'queued'"
                    # Due: the ids were read a moment ago, and meanwhile another instance
                    # may have claimed one and put it back for later (a retry's backoff).
                    " AND next_attempt_at <= $2 FOR UPDATE SKIP LOCKED) RETURNING id",
                    list(ids),
                    now,
                    owner,
                    lease_until,
                )
            }
            if claimed or limit is None:  # the lock is held since the time was read
                await insert_booking(conn, now, request_kind)
        return [i for i in ids if i in claimed]

    async def renew(self, ids: Sequence[int], *, owner: str, lease_until: float) -> None:
        await self._execute(
            "UPDATE messages SET lease_until = $3"
            " WHERE id = ANY($1::bigint[]) AND claimed_by = $2 AND state = 'sending'",
            list(ids),
            owner,
            lease_until,
        )

    async def next_lease_expiry(self, owner: str) -> float | None:
        return await self._time(
            "SELECT min(lease_until) FROM messages"
            " WHERE state = 'sending' AND claimed_by IS DISTINCT FROM $1",
            owner,
        )

    async def unsettled(
        self, now: float, *, owner: str, lease_until: float, take_over: bool = True
    ) -> list[Message]:
        """Own `sending` messages and, with `take_over` (the leader's sweep), those whose
        lease passed, taken over (lease renewed to `lease_until`); rows another instance
        is updating right now are skipped."""
        # Looked for first by a read: the dispatcher asks at every step, and an idle
        # bridge (nothing in `sending`, the usual case) ran a write transaction of
        # nothing each time (release_budget_holds says what one costs).
        if not await self._fetchval(UNSETTLED_ANY, owner, now, take_over):
            return []
        async with self._write() as conn:
            rows = await conn.fetch(
                "UPDATE messages SET claimed_by = $1, lease_until = $4 WHERE id IN"
                f" (SELECT id FROM messages WHERE {UNSETTLED}"
                " ORDER BY id LIMIT $5 FOR UPDATE SKIP LOCKED) RETURNING *",
                owner,
                now,
                take_over,
                lease_until,
                UNSETTLED_LIMIT,
            )
        return sorted((Message.from_row(r) for r in rows), key=lambda m: m.id)

    async def mark_sent(
        self, results: Iterable[tuple[int, str | None, float | None]], now: float, *, owner: str
    ) -> list[int]:
        rows = list(results)
        ids, pids = [r[0] for r in rows], [r[1] for r in rows]
        async with self._write() as conn:
            # Row locks order this against a takeover (`unsettled`) or a claim: whichever
            # commits first, the other sees its result (READ COMMITTED re-checks the row).
            marked = {
                int(r[0])
                for r in await conn.fetch(
                    "UPDATE messages m SET state = 'sent', provider_message_id = r.pid,"
                    " cost = r.cost, sent_at = $4, updated_at = $4, reason = NULL"
                    " FROM unnest($1::bigint[], $2::text[], $3::float8[]) AS r(id, pid, cost)"
                    f" WHERE m.id = r.id AND {OWNED.format('$5')} RETURNING m.id",
                    ids,
                    pids,
                    [r[2] for r in rows],
                    now,
                    owner,
                )
            }
            late = [(i, p) for i, p in zip(ids, pids, strict=True) if i not in marked]
            if not late:
                return []
            # No event where the row carries this very send (the taker found it in /logs).
            carried = {
                int(r[0]): r[1]
                for r in await conn.fetch(
                    "SELECT id, provider_message_id FROM messages WHERE id = ANY($1::bigint[])",
                    [i for i, _ in late],
                )
            }
            return await note_late(
                conn,
                now,
                [(i, sent_late(owner, p)) for i, p in late if p is None or carried.get(i) != p],
            )

    async def note_unknown(
        self, ids: Sequence[int], now: float, reason: str, kind: str, *, owner: str
    ) -> list[int]:
        return await self._owned_write(
            "UPDATE messages m SET reason = $1, reason_kind = $2, updated_at = $5"
            f" WHERE id = ANY($3::bigint[]) AND {HELD.format('$4')} RETURNING m.id",
            (reason, kind, list(ids), owner, now),
            ids,
            now,
            not_applied(owner, reason),
        )

    async def resend_unknown(
        self, ids: Sequence[int], now: float, reason: str, *, owner: str
    ) -> list[int]:
        return await self._owned_write(
            "UPDATE messages m SET state = 'queued', next_attempt_at = $1, updated_at = $1,"
            " reason = $2, unknown_resends = unknown_resends + 1, claimed_by = NULL,"
            f" lease_until = NULL WHERE id = ANY($3::bigint[]) AND {HELD.format('$4')}"
            " RETURNING m.id",
            (now, reason, list(ids), owner),
            ids,
            now,
            not_applied(owner, reason),
        )

    async def settle_unknown(
        self, ids: Sequence[int], now: float, reason: str, *, owner: str
    ) -> list[int]:
        return await self._owned_write(
            "UPDATE messages m SET state = 'sent', sent_at = $1, updated_at = $1, reason = $2,"
            " reason_kind = 'unknown', provider_message_id = NULL"
            f" WHERE id = ANY($3::bigint[]) AND {HELD.format('$4')} RETURNING m.id",
            (now, reason, list(ids), owner),
            ids,
            now,
            not_applied(owner, reason),
        )

    async def requeue(
        self,
        ids: Sequence[int],
        now: float,
        *,
        owner: str,
        at: float,
        reason: str | None,
        refund_attempt: bool = False,
        solo: bool | None = None,
        reason_kind: str | None = None,
        queued: bool = False,
        due: bool = False,
    ) -> list[int]:
        # Queued is nobody's claim: the claim's owner and lease go with it.
        return await self._owned_write(
            "UPDATE messages m SET state = 'queued', next_attempt_at = $1, updated_at = $2,"
            " reason = $3, attempts = attempts - $4, solo = coalesce($5, solo),"
            " reason_kind = coalesce($6, reason_kind), claimed_by = NULL, lease_until = NULL,"
            " due_at = coalesce($10::float8, due_at)"
            f" WHERE id = ANY($7::bigint[]) AND {DECIDED.format('$8', queued='$9')}"
            " RETURNING m.id",
            (
                at,
                now,
                reason,
                1 if refund_attempt else 0,
                solo,
                reason_kind,
                list(ids),
                owner,
                queued,
                at if due else None,
            ),
            ids,
            now,
            not_applied(owner, requeued(reason), queued=queued),
        )

    async def _owned_write(
        self, sql: str, args: Sequence[object], ids: Sequence[int], now: float, note: str
    ) -> list[int]:
        """Run `sql` (an UPDATE returning the ids it wrote, guarded by `HELD` or
        `DECIDED`) and note `note` on those of `ids` it did not write."""
        async with self._write() as conn:
            written = {int(r[0]) for r in await conn.fetch(sql, *args)}
            return await note_late(conn, now, [(i, note) for i in ids if i not in written])

    async def finish(
        self,
        updates: Iterable[tuple[int, State, str | None]],
        now: float,
        *,
        owner: str,
        reason_kind: str | None = None,
        queued: bool = False,
    ) -> list[int]:
        rows = list(updates)
        async with self._write() as conn:
            written = {
                int(r[0])
                for r in await conn.fetch(
                    "UPDATE messages m SET state = u.state, reason = u.reason, updated_at = $4,"
                    " reason_kind = coalesce($5, m.reason_kind)"
                    " FROM unnest($1::bigint[], $2::text[], $3::text[]) AS u(id, state, reason)"
                    f" WHERE m.id = u.id AND {DECIDED.format('$6', queued='$7')} RETURNING m.id",
                    [r[0] for r in rows],
                    [str(r[1]) for r in rows],
                    [r[2] for r in rows],
                    now,
                    reason_kind,
                    owner,
                    queued,
                )
            }
            return await note_late(
                conn,
                now,
                [
                    (i, not_applied(owner, ended(s, why), queued=queued))
                    for i, s, why in rows
                    if i not in written
                ],
            )

    async def record_status(
        self, updates: Iterable[tuple[int, State, str | None]], now: float
    ) -> None:
        rows = list(updates)
        await self._execute(
            "UPDATE messages m SET state = u.state, reason = u.reason, updated_at = $4"
            " FROM unnest($1::bigint[], $2::text[], $3::text[]) AS u(id, state, reason)"
            " WHERE m.id = u.id AND m.state = 'sent'",
            [r[0] for r in rows],
            [str(r[1]) for r in rows],
            [r[2] for r in rows],
            now,
        )

    async def awaiting_status(
        self,
        *,
        since: float,
        limit: int,
        scheduled_after: str = "",
        after: tuple[float, int] = (0.0, 0),
    ) -> list[Message]:
        return await self._messages(
            "SELECT * FROM messages WHERE state = 'sent' AND (sent_at > $1"
            " OR (schedule_time IS NOT NULL AND schedule_time > $2))"
            " AND (sent_at, id) > ($4::float8, $5::bigint)"
            " ORDER BY sent_at, id LIMIT $3",
            since,
            scheduled_after or "9999",
            limit,
            after[0],
            after[1],
        )

    async def known_provider_ids(self, provider_ids: Sequence[str]) -> set[str]:
        if not provider_ids:
            return set()
        return {
            r[0]
            for r in await self._fetch(
                "SELECT provider_message_id FROM messages"
                " WHERE provider_message_id = ANY($1::text[])",
                list(provider_ids),
            )
        }

    async def sent_without_id(
        self, recipients: Sequence[str], *, since: float, until: float
    ) -> list[Message]:
        if not recipients:
            return []
        return await self._messages(
            "SELECT * FROM messages WHERE sent_at >= $1 AND sent_at <= $2 AND state = 'sent'"
            " AND provider_message_id IS NULL AND reason_kind IS DISTINCT FROM 'unknown'"
            " AND recipient = ANY($3::text[]) ORDER BY sent_at, id",
            since,
            until,
            list(recipients),
        )

    async def sent_after(self, message: Message) -> int:
        sent_at = message.sent_at or 0.0
        return int(
            await self._fetchval(
                "SELECT count(*) FROM messages WHERE sent_at > $1 OR (sent_at = $1 AND id > $2)",
                sent_at,
                message.id,
            )
        )

    async def set_provider_ids(self, rows: Iterable[tuple[int, str]]) -> None:
        pairs = list(rows)
        await self._execute(
            "UPDATE messages m SET provider_message_id = r.pid"
            " FROM unnest($1::bigint[], $2::text[]) AS r(id, pid)"
            " WHERE m.id = r.id AND m.provider_message_id IS NULL",
            [p[0] for p in pairs],
            [p[1] for p in pairs],
        )
