"""The dispatcher's two figures: rate-budget use under backlog, and acknowledgement-to-
provider latency with an empty queue.

Run by hand:

    python bench/dispatch.py [--minutes 10] [--samples 200]

1. Budget: 3,000 distinct messages queued (nothing to coalesce), the dispatcher and the
   status poller driven on a manual clock against the sandbox on loopback for `minutes`
   simulated minutes; requests per minute against `provider.requests_per_minute` (target
   at least 95 %, never more than 100 % in any 60 s window).
2. Latency: the real clock, the dispatcher running as in `serve`, one message at a time:
   time from the 202 to the provider receiving the request (target p99 under 100 ms). The
   rate limit is raised to 6,000 a minute here, so that it measures the path, not the
   limiter.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bridge.app import build as build_bridge
from bridge.clock import ManualClock, SystemClock
from bridge.config import load_config
from bridge.provider.sandbox import SandboxState, create_sandbox_app
from tests.helpers import max_in_window, served


def config_for(tmp: str, url: str, rpm: int):
    path = Path(tmp) / "bench.toml"
    path.write_text(
        f'[store]\npath = "{tmp}/bench.db"\n[provider]\nbase_url = "{url}/api/v1"\n'
        f'api_key = "k"\nrequests_per_minute = {rpm}\n[dedupe]\nwindow = "0s"\n'
    )
    return load_config(path, env={})


async def budget_use(minutes: float) -> None:
    clock = ManualClock()
    sandbox = SandboxState(clock=clock, api_key="k")
    async with served(create_sandbox_app(sandbox)) as url:
        config = config_for(tempfile.mkdtemp(), url, 100)
        async with (
            build_bridge(config, clock=clock) as bridge,
            served(bridge.app) as api,
            httpx.AsyncClient() as http,
        ):
            await bridge.dispatcher.load_budget()
            for i in range(3000):
                await http.post(
                    f"{api}/api/v1/messages",
                    json={"to": f"+1202555{i % 10000:04d}", "message": f"m {i}"},
                )
            start = clock.now()
            while clock.now() - start < minutes * 60:
                wait = min(await bridge.dispatcher.run_once(), await bridge.poller.run_once(), 5)
                clock.advance(max(wait, 0.01))
    times = [r.at for r in sandbox.requests]
    sends = sum(1 for r in sandbox.requests if r.path.endswith("/send"))
    print(
        f"budget: {len(times)} requests in {minutes:g} simulated minutes at 100/min "
        f"= {len(times) / (minutes * 100):.1%} of the budget ({sends} sends, "
        f"{len(times) - sends} other); most in any 60 s window: {max_in_window(times)}; "
        f"429s: {[r.status for r in sandbox.requests].count(429)}"
    )


async def latency(samples: int) -> None:
    clock = SystemClock()
    sandbox = SandboxState(clock=clock, api_key="k", rate_limit=6000)
    async with served(create_sandbox_app(sandbox)) as url:
        config = config_for(tempfile.mkdtemp(), url, 6000)
        async with (
            build_bridge(config, clock=clock) as bridge,
            served(bridge.app) as api,
            httpx.AsyncClient() as http,
        ):
            runner = asyncio.create_task(bridge.run())
            await asyncio.sleep(0.5)
            delays = []
            for i in range(samples):
                seen = len(sandbox.requests)
                r = await http.post(
                    f"{api}/api/v1/messages", json={"to": "+12025550143", "message": f"latency {i}"}
                )
                acked = time.time()
                assert r.status_code == 202
                while not any(q.path.endswith("/send") for q in sandbox.requests[seen:]):  # noqa: ASYNC110 - polls the sandbox record
                    await asyncio.sleep(0.0005)
                sent = next(q.at for q in sandbox.requests[seen:] if q.path.endswith("/send"))
                delays.append((sent - acked) * 1000)
                await asyncio.sleep(0.05)
            bridge.stop.set()
            await runner
    delays.sort()
    p50 = statistics.median(delays)
    p99 = delays[min(len(delays) - 1, int(len(delays) * 0.99))]
    print(
        f"latency ack -> provider over {samples} messages: p50 {p50:.1f} ms, "
        f"p99 {p99:.1f} ms, max {delays[-1]:.1f} ms"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--samples", type=int, default=200)
    args = parser.parse_args()
    asyncio.run(budget_use(args.minutes))
    asyncio.run(latency(args.samples))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
