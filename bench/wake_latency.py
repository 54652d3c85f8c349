"""How soon does another instance send what one instance acknowledged? (issue #13)

Two bridges on one PostgreSQL database, built and run as `serve` runs them (in this one
process, each with its own pool, listening connection and in-process sandbox provider).
Instance A only ingests (its dispatcher is not running: stuck, or busy elsewhere);
instance B is idle. Each round acknowledges one distinct alert on A (the commit that
would let HTTP say 202) and times until B's provider receives the /send: that is the
NOTIFY -> LISTEN -> dispatcher path. As the bare reference, the same alert acknowledged
on B itself (its own dispatcher woken in-process), alternating, medians. Without the
notification, B would find it on its next idle look at the queue: up to 30 s.

    createdb -h 127.0.0.1 -U postgres sms_bench
    python bench/wake_latency.py --dsn postgresql://postgres@127.0.0.1/sms_bench
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bridge.app import build
from bridge.config import load_config
from bridge.policy.shaping import Draft
from bridge.service import Bridge
from bridge.store.postgres.migrate import migrate
from bridge.store.postgres.pool import Database


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


@contextlib.asynccontextmanager
async def instance(dsn: str, name: str, *, dispatcher: bool) -> AsyncIterator[Bridge]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bridge.toml"
        path.write_text(f'[store]\nurl = "{dsn}"\n[cluster]\ninstance = "{name}"\n')
        async with build(load_config(path, env={})) as bridge:
            if not dispatcher:

                async def idle(stop: asyncio.Event) -> None:
                    await stop.wait()

                bridge.dispatcher.run = idle  # type: ignore[method-assign]
            task = asyncio.create_task(bridge.run())
            try:
                yield bridge
            finally:
                bridge.stop.set()
                await task


def sends(bridge: Bridge) -> list[float]:
    assert bridge.sandbox is not None
    return [r.at for r in bridge.sandbox.requests if r.path.endswith("/send")]


async def one(on: Bridge, sender: Bridge, n: int) -> float:
    """Seconds from the acknowledgement on `on` to `sender`'s provider call."""
    before = len(sends(sender))
    draft = Draft([f"+1202555{n % 10000:04d}"], f"alert {n}", "bench", "SMS", dedupe_key=f"k{n}")
    await on.ingestor.submit([draft])
    acked = time.time()
    while len(sends(sender)) == before:  # noqa: ASYNC110 - the sandbox has no event; its record keeps the time
        await asyncio.sleep(0.0005)
    return sends(sender)[-1] - acked


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    db = Database(args.dsn, min_size=1, max_size=1)
    await db.open()
    async with db.transaction() as conn:
        await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    await migrate(db)
    await db.close()
    cross: list[float] = []
    local: list[float] = []
    async with (
        instance(args.dsn, "a", dispatcher=False) as a,
        instance(args.dsn, "b", dispatcher=True) as b,
    ):
        await asyncio.sleep(1.0)  # both started, B idle
        for n in range(args.rounds):
            cross.append(await one(a, b, 2 * n))
            await asyncio.sleep(0.2)  # idle again
            local.append(await one(b, b, 2 * n + 1))
            await asyncio.sleep(0.2)
    ms = 1000
    print(f"load: {uptime()}")
    print(
        f"ack on A -> provider call from B: median {statistics.median(cross) * ms:.1f} ms,"
        f" p90 {statistics.quantiles(cross, n=10)[-1] * ms:.1f} ms, max {max(cross) * ms:.1f} ms"
    )
    print(
        f"ack on B -> provider call from B (reference): median"
        f" {statistics.median(local) * ms:.1f} ms, p90"
        f" {statistics.quantiles(local, n=10)[-1] * ms:.1f} ms"
    )


if __name__ == "__main__":
    asyncio.run(main())
