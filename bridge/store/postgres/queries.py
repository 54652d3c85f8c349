"""What the API, the console, budgets and metrics read on PostgreSQL, the operator's
actions (retry, cancel, note) and retention: the same answers as the SQLite store's,
in PostgreSQL's dialect (FILTER for conditional counts, ILIKE for "any case")."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import bridge.store.totals as totals
from bridge.models import MAX_ROW_ID, OTHER_REASON, Message
from bridge.pricing import BILLED_MAX_FOR
from bridge.store.api import MetricCounts
from bridge.store.postgres.base import TOTALS_LOCK, Base, one
from bridge.store.postgres.schema import MENTIONED

# `sent` too: past status.give_up_after nothing will move it any more.
PURGEABLE = "('sent', 'delivered', 'failed', 'suppressed')"
# Retention: finished messages that reached their end (their last change) before $1,
# found through messages_created_at (created before it too).
# A `sent` text scheduled later has not reached its end: the provider holds it till its
# schedule_time (UTC text), its delivery report comes after (SQLite's purge too).
PURGE = (
    "DELETE FROM messages WHERE created_at < $1 AND updated_at < $1"
    f" AND state IN {PURGEABLE} AND (state <> 'sent' OR schedule_time IS NULL"
    " OR schedule_time < to_char(to_timestamp($1) AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS'))"
    " RETURNING id"
)
# bridge.store.totals: rows of connections no longer in pg_stat_activity, into slot 0.
# Sessions of this database only: a slot is the pid of a connection to it, and a session
# of another database on the same server (another bridge cluster's, anything) that got
# a gone connection's pid again kept its rows unfolded for as long as it lived.
TAKE_TOTALS_LOCK = f"SELECT pg_advisory_xact_lock({TOTALS_LOCK})"
LIVE_SESSIONS = (
    "SELECT pid FROM pg_stat_activity WHERE pid IS NOT NULL AND datname = current_database()"
)
FOLD_TOTALS = (
    "WITH gone AS (DELETE FROM message_totals WHERE ctid IN (SELECT ctid FROM message_totals"
    f" WHERE slot <> 0 AND slot NOT IN ({LIVE_SESSIONS})"
    " FOR UPDATE SKIP LOCKED) RETURNING source, state, reason_kind, sent, n, parts, cost_micros)"
    " INSERT INTO message_totals AS t SELECT 0, source, state, reason_kind, sent, sum(n),"
    " sum(parts), sum(cost_micros) FROM gone GROUP BY source, state, reason_kind, sent"
    " ON CONFLICT (slot, source, state, reason_kind, sent) DO UPDATE"
    " SET n = t.n + excluded.n, parts = t.parts + excluded.parts,"
    " cost_micros = t.cost_micros + excluded.cost_micros"
)
# A message's page: the suppressed messages whose reason names it (messages_mentions).
MENTIONED_BY = (
    "SELECT id, recipient, reason, created_at FROM messages"
    f" WHERE state = 'suppressed' AND {MENTIONED} = $1"
    " AND (reason LIKE $2 OR reason LIKE $3)"
    # A loop's reason quotes the mail's Auto-Submitted value: anyone's words.
    " AND coalesce(reason_kind, '') <> 'loop'"
    " ORDER BY id LIMIT $4"
)
# Through messages_failed (version 7), newest failure first.
RECENT_FAILURES = (
    f"SELECT * FROM messages WHERE {totals.FAILED_NOT_CANCELLED}"
    " ORDER BY updated_at DESC, id DESC LIMIT $1"
)
SEARCHABLE = ("state", "reason_kind", "route", "source")  # exact-match filters of `query`
# Today's use: sent since the day began ($1), or in flight (another instance's call
# under way spends the same budget), whenever claimed: its send is stamped when it is
# answered, today. Its lease bounds how long a row stays `sending`.
SPENT = "(sent_at >= $1 OR state = 'sending')"
# What the cost cap counts besides, and how often (SQLite's RESENT and BILLED): the
# attempts of an unknown outcome that was sent again, by its latest claim.
RESENT = "(unknown_resends > 0 AND claimed_at >= $1)"
BILLED = (
    "(CASE WHEN sent_at >= $1 OR state = 'sending' THEN 1 ELSE 0 END"
    " + CASE WHEN claimed_at >= $1 THEN unknown_resends ELSE 0 END)"
)

# Texts waiting for the next day's caps ($1: now) whose reason holds $2: what a release
# changes, looked for by a read before the write. The UPDATE's own WHERE, not an
# `id IN (...)`: a row claimed meanwhile is checked again there (READ COMMITTED), and left.
BUDGET_HELD = (
    "state = 'queued' AND next_attempt_at > $1"
    " AND reason_kind = 'budget' AND strpos(coalesce(reason, ''), $2) > 0"
)

# SQLite's RECORD_BILLED: 0 holds the most any part was billed, raised by a higher
# bill, replaced by any once it is $4 (`pricing.BILLED_MAX_FOR`) old.
_REPLACES = (
    "(b.country_code <> 0 OR excluded.price >= b.price OR b.billed_at <= excluded.billed_at - $4)"
)
RECORD_BILLED = (
    "INSERT INTO billed_prices AS b (country_code, price, billed_at)"
    " SELECT code, price, $3 FROM unnest($1::int[], $2::float8[]) AS bill(code, price)"
    " ON CONFLICT (country_code) DO UPDATE SET"
    f" billed_at = CASE WHEN {_REPLACES} THEN excluded.billed_at ELSE b.billed_at END,"
    f" price = CASE WHEN {_REPLACES} THEN excluded.price ELSE b.price END"
)


def _ids(ids: Sequence[int]) -> list[int]:
    return [i for i in ids if 0 < i <= MAX_ROW_ID]  # beyond bigint: no such row


def _like_escape(value: str) -> str:
    """`value` as a literal inside an ILIKE pattern (PostgreSQL's default escape `\\`)."""
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class QueryOps(Base):
    async def get(self, message_id: int) -> Message | None:
        if not 0 < message_id <= MAX_ROW_ID:
            return None
        found = await self._messages("SELECT * FROM messages WHERE id = $1", message_id)
        return found[0] if found else None

    async def in_state(self, ids: Sequence[int], state: str) -> set[int]:
        rows = await self._fetch(
            "SELECT id FROM messages WHERE id = ANY($1::bigint[]) AND state = $2", _ids(ids), state
        )
        return {int(r[0]) for r in rows}

    async def events(self, message_id: int) -> list[dict[str, Any]]:
        if not 0 < message_id <= MAX_ROW_ID:
            return []
        return [
            dict(r)
            for r in await self._fetch(
                "SELECT at, state, attempts, detail FROM events WHERE message_id = $1 ORDER BY id",
                message_id,
            )
        ]

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
        sql, args = "SELECT * FROM messages WHERE true", list[Any]()
        if reason_kind == OTHER_REASON:
            sql, reason_kind = f"{sql} AND {totals.OTHER_REASON_SQL}", None
        if number:
            args.append(number)
            sql += f" AND recipient = ${len(args)}"
        for column, value in zip(SEARCHABLE, (state, reason_kind, route, source), strict=True):
            if value:
                args.append(value)
                sql += f" AND {column} = ${len(args)}"  # column names from SEARCHABLE only
        for column, value in (("recipient", recipient), ("text", text)):
            if value:
                args.append("%" + _like_escape(value) + "%")
                sql += f" AND {column} ILIKE ${len(args)}"
        if since is not None:
            args.append(since)
            sql += f" AND created_at >= ${len(args)}"
        if not_reason_kind:
            args.append(not_reason_kind)
            sql += f" AND coalesce(reason_kind, '') <> ${len(args)}"
        order = "id DESC"
        if number:  # messages_recipient's own order, as on SQLite (CURSOR_TIME there)
            if before_id and before_id <= MAX_ROW_ID:
                args.append(before_id)
                at = f"coalesce((SELECT created_at FROM messages WHERE id = ${len(args)}), 'Infinity')"
                sql += f" AND (created_at, id) < ({at}, ${len(args)})"
            order = "created_at DESC, id DESC"
        elif before_id and before_id <= MAX_ROW_ID:
            args.append(before_id)
            sql += f" AND id < ${len(args)}"
        args.append(limit)
        return await self._messages(sql + f" ORDER BY {order} LIMIT ${len(args)}", *args)

    async def recent_failures(self, limit: int) -> list[Message]:
        return await self._messages(RECENT_FAILURES, limit)

    async def counts(self) -> dict[str, int]:
        return {r[0]: int(r[1]) for r in await self._fetch(totals.BY_STATE)}

    async def counts_by_reason(self) -> dict[str, dict[str, int]]:
        return totals.reasons(await self._fetch(totals.BY_REASON))

    async def counts_for_metrics(self) -> MetricCounts:
        async with self.db.connection() as c:
            by_source = await c.fetch(totals.BY_SOURCE_STATE)
            by_reason = await c.fetch(totals.BY_REASON)
            oldest = await c.fetchval(totals.OLDEST_DUE)
            sent = await one(c, totals.SENT)
        return totals.metric_counts(by_source, by_reason, oldest, sent)

    async def spent_since(
        self, since: float, exclude_source: str
    ) -> tuple[float, list[tuple[str, int]]]:
        where = f"WHERE ({SPENT} OR {RESENT}) AND source <> $2"
        async with self.db.connection() as c:
            known = await c.fetchval(
                f"SELECT coalesce(sum(coalesce(cost, estimated_cost) * {BILLED}), 0)"
                f" FROM messages {where}",
                since,
                exclude_source,
            )
            unknown = await c.fetch(
                f"SELECT recipient, sum(parts * {BILLED}) FROM messages {where}"
                " AND cost IS NULL AND estimated_cost IS NULL GROUP BY recipient",
                since,
                exclude_source,
            )
        return float(known), [(r, int(p)) for r, p in unknown if p]

    async def billed_prices(self) -> dict[int, tuple[float, float]]:
        rows = await self._fetch("SELECT country_code, price, billed_at FROM billed_prices")
        return {int(code): (float(price), float(at)) for code, price, at in rows}

    async def record_billed(self, prices: Mapping[int, float], now: float) -> None:
        await self._execute(RECORD_BILLED, list(prices), list(prices.values()), now, BILLED_MAX_FOR)

    async def used_since(
        self,
        since: float,
        exclude_source: str,
        route: str | None = None,
        *,
        token: str | None = None,
    ) -> tuple[int, int]:
        row = (
            await self._fetch(
                # Every attempt's parts, as SQLite's `used_since` says.
                f"SELECT count(*) FILTER (WHERE {SPENT}), coalesce(sum(parts * {BILLED}), 0)"
                f" FROM messages WHERE ({SPENT} OR {RESENT}) AND source <> $2"
                " AND ($3::text IS NULL OR route = $3)"
                " AND ($4::text IS NULL OR token = $4)",
                since,
                exclude_source,
                route,
                token,
            )
        )[0]
        return int(row[0]), int(row[1])

    async def retry(
        self, ids: Sequence[int] | None, now: float, *, by: str | None = None
    ) -> list[int]:
        reason = f"retried by {by}" if by else "retried by the operator"
        async with self._write() as conn:
            changed = {
                int(r[0])
                for r in await conn.fetch(
                    "UPDATE messages SET state = 'queued', next_attempt_at = $1, updated_at = $1,"
                    " due_at = $1, reason = $2, reason_kind = NULL, solo = true"
                    " WHERE state = 'failed'"
                    " AND ($3::bigint[] IS NULL OR id = ANY($3::bigint[])) RETURNING id",
                    now,
                    reason,
                    None if ids is None else _ids(ids),
                )
            }
            if changed:
                await self._notify_work(conn)
        order = sorted(changed) if ids is None else [i for i in dict.fromkeys(ids) if i in changed]
        return order

    async def cancel(self, ids: Sequence[int], now: float, *, by: str) -> list[int]:
        async with self._write() as conn:
            changed = {
                int(r[0])
                for r in await conn.fetch(
                    "UPDATE messages SET state = 'failed', reason = $1, reason_kind = 'cancelled',"
                    " updated_at = $2 WHERE id = ANY($3::bigint[]) AND state IN ('queued', 'held')"
                    " RETURNING id",
                    f"cancelled by {by}",
                    now,
                    _ids(ids),
                )
            }
        return sorted(changed)

    async def release_budget_holds(
        self, now: float, detail: str, *, waiting_for: str = ""
    ) -> list[int]:
        """Looked for first by a read (SQLite's too): with nothing waiting, the usual
        case, no transaction is written. With a cost cap the dispatcher asks every
        minute, and each ask was a write transaction that changed nothing (no WAL: no
        row, no xid; but BEGIN, the UPDATE and its statement trigger, COMMIT)."""
        waiting = f"SELECT EXISTS (SELECT 1 FROM messages WHERE {BUDGET_HELD})"
        if not await self._fetchval(waiting, now, waiting_for):
            return []
        async with self._write() as conn:
            changed = sorted(  # again: what the read saw may have gone since
                int(r[0])
                for r in await conn.fetch(
                    "UPDATE messages SET next_attempt_at = $1, updated_at = $1, due_at = $1"
                    f" WHERE {BUDGET_HELD} RETURNING id",
                    now,
                    waiting_for,
                )
            )
            if changed:
                await conn.execute(
                    "INSERT INTO events (message_id, at, state, attempts, detail)"
                    " SELECT id, $1, state, attempts, $2 FROM messages"
                    " WHERE id = ANY($3::bigint[]) ORDER BY id",
                    now,
                    detail,
                    changed,
                )
                await self._notify_work(conn)
        return changed

    async def note(self, ids: Sequence[int], detail: str, now: float) -> None:
        await self._execute(
            "INSERT INTO events (message_id, at, state, attempts, detail)"
            " SELECT id, $1, state, attempts, $2 FROM messages WHERE id = ANY($3::bigint[])"
            " ORDER BY id",
            now,
            detail,
            _ids(ids),
        )

    async def activity(self, since: float, bucket: float) -> dict[str, dict[int, int]]:
        out: dict[str, dict[int, int]] = {"messages": {}}
        async with self.db.connection() as c:
            for index, kind, count in await c.fetch(
                "SELECT trunc((at - $1) / $2)::int, kind, count(*) FROM provider_requests"
                " WHERE at >= $1 GROUP BY 1, 2",
                since,
                bucket,
            ):
                out.setdefault(kind, {})[index] = int(count)
            for index, count in await c.fetch(
                "SELECT trunc((sent_at - $1) / $2)::int, count(*) FROM messages"
                " WHERE sent_at >= $1 GROUP BY 1",
                since,
                bucket,
            ):
                out["messages"][index] = int(count)
        return out

    async def overview(self, *, now: float, day_start: float, since: float) -> dict[str, Any]:
        async with self.db.connection() as c:
            queue = await one(
                c,
                "SELECT min(due_at), count(*),"
                " count(*) FILTER (WHERE next_attempt_at <= $1),"
                " min(next_attempt_at) FILTER (WHERE next_attempt_at > $1)"
                " FROM messages WHERE state = 'queued'",
                now,
            )
            answers = {
                s: int(n)
                for s, n in await c.fetch(
                    "SELECT state, count(*) FROM messages WHERE created_at >= $1"
                    " AND state IN ('sent', 'delivered', 'failed')"
                    " AND NOT (state = 'failed' AND coalesce(reason_kind, '') = 'cancelled')"
                    " GROUP BY state",
                    since,
                )
            }
            day = await one(
                c,
                "SELECT count(*), coalesce(sum(parts), 0), sum(cost), sum(estimated_cost),"
                " count(*) FILTER (WHERE source = 'budget'),"
                # The estimates of the texts the provider has not priced yet.
                " sum(estimated_cost) FILTER (WHERE cost IS NULL)"
                f" FROM messages WHERE {SPENT}",  # in flight too, as the caps count
                day_start,
            )
            by: dict[str, dict[str, int]] = {}
            for column in ("route", "token"):  # texts sent today per route and API token
                rows = await c.fetch(
                    f"SELECT {column}, count(*) FROM messages WHERE {SPENT}"
                    f" AND {column} IS NOT NULL AND source <> 'budget' GROUP BY {column}",
                    day_start,
                )
                by[column] = {name: int(n) for name, n in rows}
        return {
            "queue": {
                "oldest_due_at": queue[0],
                "queued": int(queue[1]),
                "due": int(queue[2]),
                "next_retry_at": queue[3],
            },
            "answers": answers,
            "today": {
                "texts": int(day[0]) - int(day[4]),
                # As the caps count them: each attempt of a text sent again, the warnings'
                # parts left out.
                "parts": (await self.used_since(day_start, "budget"))[1],
                "cost": day[2],
                # As the cost cap counts it: each attempt of a text sent again.
                "counted_cost": (await self.spent_since(day_start, "budget"))[0],
                "estimated_cost": day[3],
                "unpriced_estimated_cost": day[5],
                "warnings": int(day[4]),
                "routes": by["route"],
                "tokens": by["token"],
            },
        }

    async def held_storms(self) -> list[dict[str, Any]]:
        return [
            {"recipient": r[0], "held": int(r[1]), "first_at": r[2]}
            for r in await self._fetch(
                "SELECT recipient, count(*), min(created_at) FROM messages"
                " WHERE state = 'held' GROUP BY recipient ORDER BY 3"
            )
        ]

    async def queued_piles(self, scan: int, minimum: int) -> list[dict[str, Any]]:
        return [
            {"recipient": r[0], "queued": int(r[1])}
            for r in await self._fetch(
                "SELECT recipient, count(*) FROM (SELECT recipient FROM messages"
                " WHERE state = 'queued' ORDER BY next_attempt_at, id LIMIT $1) AS due"
                " GROUP BY recipient HAVING count(*) >= $2 ORDER BY 2 DESC, 1",
                scan,
                minimum,
            )
        ]

    async def route_last_messages(self, routes: Sequence[str]) -> dict[str, dict[str, Any]]:
        return {
            r["route"]: dict(r)
            for r in await self._fetch(
                "SELECT m.route, m.id, m.state, m.created_at FROM unnest($1::text[]) AS r(name)"
                " CROSS JOIN LATERAL (SELECT route, id, state, created_at FROM messages"
                " WHERE route = r.name ORDER BY id DESC LIMIT 1) AS m",
                list(routes),
            )
        }

    async def mentioned_by(self, message_id: int, limit: int = 200) -> list[dict[str, Any]]:
        if not 0 < message_id <= MAX_ROW_ID:
            return []
        return [
            dict(r)
            for r in await self._fetch(
                MENTIONED_BY,
                message_id,
                f"% message {message_id} %",
                f"% message {message_id}",
                limit,
            )
        ]

    async def purge(self, before: float) -> int:
        """Retention: finished messages created before `before`, with their events."""
        async with self._write() as conn:
            doomed = [int(r[0]) for r in await conn.fetch(PURGE, before)]
            await conn.execute("DELETE FROM events WHERE message_id = ANY($1::bigint[])", doomed)
        return len(doomed)

    async def upkeep(self) -> None:
        await self.fold_totals()

    async def fold_totals(self) -> None:
        """Move the running totals of server connections that are gone into slot 0,
        so that the rows read at each scrape stay a few per live connection. Skips rows
        a live writer holds (never waits for one); one fold at a time (slot 0's rows
        would otherwise be upserted by two in any order)."""
        async with self._write() as conn:
            await conn.execute(TAKE_TOTALS_LOCK)
            await conn.execute(FOLD_TOTALS)
