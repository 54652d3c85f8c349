"""Running among other instances on one store: one leader for the singletons, and
wake-ups for work that another instance stored.

The singletons (status polling, storm digests, retention, and taking over the claims of
instances whose lease passed) each spend provider requests or write the same rows, so
one instance runs them at a time: the one holding the store's `Leadership`. Every
instance checks every `LEAD_INTERVAL` seconds: the leader confirms it still holds the
role (and stops its singletons at once when it does not), the others try to take it.
So when a leader dies, another leads within about `LEAD_INTERVAL` (plus, for a frozen
one, the store's own timeout). A singleton's step that was under way when the role was
lost finishes; each is safe to run twice (folds and takeovers are locked in the store),
so a short overlap costs a request, never a text.

One process (SQLite) always leads. The log says who leads, for people and for tests,
once per change and never on a mere confirmation: "leader: this instance (NAME) leads:
..." at INFO each time the role is taken (the first time or again), "... no longer
leads" at WARNING each time it is lost, "another instance leads ..." once at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from bridge.clock import Clock, sleep_until_woken
from bridge.errors import StoreUnavailable
from bridge.loops import LoopHealth, run_steps
from bridge.store.api import Leadership, WorkWatch

log = logging.getLogger("bridge")
LEAD_INTERVAL = 2.0  # seconds between leadership checks: how soon a dead leader is replaced
WATCH_INTERVAL = 5.0  # seconds between checks that the listening connection is up
SINGLETONS = "status polling, storm digests, retention, lease takeovers"

Loop = Callable[
    [asyncio.Event], Coroutine[Any, Any, None]
]  # a background task: runs until the event


class Leader:
    """Runs the singleton loops only while this instance holds `leadership`."""

    def __init__(
        self,
        leadership: Leadership,
        *,
        name: str,
        clock: Clock,
        interval: float = LEAD_INTERVAL,
        on_lead: Callable[[], None] = lambda: None,
        loops: LoopHealth | None = None,
    ) -> None:
        self.leadership = leadership
        self.loops = loops or LoopHealth()  # its failed checks, for /metrics and /healthz
        # Called on taking the role: the dispatcher, asleep for its idle wait as a
        # follower, must look now for the claims of the leader that just died.
        self.on_lead = on_lead
        self.name = name
        self.clock = clock
        self.interval = interval
        self.leading = False  # read by /metrics and by the dispatcher's takeovers
        self._running: list[asyncio.Task[None]] = []

    @property
    def singletons_stopped(self) -> bool:
        """No singleton runs. `leading` drops the moment the role is lost; a step under
        way then still ends (and may make its request) before this says so."""
        return all(task.done() for task in self._running)

    async def run(self, stop: asyncio.Event, singletons: Sequence[tuple[str, Loop]]) -> None:
        """Until `stop`: check every `interval`; start `singletons` on taking the role,
        stop them (and wait for their step to end) on losing it; resign at the end."""
        running = self._running = []
        halt = asyncio.Event()
        said_standby = False
        try:
            while not stop.is_set():
                _raise_failed(running)
                leading = await self._check()
                if leading and not self.leading:
                    log.info("leader: this instance (%s) leads: %s", self.name, SINGLETONS)
                    halt = asyncio.Event()
                    running = [asyncio.create_task(run(halt), name=n) for n, run in singletons]
                    self._running = running
                    self._set(True)
                    self.on_lead()
                elif self.leading and not leading:
                    log.warning("leader: this instance (%s) no longer leads", self.name)
                    self._set(False)
                    await _halt(halt, running)
                    running = []
                    # Its singletons have stopped: ask again at once rather than a check
                    # later, or a bridge whose session merely dropped (nobody else wants
                    # the role) would leave the queue unsent for a whole interval.
                    continue
                elif not leading and not said_standby:
                    log.info("leader: another instance leads; this one (%s) stands by", self.name)
                said_standby = said_standby or not leading
                await sleep_until_woken(self.clock, self.interval, asyncio.Event(), stop)
        finally:
            self._set(False)
            await _halt(halt, running)
            with contextlib.suppress(Exception):
                await self.leadership.resign()

    async def _check(self) -> bool:
        """Whether this instance leads; an error in the check (not only an unavailable
        store) counts as not leading, so the check goes on rather than the bridge ending."""
        state = self.loops.state("leader")
        try:
            leading = await self.leadership.check()
        except StoreUnavailable:  # counted as every loop counts it (bridge.loops)
            state.failures += 1
            return False
        except Exception as exc:  # the leader loop outlives any one check
            if not state.in_a_row:
                log.exception("leader: the leadership check failed; this instance stands by")
            state.failures += 1
            state.in_a_row += 1
            state.error = type(exc).__name__
            return False
        state.in_a_row, state.error = 0, ""
        return leading

    def _set(self, leading: bool) -> None:
        self.leading = leading


def _raise_failed(tasks: list[asyncio.Task[None]]) -> None:
    """A singleton that crashed brings the bridge down, as it did before it had a leader."""
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


async def _halt(halt: asyncio.Event, tasks: list[asyncio.Task[None]]) -> None:
    halt.set()
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)


async def watch_work(
    watch: WorkWatch,
    *,
    clock: Clock,
    stop: asyncio.Event,
    interval: float = WATCH_INTERVAL,
    loops: LoopHealth | None = None,
) -> None:
    """Keep listening for work stored by other instances (reconnect when it drops)."""

    async def step() -> float:
        await watch.check()
        return interval

    try:
        await run_steps(
            step, name="work watch", clock=clock, stop=stop, retry_after=interval, health=loops
        )
    finally:
        await watch.close()
