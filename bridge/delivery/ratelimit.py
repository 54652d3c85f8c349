"""The provider's budget: at most `limit` requests in any sliding window, per API key,
for every instance of a cluster together.

The documentation does not say whether the provider's window is fixed or sliding, so we
assume the strictest reading: a sliding 60 s window, counting every endpoint. The
provider counts a request when it arrives, after its booking by as long as the way there
took (a new TCP and TLS connection, a SYN sent again after 1 s, a slow connect up to
`provider.connect_timeout`), and before its answer: so a booking is stamped again when
its call comes back, answered or failed (`came_back`, which the provider client calls
after every request), and counts from then. The window then holds each request at least
as long as the provider does. A margin (WINDOW_MARGIN) covers half a second of what no
answer tells: a call cut short by a stop, or the process dying mid-call, keeps its first
stamp, short of the provider's by that one call's way there (its connect: up to the
connect timeout). A margin of the connect timeout for every request instead (65 s, not
60.5) would cost ~7 % of the throughput at all times, for what only a crash mid-call
leaves; and a SYN retried twice, or a slow TLS handshake, outlasts any fixed margin
short of the connect timeout.

The window lives in the store, not here: every request (sends, status polls, /logs
reconciliation, the price list, probes, and the CLI's) is booked there before it is
made, atomically (`book_request`, or `claim` with a limit: count, check the pause,
insert, commit; on PostgreSQL under one lock for the cluster), so N instances never
book more than `limit` together and a restart does not grant a fresh burst. A booking
refused tells how long to wait. This limiter keeps a copy of the window, re-read whole
at each dispatcher step (`sync`): a cursor by sequence number could miss a row that
another instance committed late. From that copy it answers what the dispatcher, the
pacer and the poller ask before they try (`wait_time`, `remaining`); the store has the
last word.

A 429 pauses every request of every instance until its `Retry-After`; without one, for
a pause that doubles with each 429 in a row (a success resets it). The pause is a row
of the store too, honoured by every booking. The status poller's share: while it has
messages waiting for a state (here, or on another instance, seen as status bookings in
the window that this limiter did not make), sends leave its unused share free.
"""

from __future__ import annotations

import bisect
import contextvars
import logging
import math
from collections import deque
from dataclasses import dataclass

from bridge.clock import Clock
from bridge.store.api import RateWindow

log = logging.getLogger(__name__)

WINDOW_SECONDS = 60.0
WINDOW_MARGIN = 0.5  # a call that never came back (see above); the others are re-stamped


