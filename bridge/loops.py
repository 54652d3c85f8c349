"""The one shape of every background task: do a step, sleep as long as it asks, repeat.

Steps return how long they can wait; sleeping is on the injected clock and is cut short
by a wake-up (new work) or by shutdown. A step that finds the store unavailable is
retried later rather than ending the task: the store may recover (a full disk freed).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from bridge.clock import Clock, sleep_until_woken
from bridge.errors import StoreUnavailable

log = logging.getLogger(__name__)


async def run_steps(
    step: Callable[[], Awaitable[float]],
    *,
    name: str,
    clock: Clock,
    stop: asyncio.Event,
    retry_after: float,
    wake: asyncio.Event | None = None,
) -> None:
    wake = wake or asyncio.Event()
    while not stop.is_set():
        # Cleared before the step, not after: a wake while it runs (work stored after it
        # read what is due) must cut the sleep short, or that work waits the whole wait.
        wake.clear()
        try:
            wait = await step()
        except StoreUnavailable as exc:
            log.error("%s cannot use the store: %s", name, exc)
            wait = retry_after
        await sleep_until_woken(clock, wait, wake, stop)
