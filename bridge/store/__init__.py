"""The store: the bridge's only door to SQLite, as operations on messages.

Ingest (insert a decided batch), claim, mark sent, requeue, finish, reconcile lookups,
status queries, stats, the persisted rate window and retention. The engine (one writer
with group commit, readers) is `bridge.store.engine`; the schema and its migrations
`bridge.store.schema`; the console's queries `bridge.store.console`; the lookups policy,
budgets, digests and metrics ask `bridge.store.queries`. Every state change is logged to
`events` by triggers, so no code path can change a state without leaving a row.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from typing import Any

from sqlite_utils import Database

from bridge.models import MAX_ROW_ID, Message, NewMessage, State
from bridge.store.console import ConsoleQueries
from bridge.store.schema import INSERT_COLUMNS, JSON_IDS, ROW_MARKS, ROWS_PER_INSERT, row

log = logging.getLogger(__name__)
# `sent` too: past status.give_up_after nothing will move it any more.
PURGEABLE_SQL = "('sent', 'delivered', 'failed', 'suppressed')"


class Store(ConsoleQueries):
    """`open()` before use, `close()` after; the engine's `read`/`write` run the jobs."""

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

    async def next_due_after(self, after: float) -> float | None:
        """When the first queued message not yet due at `after` becomes due."""
        return await self.read(
            lambda c: c.execute(
                "SELECT min(next_attempt_at) FROM messages"
                " WHERE state = 'queued' AND next_attempt_at > ?",
                (after,),
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
                f" WHERE id IN {JSON_IDS} AND +state = 'queued'"
                " AND reason_kind IN ('unknown', 'provider-error')",
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
                f" WHERE id IN {JSON_IDS} AND +state = 'sending'",
                (reason, kind, json.dumps(list(ids))),
            )
        )

    async def resend_unknown(self, ids: Sequence[int], now: float, reason: str) -> None:
        """sending -> queued, due now, counting one resend of an unsettled outcome."""
        await self.write(
            lambda db: db.execute(
                "UPDATE messages SET state = 'queued', next_attempt_at = ?, updated_at = ?,"
                " reason = ?, unknown_resends = unknown_resends + 1"
                f" WHERE id IN {JSON_IDS} AND +state = 'sending'",
                (now, now, reason, json.dumps(list(ids))),
            )
        )

    async def settle_unknown(self, ids: Sequence[int], now: float, reason: str) -> None:
        """sending -> sent with no provider id: the last word on an outcome nobody knows."""
        await self.write(
            lambda db: db.execute(
                "UPDATE messages SET state = 'sent', sent_at = ?, updated_at = ?, reason = ?,"
                " reason_kind = 'unknown', provider_message_id = NULL"
                f" WHERE id IN {JSON_IDS} AND +state = 'sending'",
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
                f" reason_kind = coalesce(?, reason_kind) WHERE id IN {JSON_IDS}"
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


def _like_escape(value: str) -> str:
    """`value` as a literal inside a LIKE pattern (ESCAPE '\\')."""
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