class StampRead:
    """The clock as a booking's `Stamp`, remembering the time the store read from it
    (the last read: a store may read it twice, the booking's time last)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.at = clock.now()

    def __call__(self) -> float:
        self.at = self.clock.now()
        return self.at


@dataclass
class Pending:
    """A booking whose call has not come back yet: re-stamped once, when it does."""

    at: float
    kind: str
    settled: bool = False


class SlidingWindowLimiter:
    def __init__(
        self,
        *,
        limit: int,
        clock: Clock,
        store: RateWindow,
        status_share: float = 0.1,
        window: float = WINDOW_SECONDS + WINDOW_MARGIN,
        backoff_initial: float = 5.0,
        backoff_max: float = 600.0,
    ) -> None:
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.strikes = 0  # 429s in a row
        self.limit = limit
        self.window = window
        self.clock = clock
        self.store = store
        self.status_cap = max(1, math.floor(limit * status_share))
        self.status_demand = False  # this instance's poller has messages waiting for a state
        self.paused_until = 0.0
        self.pause_reason = ""
        self._booked: deque[tuple[float, str]] = deque()  # the store's window, as last read
        self._own_status: deque[float] = deque()  # status bookings made here
        # The booking made last in this task (the dispatcher's, the poller's, the
        # reconciler's), for `came_back` after its call: per task, since they book and
        # call at once; a read the poller runs in a task of its own sees it too.
        self._pending: contextvars.ContextVar[Pending | None] = contextvars.ContextVar(
            f"pending-booking-{id(self)}", default=None
        )

    # -- the copy of the store's window --------------------------------------------------
    async def sync(self) -> None:
        """Re-read the whole window and the pause from the store (every instance's)."""
        now = self.clock.now()
        rows = await self.store.request_rows(now - self.window)
        pause = await self.store.requests_paused_until(now)
        self._booked = deque(sorted((at, kind) for _, at, kind in rows))
        if pause is not None and pause.until > self.paused_until:
            self.paused_until, self.pause_reason = pause.until, pause.reason

    def _expire(self, now: float) -> None:
        while self._booked and self._booked[0][0] <= now - self.window:
            self._booked.popleft()
        while self._own_status and self._own_status[0] <= now - self.window:
            self._own_status.popleft()

    def used(self, kind: str | None = None) -> int:
        self._expire(self.clock.now())
        return sum(1 for _, k in self._booked if kind is None or k == kind)

    def _cap(self, kind: str) -> tuple[int, str | None]:
        """How many requests of `kind` fit in a window, and which kind counts against it."""
        if kind == "status":
            return min(self.status_cap, self.limit), "status"
        polls = self.used("status")  # one pass over the window (every ingest asks)
        # Status demand: our poller waits for states, or another instance's polls
        # (status bookings we did not make are in the window).
        if self.status_demand or polls > len(self._own_status):
            # Keep the poller's share free while it has work, so a backlog of sends
            # cannot starve delivery reports.
            status_unused = max(0, self.status_cap - polls)
            return self.limit - status_unused, None
        return self.limit, None

    def booking_limit(self, kind: str = "send") -> int:
        """The bound the store books a request of `kind` under: every booking counts."""
        cap, counted = self._cap(kind)
        return cap if counted is None else self.limit

    def wait_time(self, kind: str = "send") -> float:
        """Seconds until a request of `kind` may go; 0 when it may go now."""
        now = self.clock.now()
        self._expire(now)
        if now < self.paused_until:
            return self.paused_until - now
        cap, counted = self._cap(kind)
        if len(self._booked) >= self.limit:
            return self._booked[0][0] + self.window - now
        if counted is None:  # every booking counts: the window itself, not a copy of it
            if len(self._booked) >= cap:
                if cap <= 0:
                    return self.window
                return self._booked[len(self._booked) - cap][0] + self.window - now
            return 0.0
        relevant = [t for t, k in self._booked if k == counted]
        if len(relevant) >= cap:
            if cap <= 0:
                return self.window
            return relevant[len(relevant) - cap] + self.window - now
        return 0.0

    def remaining(self, kind: str = "send") -> int:
        """Requests of `kind` that may still go in the window now; 0 while paused."""
        now = self.clock.now()
        self._expire(now)
        if now < self.paused_until:
            return 0
        cap, counted = self._cap(kind)
        relevant = sum(1 for _, k in self._booked if counted is None or k == counted)
        return max(0, min(self.limit - len(self._booked), cap - relevant))

    # -- booking -------------------------------------------------------------------------
    async def acquire(self, kind: str) -> float:
        """Book one request of `kind` in the store before making it: 0.0 when booked
        (make it now), else the seconds to wait (nothing booked). The poller's polls are
        `status`; every other kind counts as a send."""
        counted = "status" if kind == "status" else "send"
        wait = self.wait_time(counted)
        if wait > 0:
            return wait
        # The clock, not a time read now: the store reads it once it holds the pool's
        # connection and the lock, so a wait for them does not age the booking.
        stamp = self.stamp()
        refused = await self.store.book_request(
            stamp, kind, limit=self.booking_limit(counted), window=self.window
        )
        if refused > 0:  # another instance took the room, or paused us: look again
            await self.sync()
            return max(refused, self.wait_time(counted))
        self.booked(stamp.at, kind)  # the store's stamp, which `came_back` moves
        return 0.0

    def stamp(self) -> StampRead:
        """The clock to hand a booking (`book_request`, `claim`): it tells what time the
        store stamped, for `booked`."""
        return StampRead(self.clock)

    def booked(self, at: float, kind: str) -> None:
        """A booking the store made for us (`acquire`, or a bounded `claim`) at `at`,
        whose call this task makes next (`came_back` moves it once that call is over)."""
        self._booked.append((at, kind))
        if kind == "status":
            self._own_status.append(at)
        self._pending.set(Pending(at, kind))

    async def came_back(self) -> None:
        """The call booked last in this task came back, answered or failed: its booking
        counts from now, here and in the store. The provider counts a request when it
        arrives, which is after its booking by as long as the way there took (a new
        TCP and TLS connection, a SYN sent again after 1 s, a connect of up to
        `provider.connect_timeout`), and before the call came back: stamped now, the
        booking leaves the window no earlier than the provider's count of it does. The
        client calls this after every request (`ProviderClient(after_call=)`); a call
        with no booking of its own in this task (one made already, or none) moves
        nothing. A call cut short by a stop, or the process dying mid-call, leaves the
        first stamp (WINDOW_MARGIN covers half a second of it)."""
        pending = self._pending.get()
        if pending is None or pending.settled:
            return
        pending.settled = True
        self._pending.set(None)
        now = self.clock.now()
        if now <= pending.at:
            return
        try:
            self._booked.remove((pending.at, pending.kind))
        except ValueError:
            pass  # left the copy (a sync re-read it already moved, or it expired)
        else:
            bisect.insort(self._booked, (now, pending.kind))
        if pending.kind == "status" and pending.at in self._own_status:
            self._own_status.remove(pending.at)
            bisect.insort(self._own_status, now)
        try:
            await self.store.restamp_request(pending.at, pending.kind, now)
        except Exception:
            # The call's outcome matters more than this write: it goes on to be
            # recorded. The booking keeps its first stamp, as after a crash mid-call.
            log.warning("a booking's call came back, its stamp not moved", exc_info=True)

    # -- pauses --------------------------------------------------------------------------
    async def pause(self, until: float, reason: str) -> None:
        """Hold every request of every instance until `until` (here at once, then in the
        store for the others)."""
        if until > self.paused_until:
            self.paused_until, self.pause_reason = until, reason
        await self.store.pause_requests(until, reason)

    async def rate_limited(self, retry_after: float | None) -> float:
        """A 429: pause every request for `retry_after`, else for a doubling backoff.
        A Retry-After of 0 (or a date past) is none: a 429 says the window is full, and
        taken at its word, "now" sent again at once into the same 429, as often as the
        bridge's own window allowed."""
        self.strikes += 1
        pause = retry_after
        if not pause:
            pause = min(self.backoff_max, self.backoff_initial * 2 ** (self.strikes - 1))
        await self.pause(self.clock.now() + pause, "429 from the provider")
        return pause

    def answered(self) -> None:
        """The provider answered without a 429: the next one starts the backoff afresh."""
        self.strikes = 0
