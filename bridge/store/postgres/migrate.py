"""Applying the PostgreSQL migrations (`sms-bridge migrate`) and checking the schema
before `serve` runs on it.

`serve` never changes the schema: with several instances on one database, an instance
of a new release that upgraded it under instances of the old one would break them. The
operator runs `sms-bridge migrate` (once, from any machine) and then rolls the
instances; an instance refuses a schema that is missing, older or newer than its own,
and says which command fixes it.
"""

from __future__ import annotations

import contextlib
import logging
import urllib.parse
from collections.abc import AsyncIterator

import asyncpg

from bridge.errors import SchemaError
from bridge.store.postgres.pool import Conn, Database
from bridge.store.postgres.schema import (
    CREATE_VERSION_TABLE,
    LATEST,
    MIGRATIONS,
    READ_VERSION,
    RECORD_VERSION,
    TAKE_MIGRATION_LOCK,
    VERSION_TABLE_EXISTS,
    Migration,
)

log = logging.getLogger(__name__)


async def read_version(conn: Conn) -> int:
    """The schema version of the database on `conn`; 0 for a database never migrated."""
    if not await conn.fetchval(VERSION_TABLE_EXISTS):
        return 0
    return int(await conn.fetchval(READ_VERSION))


async def migrate(db: Database, *, target: int = LATEST) -> list[Migration]:
    """Apply every migration up to `target` that the database lacks; those applied.

    Each migration and its `schema_version` row commit together, under a transaction
    advisory lock: two `migrate` (or a `migrate` racing another) apply each step once.
    """
    if not 0 <= target <= LATEST:
        raise ValueError(f"no schema version {target}: this sms-bridge knows 1 to {LATEST}")
    applied: list[Migration] = []
    for migration in MIGRATIONS:
        if migration.version > target:
            break
        async with _permitted(db), db.transaction() as conn:
            await conn.execute(TAKE_MIGRATION_LOCK)
            await conn.execute(CREATE_VERSION_TABLE)
            current = await read_version(conn)
            if current > LATEST:
                raise _newer(db, current)
            if current >= migration.version:
                continue
            await conn.execute(migration.sql)
            await conn.execute(RECORD_VERSION, migration.version, migration.name)
        log.info("schema migrated to %d (%s) on %s", migration.version, migration.name, db.shown)
        applied.append(migration)
    return applied


async def check_schema(db: Database) -> int:
    """The schema version, if it is the one this bridge runs on; else SchemaError."""
    async with _permitted(db), db.connection() as conn:
        current = await read_version(conn)
    if current == LATEST:
        return current
    if current > LATEST:
        raise _newer(db, current)
    if current == 0:
        raise SchemaError(
            f"{db.shown} has no sms-bridge schema: run `sms-bridge migrate` with this"
            " config to create it"
        )
    raise SchemaError(
        f"{db.shown} has schema version {current}, this sms-bridge needs {LATEST}:"
        " run `sms-bridge migrate` with this config to upgrade it"
    )


async def check_not_newer(db: Database) -> int:
    """The schema version, unless it is newer than this bridge knows (SchemaError)."""
    async with _permitted(db), db.connection() as conn:
        current = await read_version(conn)
    if current > LATEST:
        raise _newer(db, current)
    return current


def _newer(db: Database, current: int) -> SchemaError:
    return SchemaError(
        f"{db.shown} has schema version {current}, newer than this sms-bridge knows"
        f" (up to {LATEST}): run a release that knows it; this one refuses to touch it"
    )


@contextlib.asynccontextmanager
async def _permitted(db: Database) -> AsyncIterator[None]:
    """A privilege the role of store.url lacks, as a SchemaError that says how to grant
    it: on PostgreSQL 15 and later only the database's owner may create tables in schema
    `public`, so `migrate` as a role that a plain `createdb` did not make the owner died
    in a traceback (`InsufficientPrivilegeError: permission denied for schema public`)."""
    try:
        yield
    except asyncpg.InsufficientPrivilegeError as exc:
        raise SchemaError(_denied(db, exc)) from exc


def _denied(db: Database, exc: asyncpg.InsufficientPrivilegeError) -> str:
    parts = urllib.parse.urlsplit(db.url)
    try:
        role = urllib.parse.unquote(parts.username or "") or "ROLE"
    except ValueError:
        role = "ROLE"
    database = parts.path.lstrip("/") or "DATABASE"
    why = (str(exc).strip() or type(exc).__name__).splitlines()[0]
    if "for schema " in why:
        return (
            f"{why}: store.url's role {role} may not create tables there (PostgreSQL 15"
            f" and later let only the database's owner): make it the owner, with"
            f" `createdb -O {role} {database}` or `ALTER DATABASE {database} OWNER TO {role}`"
        )
    return (
        f"{why}: store.url's role {role} may not use sms-bridge's tables, another role"
        f" created them: give store.url the role `migrate` ran as, or make {role} the"
        f" owner of the database and its tables"
    )
