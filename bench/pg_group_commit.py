"""Does group commit pay on PostgreSQL? The real `PostgresStore.ingest` with the real
policy (`bridge.policy.decide.Rules`), grouped (up to 4 transactions at once, waiting
calls share the next) against one transaction per call (8 at once, the whole pool),
alternating rounds in one run, medians.

Run by hand against a database you own (it is migrated and emptied between rounds):

    createdb -h 127.0.0.1 -U postgres sms_bench
    python bench/pg_group_commit.py --dsn postgresql://postgres@127.0.0.1/sms_bench
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import subprocess
import sys
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bridge.models import NewMessage
from bridge.policy.decide import Rules
from bridge.store.postgres.migrate import migrate
from bridge.store.postgres.store import PostgresStore

RULES = Rules(dedupe_window=600.0, per_recipient=0, per_recipient_window=600.0)
MODES = {"grouped": (4, 512), "per-call": (8, 1)}  # (transactions at once, calls per one)


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


async def one_round(dsn: str, mode: str, seconds: float, clients: int) -> tuple[float, float]:
    store = PostgresStore(dsn, max_connections=8)
    store.MAX_FLUSHERS, store.MAX_GROUP = MODES[mode]
    await store.open()
    async with store.db.transaction() as conn:
        await conn.execute("TRUNCATE messages, events RESTART IDENTITY")
    counter = itertools.count()
    latencies: list[float] = []
    stop = time.monotonic() + seconds

    async def client() -> None:
        while time.monotonic() < stop:
            n = next(counter)
            # Distinct alerts to a rota of three phones: nothing to suppress.
            alert = NewMessage("+12025550143", f"alert {n}", "http", "SMS", 1, 1)
            pending = [
                (alert._replace(recipient=f"+1202555{p:04d}", dedupe_key=f"k{n}"), time.time())
                for p in range(3)
            ]
            started = time.perf_counter()
            await store.ingest(pending, RULES)
            latencies.append((time.perf_counter() - started) * 1000)

    before = store.stats()
    await asyncio.gather(*(client() for _ in range(clients)))
    after = store.stats()
    await store.close()
    latencies.sort()
    per_commit = (after.writes - before.writes) / max(1, after.transactions - before.transactions)
    print(
        f"{mode:8} {len(latencies) / seconds:7.0f} ingests/s  p50 {latencies[len(latencies) // 2]:6.1f}"
        f" ms  p99 {latencies[int(len(latencies) * 0.99)]:6.1f} ms  {per_commit:5.1f} calls/commit"
    )
    return len(latencies) / seconds, latencies[int(len(latencies) * 0.99)]


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dsn", default="postgresql://postgres@127.0.0.1/sms_bench")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--duration", type=float, default=4.0)
    p.add_argument("--clients", type=int, default=64)
    args = p.parse_args()
    setup = PostgresStore(args.dsn)
    setup.migrating = True
    await setup.open()
    await migrate(setup.db)
    await setup.close()
    print(f"uptime: {uptime()}")
    print(f"{args.clients} clients, 3 recipients per ingest, {args.duration}s rounds")
    rates: dict[str, list[float]] = {m: [] for m in MODES}
    for round_no in range(args.rounds):
        for mode in MODES if round_no % 2 == 0 else list(MODES)[::-1]:
            rate, _ = await one_round(args.dsn, mode, args.duration, args.clients)
            rates[mode].append(rate)
    print(f"uptime: {uptime()}")
    ratios = [g / c for g, c in zip(rates["grouped"], rates["per-call"], strict=True)]
    print(
        f"median grouped {statistics.median(rates['grouped']):.0f}/s, per-call"
        f" {statistics.median(rates['per-call']):.0f}/s, grouped / per-call per round"
        f" {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
    )


if __name__ == "__main__":
    uvloop.run(main())
