"""The provider's rate window as every backend decides it: may one more request be
booked now, and if not, for how long not.

Pure arithmetic on what a backend read under its lock (SQLite: inside the writer's
transaction; PostgreSQL: under the rate lock), so that both backends, and the CLI's
bookings next to `serve`'s, answer the same question the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeAlias

# A booking's time: a number, or the caller's clock (`clock.now`), read by the store only
# once it holds what the booking waits for (a pooled connection, the rate lock, the
# writer's turn). A time read before those waits is old by the time the request is made:
# under a flood, a pool wait longer than the window's margin let the provider see more
# than the limit in one of its minutes.
Stamp: TypeAlias = "float | Callable[[], float]"


def read_stamp(at: Stamp) -> float:
    """The booking's time, read now if `at` is a clock."""
    return at() if callable(at) else at


def wait_to_book(
    booked: Sequence[float], at: float, *, limit: int, window: float, paused_until: float = 0.0
) -> float:
    """Seconds until a request may be booked at `at`; 0.0 when it may be now.

    `booked`: the times of the bookings in (at - window, ...], oldest first (a booking
    stamped after `at` by an instance whose clock runs ahead counts too: the provider
    counts it). A pause in force (a 429's Retry-After, a refused key) holds everything.
    """
    if at < paused_until:
        return paused_until - at
    if len(booked) < limit:
        return 0.0
    if limit <= 0:
        return window
    return max(0.0, booked[len(booked) - limit] + window - at)
