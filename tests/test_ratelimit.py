"""The limiter's answers from its copy of the window (`wait_time`, `remaining`), held to
the rules written out plainly: the status poller's share kept free while it has work,
sends counted against the whole window, a pause above all. Every ingest asks the
dispatcher's `wait_time` while the budget is spent, so it is computed without copying
the window; this checks that nothing else changed."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from hypothesis import given, settings
from hypothesis import strategies as st

import tests.properties  # noqa: F401  (the suite's Hypothesis profile)
from bridge.clock import ManualClock
from bridge.delivery.ratelimit import SlidingWindowLimiter
from bridge.store import Store

LIMIT, WINDOW = 10, 60.5


class Window:
    """Another instance's bookings, as the store's window answers them to `sync`."""

    def __init__(self, rows: list[tuple[float, str]]) -> None:
        self.rows = rows

    async def request_rows(self, since: float) -> list[tuple[int, float, str]]:
        return [(i, at, kind) for i, (at, kind) in enumerate(self.rows) if at > since]

    async def requests_paused_until(self, now: float) -> Any:
        return None


def expected_wait(
    bookings: list[tuple[float, str]],
    own_polls: list[float],
    demand: bool,
    now: float,
    kind: str,
    status_cap: int,
) -> tuple[float, int]:
    """(wait, remaining) for a request of `kind`, from the rules themselves."""
    live = sorted((at, k) for at, k in bookings if at > now - WINDOW)
    polls = sum(1 for _, k in live if k == "status")
    if kind == "status":
        cap, counted = min(status_cap, LIMIT), "status"
    elif demand or polls > len([at for at in own_polls if at > now - WINDOW]):
        cap, counted = LIMIT - max(0, status_cap - polls), None
    else:
        cap, counted = LIMIT, None
    relevant = [at for at, k in live if counted is None or k == counted]
    remaining = max(0, min(LIMIT - len(live), cap - len(relevant)))
    if len(live) >= LIMIT:
        return live[0][0] + WINDOW - now, remaining
    if len(relevant) >= cap:
        return (WINDOW if cap <= 0 else relevant[len(relevant) - cap] + WINDOW - now), remaining
    return 0.0, remaining


booking = st.tuples(st.floats(0, 100, allow_nan=False), st.sampled_from(["send", "status"]))


@settings(max_examples=300, deadline=None)
@given(
    others=st.lists(booking, max_size=14),
    own=st.lists(booking, max_size=14),
    demand=st.booleans(),
    share=st.sampled_from([0.1, 0.3, 0.5]),
    later=st.floats(0, 80, allow_nan=False),
)
def test_wait_and_remaining_follow_the_rules(
    others: list[tuple[float, str]],
    own: list[tuple[float, str]],
    demand: bool,
    share: float,
    later: float,
) -> None:
    clock = ManualClock(start=100.0)  # the bookings at 0-100 s are in the window
    limiter = SlidingWindowLimiter(
        limit=LIMIT, clock=clock, store=cast(Any, Window(sorted(others))), status_share=share
    )
    asyncio.run(limiter.sync())
    start = max((at for at, _ in others), default=0.0)
    own = [(start + at / 1000, kind) for at, kind in sorted(own)]  # booked after the sync
    for at, kind in own:
        limiter.booked(at, kind)
    limiter.status_demand = demand
    clock.advance(later)
    now = clock.now()
    own_polls = [at for at, kind in own if kind == "status"]
    for kind in ("send", "status"):
        wait, remaining = expected_wait(
            others + own, own_polls, demand, now, kind, limiter.status_cap
        )
        assert abs(limiter.wait_time(kind) - wait) < 1e-9, kind
        assert limiter.remaining(kind) == remaining, kind
        seen.add((wait > 0, remaining > 0))


seen: set[tuple[bool, bool]] = set()


def test_the_rules_were_met_both_ways() -> None:
    """The examples above waited and went (run after them, in file order)."""
    if seen:
        assert {wait for wait, _ in seen} == {True, False}


async def test_a_booking_counts_from_when_its_call_came_back(store: Store) -> None:
    """A booking is stamped before its call; the provider counts the call when it
    arrives, up to a connect timeout later. When the call comes back the booking moves
    to then, in the limiter's copy and in the store (what `sync` and every other
    instance read): once, whichever task the call ran in (the poller reads /logs in a
    task of its own), and never a booking this task did not make last."""
    clock = ManualClock()
    limiter = SlidingWindowLimiter(limit=2, clock=clock, store=store, window=WINDOW)
    start = clock.now()
    assert await limiter.acquire("send") == 0.0
    clock.advance(3.0)  # a slow connect: the provider counts it about now
    await limiter.came_back()
    await limiter.came_back()  # a second call with no booking of its own moves nothing
    assert await limiter.acquire("status") == 0.0
    clock.advance(1.0)
    await asyncio.ensure_future(limiter.came_back())  # the call in a task of its own
    await limiter.came_back()
    moved = [start + 3.0, start + 4.0]
    assert [b.at for b in await store.request_rows(0)] == moved
    clock.advance(WINDOW - 2.0)  # the first stamps left the window; the calls have not
    assert abs(limiter.wait_time("send") - 1.0) < 1e-9
    await limiter.sync()
    assert abs(limiter.wait_time("send") - 1.0) < 1e-9
    assert await limiter.acquire("send") > 0
