"""Durable HTTP accepts per second: the bridge's POST /api/v1/messages vs a bare Starlette 202.

Only 2xx answers count, in the rates and in the CPU per request.

Run by hand (needs `wrk`: `apt-get install wrk`):

    python bench/ingest_http.py [--duration 5] [--rounds 3] [--connections 32 64]
        [--workload distinct duplicate] [--recipients 10000]

Both servers run side by side on this machine, one uvicorn process each, and wrk loads
them in turn on loopback with the same requests, round after round (bare, bridge, bare,
bridge...), so that a noisy neighbour hits both alike; each round gives a ratio and the
median ratio is the figure that matters.

Two workloads (`--workload`, both by default, distinct first):

- `distinct`: what alerts look like in the field. A wrk Lua script gives every request
  its own text and recipient (`--recipients` numbers in turn, 10,000 by default), and
  each round starts where the last ended, so nothing repeats within the dedupe window:
  every 202 is a queued message the dispatcher must send, one provider request each
  (distinct texts cannot share a bulk call), so the rate budget is spent within the
  first second and the queue grows.
- `duplicate`: one body posted again and again: every request after the first is
  stored as a suppressed duplicate (a dedupe lookup that finds its original, then the
  insert), and the dispatcher has nothing to do.

The bridge runs as `sms-bridge serve`, its dispatcher and status poller working as in
production against the sandbox provider in a process of its own (as a remote provider
would be). Idle RSS is read from /proc before
the load, and each server's CPU time per request after each round (a busy machine
disturbs it less than the rates).
"""

from __future__ import annotations

import argparse
import os
import re
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from common import cpu_seconds, free_port, load_average, sandbox_provider, server

BODY = '{"to": "+12025550143", "message": "bench: disk full on db-2"}'
DUPLICATE_LUA = f"""
wrk.method = 'POST'
wrk.body = '{BODY}'
wrk.headers['Content-Type'] = 'application/json'
"""
# Every request its own text and recipient; `init` takes where to start counting, so
# that later rounds do not repeat earlier ones (they would be suppressed as duplicates).
DISTINCT_LUA = """
local counter, recipients = 0, 10000
local headers = {["Content-Type"] = "application/json"}
init = function(args)
  counter = tonumber(args[1]) or 0
  recipients = tonumber(args[2]) or 10000
end
request = function()
  counter = counter + 1
  local body = string.format(
    '{"to": "+1202555%04d", "message": "bench: disk %d%% full on db-%d"}',
    counter % recipients, counter % 100, counter)
  return wrk.format("POST", nil, headers, body)
end
"""
WORKLOADS = ("distinct", "duplicate")
BARE_APP = textwrap.dedent("""
    import socket, sys, uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def accept(request):
        await request.json()
        return JSONResponse({"ids": [1]}, 202)

    async def health(request):
        return JSONResponse({"status": "ok"})

    app = Starlette(routes=[Route("/api/v1/messages", accept, methods=["POST"]),
                            Route("/healthz", health)])
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", int(sys.argv[1])))
    uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False)).run(sockets=[sock])
""")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wrk(
    port: int, connections: int, duration: int, script: str, start: int = 0, recipients: int = 0
) -> dict[str, float]:
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{duration}s",
            "--latency",
            "-s",
            script,
            f"http://127.0.0.1:{port}/api/v1/messages",
            "--",
            str(start),
            str(recipients),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    refused = int(non2xx.group(1)) if non2xx else 0
    # Only acknowledged requests count: a 503 refusal costs a server next to nothing, and
    # counting it would reward refusing.
    rps *= (requests - refused) / max(1, requests)
    lat = {p: _ms(v) for p, v in re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)", out, re.M)}
    errors = re.search(r"Socket errors: .*", out)
    return {
        "rps": rps,
        "requests": requests,
        "p50": lat.get("50", float("nan")),
        "p99": lat.get("99", float("nan")),
        "non2xx": refused,
        "socket_errors": errors.group(0) if errors else "",
    }


