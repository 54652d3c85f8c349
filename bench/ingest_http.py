"""Durable HTTP accepts per second: the bridge's POST /api/v1/messages vs a bare Starlette 202.

Run by hand (needs `wrk`: `apt-get install wrk`):

    python bench/ingest_http.py [--duration 5] [--rounds 3] [--connections 32 64]

Both servers run side by side on this machine, one uvicorn process each, and wrk loads
them in turn on loopback with the same body, round after round (bare, bridge, bare,
bridge...), so that a noisy neighbour hits both alike; each round gives a ratio and the
median ratio is the figure that matters. The bridge runs as `sms-bridge serve`, its
dispatcher and status poller working as in production against the sandbox provider in a
process of its own (as a remote provider would be). Idle RSS is read from /proc before
the load.
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

from common import free_port, sandbox_provider, server

BODY = '{"to": "+12025550143", "message": "bench: disk full on db-2"}'
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


def wrk(port: int, connections: int, duration: int, script: str) -> dict[str, float]:
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
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    lat = {p: _ms(v) for p, v in re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)", out, re.M)}
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: .*", out)
    return {
        "rps": rps,
        "p50": lat.get("50", float("nan")),
        "p99": lat.get("99", float("nan")),
        "non2xx": int(non2xx.group(1)) if non2xx else 0,
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
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-http-")
    script = Path(tmp) / "post.lua"
    script.write_text(
        f"wrk.method = 'POST'\nwrk.body = '{BODY}'\n"
        "wrk.headers['Content-Type'] = 'application/json'\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMS_BRIDGE_")}
    runs: dict[str, dict[int, list[dict[str, float]]]] = {
        "bare": {c: [] for c in args.connections},
        "bridge": {c: [] for c in args.connections},
    }
    rss: dict[str, float] = {}
    bare_port, bridge_port = free_port(), free_port()
    (Path(tmp) / "bare.py").write_text(BARE_APP)
    bridge_env = dict(
        env,
        SMS_BRIDGE_HTTP_LISTEN=f"127.0.0.1:{bridge_port}",
        SMS_BRIDGE_SMTP_LISTEN="",
        SMS_BRIDGE_STORE_PATH=f"{tmp}/bench.db",
    )
    bare_cmd = [sys.executable, str(Path(tmp) / "bare.py"), str(bare_port)]
    with (
        sandbox_provider(env, tmp) as provider,
        server(bare_cmd, bare_port, env, tmp) as bare_pid,
        server(
            [sys.executable, "-m", "bridge", "serve"], bridge_port, bridge_env | provider, tmp
        ) as pid,
    ):
        rss["bare"], rss["bridge"] = rss_mib(bare_pid), rss_mib(pid)
        for _ in range(args.rounds):
            for c in args.connections:
                for name, port in (("bare", bare_port), ("bridge", bridge_port)):
                    runs[name][c].append(wrk(port, c, args.duration, str(script)))
    stored = (
        sqlite3.connect(f"{tmp}/bench.db").execute("SELECT count(*) FROM messages").fetchone()[0]
    )
    print(
        f"HTTP ingest, {args.rounds} rounds of {args.duration}s per server, wrk -t1 on loopback,"
        f" {os.cpu_count()} cores"
    )
    print(
        f"{'conns':>5} {'round':>5} {'bare req/s':>11} {'bridge req/s':>13} {'ratio':>6} "
        f"{'bridge p50 ms':>14} {'bridge p99 ms':>14} {'bare p99 ms':>12}"
    )
    for c in args.connections:
        ratios = []
        for n, (b, s) in enumerate(zip(runs["bare"][c], runs["bridge"][c], strict=True), 1):
            ratios.append(s["rps"] / b["rps"])
            print(
                f"{c:>5} {n:>5} {b['rps']:>11.0f} {s['rps']:>13.0f} {ratios[-1]:>6.2f} "
                f"{s['p50']:>14.2f} {s['p99']:>14.2f} {b['p99']:>12.2f}"
            )
            for name, r in (("bare", b), ("bridge", s)):
                if r["non2xx"] or r["socket_errors"]:
                    print(f"  {name}: non-2xx {r['non2xx']} {r['socket_errors']}")
        print(f"{c:>5} median ratio {statistics.median(ratios):.2f}")
    print(f"idle RSS: bridge {rss['bridge']:.1f} MiB, bare Starlette {rss['bare']:.1f} MiB")
    print(f"rows stored by the bridge: {stored}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
