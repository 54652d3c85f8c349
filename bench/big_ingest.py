"""Time `Store.ingest` of 10,000 distinct messages in-process on a fresh SQLite store (run
by hand, before and after a change that adds a write per ingest: BENCHMARKS.md, "A store
after months of traffic"). Messages are stored as given (no policy questions), so the
figure is the store's own: the inserts, their triggers and the commits.

    PYTHONPATH=SOURCE_TREE python bench/big_ingest.py [--calls 1|100|10000]

--calls: how many `ingest` calls share the 10,000 (one call of 10,000; 100 of 100;
10,000 of one, run concurrently so that group commit batches them). --route: every
message came by a route (indexed by route since SQLite 0009). --lifecycle: time instead
the state changes that follow, in batches of 100 as the dispatcher makes them: claim,
mark_sent, record_status (delivered). --postgres URL: on a fresh database of that
server instead (created, migrated, dropped; the URL's database must allow CREATE
DATABASE). Best of 3.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg

from bridge.models import NewMessage, State
from bridge.store.api import Store
from bridge.store.postgres.store import PostgresStore
from bridge.store.sqlite import SqliteStore
from tests.stores import AS_GIVEN

COUNT = 10_000
# AS_GIVEN stores messages as given: one decider for every call, as the bridge's ingress
# has one (bridge.ingress.ingest); the store decides consecutive calls with one decider
# together, one INSERT for a group (a decider per call would insert per call).


@contextlib.asynccontextmanager
async def fresh_store(postgres: str | None) -> AsyncIterator[Store]:
    if postgres is None:
        with tempfile.TemporaryDirectory() as tmp:
            yield SqliteStore(Path(tmp) / "s.db")
        return
    name = f"sms_bench_ingest_{os.getpid()}"
    admin = await asyncpg.connect(postgres)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
        url = postgres.rsplit("/", 1)[0] + f"/{name}"
        migrating = PostgresStore(url, migrating=True)
        await migrating.open()
        await migrating.migrate()
        await migrating.close()
        yield PostgresStore(url)
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


async def once(calls: int, route: str | None, lifecycle: bool, postgres: str | None) -> float:
    async with fresh_store(postgres) as store:
        await store.open()
        try:
            messages = [
                NewMessage(f"+1202555{i % 5000:04d}", f"alert {i}", "http", "SMS", 1, 1, route)
                for i in range(COUNT)
            ]
            per = COUNT // calls
            batches = [
                [(m, 1.0 + i) for i, m in enumerate(messages[s : s + per])]
                for s in range(0, COUNT, per)
            ]
            if lifecycle:
                ids = [s.id for b in batches for s in await store.ingest(b, AS_GIVEN)]
                return await _lifecycle(store, ids)
            started = time.perf_counter()
            if calls <= 100:
                for batch in batches:
                    await store.ingest(batch, AS_GIVEN)
            else:
                await asyncio.gather(*(store.ingest(b, AS_GIVEN) for b in batches))
            return time.perf_counter() - started
        finally:
            await store.close()


async def _lifecycle(store: Store, ids: list[int]) -> float:
    started = time.perf_counter()
    for s in range(0, len(ids), 100):
        batch = ids[s : s + 100]
        await store.claim(batch, 2.0, owner="bench", lease_until=1e12)
        await store.mark_sent([(i, f"p{i}", 0.05) for i in batch], 3.0, owner="bench")
        await store.record_status([(i, State.DELIVERED, None) for i in batch], 4.0)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1, choices=(1, 100, 10_000))
    parser.add_argument("--route", action="store_true")
    parser.add_argument("--lifecycle", action="store_true")
    parser.add_argument("--postgres", help="URL of a database on a PostgreSQL server")
    args = parser.parse_args()
    route = "am" if args.route else None
    best = min(
        asyncio.run(once(args.calls, route, args.lifecycle, args.postgres)) for _ in range(3)
    )
    what = "claim, mark_sent, record_status of" if args.lifecycle else "ingest"
    print(
        f"{what} {COUNT} messages in {args.calls} calls{' (route)' if route else ''}:"
        f" {best * 1000:.0f} ms (best of 3)"
    )


if __name__ == "__main__":
    main()
