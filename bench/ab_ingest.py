"""Distinct ingest, several trees side by side: where a change's time went, per thread.

Run by hand (HTTP needs `wrk`):

    python bench/ab_ingest.py [--protocol http|smtp] [--rounds 5] [--duration 5]
        NAME=TREE [NAME=TREE ...]

Each `NAME=TREE` is a checkout of the project (`git worktree add /tmp/before REV`) served
by `sms-bridge serve` with `PYTHONPATH=TREE`, beside bare Starlette or a bare aiosmtpd
handler (the same servers as `ingest_http.py` and `ingest_smtp.py`), all loaded in turn
round after round with distinct alerts (every request its own text and recipient) by the
same clients as those benchmarks: 32 wrk connections, or 16 SMTP sessions reused. For each
server: the rate, its ratio to bare per round (medians printed), and its CPU per
acknowledged request split by thread from /proc: the event loop's thread against the
others (the store's writer, SMTP's parse workers), and each side's voluntary context
switches a request (every wait for the GIL, the writer's queue, the disk or the network:
a count the machine's load does not change much, where each wait costs more on a loaded
machine). A loop busy well under 100 % while
its rate lags says the requests wait for something else (BENCHMARKS.md, issue #16).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
from pathlib import Path

import ingest_http
import ingest_smtp
from common import free_port, load_average, sandbox_provider, server

TICK = os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of `pid`."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            out[int(task.name)] = (int(fields[11]) + int(fields[12])) / TICK
    return out


def thread_switches(pid: int) -> dict[int, int]:
    """Voluntary context switches of each thread of `pid`: each is a wait (for the GIL,
    the writer's queue, the disk, the network) that a loaded machine makes longer."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    out[int(task.name)] = int(line.split()[1])
    return out


def load_once(
    protocol: str, port: int, duration: int, script: Path, start: int
) -> tuple[float, int]:
    """One round against `port`: (acknowledged per second, requests numbered)."""
    if protocol == "http":
        result = ingest_http.wrk(port, 32, duration, str(script), start, 10_000)
        return result["rps"], int(result["requests"])
    rate, numbered = asyncio.run(ingest_smtp.load(port, 16, duration, True, "distinct", start))
    return rate, numbered


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", choices=("http", "smtp"), default="http")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("trees", nargs="+", metavar="NAME=TREE")
    args = parser.parse_args()
    trees = [tuple(spec.split("=", 1)) for spec in args.trees]
    tmp = Path(tempfile.mkdtemp(prefix="bench-ab-"))
    script = tmp / "distinct.lua"
    script.write_text(ingest_http.DISTINCT_LUA)
    bare_source = ingest_http.BARE_APP if args.protocol == "http" else ingest_smtp.BARE_SERVER
    (tmp / "bare.py").write_text(bare_source)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMS_BRIDGE_")}
    listen = "SMS_BRIDGE_HTTP_LISTEN" if args.protocol == "http" else "SMS_BRIDGE_SMTP_LISTEN"
    other = "SMS_BRIDGE_SMTP_LISTEN" if args.protocol == "http" else "SMS_BRIDGE_HTTP_LISTEN"
    load_before = os.getloadavg()
    # rate, loop us, others us, loop switches, others' switches (per request)
    results: dict[str, list[tuple[float, float, float, float, float]]] = {}
    with contextlib.ExitStack() as stack:
        provider = stack.enter_context(sandbox_provider(env, str(tmp)))
        port = free_port()
        bare = [sys.executable, str(tmp / "bare.py"), str(port)]
        servers = [("bare", port, stack.enter_context(server(bare, port, env, str(tmp))))]
        for n, (name, tree) in enumerate(trees):
            port = free_port()
            bridge_env = (
                env
                | provider
                | {
                    "PYTHONPATH": str(Path(tree).resolve()),
                    listen: f"127.0.0.1:{port}",
                    other: "",
                    "SMS_BRIDGE_STORE_PATH": str(tmp / f"{n}.db"),
                    # as in ingest_http.py and ingest_smtp.py: one client, one long session
                    "SMS_BRIDGE_HTTP_MAX_CONNECTIONS_PER_CLIENT": "128",
                    "SMS_BRIDGE_SMTP_MAX_MAILS_PER_SESSION": "1000000",
                }
            )
            cmd = [sys.executable, "-m", "bridge", "serve"]
            servers.append(
                (name, port, stack.enter_context(server(cmd, port, bridge_env, str(tmp))))
            )
        started = 0  # distinct requests so far: no round repeats an earlier one
        for _ in range(args.rounds):
            for name, port, pid in servers:
                before, waits_before = thread_cpu(pid), thread_switches(pid)
                rate, numbered = load_once(args.protocol, port, args.duration, script, started)
                after, waits_after = thread_cpu(pid), thread_switches(pid)
                started += numbered + 1000
                done = max(1.0, rate * args.duration)
                spent = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
                loop = spent.pop(pid, 0.0) * 1e6 / done
                waits = {t: waits_after[t] - waits_before.get(t, 0) for t in waits_after}
                loop_waits = waits.pop(pid, 0) / done
                results.setdefault(name, []).append(
                    (
                        rate,
                        loop,
                        sum(spent.values()) * 1e6 / done,
                        loop_waits,
                        sum(waits.values()) / done,
                    )
                )
    print(
        f"{args.protocol} distinct, {args.rounds} rounds of {args.duration}s, load average"
        f" before {load_average(load_before)}, after {load_average(os.getloadavg())}"
    )
    print(
        f"{'server':>10} {'rate':>7} {'vs bare':>8} {'loop us':>8} {'others us':>10}"
        f" {'loop sw':>8} {'others sw':>10}"
    )
    for name, rows in results.items():
        ratio = statistics.median(r[0] / b[0] for r, b in zip(rows, results["bare"], strict=True))
        rate, loop, others, loop_sw, others_sw = (
            statistics.median(r[i] for r in rows) for i in range(5)
        )
        print(
            f"{name:>10} {rate:>7.0f} {ratio:>8.3f} {loop:>8.0f} {others:>10.0f}"
            f" {loop_sw:>8.2f} {others_sw:>10.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
