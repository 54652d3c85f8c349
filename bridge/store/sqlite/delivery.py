"""The SQLite store's delivery operations: due, claim (with its booking in the rate
window, `bridge.store.sqlite.rate`), outcomes, reconcile lookups.

One process owns the store, so claims need no lease: `owner` and `lease_until` are
accepted and ignored, and every message in `sending` is this process's to settle.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

from sqlite_utils import Database

from bridge.models import Message, State
from bridge.store.due import due_sql
from bridge.store.sqlite.base import EngineBound
from bridge.store.sqlite.rate import insert_booking, wait_in
from bridge.store.sqlite.schema import JSON_IDS
from bridge.store.values import ended, not_applied, requeued, sent_late
from bridge.store.window import Stamp, read_stamp

UNSETTLED_LIMIT = 10_000  # per reconcile step; the rest waits for the next one
# The states an outcome may write (PostgreSQL's rule, `claimed_by` aside: one process
# holds every claim): an owner's own claims; a send also lands on a queued row (nobody's).
HELD = "('sending')"
OWNED = "('sending', 'queued')"
QUEUED = "('queued')"  # what a decision taken without a claim (a daily cap) may write


def in_states(db: Database, ids: Iterable[int], states: str) -> set[int]:
    """Those of `ids` whose row is in one of `states` (an SQL list)."""
    return set(
        json.loads(
            db.execute(
                "SELECT json_group_array(id) FROM messages"
                f" WHERE id IN {JSON_IDS} AND +state IN {states}",
                (json.dumps(list(ids)),),
            ).fetchone()[0]
        )
    )


def note_late(db: Database, now: float, notes: Iterable[tuple[int, str]]) -> list[int]:
    """(id, detail) as events on the messages, in their current state (PostgreSQL's
    `note_late`); the ids noted (those that still exist), in the order given."""
    return [
        i
        for i, detail in notes
        if db.execute(
            "INSERT INTO events (message_id, at, state, attempts, detail)"
            " SELECT id, ?, state, attempts, ? FROM messages WHERE id = ?",
            (now, detail, i),
        ).rowcount
    ]


class DeliveryOperations(EngineBound):
    async def due(self, now: float, limit: int, *, texts: int | None = None) -> list[Message]:
        sql = due_sql("?1", "?2", None if texts is None else "?3")
        args = (now, limit) if texts is None else (now, limit, texts)
        return await self.engine.read(lambda c: [Message.from_row(r) for r in c.execute(sql, args)])

    async def next_due_at(self) -> float | None:
        return await self.engine.read(
            lambda c: c.execute(
                "SELECT min(next_attempt_at) FROM messages WHERE state = 'queued'"
            ).fetchone()[0]
        )

    async def next_due_after(self, after: float) -> float | None:
        return await self.engine.read(
            lambda c: c.execute(
                "SELECT min(next_attempt_at) FROM messages"
                " WHERE state = 'queued' AND next_attempt_at > ?",
                (after,),
            ).fetchone()[0]
        )

    async def renew(self, ids: Sequence[int], *, owner: str, lease_until: float) -> None:
        del ids, owner, lease_until  # one process: no one else takes a claim over

    async def next_lease_expiry(self, owner: str) -> float | None:
        return None  # one process: every claim is this one's

    async def unsettled(
        self, now: float, *, owner: str, lease_until: float, take_over: bool = True
    ) -> list[Message]:
        """Every message in `sending`: one process, so all of them are its own."""
        del now, owner, lease_until, take_over
        return await self.engine.read(
            lambda c: [
                Message.from_row(r)
                for r in c.execute(
                    "SELECT * FROM messages WHERE state = 'sending' ORDER BY id LIMIT ?",
                    (UNSETTLED_LIMIT,),
                )
            ]
        )

    async def awaiting_status(
        self,
        *,
        since: float,
        limit: int,
        scheduled_after: str = "",
        after: tuple[float, int] = (0.0, 0),
    ) -> list[Message]:
        """`sent` messages sent after `since`, or scheduled (UTC text) after
        `scheduled_after`, oldest first; with or without a provider id (the poller
        matches an id-less one by recipient and text, an unsettled outcome included:
        /logs may show it late)."""
        return await self.engine.read(
            lambda c: [
                Message.from_row(r)
                for r in c.execute(
                    "SELECT * FROM messages WHERE state = 'sent' AND (sent_at > ?"
                    " OR (schedule_time IS NOT NULL AND schedule_time > ?))"
                    " AND (sent_at > ? OR (sent_at = ? AND id > ?))"
                    " ORDER BY sent_at, id LIMIT ?",
                    (since, scheduled_after or "9999", after[0], after[0], after[1], limit),
                )
            ]
        )

    async def known_provider_ids(self, provider_ids: Sequence[str]) -> set[str]:
        """Which of these provider ids a stored message already carries."""
        if not provider_ids:
            return set()
        marks = ",".join("?" * len(provider_ids))
        sql = f"SELECT provider_message_id FROM messages WHERE provider_message_id IN ({marks})"
        return await self.engine.read(lambda c: {r[0] for r in c.execute(sql, list(provider_ids))})

    async def sent_without_id(
        self, recipients: Sequence[str], *, since: float, until: float
    ) -> list[Message]:
        if not recipients:
            return []
        marks = ",".join("?" * len(recipients))
        sql = (
            "SELECT * FROM messages WHERE sent_at >= ? AND sent_at <= ? AND state = 'sent'"
            " AND provider_message_id IS NULL AND reason_kind IS NOT 'unknown'"
            f" AND recipient IN ({marks}) ORDER BY sent_at, id"
        )
        params = [since, until, *recipients]
        return await self.engine.read(
            lambda c: [Message.from_row(r) for r in c.execute(sql, params)]
        )

    async def sent_after(self, message: Message) -> int:
        """How many messages reached the provider after `message`: its /logs position.

        A bulk call gives its messages one sent_at, so ids break the tie.
        """
        sent_at = message.sent_at or 0.0
        sql = "SELECT count(*) FROM messages WHERE sent_at > ? OR (sent_at = ? AND id > ?)"
        return await self.engine.read(
            lambda c: int(c.execute(sql, (sent_at, sent_at, message.id)).fetchone()[0])
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
        """queued -> sending for `ids`, and one provider request booked (with `limit`:
        if the window has room and no pause holds), in one commit. One process owns every
        claim: `owner` and the lease have nothing to guard here."""
        del owner, lease_until
        kind = request_kind

        wanted = json.dumps(list(ids))

        def job(db: Database) -> list[int]:
            at = read_stamp(now)  # in the writer's turn: the wait for it does not count
            if limit is not None and wait_in(db, at, limit=limit, window=window) > 0:
                return []
            # A new attempt: what an earlier outcome was (reason_kind), and the daily caps
            # that held it back, no longer hold (PostgreSQL's RETRIED_KINDS).
            db.execute(
                "UPDATE messages SET reason_kind = NULL"
                f" WHERE id IN {JSON_IDS} AND +state = 'queued'"
                " AND reason_kind IN ('unknown', 'provider-error', 'budget')",
                (wanted,),
            )
            queued = set(
                json.loads(
                    db.execute(
                        "SELECT json_group_array(id) FROM messages"
                        f" WHERE id IN {JSON_IDS} AND +state = 'queued'",
                        (wanted,),
                    ).fetchone()[0]
                )
            )
            db.execute(
                "UPDATE messages SET state = 'sending', attempts = attempts + 1,"
                f" claimed_at = ?, updated_at = ?, reason = NULL WHERE id IN {JSON_IDS}"
                " AND +state = 'queued'",
                (at, at, wanted),
            )
            if queued or limit is None:
                insert_booking(db, at, kind)
            return [i for i in ids if i in queued]

        return await self.engine.write(job)

    async def mark_sent(
        self, results: Iterable[tuple[int, str | None, float | None]], now: float, *, owner: str
    ) -> list[int]:
        """As PostgreSQL's: one process holds every claim, so only the state decides
        (`sending` or `queued` are marked sent; any other row gets a `sent_late` event)."""
        rows = list(results)

        def job(db: Database) -> list[int]:
            movable = in_states(db, (r[0] for r in rows), OWNED)
            db.execute(
                "UPDATE messages SET state = 'sent',"
                " provider_message_id = json_extract(r.value, '$[1]'),"
                " cost = json_extract(r.value, '$[2]'), sent_at = ?, updated_at = ?,"
                " reason = NULL FROM json_each(?) AS r"
                " WHERE messages.id = json_extract(r.value, '$[0]')",
                (now, now, json.dumps([r for r in rows if r[0] in movable])),
            )
            late = [(i, pid) for i, pid, _ in rows if i not in movable]
            carried = dict(
                db.execute(
                    f"SELECT id, provider_message_id FROM messages WHERE id IN {JSON_IDS}",
                    (json.dumps([i for i, _ in late]),),
                ).fetchall()
            )
            # No event where the row carries this very send (found in /logs).
            return note_late(
                db,
                now,
                [(i, sent_late(owner, p)) for i, p in late if p is None or carried.get(i) != p],
            )

        return await self.engine.write(job)

    async def note_unknown(
        self, ids: Sequence[int], now: float, reason: str, kind: str, *, owner: str
    ) -> list[int]:
        """A send whose outcome /logs must settle: stays `sending`, says why and how,
        and since when (updated_at: the reconciler's wait for /logs counts from it)."""
        return await self._owned_write(
            "UPDATE messages SET reason = ?, reason_kind = ?, updated_at = ?"
            f" WHERE id IN {JSON_IDS}",
            (reason, kind, now),
            ids,
            HELD,
            now,
            not_applied(owner, reason),
        )

    async def resend_unknown(
        self, ids: Sequence[int], now: float, reason: str, *, owner: str
    ) -> list[int]:
        """sending -> queued, due now, counting one resend of an unsettled outcome."""
        return await self._owned_write(
            "UPDATE messages SET state = 'queued', next_attempt_at = ?, updated_at = ?,"
            f" reason = ?, unknown_resends = unknown_resends + 1 WHERE id IN {JSON_IDS}",
            (now, now, reason),
            ids,
            HELD,
            now,
            not_applied(owner, reason),
        )

    async def settle_unknown(
        self, ids: Sequence[int], now: float, reason: str, *, owner: str
    ) -> list[int]:
        """sending -> sent with no provider id: the last word on an outcome nobody knows."""
        return await self._owned_write(
            "UPDATE messages SET state = 'sent', sent_at = ?, updated_at = ?, reason = ?,"
            " reason_kind = 'unknown', provider_message_id = NULL"
            f" WHERE id IN {JSON_IDS}",
            (now, now, reason),
            ids,
            HELD,
            now,
            not_applied(owner, reason),
        )

    async def set_provider_ids(self, rows: Iterable[tuple[int, str]]) -> None:
        """Provider ids found for id-less sent messages (matched in /logs)."""
        data = json.dumps(list(rows))
        await self.engine.write(
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
        owner: str,
        at: float,
        reason: str | None,
        refund_attempt: bool = False,
        solo: bool | None = None,
        reason_kind: str | None = None,
        queued: bool = False,
        due: bool = False,
    ) -> list[int]:
        """Back to queued, due at `at`; `refund_attempt` when the send never really ran."""
        return await self._owned_write(
            "UPDATE messages SET state = 'queued', next_attempt_at = ?, updated_at = ?,"
            " reason = ?, attempts = attempts - ?, solo = coalesce(?, solo),"
            " reason_kind = coalesce(?, reason_kind), due_at = coalesce(?, due_at)"
            f" WHERE id IN {JSON_IDS}",
            (
                at,
                now,
                reason,
                1 if refund_attempt else 0,
                None if solo is None else int(solo),
                reason_kind,
                at if due else None,
            ),
            ids,
            QUEUED if queued else HELD,
            now,
            not_applied(owner, requeued(reason), queued=queued),
        )

    async def _owned_write(
        self,
        sql: str,
        args: tuple[object, ...],
        ids: Sequence[int],
        states: str,
        now: float,
        note: str,
    ) -> list[int]:
        """Run `sql` (an UPDATE whose last parameter is `JSON_IDS`) on those of `ids` in
        `states`, and note `note` on the others (PostgreSQL's `_owned_write`)."""

        def job(db: Database) -> list[int]:
            owned = in_states(db, ids, states)
            db.execute(sql, (*args, json.dumps([i for i in ids if i in owned])))
            return note_late(db, now, [(i, note) for i in ids if i not in owned])

        return await self.engine.write(job)

    async def finish(
        self,
        updates: Iterable[tuple[int, State, str | None]],
        now: float,
        *,
        owner: str,
        reason_kind: str | None = None,
        queued: bool = False,
    ) -> list[int]:
        """Final states (failed) with their reasons, for rows still `sending` (or with
        `queued`, still `queued`); any other is noted (`not_applied`)."""
        rows = [(i, str(state), reason) for i, state, reason in updates]

        def job(db: Database) -> list[int]:
            owned = in_states(db, (r[0] for r in rows), QUEUED if queued else HELD)
            db.execute(
                "UPDATE messages SET state = json_extract(r.value, '$[1]'),"
                " reason = json_extract(r.value, '$[2]'), updated_at = ?,"
                " reason_kind = coalesce(?, reason_kind) FROM json_each(?) AS r"
                " WHERE messages.id = json_extract(r.value, '$[0]')",
                (now, reason_kind, json.dumps([r for r in rows if r[0] in owned])),
            )
            return note_late(
                db,
                now,
                [
                    (i, not_applied(owner, ended(s, why), queued=queued))
                    for i, s, why in rows
                    if i not in owned
                ],
            )

        return await self.engine.write(job)

    async def record_status(
        self, updates: Iterable[tuple[int, State, str | None]], now: float
    ) -> None:
        """Delivery reports: `sent` rows -> delivered or failed."""
        rows = json.dumps([(i, str(state), reason) for i, state, reason in updates])
        await self.engine.write(
            lambda db: db.execute(
                "UPDATE messages SET state = json_extract(r.value, '$[1]'),"
                " reason = json_extract(r.value, '$[2]'), updated_at = ?"
                " FROM json_each(?) AS r WHERE messages.id = json_extract(r.value, '$[0]')"
                " AND +messages.state = 'sent'",
                (now, rows),
            )
        )