def _ms(value: str) -> float:
    number, unit = re.match(r"([\d.]+)(\w+)", value).groups()
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--workload", choices=WORKLOADS, nargs="+", default=list(WORKLOADS))
    parser.add_argument(
        "--recipients",
        type=int,
        default=10_000,
        help="distinct numbers the distinct workload texts in turn (10,000: past every"
        " per-number cache; an on-call team is a handful)",
    )
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-http-")
    scripts = {"distinct": Path(tmp) / "distinct.lua", "duplicate": Path(tmp) / "duplicate.lua"}
    scripts["distinct"].write_text(DISTINCT_LUA)
    scripts["duplicate"].write_text(DUPLICATE_LUA)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMS_BRIDGE_")}
    cases = [(w, c) for w in args.workload for c in args.connections]
    runs: dict[str, dict[tuple[str, int], list[dict[str, float]]]] = {
        "bare": {case: [] for case in cases},
        "bridge": {case: [] for case in cases},
    }
    rss: dict[str, float] = {}
    bare_port, bridge_port = free_port(), free_port()
    (Path(tmp) / "bare.py").write_text(BARE_APP)
    bridge_env = dict(
        env,
        SMS_BRIDGE_HTTP_LISTEN=f"127.0.0.1:{bridge_port}",
        SMS_BRIDGE_SMTP_LISTEN="",
        SMS_BRIDGE_STORE_PATH=f"{tmp}/bench.db",
        # wrk is one client: left at its default (32), the per-client cap would answer
        # most of a 64-connection run with 503, as it should a single misbehaving client;
        # raised here as behind a reverse proxy, where every request comes from one address.
        SMS_BRIDGE_HTTP_MAX_CONNECTIONS_PER_CLIENT=str(2 * max(args.connections)),
    )
    bare_cmd = [sys.executable, str(Path(tmp) / "bare.py"), str(bare_port)]
    load_before = os.getloadavg()
    started = 0  # distinct requests so far: where the next wrk run starts counting
    with (
        sandbox_provider(env, tmp) as provider,
        server(bare_cmd, bare_port, env, tmp) as bare_pid,
        server(
            [sys.executable, "-m", "bridge", "serve"], bridge_port, bridge_env | provider, tmp
        ) as pid,
    ):
        rss["bare"], rss["bridge"] = rss_mib(bare_pid), rss_mib(pid)
        pids = {"bare": bare_pid, "bridge": pid}
        for _ in range(args.rounds):
            for workload, c in cases:
                for name, port in (("bare", bare_port), ("bridge", bridge_port)):
                    cpu = cpu_seconds(pids[name])
                    result = wrk(
                        port, c, args.duration, str(scripts[workload]), started, args.recipients
                    )
                    result["cpu_us"] = (
                        (cpu_seconds(pids[name]) - cpu)
                        * 1e6
                        / max(1, result["requests"] - result["non2xx"])
                    )
                    started += int(result["requests"]) + 1000  # wrk may count a few short
                    runs[name][(workload, c)].append(result)
    load_after = os.getloadavg()
    with sqlite3.connect(f"{tmp}/bench.db") as db:
        stored = dict(db.execute("SELECT state, count(*) FROM messages GROUP BY state").fetchall())
    print(
        f"HTTP ingest, {args.rounds} rounds of {args.duration}s per server, wrk -t1 on loopback,"
        f" {os.cpu_count()} cores; load average before {load_average(load_before)},"
        f" after {load_average(load_after)}"
    )
    print(
        f"{'workload':>9} {'conns':>5} {'round':>5} {'bare req/s':>11} {'bridge req/s':>13}"
        f" {'ratio':>6} {'bridge p50 ms':>14} {'bridge p99 ms':>14} {'bare p99 ms':>12}"
        f" {'CPU us/req bare':>16} {'bridge':>7}"
    )
    for workload, c in cases:
        ratios, cpu_ratios = [], []
        pairs = zip(runs["bare"][(workload, c)], runs["bridge"][(workload, c)], strict=True)
        for n, (b, s) in enumerate(pairs, 1):
            ratios.append(s["rps"] / b["rps"])
            cpu_ratios.append(b["cpu_us"] / s["cpu_us"])
            print(
                f"{workload:>9} {c:>5} {n:>5} {b['rps']:>11.0f} {s['rps']:>13.0f}"
                f" {ratios[-1]:>6.2f} {s['p50']:>14.2f} {s['p99']:>14.2f} {b['p99']:>12.2f}"
                f" {b['cpu_us']:>16.0f} {s['cpu_us']:>7.0f}"
            )
            for name, r in (("bare", b), ("bridge", s)):
                if r["non2xx"] or r["socket_errors"]:
                    print(f"  {name}: non-2xx {r['non2xx']} {r['socket_errors']}")
        print(
            f"{workload:>9} {c:>5} median ratio {statistics.median(ratios):.2f}"
            f" (CPU per request, bare/bridge: {statistics.median(cpu_ratios):.2f})"
        )
    print(f"idle RSS: bridge {rss['bridge']:.1f} MiB, bare Starlette {rss['bare']:.1f} MiB")
    print(f"rows stored by the bridge, by state: {stored}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
