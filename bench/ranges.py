"""How long one API request naming 100 new unknown numbers holds the event loop.

Every recipient of a request is resolved on the loop (parse, firewall); a number the
phone metadata does not know is also placed in its range (bridge.ranges), the costly
part. The bridge runs in this process on a loopback port (the in-process sandbox as its
provider); a ticker on the same loop records the longest gap between its 1 ms sleeps
while each request runs. Each round names 100 numbers no earlier round named (+1, +44,
+49, unknown to the metadata): the first round also pays each calling code's first use.

    python bench/ranges.py [--rounds 6]

Prints each round's request time and longest loop stall, with the load average.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import os
import random
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx
import phonenumbers

from bridge.app import build
from bridge.config import load_config
from bridge.service import uvicorn_server
from bridge.sockets import bind_socket


def unknown_numbers(seed: int, rounds: int, count: int = 100) -> list[list[str]]:
    """Per round, possible numbers the metadata does not know, over +1, +44 and +49,
    that the firewall lets through (one refused number ends a request's resolving).
    Run in a process of its own, so the bridge's caches start cold."""
    from bridge.errors import InputError
    from bridge.firewall import Firewall

    rng, firewall = random.Random(seed), Firewall()
    out: list[list[str]] = []
    codes = [1] * 40 + [44] * 30 + [49] * 30
    for _ in range(rounds):
        numbers: list[str] = []
        while len(numbers) < count:
            e164 = f"+{codes[len(numbers)]}{rng.randint(10**9, 10**10 - 1)}"
            number = phonenumbers.parse(e164, None)
            if not phonenumbers.is_possible_number(number) or (
                phonenumbers.number_type(number) != phonenumbers.PhoneNumberType.UNKNOWN
            ):
                continue
            try:
                firewall.number(e164)
            except InputError:
                continue
            numbers.append(e164)
        out.append(numbers)
    return out


async def bench(rounds: int) -> None:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        batches = pool.submit(unknown_numbers, 20240601, rounds).result()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bridge.toml"
        # Premium checks on (the default); the store's writes are not what is measured.
        path.write_text(f'[store]\npath = "{tmp}/b.db"\n[dedupe]\nwindow = 0\n')
        config = load_config(path, env={})
        async with build(config) as bridge:
            sock = bind_socket("127.0.0.1:0")
            server = uvicorn_server(bridge.app, http=config.http)
            task = asyncio.create_task(server.serve(sockets=[sock]))
            while not server.started:  # noqa: ASYNC110 (uvicorn sets a flag, no event)
                await asyncio.sleep(0.01)
            url = f"http://127.0.0.1:{sock.getsockname()[1]}/api/v1/messages"
            stalls, times = [], []
            async with httpx.AsyncClient(timeout=60) as http:
                for index in range(rounds):
                    numbers = batches[index]
                    worst, stop = 0.0, asyncio.Event()

                    async def ticker(stop: asyncio.Event) -> None:
                        nonlocal worst
                        last = time.perf_counter()
                        while not stop.is_set():
                            await asyncio.sleep(0.001)
                            now = time.perf_counter()
                            worst, last = max(worst, now - last), now

                    tick = asyncio.create_task(ticker(stop))
                    started = time.perf_counter()
                    answer = await http.post(url, json={"to": numbers, "message": "bench"})
                    took = time.perf_counter() - started
                    stop.set()
                    await tick
                    kinds = answer.status_code
                    print(
                        f"round {index}: {took * 1000:.0f} ms, longest loop stall"
                        f" {worst * 1000:.0f} ms (HTTP {kinds})"
                    )
                    if index:
                        stalls.append(worst)
                        times.append(took)
            server.should_exit = True
            await task
            sock.close()
    if stalls:
        print(
            f"warm rounds: median stall {statistics.median(stalls) * 1000:.0f} ms,"
            f" max {max(stalls) * 1000:.0f} ms; median request"
            f" {statistics.median(times) * 1000:.0f} ms; load average"
            f" {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
        )


def main() -> None:
    logging.basicConfig(level=logging.ERROR)  # not the "sending anyway" line per number
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    asyncio.run(bench(args.rounds))


if __name__ == "__main__":
    main()
