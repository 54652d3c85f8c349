"""Which PostgreSQL driver for the store: psycopg 3 (+ psycopg_pool) against asyncpg, on the
bridge's hot shapes, alternating rounds in one run, medians.

Run by hand against a server you own (it creates and drops its own tables):

    createdb -h 127.0.0.1 -U postgres sms_bench
    python bench/pg_driver.py --dsn postgresql://postgres@127.0.0.1/sms_bench

Shapes (each one transaction, as the store will run them):
- ingest: take a transaction-scoped advisory lock per dedupe key (sorted, so two
  instances cannot deadlock), look every key up in the dedupe window in one statement,
  insert the batch's messages in one multi-row statement (unnest of arrays); an AFTER
  INSERT trigger writes one event row per message. `--batch` recipients per ingest (an
  alert to a rota), a fifth of the keys repeat an earlier ingest's (found by the lookup).
- claim: `UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED LIMIT n) RETURNING`
  with an owner and a lease, then the rows back to done (a dispatcher's claim + finish).
- floor: `BEGIN; SELECT 1; COMMIT` - the driver's own cost per transaction, no fsync.

`--tasks` coroutines share a pool of `--pool` connections; each round runs one driver
for `--duration` seconds, then the other; the ratio psycopg / asyncpg is per round pair.
Besides throughput (bounded by the server and the neighbours on a shared machine), the
bench reports this process's CPU time per operation: the driver's cost on the bridge's
event loop, which is what the bridge's ingest is short of (see the HTTP ingest figures).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import statistics
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import psycopg
import psycopg_pool
import uvloop

SCHEMA = """
DROP TABLE IF EXISTS bench_events, bench_messages;
CREATE TABLE bench_messages (
    id bigserial PRIMARY KEY, recipient text NOT NULL, text text NOT NULL,
    dedupe_key text, state text NOT NULL, created_at double precision NOT NULL,
    next_attempt_at double precision NOT NULL, claimed_by text, lease_until double precision,
    attempts integer NOT NULL DEFAULT 0);
CREATE INDEX bench_due ON bench_messages (state, next_attempt_at, id);
CREATE INDEX bench_dedupe ON bench_messages (dedupe_key, recipient, created_at)
    WHERE dedupe_key IS NOT NULL;
CREATE TABLE bench_events (id bigserial PRIMARY KEY, message_id bigint NOT NULL,
    at double precision NOT NULL, state text NOT NULL);
CREATE OR REPLACE FUNCTION bench_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO bench_events (message_id, at, state) VALUES (NEW.id, NEW.created_at, NEW.state);
    RETURN NULL;
END $$;
CREATE TRIGGER bench_insert_event AFTER INSERT ON bench_messages
    FOR EACH ROW EXECUTE FUNCTION bench_event();
