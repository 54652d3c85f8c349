"""Cluster benchmarks (issue 13 item 8): durable ingest on PostgreSQL, several instances
on one database, and the time to take over a dead instance's messages.

Run by hand (needs `wrk` and a PostgreSQL server where it may create a database):

    python bench/cluster.py ingest   [--rounds 3] [--duration 3] [--connections 32]
    python bench/cluster.py scale    [--rounds 3] [--duration 3] [--instances 1 2 3]
    python bench/cluster.py takeover [--runs 3] [--messages 5] [--lease 5]
    (--dsn postgresql://postgres@127.0.0.1:5432/postgres: the server; a database
     sms_bench_<pid> is created on it and dropped at the end)

ingest: bare Starlette's 202, the bridge on SQLite and the bridge on PostgreSQL, one
uvicorn process each, loaded by wrk in turn (bare, sqlite, postgres, bare...), each
round's ratios to bare, medians reported. Every request is a distinct alert to one of
10,000 phones (a text no earlier request sent, so the dedupe window and storm control
take the path a real alert takes, not the cheap "duplicate" one).
scale: 1, 2, 3 `serve` processes on one database, one wrk per instance at once; the
figure is the sum. On a 2-core machine the instances, PostgreSQL and wrk share two
cores: more instances cannot add CPU, so this measures what sharing one queue costs,
not what N machines would give.
takeover: two instances with cluster.lease; instance A claims messages whose sends the
sandbox holds (a fault delay), is killed with -9, and the time from the kill until
instance B has recorded every one of them as sent is measured.
Every figure is printed with the load average (`uptime`) at its time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
from common import free_port, sandbox_provider, server
from ingest_http import BARE_APP, wrk

LUA = """
counter = 0
request = function()
  counter = counter + 1
  local body = string.format(
    '{"to": "+1202555%04d", "message": "%s %d: disk full on db-%d"}',
    counter % 10000, "ROUND", counter, counter)
  return wrk.format("POST", nil, {["Content-Type"] = "application/json"}, body)
