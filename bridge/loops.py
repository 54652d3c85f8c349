"""The one shape of every background task: do a step, sleep as long as it asks, repeat.

Steps return how long they can wait; sleeping is on the injected clock and is cut short
by a wake-up (new work) or by shutdown. A step that finds the store unavailable or busy
is retried later rather than ending the task: the store may recover (a full disk freed).
It is counted (`LoopHealth.failures`, /metrics) but does not make the loop "failing":
/readyz says the store is down, and a restart (what a failing /healthz asks for) cannot
bring a store back.

Any other error in a step (a bug, a driver's error nobody classified) does not end the
task either: a dead dispatcher leaves acknowledged alerts unsent for good, and ended
the whole bridge with it. The step is retried after a backoff that doubles with each
failure in a row (from the loop's `retry_after`, up to `MAX_BACKOFF`): its traceback is
logged once for each new kind of failure, each failure is counted (`LoopHealth`, read
by /metrics), and a loop whose steps keep failing makes /healthz and /readyz say so, so
that an orchestrator restarts a bridge that cannot recover by itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from bridge.clock import Clock, sleep_until_woken
from bridge.errors import StoreUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_BACKOFF = 300.0  # seconds: the longest wait after a failed step (unless retry_after is longer)
FAILING_AFTER = 3  # failed steps in a row before the health checks call a loop failing


@dataclass
class LoopState:
    """One loop's record: its failures since start, and the run it is in now."""

    failures: int = 0  # failed steps since start, the store's included (a counter: /metrics)
    in_a_row: int = 0  # unexpected errors since its last good step (not the store's)
    error: str = ""  # the last one's type (its words may quote anything: the log has them)


@dataclass
class LoopHealth:
    """Every background loop's failures, for /metrics and the health checks (one per
    bridge, handed to each part that runs a loop)."""

    loops: dict[str, LoopState] = field(default_factory=dict)

    def state(self, name: str) -> LoopState:
        return self.loops.setdefault(name, LoopState())

    def failures(self) -> dict[str, float]:
        """Failed steps since start, by loop: an unexpected error, or the store
        unavailable or busy (a deadlock, a lock not had in time, a full disk)."""
        return {name: float(s.failures) for name, s in self.loops.items()}

    def failing(self) -> dict[str, str]:
        """The loops whose last `FAILING_AFTER` steps or more all failed, and why."""
        return {
            name: f"{s.in_a_row} steps in a row failed ({s.error}): see the log"
            for name, s in self.loops.items()
            if s.in_a_row >= FAILING_AFTER
        }


def backoff(retry_after: float, in_a_row: int) -> float:
    """The wait after the `in_a_row`-th failed step in a row: doubling from `retry_after`."""
    ceiling = max(retry_after, MAX_BACKOFF)
    return min(ceiling, retry_after * 2.0 ** min(in_a_row - 1, 32))


async def run_steps(
    step: Callable[[], Awaitable[float]],
    *,
    name: str,
    clock: Clock,
    stop: asyncio.Event,
    retry_after: float,
    wake: asyncio.Event | None = None,
    health: LoopHealth | None = None,
) -> None:
    wake = wake or asyncio.Event()
    state = (health or LoopHealth()).state(name)
    logged: set[str] = set()  # the kinds of failure whose traceback this run logged
    try:
        while not stop.is_set():
            # Cleared before the step, not after: a wake while it runs (work stored after it
            # read what is due) must cut the sleep short, or that work waits the whole wait.
            wake.clear()
            try:
                wait = await step()
            except StoreUnavailable as exc:  # StoreBusy too
                # Counted: a store that refused every step for an hour showed as a loop
                # with no failure at all. Not in a row: see the module's docstring.
                state.failures += 1
                log.error("%s cannot use the store: %s", name, exc)
                wait = retry_after
            except Exception as exc:  # the loop outlives any one step
                state.failures += 1
                state.in_a_row += 1
                state.error = type(exc).__name__
                wait = backoff(retry_after, state.in_a_row)
                kind = f"{type(exc).__module__}.{type(exc).__qualname__}"
                if kind not in logged:
                    logged.add(kind)
                    log.exception("%s: a step failed; retrying in %gs", name, wait)
                else:
                    log.debug("%s: a step failed again (%s); retrying in %gs", name, exc, wait)
                # No wake cuts this wait short: every ingest wakes the dispatcher, and a step
                # that fails at once would otherwise run once per acknowledged alert.
                await sleep_until_woken(clock, wait, asyncio.Event(), stop)
                continue
            if state.in_a_row:
                log.warning("%s: steps succeed again after %d failures", name, state.in_a_row)
                state.in_a_row, state.error = 0, ""
                logged.clear()
            await sleep_until_woken(clock, wait, wake, stop)
    finally:
        # A loop that stopped (shutdown, or a singleton halted when its instance lost
        # the lead) is not failing: kept, its failures in a row made a follower's
        # /healthz say 503 for a loop it no longer runs. The counter stays.
        state.in_a_row, state.error = 0, ""


class Stopped(Exception):
    """A read cut short by a stop (`unless_stopped`): nothing was learnt from it."""


async def unless_stopped(read: Coroutine[Any, Any, T], stop: asyncio.Event | None) -> T:
    """`read`, cancelled if `stop` is set before it is done (Stopped, then).

    For reads only (/logs, say): a slow provider held a stop for a whole request timeout
    per read under way, past Docker's 10 s grace, while cutting a read loses nothing
    (what it would have told is read again at the next start). A request that changes
    something (a send) is never cut: whether it went would be unknown."""
    if stop is None:
        return await read
    if stop.is_set():
        read.close()  # never started
        raise Stopped
    task = asyncio.ensure_future(read)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # our own cancellation (a task group ending) takes both with it
        stopper.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
    if task.cancelled():
        raise Stopped
    return task.result()
