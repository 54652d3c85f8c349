"""The provider's budget: at most `limit` requests in any sliding window, per API key.

The documentation does not say whether the provider's window is fixed or sliding, so we
assume the strictest reading: a sliding 60 s window, counting every endpoint. Each request
is booked before it is sent (and persisted by the caller, so a restart does not grant a
fresh burst). A small margin covers the delay between booking and the provider's own
timestamp. A 429 pauses every kind of request until its `Retry-After`; without one, for
a pause that doubles with each 429 in a row (a success resets it). Requests booked by
other processes (`sms-bridge provider ...`) are read from the store and counted too.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable

from bridge.clock import Clock

WINDOW_SECONDS = 60.0
WINDOW_MARGIN = 0.5


class SlidingWindowLimiter:
    def __init__(
        self,
        *,
        limit: int,
        clock: Clock,
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
        self.status_cap = max(1, math.floor(limit * status_share))
        self.status_demand = False  # the poller has messages waiting for a state
        self.paused_until = 0.0
        self._booked: deque[tuple[float, str]] = deque()

    def load(self, booked: Iterable[tuple[float, str]]) -> None:
        self._booked.extend(sorted(booked))

    def _expire(self, now: float) -> None:
        while self._booked and self._booked[0][0] <= now - self.window:
            self._booked.popleft()

    def used(self, kind: str | None = None) -> int:
        self._expire(self.clock.now())
        return sum(1 for _, k in self._booked if kind is None or k == kind)

    def _cap(self, kind: str) -> tuple[int, str | None]:
        """How many requests of `kind` fit in a window, and which kind counts against it."""
        if kind == "status":
            return min(self.status_cap, self.limit), "status"
        if self.status_demand:
            # Keep the poller's share free while it has work, so a backlog of sends
            # cannot starve delivery reports.
            status_unused = max(0, self.status_cap - self.used("status"))
            return self.limit - status_unused, None
        return self.limit, None

    def wait_time(self, kind: str = "send") -> float:
        """Seconds until a request of `kind` may go; 0 when it may go now."""
        now = self.clock.now()
        self._expire(now)
        if now < self.paused_until:
            return self.paused_until - now
        cap, counted = self._cap(kind)
        if len(self._booked) >= self.limit:
            return self._booked[0][0] + self.window - now
        relevant = [t for t, k in self._booked if counted is None or k == counted]
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

    def book(self, at: float, kind: str = "send") -> None:
        self._booked.append((at, kind))

    def pause(self, until: float) -> None:
        self.paused_until = max(self.paused_until, until)

    def rate_limited(self, retry_after: float | None) -> float:
        """A 429: pause every request for `retry_after`, else for a doubling backoff."""
        self.strikes += 1
        pause = retry_after
        if pause is None:
            pause = min(self.backoff_max, self.backoff_initial * 2 ** (self.strikes - 1))
        self.pause(self.clock.now() + pause)
        return pause

    def answered(self) -> None:
        """The provider answered without a 429: the next one starts the backoff afresh."""
        self.strikes = 0

    def oldest_relevant(self) -> float:
        return self.clock.now() - self.window