end
"""


def load() -> str:
    one, five, fifteen = Path("/proc/loadavg").read_text().split()[:3]
    return f"load {one} {five} {fifteen}"


def script(tmp: str, tag: str) -> str:
    """A wrk script whose texts no other round used (`tag` is in each)."""
    path = Path(tmp) / f"{tag}.lua"
    path.write_text(LUA.replace("ROUND", tag))
    return str(path)


def with_db(dsn: str, name: str) -> str:
    return urllib.parse.urlunsplit(urllib.parse.urlsplit(dsn)._replace(path="/" + name))


async def admin(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextlib.contextmanager
def database(dsn: str, tmp: str) -> Iterator[str]:
    name = f"sms_bench_{os.getpid()}"
    asyncio.run(admin(dsn, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    asyncio.run(admin(dsn, f"CREATE DATABASE {name}"))
    url = with_db(dsn, name)
    env = clean_env(SMS_BRIDGE_STORE_URL=url)
    subprocess.run([sys.executable, "-m", "bridge", "migrate"], env=env, cwd=tmp, check=True)
    try:
        yield url
    finally:
        asyncio.run(admin(dsn, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMS_BRIDGE_")}
    return env | extra


def bridge_env(port: int, provider: dict[str, str], **store: str) -> dict[str, str]:
    return clean_env(
        SMS_BRIDGE_HTTP_LISTEN=f"127.0.0.1:{port}", SMS_BRIDGE_SMTP_LISTEN="", **provider, **store
    )


SERVE = [sys.executable, "-m", "bridge", "serve"]


@contextlib.contextmanager
def instance(port: int, env: dict[str, str], cwd: str) -> Iterator[int]:
    """`serve` until the block ends, then killed: a graceful stop would wait out the
    sends the sandbox is holding (the takeover run makes every send hang)."""
    proc = subprocess.Popen(SERVE, env=env, cwd=cwd, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                    break
            time.sleep(0.1)
        yield proc.pid
    finally:
        proc.kill()
        proc.wait(timeout=20)


def ingest(args: argparse.Namespace, tmp: str) -> None:
    ports = {name: free_port() for name in ("bare", "sqlite", "postgres")}
    (Path(tmp) / "bare.py").write_text(BARE_APP)
    env = clean_env()
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in ports}
    loads = []
    with (
        database(args.dsn, tmp) as url,
        sandbox_provider(env, tmp) as provider,
        server([sys.executable, f"{tmp}/bare.py", str(ports["bare"])], ports["bare"], env, tmp),
        server(
            SERVE,
            ports["sqlite"],
            bridge_env(ports["sqlite"], provider, SMS_BRIDGE_STORE_PATH=f"{tmp}/b.db"),
            tmp,
        ),
        server(
            SERVE,
            ports["postgres"],
            bridge_env(ports["postgres"], provider, SMS_BRIDGE_STORE_URL=url),
            tmp,
        ),
    ):
        for n in range(args.rounds):
            for name, port in ports.items():
                lua = script(tmp, f"{name}-{n}")
                runs[name].append(wrk(port, args.connections, args.duration, lua))
            loads.append(load())
    print(f"durable ingest, POST /api/v1/messages, distinct alerts, wrk -t1 -c{args.connections}")
    print(
        f"{'round':>5} {'bare':>7} {'sqlite':>7} {'pg':>7} {'sq/bare':>8} {'pg/bare':>8} {'pg/sq':>6}  pg p99 ms"
    )
    ratios: dict[str, list[float]] = {"sq": [], "pg": [], "pgsq": []}
    for n in range(args.rounds):
        b, s, p = (runs[k][n] for k in ("bare", "sqlite", "postgres"))
        ratios["sq"].append(s["rps"] / b["rps"])
        ratios["pg"].append(p["rps"] / b["rps"])
        ratios["pgsq"].append(p["rps"] / s["rps"])
        print(
            f"{n + 1:>5} {b['rps']:>7.0f} {s['rps']:>7.0f} {p['rps']:>7.0f}"
            f" {ratios['sq'][-1]:>8.2f} {ratios['pg'][-1]:>8.2f} {ratios['pgsq'][-1]:>6.2f}"
            f"  {p['p99']:>8.1f}  {loads[n]}"
        )
        for name in runs:
            if runs[name][n]["non2xx"] or runs[name][n]["socket_errors"]:
                print(
                    f"  {name}: non-2xx {runs[name][n]['non2xx']} {runs[name][n]['socket_errors']}"
                )
    med = {k: statistics.median(v) for k, v in ratios.items()}
    print(
        f"median: sqlite/bare {med['sq']:.2f}, postgres/bare {med['pg']:.2f},"
        f" postgres/sqlite {med['pgsq']:.2f}"
    )


def scale(args: argparse.Namespace, tmp: str) -> None:
    env = clean_env()
    results: dict[int, list[float]] = {}
    with database(args.dsn, tmp) as url, sandbox_provider(env, tmp) as provider:
        for count in args.instances:
            ports = [free_port() for _ in range(count)]
            with contextlib.ExitStack() as stack:
                for i, port in enumerate(ports):
                    e = bridge_env(port, provider, SMS_BRIDGE_STORE_URL=url)
                    e["SMS_BRIDGE_CLUSTER_INSTANCE"] = f"bench-{count}-{i}"
                    stack.enter_context(server(SERVE, port, e, tmp))
                results[count] = []
                for n in range(args.rounds):
                    procs = [
                        subprocess.Popen(
                            [
                                "wrk",
                                "-t1",
                                f"-c{args.connections}",
                                f"-d{args.duration}s",
                                "-s",
                                script(tmp, f"scale{count}-{n}-{i}"),
                                f"http://127.0.0.1:{port}/api/v1/messages",
                            ],
                            stdout=subprocess.PIPE,
                            text=True,
                        )
                        for i, port in enumerate(ports)
                    ]
                    total = 0.0
                    for proc in procs:
                        out, _ = proc.communicate()
                        found = re.search(r"Requests/sec:\s+([\d.]+)", out)
                        total += float(found.group(1)) if found else 0.0
                    results[count].append(total)
                    print(f"{count} instance(s), round {n + 1}: {total:.0f} req/s  {load()}")
    print(f"durable ingest on one PostgreSQL database, wrk -c{args.connections} per instance")
    for count, totals in results.items():
        print(
            f"{count} instance(s): median {statistics.median(totals):.0f} req/s (sum of instances)"
        )


async def _sent(url: str, ids: list[int]) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM messages WHERE id = ANY($1) AND state IN ('sent','delivered')",
                ids,
            )
        )
    finally:
        await conn.close()


async def _claimed(url: str, owner: str) -> list[int]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT id FROM messages WHERE state = 'sending' AND claimed_by = $1", owner
        )
        return [r[0] for r in rows]
    finally:
        await conn.close()


def takeover(args: argparse.Namespace, tmp: str) -> None:
    env = clean_env()
    times = []
    for run in range(args.runs):
        with (
            database(args.dsn, tmp) as url,
            sandbox_provider(env, tmp, requests_per_minute=6000) as provider,
        ):
            sandbox = provider["SMS_BRIDGE_PROVIDER_BASE_URL"].removesuffix("/api/v1")
            a_port, b_port = free_port(), free_port()
            common = {"SMS_BRIDGE_STORE_URL": url, "SMS_BRIDGE_CLUSTER_LEASE": f"{args.lease}s"}
            a_env = bridge_env(a_port, provider, SMS_BRIDGE_CLUSTER_INSTANCE="a", **common)
            b_env = bridge_env(b_port, provider, SMS_BRIDGE_CLUSTER_INSTANCE="b", **common)
            # every send now hangs at the provider: A's claims stay in flight until it dies
            httpx.post(
                f"{sandbox}/_sandbox/faults",
                json={"status": 0, "delay": 10.0, "path": "/send", "times": args.messages},
            )
            with instance(a_port, a_env, tmp) as a_pid, instance(b_port, b_env, tmp):
                for i in range(args.messages):
                    r = httpx.post(
                        f"http://127.0.0.1:{a_port}/api/v1/messages",
                        json={"to": f"+1202555{i:04d}", "message": f"takeover {run} {i}"},
                    )
                    assert r.status_code == 202, r.text
                deadline = time.monotonic() + 10
                claimed: list[int] = []
                while not claimed and time.monotonic() < deadline:
                    time.sleep(0.05)
                    claimed = asyncio.run(_claimed(url, "a"))
                os.kill(a_pid, 9)  # at once: its sends are held 10 s at the provider
                killed = time.monotonic()
                while asyncio.run(_sent(url, claimed)) < len(claimed):
                    if time.monotonic() - killed > 120:
                        raise SystemExit("not taken over in 120 s")
                    time.sleep(0.1)
                took = time.monotonic() - killed
                times.append(took)
                entries = httpx.get(f"{sandbox}/_sandbox/entries").json()
            print(
                f"run {run + 1}: {len(claimed)} claimed by A at the kill, all sent by B"
                f" {took:.1f} s after it; provider saw {len(entries)} sends for"
                f" {args.messages} messages  {load()}"
            )
    print(f"takeover, cluster.lease = {args.lease} s: median {statistics.median(times):.1f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["ingest", "scale", "takeover"])
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--instances", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--messages", type=int, default=5)
    parser.add_argument("--lease", type=int, default=5)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-cluster-")
    print(f"{os.cpu_count()} cores, {load()} at start")
    {"ingest": ingest, "scale": scale, "takeover": takeover}[args.what](args, tmp)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
