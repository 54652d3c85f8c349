"""Time the read paths of a big store (bench/big_store.py) as the operator meets them: the
store's methods in-process (best of 3, warm), then the real pages of `sms-bridge serve`
on 127.0.0.1 (median of 5). Run by hand, on a copy of the file (serve may write to it):

    python bench/big_reads.py COPY_OF_STORE [--message-id N] [--no-http]
    python bench/big_reads.py --postgres URL [...]   # a database `store copy` filled

Routes `route-0`...`route-7` are configured as bench/big_store.py named them; retention
is off (the store is kept as built) and the provider is the in-process sandbox.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

import bridge
from bench.common import free_port, server
from bridge.store import Store
from bridge.store.postgres.store import PostgresStore
from bridge.store.sqlite import SqliteStore

ROUTES = [f"route-{i}" for i in range(8)]


def open_store(path: Path | None, postgres: str | None) -> Store:
    return PostgresStore(postgres) if postgres else SqliteStore(path or "")


async def store_timings(store: Store, message_id: int) -> None:
    await store.open()
    calls: dict[str, Callable[[], Awaitable[Any]]] = {
        "counts_for_metrics()": store.counts_for_metrics,
        "counts()": store.counts,
        "counts_by_reason()": store.counts_by_reason,
        "route_last_messages()": _route_call(store),
        f"mentioned_by({message_id})": lambda: store.mentioned_by(message_id),
        # The overview's recent failures: by id before feat-apifix, by failure time after.
        "recent failures (10)": lambda: (
            store.recent_failures(10)
            if hasattr(store, "recent_failures")
            else store.query(state="failed", limit=10)
        ),
    }
    try:
        for name, call in calls.items():
            best = min([await _timed(call) for _ in range(3)])
            print(f"store {name:32} {best * 1000:9.1f} ms")
    finally:
        await store.close()


def _route_call(store: Store) -> Callable[[], Awaitable[Any]]:
    # The configured routes' names, where the store asks per route; else no argument.
    ask: Callable[..., Awaitable[Any]] = store.route_last_messages  # either signature
    if not inspect.signature(ask).parameters:
        return ask
    return lambda: ask(ROUTES)


async def _timed(call: Callable[[], Awaitable[Any]]) -> float:
    started = time.perf_counter()
    await call()
    return time.perf_counter() - started


def http_timings(path: Path | None, postgres: str | None, message_id: int) -> None:
    port = free_port()
    routes = "".join(
        f'[routes.{name}]\nformat = "generic"\nto = ["+12025550101"]\npublic = true\n'
        for name in ROUTES
    )
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "bridge.toml"
        config.write_text(
            f'[http]\nlisten = "127.0.0.1:{port}"\n[smtp]\nlisten = ""\n'
            f'[store]\n{_where(path, postgres)}\nretention = "0"\n{routes}'
        )
        args = [sys.executable, "-m", "bridge", "serve", "--config", str(config)]
        # serve from the tree this script imports the bridge from (PYTHONPATH): before
        # and after a change are measured with the same script.
        source = Path(bridge.__file__).resolve().parent.parent
        with server(args, port, {"PYTHONPATH": str(source)}, str(source)):
            base = f"http://127.0.0.1:{port}"
            pages = ["/metrics", "/api/v1/stats", "/ui/routes", "/ui/routes/route-3", "/ui/"]
            pages.append(f"/ui/messages/{message_id}")
            with httpx.Client(base_url=base, timeout=60) as http:
                for page in pages:
                    times = []
                    for _ in range(5):
                        started = time.perf_counter()
                        answer = http.get(page)
                        times.append(time.perf_counter() - started)
                        if answer.status_code != 200:
                            raise SystemExit(f"{page}: {answer.status_code} {answer.text[:200]}")
                    print(f"http  {page:32} {statistics.median(times) * 1000:9.1f} ms median")


def _where(path: Path | None, postgres: str | None) -> str:
    return f'url = "{postgres}"' if postgres else f'path = "{path.resolve() if path else ""}"'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, nargs="?")
    parser.add_argument("--postgres", help="URL of a PostgreSQL store instead")
    parser.add_argument("--message-id", type=int, default=500_000)
    parser.add_argument("--no-http", action="store_true")
    args = parser.parse_args()
    asyncio.run(store_timings(open_store(args.path, args.postgres), args.message_id))
    if not args.no_http:
        http_timings(args.path, args.postgres, args.message_id)


if __name__ == "__main__":
    main()
