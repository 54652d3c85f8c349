"""What the dispatcher costs the event loop while distinct alerts pile up (issue #16).

    python bench/due_cost.py [--duration 20] [--connections 32] [--source TREE]

`sms-bridge serve` (the tree's, or `--source`'s) runs against the sandbox provider (100
requests a minute), instrumented in its own process, and wrk posts distinct alerts to it
(the `distinct` workload of `ingest_http.py`, one wrk thread, nice'd) for `--duration`
seconds, the queue growing by thousands a second. The rate window starts full, booked
evenly over the last minute (`--burst`: empty), so that one request frees every 0.6 s
as a minute into a backlog, when the dispatcher reads the queue for each. Counted, as figures the machine's load moves little:

- dispatcher steps (`run_once`) and the event loop's CPU inside them (thread CPU time
  of each slice of the coroutine between two awaits: `plan_batches`, `_keep_for_later`,
  the pacing, the bookkeeping; not the awaits);
- `due` reads, the rows they returned, and the reader thread's CPU turning them into
  messages (it holds the GIL the loop needs);
- the loop's whole CPU (the main thread) and the 202s, for the share.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import bridge_env, free_port, sandbox_provider, server

STATS_EVERY = 0.5


def instrument(stats_file: str) -> None:
    """In the bridge's process: count what the dispatcher does, and dump it regularly."""
    from bridge.delivery import dispatcher as dispatcher_module
    from bridge.models import Message
    from bridge.store.sqlite import delivery

    counts = {"steps": 0, "step_cpu": 0.0, "due": 0, "rows": 0, "due_cpu": 0.0}

    class Timed:
        """Awaits a coroutine, adding the thread CPU of each of its slices to step_cpu."""

        def __init__(self, coro):  # type: ignore[no-untyped-def]
            self.coro = coro

        def __await__(self):  # type: ignore[no-untyped-def]
            value, error = None, None
            while True:
                started = time.thread_time()
                try:
                    step = self.coro.throw(error) if error else self.coro.send(value)
                except StopIteration as done:
                    counts["step_cpu"] += time.thread_time() - started
                    return done.value
                counts["step_cpu"] += time.thread_time() - started
                try:
                    value, error = (yield step), None
                except BaseException as exc:  # handed to the coroutine, as await would
                    value, error = None, exc

    run_once = dispatcher_module.Dispatcher.run_once

    async def counted_run_once(self):  # type: ignore[no-untyped-def]
        counts["steps"] += 1
        return await Timed(run_once(self))

    dispatcher_module.Dispatcher.run_once = counted_run_once  # type: ignore[method-assign]
    try:  # the query of the tree under test (bridge/store/sqlite/delivery.py)
        from bridge.store.due import due_sql
    except ImportError:  # a tree from before it: every row of the oldest `limit`

        def due_sql(now: str, limit: str, texts: str | None = None) -> str:
            return (
                "SELECT * FROM messages WHERE state = 'queued' AND next_attempt_at <= ?1"
                " ORDER BY next_attempt_at, id LIMIT ?2"
            )

    def read_due(c, sql, args):  # type: ignore[no-untyped-def]
        started = time.thread_time()
        rows = [Message.from_row(r) for r in c.execute(sql, args)]
        counts["due_cpu"] += time.thread_time() - started
        return rows

    async def counted_due(self, now, limit, *, texts=None):  # type: ignore[no-untyped-def]
        sql = due_sql("?1", "?2", None if texts is None else "?3")
        args = (now, limit) if texts is None else (now, limit, texts)
        rows = await self.engine.read(lambda c: read_due(c, sql, args))
        counts["due"] += 1
        counts["rows"] += len(rows)
        return rows

    delivery.DeliveryOperations.due = counted_due  # type: ignore[method-assign]
    main_thread = threading.main_thread().native_id

    def dump() -> None:
        while True:
            with open(f"/proc/self/task/{main_thread}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            loop_cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            Path(stats_file + ".tmp").write_text(json.dumps(dict(counts, loop_cpu=loop_cpu)))
            os.replace(stats_file + ".tmp", stats_file)
            time.sleep(STATS_EVERY)

    threading.Thread(target=dump, daemon=True).start()


def child() -> None:
    instrument(os.environ["DUE_COST_STATS"])
    from bridge.cli import main as cli_main

    sys.argv = ["sms-bridge", "serve"]
    raise SystemExit(cli_main())


def steady(db_file: Path, limit: int = 100, window: float = 60.5) -> None:
    """Book a whole window spread evenly, as a minute into a backlog: one request frees
    every `window / limit` s, and the dispatcher takes each as it frees (in a real run it
    does so from the second minute on; a short run would otherwise see no slot free)."""
    now = time.time()
    with sqlite3.connect(db_file, timeout=30) as db:
        db.executemany(
            "INSERT INTO provider_requests (at, kind) VALUES (?, 'send')",
            [(now - window + (i + 1) * window / limit,) for i in range(limit)],
        )


def read(stats: Path) -> dict[str, float]:
    return json.loads(stats.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=20)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument(
        "--burst",
        action="store_true",
        help="start with an empty window (the budget spent in the first second, then"
        " nothing frees for a minute) instead of a full one freeing a slot every 0.6 s",
    )
    parser.add_argument("--source", help="the bridge's source tree (default: installed)")
    args = parser.parse_args()
    from ingest_http import DISTINCT_LUA

    tmp = tempfile.mkdtemp(prefix="bench-due-")
    script = Path(tmp) / "distinct.lua"
    script.write_text(DISTINCT_LUA)
    stats = Path(tmp) / "stats.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMS_BRIDGE_")}
    port = free_port()
    serve_env = bridge_env(
        tmp,
        port,
        SMS_BRIDGE_HTTP_MAX_CONNECTIONS_PER_CLIENT=str(2 * args.connections),
        DUE_COST_STATS=str(stats),
    )
    here = str(Path(__file__).resolve().parent)
    serve_env["PYTHONPATH"] = os.pathsep.join(p for p in (args.source, here) if p)
    cmd = [sys.executable, "-c", "import due_cost; due_cost.child()"]
    with (
        sandbox_provider(env, tmp) as provider,
        server(cmd, port, serve_env | provider, tmp),
    ):
        if not args.burst:
            steady(Path(tmp) / "bench.db")
        before, started = read(stats), time.monotonic()
        out = subprocess.run(
            [
                *("nice", "-n", "10", "wrk", "-t1", f"-c{args.connections}"),
                *(f"-d{args.duration}s", "-s", str(script)),
                *(f"http://127.0.0.1:{port}/api/v1/messages", "--", "0", "10000"),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        time.sleep(2 * STATS_EVERY)
        after, wall = read(stats), time.monotonic() - started
    d = {k: after[k] - before[k] for k in after}
    requests = int(out.split(" requests in")[0].split()[-1])
    print(
        f"{args.source or 'installed'}: {wall:.1f} s, {requests} requests ({requests / wall:.0f}/s);"
        f" load {os.getloadavg()[0]:.1f}\n"
        f"  steps {d['steps']:.0f} ({d['steps'] / wall:.2f}/s); due reads {d['due']:.0f},"
        f" rows {d['rows']:.0f} ({d['rows'] / wall:.0f}/s)\n"
        f"  loop CPU in run_once {d['step_cpu'] * 1000:.0f} ms"
        f" ({d['step_cpu'] / wall * 1000:.1f} ms per s of wall),"
        f" reader CPU in due {d['due_cpu'] * 1000:.0f} ms"
        f" ({d['due_cpu'] / wall * 1000:.1f} ms/s); loop CPU in all {d['loop_cpu']:.2f} s:"
        f" the dispatcher {100 * (d['step_cpu'] + d['due_cpu']) / max(d['loop_cpu'], 1e-9):.1f} %"
        " of it (reader's included)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
