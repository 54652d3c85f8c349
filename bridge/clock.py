"""Time, injected: every window, backoff and poll interval reads a `Clock`.

Production uses `SystemClock`; tests and benchmarks drive a `ManualClock` so that a
rate window of a minute passes without anyone sleeping for one.
"""

from __future__ import annotations

import asyncio
import functools
import time
import zoneinfo
from datetime import UTC, tzinfo
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the Unix epoch."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class ManualClock:
    """A clock that moves only when told; sleepers wake when time passes them."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += max(0.0, seconds)
        due = [s for s in self._sleepers if s[0] <= self._now]
        self._sleepers = [s for s in self._sleepers if s[0] > self._now]
        for _, future in due:
            if not future.done():
                future.set_result(None)

    def wakes(self) -> list[float]:
        """The times this clock's sleepers wait for: a test waits for a loop to be asleep
        again before it moves time, or the loop would sleep past the step."""
        return sorted(at for at, future in self._sleepers if not future.done())

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((self._now + seconds, future))
        await future


async def sleep_until_woken(
    clock: Clock, seconds: float, wake: asyncio.Event, stop: asyncio.Event
) -> None:
    """Sleep on the injected clock, cut short by new work or by shutdown."""
    if seconds <= 0:
        await asyncio.sleep(0)
        return
    sleeper = asyncio.ensure_future(clock.sleep(seconds))
    waker = asyncio.ensure_future(wake.wait())
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({sleeper, waker, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (sleeper, waker, stopper):
            task.cancel()
        await asyncio.gather(sleeper, waker, stopper, return_exceptions=True)


@functools.lru_cache(maxsize=64)
def zone(name: str) -> tzinfo:
    """An IANA zone by name (config validated it); UTC for "" or "UTC"."""
    return UTC if name in ("", "UTC") else zoneinfo.ZoneInfo(name)
