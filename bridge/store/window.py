"""The provider's rate window as every backend decides it: may one more request be
booked now, and if not, for how long not.

Pure arithmetic on what a backend read under its lock (SQLite: inside the writer's
transaction; PostgreSQL: under the rate lock), so that both backends, and the CLI's
bookings next to `serve`'s, answer the same question the same way.
"""

from __future__ import annotations

from collections.abc import Sequence


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
