"""Loading a whole store into an empty PostgreSQL database (`sms-bridge store copy`).

One transaction: the target holds every row or none. Rows go in with COPY, ids as
they were (COPY writes identity columns as given), and each identity sequence is then
moved past the highest id, so that the first message a `serve` ingests afterwards gets
a new number, not one the copy used; the messages' sequence past the highest id the
source ever gave, too (retention may have purged its newest: a caller holds that id). The insert trigger logs an event for every message
COPY writes; those are deleted and the source's own history loaded in their place (the
target's events were empty, or emptied by `replace`), so `/api/v1/messages/{id}` shows
the same events, with the same times, as before.

Messages that were `sending` when the source stopped keep that state with no owner and
no lease: the first instance to look takes them over and checks the provider's `/logs`
before any resend, exactly as after a crash.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any, Protocol

import asyncpg

from bridge.errors import StoreUnavailable
from bridge.store.postgres.base import TOTALS_LOCK, one
from bridge.store.postgres.pool import Conn, Database
from bridge.store.postgres.rate import KEY, PAUSE, TAKE_RATE_LOCK
from bridge.store.postgres.schema import REBUILD_TOTALS, RECOUNT_STORED

CHUNK = 5000  # rows per COPY
DATA_TABLES = ("messages", "events", "provider_requests")
# The target is not empty if any of these holds a row.
OCCUPIED = (
    "SELECT (SELECT count(*) FROM messages), (SELECT count(*) FROM events),"
    " (SELECT count(*) FROM provider_requests)"
)
COLUMN_TYPES = (
    "SELECT column_name, data_type FROM information_schema.columns"
    " WHERE table_schema = current_schema() AND table_name = $1"
)
# Where a table's id sequence stands (null if it never gave one). `--replace` empties
# the tables but not their sequences: a cluster that gave higher ids than the source's
# meanwhile had them handed out again after the copy, had the sequence been set back.
SEQUENCE_AT = (
    "(SELECT last_value FROM pg_sequences WHERE format('%I.%I', schemaname, sequencename)"
    "::regclass = pg_get_serial_sequence({table}, 'id')::regclass)"
)
_MESSAGES_AT = SEQUENCE_AT.format(table="'messages'")
# Each sequence past the highest copied id and never back.
ADVANCE = (
    "SELECT setval(pg_get_serial_sequence($1, 'id'), greatest(m, {at}), true)"
    " FROM (SELECT max(id) AS m FROM {table}) AS top WHERE m IS NOT NULL"
)
# The source's highest message id ever given (SQLite's message_ids), when above every
# copied one and where the sequence stands: ids its callers hold for messages since
# purged are not given again.
CARRY_IDS = (
    "SELECT setval(pg_get_serial_sequence('messages', 'id'), $1::bigint, true)"
    " WHERE $1::bigint > greatest((SELECT coalesce(max(id), 0) FROM messages),"
    f" {_MESSAGES_AT})"
)
# The highest message id given, copied or not: the next ingest gets a higher one.
TOP_ID = f"SELECT greatest((SELECT coalesce(max(id), 0) FROM messages), {_MESSAGES_AT})"


class Rows(Protocol):
    """A table to load (`bridge.store.sqlite.export.Table` is one)."""

    @property
    def name(self) -> str: ...
    @property
    def columns(self) -> tuple[str, ...]: ...
    @property
    def rows(self) -> Iterator[tuple[Any, ...]]: ...


@dataclass(frozen=True, slots=True)
class Loaded:
    counts: dict[str, int]  # rows per table
    top_id: int  # the highest message id given; the next ingest gets a higher one


class TargetNotEmpty(StoreUnavailable):
    """The target already holds data and `replace` was not asked for."""


# Bridges serving the target: each keeps a session of this name (`AdvisoryLeadership`),
# whether it leads or waits to. A copy never does.
SERVING = (
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
    " AND application_name LIKE 'sms-bridge leader %'"
)


def _chunks(rows: Iterable[tuple[Any, ...]]) -> Iterator[list[tuple[Any, ...]]]:
    it = iter(rows)
    while chunk := list(islice(it, CHUNK)):
        yield chunk


def _boolean(value: Any) -> bool | None:
    return None if value is None else bool(value)


def _text(value: Any) -> Any:
    """NUL shown as U+FFFD: SQLite's text holds it, PostgreSQL's cannot, and one NUL (a
    provider's words an older bridge stored as they came) failed the whole copy."""
    return value.replace("\x00", "\ufffd") if isinstance(value, str) else value


_CONVERTERS = {"boolean": _boolean, "text": _text}


async def _converters(conn: Conn, table: Rows) -> list[Any]:
    """Per column, how a source value becomes the target's (SQLite 0/1 -> boolean, NUL
    out of text); a source column the target lacks is refused, never dropped."""
    types = {r[0]: r[1] for r in await conn.fetch(COLUMN_TYPES, table.name)}
    if unknown := [c for c in table.columns if c not in types]:
        raise StoreUnavailable(
            f"the target's {table.name} has no column {', '.join(unknown)}: run"
            " `sms-bridge migrate` with the release that wrote the source"
        )
    return [_CONVERTERS.get(types[c]) for c in table.columns]


async def _copy(conn: Conn, table: Rows) -> int:
    convert = await _converters(conn, table)
    copied = 0
    for chunk in _chunks(table.rows):
        if any(convert):
            chunk = [
                tuple(f(v) if f else v for f, v in zip(convert, row, strict=True)) for row in chunk
            ]
        await conn.copy_records_to_table(table.name, records=chunk, columns=list(table.columns))
        copied += len(chunk)
    return copied


async def _pause(conn: Conn, table: Rows) -> int:
    """The source's pause (SQLite's one rate_pause row: until, reason) as the cluster's,
    under the rate lock as any pause (`rate.PAUSE`: a later one in the target stays)."""
    rows = [dict(zip(table.columns, row, strict=True)) for row in table.rows]
    await conn.execute(TAKE_RATE_LOCK)
    for row in rows:
        await conn.execute(PAUSE, KEY, float(row["until"]), row["reason"])
    return len(rows)


async def load(db: Database, tables: Sequence[Rows], *, replace: bool = False) -> Loaded:
    """Copy `tables` (messages first) into the database in one transaction.

    TargetNotEmpty if it holds messages, events or bookings, unless `replace`: then
    those are deleted first, in the same transaction.
    """
    try:
        return await _load(db, tables, replace)
    except asyncpg.PostgresError as exc:  # a refused statement (rights, a constraint)
        raise StoreUnavailable(f"copy failed, nothing copied: {exc}") from exc


async def _load(db: Database, tables: Sequence[Rows], replace: bool) -> Loaded:
    async with db.transaction() as conn:
        # No instance may write while the copy runs (it would take ids the copy is
        # about to use): they wait for the commit, then find the sequences moved on.
        await conn.execute(f"LOCK TABLE {', '.join(DATA_TABLES)} IN EXCLUSIVE MODE")
        # and no instance's hourly fold may write slot 0 while the totals are replaced
        await conn.execute(f"SELECT pg_advisory_xact_lock({TOTALS_LOCK})")
        held = dict(zip(DATA_TABLES, await one(conn, OCCUPIED), strict=True))
        if any(held.values()) and not replace:
            listed = ", ".join(f"{n} {t}" for t, n in held.items() if n)
            raise TargetNotEmpty(
                f"the target already holds data ({listed}): copy into an empty database,"
                " or pass --replace to delete it first"
            )
        if any(held.values()):
            if serving := await conn.fetchval(SERVING):
                # Their queue is texts they acknowledged: deleted under them, lost.
                raise TargetNotEmpty(
                    f"{serving} bridge instance(s) serve the target: stop them first;"
                    " --replace deletes the messages they took and have not sent yet"
                )
            await conn.execute(f"TRUNCATE {', '.join(DATA_TABLES)}")
        # The source's bills priced its sends: the target's prices go whether the source
        # brings any or not (a store before SQLite 0014 kept none: the target's stayed,
        # pricing the copied store's cost cap by another store's bills).
        await conn.execute("DELETE FROM billed_prices")
        counts = {}
        brings_totals = any(table.name == "message_totals" for table in tables)
        given = 0
        for table in tables:
            if table.name == "rate_pause":
                counts[table.name] = await _pause(conn, table)
                continue
            if table.name == "message_ids":  # one row: (1, last)
                last = table.columns.index("last")
                given = max([given, *(int(row[last]) for row in table.rows)])
                continue
            if table.name == "message_totals":  # after messages: what the trigger
                await conn.execute("DELETE FROM message_totals")  # counted of the copy goes
            counts[table.name] = await _copy(conn, table)
            if table.name == "messages":  # the trigger's events: the source's replace them
                await conn.execute("DELETE FROM events")
        # The stored messages counted from the copied rows, once; what was sent from the
        # source's totals when it brings them (slot 0: what it sent before its retention
        # purged it too), else from the rows as well.
        await conn.execute(RECOUNT_STORED if brings_totals else REBUILD_TOTALS)
        for name in DATA_TABLES:
            at = SEQUENCE_AT.format(table="$1")
            await conn.execute(ADVANCE.format(table=name, at=at), name)
        await conn.execute(CARRY_IDS, given)
        top = await conn.fetchval(TOP_ID)
    return Loaded(counts, max(int(top), given))