CREATE TRIGGER bench_state_event AFTER UPDATE OF state ON bench_messages
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state) EXECUTE FUNCTION bench_event();
"""

LOCK = (
    "SELECT count(pg_advisory_xact_lock(h)) FROM"
    " (SELECT DISTINCT hashtextextended(k, 0) AS h FROM unnest({k}::text[]) AS k ORDER BY 1) s"
)
LOOKUP = (
    "SELECT w.i, (SELECT m.id FROM bench_messages m WHERE m.dedupe_key = w.k"
    " AND m.recipient = w.r AND m.created_at >= {since} ORDER BY m.created_at LIMIT 1)"
    " FROM unnest({k}::text[], {r}::text[]) WITH ORDINALITY AS w(k, r, i)"
)
INSERT = (
    "INSERT INTO bench_messages (recipient, text, dedupe_key, state, created_at, next_attempt_at)"
    " SELECT r, t, k, s, {now}::float8, {now}::float8"
    " FROM unnest({r}::text[], {t}::text[], {k}::text[], {s}::text[]) AS x(r, t, k, s)"
    " RETURNING id"
)
CLAIM = (
    "UPDATE bench_messages SET state = 'sending', claimed_by = {me}, lease_until = {lease}::float8,"
    " attempts = attempts + 1 WHERE id IN (SELECT id FROM bench_messages"
    " WHERE state = 'queued' AND next_attempt_at <= {now} ORDER BY next_attempt_at, id"
    " LIMIT {n} FOR UPDATE SKIP LOCKED) RETURNING id, recipient, text"
)
FINISH = "UPDATE bench_messages SET state = 'sent', claimed_by = NULL WHERE id = ANY({ids})"


def asyncpg_sql(sql: str) -> str:
    seen: dict[str, str] = {}

    def mark(key: str) -> str:
        return seen.setdefault(key, f"${len(seen) + 1}")

    return sql.format_map(_Marks(mark))


def psycopg_sql(sql: str) -> str:
    return sql.format_map(_Marks(lambda key: f"%({key})s"))


class _Marks(dict[str, str]):
    def __init__(self, mark: Callable[[str], str]) -> None:
        super().__init__()
        self.mark = mark

    def __missing__(self, key: str) -> str:
        return self.mark(key)


class Workload:
    """What each ingest sends: fresh keys, a fifth of them repeating an earlier one."""

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.counter = itertools.count()
        self.rng = random.Random(7)

    def ingest(self) -> dict[str, Any]:
        n = next(self.counter)
        key = f"alert-{self.rng.randrange(n)}" if n and self.rng.random() < 0.2 else f"alert-{n}"
        recipients = [f"+4915100000{i:03d}" for i in range(self.batch)]
        return {
            "k": [key] * self.batch,
            "r": recipients,
            "t": [f"FIRING {key}: disk full on host-{n % 50}"] * self.batch,
            "now": time.time(),
            "since": time.time() - 300,
        }


def states(found: dict[int, Any], size: int) -> list[str]:
    return ["suppressed" if found.get(i + 1) else "queued" for i in range(size)]


# -- asyncpg ---------------------------------------------------------------------------
class Asyncpg:
    name = "asyncpg"

    async def open(self, dsn: str, size: int) -> None:
        self.pool = await asyncpg.create_pool(dsn, min_size=size, max_size=size)
        self.sql = {name: asyncpg_sql(sql) for name, sql in QUERIES.items()}

    async def close(self) -> None:
        await self.pool.close()

    async def ingest(self, w: dict[str, Any]) -> None:
        async with self.pool.acquire() as c, c.transaction():
            await c.fetchval(self.sql["lock"], w["k"])
            found = dict(await c.fetch(self.sql["lookup"], w["since"], w["k"], w["r"]))
            s = states(found, len(w["k"]))
            await c.fetch(self.sql["insert"], w["now"], w["r"], w["t"], w["k"], s)

    async def claim(self, me: str) -> int:
        now = time.time()
        async with self.pool.acquire() as c:
            async with c.transaction():
                rows = await c.fetch(self.sql["claim"], me, now + 30, now, 10)
            async with c.transaction():
                await c.execute(self.sql["finish"], [r[0] for r in rows])
        return len(rows)

    async def floor(self) -> None:
        async with self.pool.acquire() as c, c.transaction():
            await c.fetchval("SELECT 1")


# -- psycopg 3 -------------------------------------------------------------------------
class Psycopg:
    name = "psycopg"

    async def open(self, dsn: str, size: int) -> None:
        self.pool = psycopg_pool.AsyncConnectionPool(
            dsn, min_size=size, max_size=size, open=False, kwargs={"prepare_threshold": 0}
        )
        await self.pool.open(wait=True)
        self.sql = {name: psycopg_sql(sql) for name, sql in QUERIES.items()}

    async def close(self) -> None:
        await self.pool.close()

    async def ingest(self, w: dict[str, Any]) -> None:
        async with self.pool.connection() as c, c.transaction():
            await c.execute(self.sql["lock"], w)
            cur = await c.execute(self.sql["lookup"], w)
            found = dict(await cur.fetchall())
            s = states(found, len(w["k"]))
            await c.execute(self.sql["insert"], {**w, "s": s})

    async def claim(self, me: str) -> int:
        now = time.time()
        async with self.pool.connection() as c:
            async with c.transaction():
                cur = await c.execute(
                    self.sql["claim"], {"me": me, "lease": now + 30, "now": now, "n": 10}
                )
                rows = await cur.fetchall()
            async with c.transaction():
                await c.execute(self.sql["finish"], {"ids": [r[0] for r in rows]})
        return len(rows)

    async def floor(self) -> None:
        async with self.pool.connection() as c, c.transaction():
            await c.execute("SELECT 1")


QUERIES = {"lock": LOCK, "lookup": LOOKUP, "insert": INSERT, "claim": CLAIM, "finish": FINISH}


async def run_for(
    seconds: float, tasks: int, op: Callable[[], Awaitable[Any]]
) -> tuple[int, list[float]]:
    """`tasks` coroutines calling `op` until time is up: (completed, latencies in ms)."""
    stop = time.monotonic() + seconds
    latencies: list[float] = []

    async def worker() -> None:
        while time.monotonic() < stop:
            start = time.perf_counter()
            await op()
            latencies.append((time.perf_counter() - start) * 1000)

    await asyncio.gather(*(worker() for _ in range(tasks)))
    return len(latencies), latencies


async def fill_queue(dsn: str, n: int) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as c:
        await c.execute("TRUNCATE bench_messages, bench_events")
        await c.execute(
            "INSERT INTO bench_messages (recipient, text, state, created_at, next_attempt_at)"
            " SELECT '+49151' || g, 'text ' || g, 'queued', 0, 0 FROM generate_series(1, %s) g",
            (n,),
        )


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dsn", default="postgresql://postgres@127.0.0.1/sms_bench")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--tasks", type=int, default=32)
    p.add_argument("--pool", type=int, default=8)
    p.add_argument("--batch", type=int, default=3)
    args = p.parse_args()
    async with await psycopg.AsyncConnection.connect(args.dsn, autocommit=True) as c:
        await c.execute(SCHEMA)
    drivers = [Asyncpg(), Psycopg()]
    for d in drivers:
        await d.open(args.dsn, args.pool)
    print(f"uptime: {uptime()}")
    print(f"tasks {args.tasks}, pool {args.pool}, batch {args.batch}, {args.duration}s rounds")
    results: dict[tuple[str, str], list[float]] = {}
    p99: dict[tuple[str, str], list[float]] = {}
    cpu_per_op: dict[tuple[str, str], list[float]] = {}
    for round_no in range(args.rounds):
        order = drivers if round_no % 2 == 0 else drivers[::-1]
        for shape in ("floor", "ingest", "claim"):
            for d in order:
                if shape == "claim":
                    await fill_queue(args.dsn, 200_000)
                    me = f"bench-{d.name}"
                    op: Callable[[], Awaitable[Any]] = lambda d=d, me=me: d.claim(me)  # noqa: E731
                elif shape == "ingest":
                    work = Workload(args.batch)
                    op = lambda d=d, work=work: d.ingest(work.ingest())  # noqa: E731
                else:
                    op = d.floor
                cpu = time.process_time()
                done, lat = await run_for(args.duration, args.tasks, op)
                cpu_us = (time.process_time() - cpu) / max(done, 1) * 1e6
                cpu_per_op.setdefault((shape, d.name), []).append(cpu_us)
                rate = done / args.duration
                results.setdefault((shape, d.name), []).append(rate)
                lat.sort()
                p99.setdefault((shape, d.name), []).append(lat[int(len(lat) * 0.99)])
                print(
                    f"round {round_no} {shape:6} {d.name:8} {rate:8.0f}/s"
                    f" p50 {lat[len(lat) // 2]:6.2f} ms p99 {lat[int(len(lat) * 0.99)]:6.2f} ms"
                    f" client CPU {cpu_us:5.0f} us/op"
                )
    print(f"uptime: {uptime()}")
    print("\nshape   asyncpg/s (median)  psycopg/s (median)  psycopg/asyncpg per round (median)")
    for shape in ("floor", "ingest", "claim"):
        a, b = results[(shape, "asyncpg")], results[(shape, "psycopg")]
        ratios = [y / x for x, y in zip(a, b, strict=True)]
        print(
            f"{shape:6}  {statistics.median(a):10.0f}  {statistics.median(b):10.0f}"
            f"  {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
            f"  p99 ms {statistics.median(p99[(shape, 'asyncpg')]):.1f}"
            f" / {statistics.median(p99[(shape, 'psycopg')]):.1f}"
            f"  client CPU us/op {statistics.median(cpu_per_op[(shape, 'asyncpg')]):.0f}"
            f" / {statistics.median(cpu_per_op[(shape, 'psycopg')]):.0f}"
        )
    for d in drivers:
        await d.close()


if __name__ == "__main__":
    uvloop.run(main())
