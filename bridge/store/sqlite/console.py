"""The SQLite store's queries and operator actions: the API's and the web console's
(bridge.ingress.http.console) reads, retry, cancel, notes, and retention.

A part of `SqliteStore` (it mixes this in), kept apart so that delivery's operations
stay one concern.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Any

from sqlite_utils import Database

import bridge.store.sqlite.queries as queries
import bridge.store.totals as totals
from bridge.models import MAX_ROW_ID, OTHER_REASON, Message
from bridge.store.sqlite.base import EngineBound
from bridge.store.sqlite.queries import SPENT
from bridge.store.sqlite.schema import JSON_IDS, MENTIONED, MENTIONS

# `sent` too: past status.give_up_after nothing will move it any more.
PURGEABLE_SQL = "('sent', 'delivered', 'failed', 'suppressed')"
# A number's page goes on after the `before` message in creation order; that message
# gone since (purged), after it by id alone.
CURSOR_TIME = "coalesce((SELECT created_at FROM messages WHERE id = ?), 1e308)"


class ConsoleQueries(EngineBound):
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
                    f" WHERE id IN {JSON_IDS} AND +state IN ('queued', 'held')",
                    (wanted,),
                ).fetchone()[0]
            )
            db.execute(
                "UPDATE messages SET state = 'failed', reason = ?, reason_kind = 'cancelled',"
                f" updated_at = ? WHERE id IN {JSON_IDS} AND +state IN ('queued', 'held')",
                (f"cancelled by {by}", now, wanted),
            )
            return [int(i) for i in chosen]

        return await self.engine.write(job)

    async def note(self, ids: Sequence[int], detail: str, now: float) -> None:
        """An event row for each message that changes no state (who did what)."""
        await self.engine.write(
            lambda db: db.execute(
                "INSERT INTO events (message_id, at, state, attempts, detail)"
                f" SELECT id, ?, state, attempts, ? FROM messages WHERE id IN {JSON_IDS}",
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

        return await self.engine.read(read)

    async def overview(self, *, now: float, day_start: float, since: float) -> dict[str, Any]:
        """Queue age, delivery answers since `since`, and the day's sends and spend.

        Budget warnings (source `budget`) are counted apart: the daily caps ignore them.
        """

        def read(c: sqlite3.Connection) -> dict[str, Any]:
            queue = c.execute(
                "SELECT min(due_at), count(*), coalesce(sum(next_attempt_at <= ?), 0),"
                " min(CASE WHEN next_attempt_at > ? THEN next_attempt_at END)"
                " FROM messages WHERE state = 'queued'",
                (now, now),
            ).fetchone()
            # `+state` (here and in purge): the hour's rows through messages_created_at;
            # on state, SQLite would walk every sent, delivered and failed message.
            answers = dict(
                c.execute(
                    "SELECT state, count(*) FROM messages WHERE created_at >= ?"
                    " AND +state IN ('sent', 'delivered', 'failed')"
                    " AND NOT (state = 'failed' AND coalesce(reason_kind, '') = 'cancelled')"
                    " GROUP BY +state",
                    (since,),
                ).fetchall()
            )
            day = c.execute(
                "SELECT count(*), coalesce(sum(parts), 0), sum(cost), sum(estimated_cost),"
                " coalesce(sum(source = 'budget'), 0),"
                # The estimates of the texts the provider has not priced yet.
                " sum(CASE WHEN cost IS NULL THEN estimated_cost END)"
                f" FROM messages WHERE {SPENT}",  # in flight too, as the caps count
                (day_start,),
            ).fetchone()
            routes = dict(
                c.execute(
                    f"SELECT route, count(*) FROM messages WHERE {SPENT}"
                    " AND route IS NOT NULL GROUP BY route",
                    (day_start,),
                ).fetchall()
            )
            tokens = dict(
                c.execute(
                    f"SELECT token, count(*) FROM messages WHERE {SPENT}"
                    " AND token IS NOT NULL AND source != 'budget' GROUP BY token",
                    (day_start,),
                ).fetchall()
            )
            return {
                "queue": {
                    "oldest_due_at": queue[0],
                    "queued": queue[1],
                    "due": queue[2],
                    "next_retry_at": queue[3],
                },
                "answers": answers,
                "today": {
                    "texts": day[0] - day[4],
                    # As the caps count them: each attempt of a text sent again, the
                    # warnings' parts left out.
                    "parts": queries.used_since(c, day_start, "budget")[1],
                    "cost": day[2],
                    # As the cost cap counts it: each attempt of a text sent again.
                    "counted_cost": queries.spent_since(c, day_start, "budget")[0],
                    "estimated_cost": day[3],
                    "unpriced_estimated_cost": day[5],
                    "warnings": day[4],
                    "routes": routes,
                    "tokens": tokens,
                },
            }

        return await self.engine.read(read)

    async def held_storms(self) -> list[dict[str, Any]]:
        """Phones with messages held by storm control: how many, since when."""
        return await self.engine.read(
            lambda c: [
                dict(r)
                for r in c.execute(
                    "SELECT recipient, count(*) AS held, min(created_at) AS first_at"
                    " FROM messages WHERE state = 'held' GROUP BY recipient ORDER BY 3"
                )
            ]
        )

    async def queued_piles(self, scan: int, minimum: int) -> list[dict[str, Any]]:
        return await self.engine.read(
            lambda c: [
                dict(r)
                for r in c.execute(
                    "SELECT recipient, count(*) AS queued FROM (SELECT recipient FROM messages"
                    " WHERE state = 'queued' ORDER BY next_attempt_at, id LIMIT ?)"
                    " GROUP BY recipient HAVING count(*) >= ? ORDER BY 2 DESC, 1",
                    (scan, minimum),
                )
            ]
        )

    async def route_last_messages(self, routes: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The newest stored message of each of `routes`: survives a restart, unlike
        call records. One look into messages_route per route, not a walk of the table."""
        return await self.engine.read(
            lambda c: {
                r["route"]: dict(r)
                for r in c.execute(
                    "SELECT route, id, state, created_at FROM messages WHERE id IN"
                    " (SELECT (SELECT id FROM messages WHERE route = j.value"
                    " ORDER BY id DESC LIMIT 1) FROM json_each(?) AS j)",
                    (json.dumps(list(routes)),),
                )
            }
        )

    async def mentioned_by(self, message_id: int, limit: int = 200) -> list[dict[str, Any]]:
        """Suppressed messages whose reason names this one: its duplicates, or what a
        digest folded. Reasons say "message N" (policy, storm digests): found through
        messages_mentions, then matched as whole words, in the case written (GLOB, as
        PostgreSQL's LIKE: SQLite's LIKE ignores case, and "MESSAGE 12" named 12 here
        only)."""
        if not 0 < message_id <= MAX_ROW_ID:
            return []
        return await self.engine.read(
            lambda c: [
                dict(r)
                for r in c.execute(
                    "SELECT id, recipient, reason, created_at FROM messages"
                    f" WHERE {MENTIONS} AND {MENTIONED} = ? AND (reason GLOB ? OR reason GLOB ?)"
                    # A loop's reason quotes the mail's Auto-Submitted value: anyone's words.
                    " AND coalesce(reason_kind, '') <> 'loop'"
                    " ORDER BY id LIMIT ?",
                    (message_id, f"* message {message_id} *", f"* message {message_id}", limit),
                )
            ]
        )

    async def get(self, message_id: int) -> Message | None:
        if not 0 < message_id <= MAX_ROW_ID:
            return None  # no such row, and SQLite could not even bind the number
        row = await self.engine.read(
            lambda c: c.execute("SELECT * FROM messages WHERE id = ?", (message_id,)).fetchone()
        )
        return None if row is None else Message.from_row(row)

    async def in_state(self, ids: Sequence[int], state: str) -> set[int]:
        wanted = json.dumps([i for i in ids if 0 < i <= MAX_ROW_ID])
        rows = await self.engine.read(
            lambda c: c.execute(
                f"SELECT id FROM messages WHERE id IN {JSON_IDS} AND +state = ?", (wanted, state)
            ).fetchall()
        )
        return {int(r[0]) for r in rows}

    async def events(self, message_id: int) -> list[dict[str, Any]]:
        return await self.engine.read(
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
        number: str | None = None,
        since: float | None = None,
        not_reason_kind: str | None = None,
    ) -> list[Message]:
        """Newest first; `recipient` and `text` match anywhere in the field (any case);
        `number` is the whole recipient (StoreApi.query)."""
        sql, args = "SELECT * FROM messages WHERE 1=1", list[object]()
        if reason_kind == OTHER_REASON:
            sql, reason_kind = f"{sql} AND {totals.OTHER_REASON_SQL}", None
        for column, value in (
            ("recipient", number),
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
        if since is not None:
            sql += " AND created_at >= ?"
            args.append(since)
        if not_reason_kind:
            sql += " AND coalesce(reason_kind, '') <> ?"
            args.append(not_reason_kind)
        if number:  # messages_recipient's own order: read no more rows than the page
            if before_id and before_id <= MAX_ROW_ID:
                sql += f" AND (created_at, id) < ({CURSOR_TIME}, ?)"
                args += [before_id, before_id]
            sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
        else:
            if before_id and before_id <= MAX_ROW_ID:  # beyond it, every row is "before"
                sql += " AND id < ?"
                args.append(before_id)
            sql += " ORDER BY id DESC LIMIT ?"
        args.append(limit)
        return await self.engine.read(lambda c: [Message.from_row(r) for r in c.execute(sql, args)])

    async def recent_failures(self, limit: int) -> list[Message]:
        return await self.engine.read(
            lambda c: [
                Message.from_row(r)
                for r in c.execute(
                    # Named: planning from the schema alone (no ANALYZE), SQLite takes
                    # messages_due for `state =` and sorts every failed message.
                    "SELECT * FROM messages INDEXED BY messages_failed"
                    f" WHERE {totals.FAILED_NOT_CANCELLED}"
                    " ORDER BY updated_at DESC, id DESC LIMIT ?",
                    (limit,),
                )
            ]
        )

    async def upkeep(self) -> None:
        """Nothing: one writer keeps one row per key of the running totals."""

    async def purge(self, before: float) -> int:
        """Delete messages that reached their end before `before`, with their events."""

        def job(db: Database) -> int:
            # Its end is its last change (updated_at): one queued for days and sent just
            # now stays, in its history and in today's caps. created_at, never later,
            # picks the candidates through messages_created_at.
            where = "WHERE created_at < ? AND updated_at < ? AND +state IN " + PURGEABLE_SQL
            # A `sent` text scheduled later has not reached its end: the provider holds it
            # till its schedule_time (UTC text), its delivery report comes after. Purged
            # as finished, it was gone (404, no state, uncounted by storm control) before
            # it was delivered.
            where += (
                " AND (+state != 'sent' OR schedule_time IS NULL"
                " OR schedule_time < strftime('%Y-%m-%d %H:%M:%S', ?, 'unixepoch'))"
            )
            # The newest goes too: ids continue after the highest ever given
            # (schema.NEXT_ID), as PostgreSQL's sequence does, not after max(id).
            db.execute(
                f"DELETE FROM events WHERE message_id IN (SELECT id FROM messages {where})",
                (before, before, before),
            )
            return int(
                db.execute(f"DELETE FROM messages {where}", (before, before, before)).rowcount
            )

        return await self.engine.write(job)

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
                    # The old reason's kind goes with it: a cancelled message retried
                    # and refused by the provider was still counted as cancelled.
                    # Due now: an operator's retry starts its retry_max_age afresh.
                    "UPDATE messages SET state = 'queued', next_attempt_at = ?, updated_at = ?,"
                    " due_at = ?, reason = ?, reason_kind = NULL, solo = 1 WHERE id = ?",
                    (now, now, now, reason, message_id),
                )
            return chosen

        return await self.engine.write(job)

    async def release_budget_holds(
        self, now: float, detail: str, *, waiting_for: str = ""
    ) -> list[int]:
        """Messages waiting for the next day's caps (queued, reason kind budget, due
        later; their reason holding `waiting_for`) due now, each with an event saying
        `detail`; the ids changed. Looked for first by a reader: with nothing waiting
        (the usual case) nothing is written. The dispatcher asks every minute once a
        price is known, and each ask was a commit of the writer (an fsync) of nothing."""

        def waiting(c: sqlite3.Connection) -> list[int]:
            return [
                int(r[0])
                for r in c.execute(
                    "SELECT id FROM messages WHERE state = 'queued' AND next_attempt_at > ?"
                    " AND reason_kind = 'budget' AND instr(coalesce(reason, ''), ?) > 0"
                    " ORDER BY id",
                    (now, waiting_for),
                )
            ]

        if not await self.engine.read(waiting):
            return []

        def job(db: Database) -> list[int]:
            chosen = waiting(db.conn)  # again: what the reader saw may have gone since
            ids = json.dumps(chosen)
            db.execute(
                "UPDATE messages SET next_attempt_at = ?, updated_at = ?, due_at = ?"
                f" WHERE id IN {JSON_IDS}",
                (now, now, now, ids),
            )
            db.execute(
                "INSERT INTO events (message_id, at, state, attempts, detail)"
                f" SELECT id, ?, state, attempts, ? FROM messages WHERE id IN {JSON_IDS}",
                (now, detail, ids),
            )
            return chosen

        return await self.engine.write(job)

    async def counts_by_reason(self) -> dict[str, dict[str, int]]:
        """{state: {reason kind: count}} for held, suppressed and failed messages."""
        return totals.reasons(
            await self.engine.read(lambda c: c.execute(totals.BY_REASON).fetchall())
        )

    async def counts(self) -> dict[str, int]:
        return await self.engine.read(
            lambda c: {r[0]: int(r[1]) for r in c.execute(totals.BY_STATE)}
        )


def _like_escape(value: str) -> str:
    """`value` as a literal inside a LIKE pattern (ESCAPE '\\')."""
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
