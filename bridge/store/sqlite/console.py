"""The web console's queries (bridge.ingress.http.console): activity, overview, storms, actions.

A part of `Store` (it mixes this in), kept apart so the message operations in
`bridge.store` stay one concern.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Any

from sqlite_utils import Database

from bridge.models import MAX_ROW_ID
from bridge.store.engine import Engine
from bridge.store.schema import JSON_IDS


class ConsoleQueries(Engine):
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

        return await self.write(job)

    async def note(self, ids: Sequence[int], detail: str, now: float) -> None:
        """An event row for each message that changes no state (who did what)."""
        await self.write(
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
