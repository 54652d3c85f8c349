"""CPU per request of the ASGI apps alone, no sockets: the bridge's `POST /api/v1/messages`
against a bare Starlette handler of the same request (run by hand; BENCHMARKS.md, issue
#16).

    PYTHONPATH=SOURCE_TREE python bench/app_cost.py [--requests 20000] [--rounds 2]
        [--concurrency 32] [--profile]

The servers' benchmarks (`ingest_http.py`, `ab_ingest.py`) measure the whole process
under wrk: the network layer (uvloop, uvicorn's parser and socket writes, ~35-40 us a
request on a 2-core machine) is in every figure and its noise with it. This drives the
apps' ASGI callables directly in one process (the bridge built as `serve` builds it, on
a fresh SQLite store with the in-process sandbox, its dispatcher not started), with
`--concurrency` coroutines posting distinct alerts (every request its own text, one of
10,000 recipients in turn, as the servers' distinct workload), so that the store's group
commit batches them as under load. Prints each app's rate and CPU per request: the event
loop's thread alone, and the whole process (the store's writer thread too).
`--profile`: cProfile of the bridge's last round, by cumulative time.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import tempfile
import time
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bridge.app import build
from bridge.config import load_config

RECIPIENTS = 10_000


async def _accept(request: Request) -> Response:
    await request.json()
    return JSONResponse({"ids": [1]}, 202)


BARE = Starlette(routes=[Route("/api/v1/messages", _accept, methods=["POST"])])


class Poster:
    """Distinct alerts, numbered across rounds so that none repeats within the window."""

    def __init__(self, path: str = "/api/v1/messages") -> None:
        self.sent = 0
        self.path = path  # or a webhook route's, `/hooks/NAME` (bench/app_instr.py --hook)

    def body(self) -> bytes:
        self.sent += 1
        n = self.sent
        to = f"+1202555{n % RECIPIENTS:04d}"
        return json.dumps({"to": to, "message": f"bench: disk {n % 100}% full on db-{n}"}).encode()

    async def post(self, app: Any) -> None:
        body = self.body()
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": self.path,
            "raw_path": self.path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [
                (b"host", b"127.0.0.1:8080"),
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8080),
            "state": {},
        }
        answers: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            answers.append(message)

        await app(scope, receive, send)
        if answers[0]["status"] != 202:
            raise SystemExit(f"answered {answers[0]['status']}: {answers[1:]}")

    async def run(self, app: Any, requests: int, concurrency: int) -> None:
        async def one_client() -> None:
            for _ in range(requests // concurrency):
                await self.post(app)

        await asyncio.gather(*(one_client() for _ in range(concurrency)))


async def measure(
    name: str, app: Any, poster: Poster, args: argparse.Namespace, profile: bool = False
) -> None:
    await poster.run(app, 2000, args.concurrency)  # warm: caches, statements, first pages
    profiler = cProfile.Profile() if profile else None
    wall, loop_cpu, process_cpu = time.perf_counter(), time.thread_time(), time.process_time()
    if profiler:
        profiler.enable()
    await poster.run(app, args.requests, args.concurrency)
    if profiler:
        profiler.disable()
    wall = time.perf_counter() - wall
    loop_cpu, process_cpu = time.thread_time() - loop_cpu, time.process_time() - process_cpu
    per = 1e6 / args.requests
    print(
        f"{name:>6}: {args.requests / wall:8.0f} req/s   loop {loop_cpu * per:6.1f} us"
        f"   process {process_cpu * per:6.1f} us"
    )
    if profiler:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(40)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-app-cost-"))
    config_file = tmp / "bridge.toml"
    config_file.write_text(f'[store]\npath = "{tmp / "bench.db"}"\n')
    poster = Poster()
    async with build(load_config(config_file, env={})) as bridge:
        for round_ in range(1, args.rounds + 1):
            await measure("bare", BARE, poster, args)
            last = round_ == args.rounds
            await measure("bridge", bridge.app, poster, args, profile=args.profile and last)


if __name__ == "__main__":
    try:
        import uvloop  # as `serve` runs, where installed
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())
