"""Where a distinct request's time goes between the event loop and the store's threads:
the SQLite writer's groups, timed stage by stage, under wrk (BENCHMARKS.md, issue #16).

Run by hand (needs `wrk`):

    python bench/group_cycle.py [--connections 32 128] [--duration 6] [--tree TREE]

For each `--connections`, `sms-bridge serve` (from `--tree`, default this checkout) runs
in a process of its own with `Engine` wrapped at start-up (nothing in `bridge/` changes:
the wrapping is `BOOT` below, run before `serve`), and wrk posts the distinct workload
of `ingest_http.py` to it. Every group the writer commits is stamped: when its first and
last job were issued on the loop, when the writer took it, finished it (and its CPU),
when the syncer's fdatasync covered it, and when the loop settled its futures. Printed:
jobs a group and each stage's wall time (medians over the middle half of the groups),
and each stage's largest over all of them (where the tail of the answers comes from).
A group as large as the connections says the benchmark runs in lockstep: every client
waits on one group, so the loop has nothing to do while the writer and the syncer work.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from common import free_port, sandbox_provider, server
from ingest_http import DISTINCT_LUA, wrk

# Run in the bridge's process before `serve`: wraps the engine's hand-offs; each group's
# record is [first issued, last issued, taken, done, synced, settled, jobs, writer CPU].
BOOT = """
import atexit, json, os, sys, time
from bridge.store.sqlite import engine

groups, of_future = [], {}
_Job, run_batch, resolve, settle_all = (
    engine._Job, engine.Engine._run_batch, engine.Engine._resolve, engine._settle_all)

class StampedJob(_Job):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.issued = time.perf_counter()

def timed_run_batch(self, conn, db, batch):
    cpu = time.thread_time()
    record = [min(j.issued for j in batch), max(j.issued for j in batch),
              time.perf_counter(), 0.0, 0.0, 0.0, len(batch), 0.0]
    for job in batch:
        of_future[job.future] = record
    try:
        run_batch(self, conn, db, batch)
    finally:
        record[3], record[7] = time.perf_counter(), time.thread_time() - cpu
        groups.append(record)

def timed_resolve(self, outcomes):
    now = time.perf_counter()
    for job, _, _ in outcomes:
        if job.future in of_future:
            of_future[job.future][4] = now
    resolve(self, outcomes)

def timed_settle_all(settled):
    now = time.perf_counter()
    for future, _, _ in settled:
        record = of_future.pop(future, None)
        if record is not None:
            record[5] = now
    settle_all(settled)

engine._Job, engine._settle_all = StampedJob, timed_settle_all
engine.Engine._run_batch, engine.Engine._resolve = timed_run_batch, timed_resolve
atexit.register(lambda: open(os.environ["GROUP_CYCLE_OUT"], "w").write(json.dumps(groups)))
from bridge.cli import main
sys.exit(main(["serve"]))
"""
STAGES = (
    ("first job issued -> taken by the writer", 0, 2),
    ("last job issued -> taken", 1, 2),
    ("taken -> committed (the writer)", 2, 3),
    ("committed -> fdatasync'd (the syncer)", 3, 4),
    ("fdatasync'd -> futures settled (the loop)", 4, 5),
)


def report(groups: list[list[float]]) -> None:
    groups = [g for g in groups if g[5]]  # settled: an ingest's group, not a lone write
    middle = groups[len(groups) // 4 : 3 * len(groups) // 4]
    if len(middle) < 2:
        print("  too few groups")
        return
    sizes = [g[6] for g in middle]
    print(f"  groups {len(middle)} (middle half); jobs a group median {statistics.median(sizes):g}")
    print(f"  {'stage':<44} {'median':>9} {'largest (all groups)':>21}")
    for name, start, end in STAGES:
        median = statistics.median(g[end] - g[start] for g in middle) * 1e3
        largest = max(g[end] - g[start] for g in groups) * 1e3
        print(f"  {name:<44} {median:6.2f} ms {largest:18.1f} ms")
    cycle = statistics.median(b[2] - a[2] for a, b in itertools.pairwise(middle))
    print(f"  {'one take to the next (the cycle)':<44} {cycle * 1e3:6.2f} ms")
    cpu = statistics.median(g[7] for g in middle)
    print(f"  {'the writer CPU a group':<44} {cpu * 1e3:6.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--duration", type=int, default=6)
    parser.add_argument("--tree", default=str(Path(__file__).resolve().parent.parent))
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-cycle-")
    script = Path(tmp) / "distinct.lua"
    script.write_text(DISTINCT_LUA)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMS_BRIDGE_")}
    env["PYTHONPATH"] = args.tree
    with sandbox_provider(env, tmp) as provider:
        for n, connections in enumerate(args.connections):
            port, out = free_port(), Path(tmp) / f"groups-{n}.json"
            bridge_env = (
                env
                | provider
                | {
                    "GROUP_CYCLE_OUT": str(out),
                    "SMS_BRIDGE_HTTP_LISTEN": f"127.0.0.1:{port}",
                    "SMS_BRIDGE_SMTP_LISTEN": "",
                    "SMS_BRIDGE_STORE_PATH": f"{tmp}/bench-{n}.db",
                    # one client (wrk): its connections all count as one (ingest_http.py)
                    "SMS_BRIDGE_HTTP_MAX_CONNECTIONS_PER_CLIENT": str(2 * connections),
                    "SMS_BRIDGE_HTTP_MAX_CONCURRENCY": str(2 * connections),
                }
            )
            with server([sys.executable, "-c", BOOT], port, bridge_env, tmp):
                result = wrk(port, connections, args.duration, str(script), 0, 10_000)
            print(
                f"{connections} connections: {result['rps']:.0f} req/s,"
                f" p50 {result['p50']:.2f} ms, p99 {result['p99']:.2f} ms"
            )
            report(json.loads(out.read_text()))


if __name__ == "__main__":
    main()
