"""Budget pacing: a flood of one text goes in few full calls, an idle alert at once, and
the provider's limit holds in every 60 s window.

The pure decision (`bridge.delivery.pacing.hold`) is checked by its invariants and by a
model of the dispatcher driving it over arbitrary arrivals; the dispatcher itself against
the sandbox provider on loopback, time on a ManualClock shared by bridge and sandbox.
"""

from __future__ import annotations

import re
from collections import deque

import httpx
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import tests.properties  # noqa: F401  (the suite's Hypothesis profile)
from bridge.clock import ManualClock
from bridge.delivery.pacing import hold
from bridge.delivery.ratelimit import SlidingWindowLimiter
from bridge.models import State
from bridge.provider.sandbox import Fault, SandboxState
from bridge.store import Store
from tests.helpers import ToProvider, bridge_config, max_in_window, pump, running_bridge

WINDOW = 60.5  # the limiter's: 60 s and its margin
TEXT = "db-2: disk full, writes failing"


def numbers(count: int, start: int = 0) -> list[str]:
    return [f"+1202{5000000 + start + i:07d}" for i in range(count)]


def calls(sandbox: SandboxState) -> list:
    return [r for r in sandbox.requests if r.path.endswith(("/send", "/send-bulk"))]


# -- the pure decision --------------------------------------------------------------------
def test_hold_cases() -> None:
    base = {"oldest_age": 0.1, "remaining": 99, "window": WINDOW, "max_bulk": 1000}
    assert hold(queued=1, since_last=None, **base) == 0  # first of its text: at once
    assert hold(queued=1000, since_last=0.0, **base) == 0  # full: at once
    assert hold(queued=5, since_last=0.1, **base | {"remaining": 0}) == 0  # limiter's turn
    assert hold(queued=5, since_last=0.7, **base) == 0  # spacing (0.61 s) already passed
    assert hold(queued=1, since_last=0.5, **base | {"oldest_age": 0.5}) == 0  # a trickle
    # 30 recipients in 0.1 s since the last call: wait out the spacing, 0.61 s in all.
    assert hold(queued=30, since_last=0.1, **base) == pytest.approx(WINDOW / 99 - 0.1)
    # ...unless the call would fill first at that rate.
    assert hold(queued=900, since_last=0.1, **base) == pytest.approx(100 / 9000)
    # Less budget left: a longer spacing.
    assert hold(queued=3, since_last=0.1, **base | {"remaining": 10}) == pytest.approx(5.95)


@settings(max_examples=500, deadline=None)
@given(
    queued=st.integers(1, 2000),
    oldest_age=st.floats(0, 600),
    since_last=st.none() | st.floats(0, 120),
    remaining=st.integers(-5, 200),
    limit=st.integers(1, 200),
    max_bulk=st.integers(1, 1000),
)
def test_hold_invariants(
    queued: int,
    oldest_age: float,
    since_last: float | None,
    remaining: int,
    limit: int,
    max_bulk: int,
) -> None:
    args = {"oldest_age": oldest_age, "window": WINDOW, "max_bulk": max_bulk}
    h = hold(queued=queued, since_last=since_last, remaining=remaining, **args)
    assert 0 <= h <= WINDOW  # never past the window
    if since_last is None or queued >= max_bulk or remaining <= 0:
        assert h == 0
    if h > 0:
        assert since_last is not None
        # The call goes no later than what is left spread evenly over a window.
        assert since_last + h <= WINDOW / remaining + 1e-9
        # More budget left never makes a call wait longer.
        assert hold(queued=queued, since_last=since_last, remaining=remaining + 1, **args) <= h


def model(
    arrivals: list[float], *, limit: int, max_bulk: int
) -> tuple[list[tuple[float, int]], int]:
    """The dispatcher's use of `hold`, as a model: a step at each arrival and whenever a
    hold or the window ends; (calls as (time, recipients), steps that found no budget)."""
    pending = deque(sorted(arrivals))
    queue: deque[float] = deque()
    booked: deque[float] = deque()
    sent: list[tuple[float, int]] = []
    last: float | None = None
    starved = 0
    now, wake = pending[0], float("inf")
    while pending or queue:
        while pending and pending[0] <= now:
            queue.append(pending.popleft())
        while booked and booked[0] + WINDOW <= now:  # as the wake below computes it
            booked.popleft()
        wake = float("inf")
        while queue:
            if len(booked) >= limit:
                starved += 1
                wake = booked[0] + WINDOW
                break
            size = min(len(queue), max_bulk)
            h = hold(
                queued=size,
                oldest_age=now - queue[0],
                since_last=None if last is None or now - last >= WINDOW else now - last,
                remaining=limit - len(booked),
                window=WINDOW,
                max_bulk=max_bulk,
            )
            if h > 0:
                wake = now + h
                break
            for _ in range(size):
                queue.popleft()
            sent.append((now, size))
            booked.append(now)
            last = now
        now = min(wake, pending[0] if pending else float("inf"))
    return sent, starved


# No explain phase: tracing the model's loop on a failure takes minutes.
@settings(max_examples=200, deadline=None, phases=[Phase.generate, Phase.shrink])
@given(
    bursts=st.lists(
        st.tuples(st.floats(0, 120), st.integers(1, 400), st.floats(0.01, 20)),
        min_size=1,
        max_size=12,
    )
)
def test_one_text_never_empties_the_window_and_every_recipient_goes_soon(bursts) -> None:
    """Bursts of one text, each `count` arrivals spread evenly over `span` seconds from
    `start` (up to ~4,800 in 2 minutes, up to 40,000 a second): the pacing alone never
    spends the whole window, so no recipient waits for the window to turn, and each
    leaves within a few seconds of arriving."""
    arrivals = [start + span * i / count for start, count, span in bursts for i in range(count)]
    sent, starved = model(arrivals, limit=100, max_bulk=1000)
    assert starved == 0
    assert sum(size for _, size in sent) == len(arrivals)
    assert max_in_window([at for at, _ in sent], WINDOW) <= 100
    # Recipients leave in arrival order: match each to its call, find the longest wait.
    times = sorted(arrivals)
    waited, i = 0.0, 0
    for at, size in sent:
        waited = max(waited, at - times[i])
        i += size
    assert waited <= WINDOW / 20  # 3 s: a spacing with a fifth of the budget left


def test_the_flood_of_the_issue_in_the_model() -> None:
    """3,000 arrivals in 10 s: a handful of calls, the last one within a spacing."""
    arrivals = [i / 300 for i in range(3000)]
    sent, starved = model(arrivals, limit=100, max_bulk=1000)
    assert starved == 0 and len(sent) <= 20
    assert sent[-1][0] - arrivals[-1] <= 1.3


async def test_limiter_remaining_agrees_with_its_wait(store: Store) -> None:
    clock = ManualClock()
    limiter = SlidingWindowLimiter(limit=5, clock=clock, store=store)
    for _ in range(5):
        assert limiter.remaining() > 0 and limiter.wait_time() == 0
        assert await limiter.acquire("send") == 0.0
        clock.advance(1)
    assert limiter.remaining() == 0 and limiter.wait_time() > 0
    assert await limiter.acquire("send") > 0  # and nothing booked
    assert len(await store.request_rows(0)) == 5
    clock.advance(WINDOW - 4.9)  # the first booking leaves the window
    assert limiter.remaining() == 1 and limiter.wait_time() == 0
    await limiter.rate_limited(30)
    assert limiter.remaining() == 0  # paused by a 429: nothing may go


# -- the dispatcher against the sandbox ---------------------------------------------------
async def test_an_idle_alert_goes_at_once_and_a_second_of_its_text_waits(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        posted = clock.now()
        await http.post(f"{url}/api/v1/messages", json={"to": numbers(1)[0], "message": TEXT})
        await bridge.dispatcher.run_once()
        assert [r.at for r in calls(sandbox_state)] == [posted]  # no clock moved: at once
        clock.advance(0.05)
        await http.post(f"{url}/api/v1/messages", json={"to": numbers(1, 1)[0], "message": TEXT})
        await http.post(f"{url}/api/v1/messages", json={"to": numbers(1, 2)[0], "message": "other"})
        wait = await bridge.dispatcher.run_once()
        # The other text went at once; the second of the first waits out its spacing.
        assert [r.path for r in calls(sandbox_state)] == ["/api/v1/send"] * 2
        assert 0 < wait <= WINDOW / 98
        # While it waits, wake-ups do not re-read the queue: a new text waits with it.
        clock.advance(wait / 2)
        await http.post(f"{url}/api/v1/messages", json={"to": numbers(1, 3)[0], "message": "new"})
        assert await bridge.dispatcher.run_once() == pytest.approx(wait / 2)
        assert len(calls(sandbox_state)) == 2
        clock.advance(wait / 2)
        await bridge.dispatcher.run_once()
        assert len(calls(sandbox_state)) == 4
        assert max(r.at for r in calls(sandbox_state)) - posted <= WINDOW / 97


async def flood(bridge, url: str, clock: ManualClock, count: int, per_second: float) -> float:
    """One text, one recipient per request, the dispatcher stepping after each ingest
    (as its wake-up makes it in `serve`); the time of the last acknowledgement."""
    async with httpx.AsyncClient() as http:
        for number in numbers(count):
            response = await http.post(
                f"{url}/api/v1/messages", json={"to": number, "message": TEXT}
            )
            assert response.status_code == 202
            await bridge.dispatcher.run_once()
            clock.advance(1 / per_second)
    return clock.now() - 1 / per_second


async def all_sent(bridge) -> bool:
    return not (await bridge.store.counts()).get("queued")


@pytest.mark.slow  # over ~2 s
async def test_a_growing_flood_goes_in_few_full_calls(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    config = bridge_config(tmp_path, sandbox_url, max_bulk=25)
    async with running_bridge(config, clock) as (bridge, url):
        last_ack = await flood(bridge, url, clock, 300, per_second=100)
        await pump(bridge, clock, lambda: all_sent(bridge), max_seconds=60)
    made = calls(sandbox_state)
    sizes = [len([e for e in sandbox_state.entries if e.created_at == r.at]) for r in made]
    assert sizes[0] == 1  # the first went alone, at once
    assert sizes[1:-1] == [25] * (len(made) - 2)  # then full calls only
    assert len(made) <= 14  # 300 recipients: 12 full calls, the first and the rest
    assert sorted(e.to for e in sandbox_state.entries) == numbers(300)
    assert made[-1].at - last_ack <= WINDOW / 90


@pytest.mark.slow  # over ~2 s
async def test_a_flood_at_the_limit_reaches_the_provider_soon_after_its_last_ack(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """The issue's flood, scaled: 1,000 of one text in 10 s against 100 requests a minute.
    Sent as it came, the budget went on the first second's calls and the rest waited for
    the window to turn (~60 s)."""
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (bridge, url):
        last_ack = await flood(bridge, url, clock, 1000, per_second=100)
        await pump(bridge, clock, lambda: all_sent(bridge), max_seconds=120)
    made = calls(sandbox_state)
    assert made[-1].at - last_ack <= 2.0
    assert len(made) <= 25
    assert 429 not in [r.status for r in sandbox_state.requests]
    assert max_in_window([r.at for r in sandbox_state.requests]) <= 100
    assert len(sandbox_state.entries) == 1000


@pytest.mark.slow  # over ~2 s
async def test_pacing_never_exceeds_the_limit_in_any_window(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """Three texts flooding at once, distinct texts among them and the status poller
    polling, against 20 requests a minute for three simulated minutes."""
    sandbox_state.rate_limit = 20
    config = bridge_config(tmp_path, sandbox_url, requests_per_minute=20)
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        for i, number in enumerate(numbers(540)):
            text = f"{TEXT} ({i % 3})" if i % 10 else f"distinct {i}"
            await http.post(f"{url}/api/v1/messages", json={"to": number, "message": text})
            await bridge.dispatcher.run_once()
            await bridge.poller.run_once()
            clock.advance(1 / 3)
        await pump(bridge, clock, lambda: all_sent(bridge), max_seconds=1800)
    assert 429 not in [r.status for r in sandbox_state.requests]
    assert max_in_window([r.at for r in sandbox_state.requests]) <= 20
    assert sorted(e.to for e in sandbox_state.entries) == numbers(540)


def queue_age(metrics: str) -> float:
    return float(re.search(r"^sms_bridge_oldest_queued_age_seconds (\S+)$", metrics, re.M)[1])


async def test_a_flood_of_distinct_texts_shows_its_queue_age(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """Distinct texts cannot share a call: the limit is physical. The bridge sends 100 at
    once (none held), the rest wait for the window, and /metrics and the console say how
    long the oldest has waited."""
    reader = "read-token-0123456789abcdef"
    extra = f'[tokens.ops]\ntoken = "{reader}"\nscopes = ["read", "send"]\n'
    config = bridge_config(tmp_path, sandbox_url, extra)
    auth = {"Authorization": f"Bearer {reader}"}
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        for i, number in enumerate(numbers(130)):
            r = await http.post(
                f"{url}/api/v1/messages", json={"to": number, "message": f"alert {i}"}, headers=auth
            )
            assert r.status_code == 202, r.text
        await bridge.dispatcher.run_once()
        # The whole window at once: the price list, then 99 texts.
        assert len(sandbox_state.requests) == 100 and len(calls(sandbox_state)) == 99
        assert queue_age((await http.get(f"{url}/metrics", headers=auth)).text) == 0
        clock.advance(30)
        await bridge.dispatcher.run_once()
        assert len(calls(sandbox_state)) == 99
        assert queue_age((await http.get(f"{url}/metrics", headers=auth)).text) == pytest.approx(30)
        overview = (await http.get(f"{url}/ui/overview.json", headers=auth)).json()["queue"]
        assert overview["queued"] == 31 and overview["oldest_age_seconds"] == pytest.approx(30)
        await pump(bridge, clock, lambda: all_sent(bridge), max_seconds=120)
        assert queue_age((await http.get(f"{url}/metrics", headers=auth)).text) == 0
    assert len(calls(sandbox_state)) == 130
    assert calls(sandbox_state)[-1].at - calls(sandbox_state)[0].at >= 60


# -- what a step reads ---------------------------------------------------------------------
async def post_each(url: str, texts: list[tuple[str, str]]) -> None:
    async with httpx.AsyncClient() as http:
        for number, text in texts:
            r = await http.post(f"{url}/api/v1/messages", json={"to": number, "message": text})
            assert r.status_code == 202, r.text


def rows_read(bridge) -> list[int]:
    """How many rows each of the dispatcher's reads of the queue returned, from now on."""
    counts: list[int] = []
    real_due = bridge.store.due

    async def due(now: float, limit: int, **texts: int | None) -> list:
        found = await real_due(now, limit, **texts)
        counts.append(len(found))
        return found

    bridge.store.due = due
    return counts


@pytest.mark.usefixtures("backend")  # the read is SQL of each backend
async def test_a_step_reads_only_the_texts_the_budget_can_take(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """A backlog of distinct alerts while the budget is spent: each step that a freed
    request wakes sends one call, and read the 5,000 oldest rows for it (turned into
    messages and planned on the loop, every 0.6 s, beside ingest). It reads the texts it
    can send, and those it may hold, and still sends the oldest first."""
    sandbox_state.rate_limit = 20
    config = bridge_config(tmp_path, sandbox_url, requests_per_minute=20)
    async with running_bridge(config, clock) as (bridge, url):
        alerts = [(n, f"alert {i}") for i, n in enumerate(numbers(200))]
        await post_each(url, alerts)
        read = rows_read(bridge)
        await bridge.dispatcher.run_once()  # the price list, then 19 texts
        assert len(calls(sandbox_state)) == 19
        assert read == [19]  # of 200 queued
        clock.advance(WINDOW)  # the window turns (the texts sent in it are new again)
        await bridge.dispatcher.run_once()
        assert read[1:] == [20] and len(calls(sandbox_state)) == 39
        assert max_in_window([r.at for r in sandbox_state.requests]) <= 20
    sent = [e.to for e in sorted(sandbox_state.entries, key=lambda e: e.message_id)]
    assert sent == [n for n, _ in alerts[:39]]  # oldest first, none skipped


@pytest.mark.usefixtures("backend")  # the read is SQL of each backend
async def test_a_held_flood_neither_stalls_an_alert_behind_it_nor_splits_its_call(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """One request left, a flood of one text held for more recipients, an alert queued
    behind its rows: the alert takes the request at once (a read of as many texts as
    requests left found the flood alone, and the alert waited out its hold); and the
    flood's next call carries every recipient queued, however many distinct alerts
    came between them (a read of as many rows as one call holds split it)."""
    sandbox_state.rate_limit = 20
    config = bridge_config(tmp_path, sandbox_url, requests_per_minute=20, max_bulk=40)
    async with running_bridge(config, clock) as (bridge, url):
        await post_each(url, [(numbers(1)[0], TEXT)])
        await post_each(url, [(n, f"alert {i}") for i, n in enumerate(numbers(17, 100))])
        await bridge.dispatcher.run_once()  # the price list, the flood's first, 17 alerts
        assert len(calls(sandbox_state)) == 18 and bridge.dispatcher.limiter.remaining() == 1
        clock.advance(0.1)
        flood_numbers = numbers(30, 1)
        alerts = [(n, f"later {i}") for i, n in enumerate(numbers(30, 200))]
        await post_each(
            url,
            [
                x
                for pair in zip(((n, TEXT) for n in flood_numbers), alerts, strict=True)
                for x in pair
            ],
        )
        await bridge.dispatcher.run_once()
        assert calls(sandbox_state)[-1].path == "/api/v1/send"  # the oldest alert...
        assert sandbox_state.entries[-1].message == "later 0"  # ...while the flood waits
        assert bridge.dispatcher.limiter.remaining() == 0
        clock.advance(WINDOW)  # the window turns: the flood's 30 go in one call of 40
        await bridge.dispatcher.run_once()
        bulk = [e.to for e in sandbox_state.entries if e.message == TEXT][1:]
        assert sorted(bulk) == flood_numbers
        assert len({e.bulk_id for e in sandbox_state.entries if e.to in flood_numbers}) == 1
        assert max_in_window([r.at for r in sandbox_state.requests]) <= 20


async def test_a_hold_of_half_a_minute_or_more_waits_instead_of_spinning(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """One request left in the window: a second call of a text is held for up to the
    window (`hold`: window / remaining). A hold of IDLE_WAIT (30 s) or more fell through
    to the idle wait, which found the held text due and answered 0: the dispatcher read
    the queue again and again, a store query each lap (a write transaction on
    PostgreSQL), until the hold ran out. The wait it asks for is held here."""
    config = bridge_config(tmp_path, sandbox_url, requests_per_minute=3)
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        await http.post(f"{url}/api/v1/messages", json={"to": numbers(1)[0], "message": TEXT})
        await bridge.dispatcher.run_once()  # its first call (and the price list)
        clock.advance(1)
        for number in numbers(3, 400):
            await http.post(f"{url}/api/v1/messages", json={"to": number, "message": TEXT})
        waits = []
        for _ in range(20):  # a minute at most, unless it spins
            waits.append(await bridge.dispatcher.run_once())
            clock.advance(max(waits[-1], 0.01))
    assert waits.count(0.0) < 3, waits
    assert len(calls(sandbox_state)) == 2  # the rest in one more call, within the limit


async def test_a_held_text_does_not_put_off_a_failed_logs_reads_retry(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """/logs answered 503 to the look for an unknown outcome while a flood's text was
    held for more recipients: the hold's wait ignored when /logs could be asked again
    (`Reconciler.logs_retry_at`, the backoff: 1-2 s here), and the look came 5 s later,
    when the hold ended."""
    gateway = Fault(status=502, body="<html>Bad Gateway</html>", taken=True, path="/send")
    sandbox_state.faults.append(gateway)
    config = bridge_config(
        tmp_path, sandbox_url, requests_per_minute=10, backoff_initial="2s", backoff_max="2s"
    )
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        messages = f"{url}/api/v1/messages"
        await http.post(messages, json={"to": "+12025550202", "message": "disk 98% on db-3"})
        await http.post(messages, json={"to": numbers(1)[0], "message": TEXT})
        await bridge.dispatcher.run_once()  # the unknown outcome, and the flood's first call
        clock.advance(5)
        sandbox_state.faults.append(Fault(status=503, path="/logs"))
        for number in numbers(3, 400):
            await http.post(messages, json={"to": number, "message": TEXT})
        wait = await bridge.dispatcher.run_once()  # /logs: 503; the flood's text held
    assert [r.status for r in sandbox_state.requests if r.path.endswith("/logs")] == [503]
    assert wait <= 2, f"/logs is asked again in {wait:g}s"


async def test_an_alert_during_a_long_hold_waits_seconds_not_the_hold(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """One request left: a flood's text is held for most of a minute. Wake-ups during a
    hold are answered without reading the queue (each of the flood's acknowledgements
    wakes the dispatcher), so an alert of another text that came then waited for the
    hold's end. The queue is read again every HOLD_LOOK (5 s): the alert takes the
    request within that. The waits `run_once` asks for are followed."""
    config = bridge_config(tmp_path, sandbox_url, requests_per_minute=3)
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        messages = f"{url}/api/v1/messages"
        await http.post(messages, json={"to": numbers(1)[0], "message": TEXT})
        await bridge.dispatcher.run_once()  # its first call (and the price list)
        clock.advance(1)
        for number in numbers(3, 400):
            await http.post(messages, json={"to": number, "message": TEXT})
        wait = await bridge.dispatcher.run_once()  # the flood held
        clock.advance(1)
        posted = clock.now()
        await http.post(messages, json={"to": numbers(1, 900)[0], "message": "db-1 down"})
        for _ in range(10):
            wait = await bridge.dispatcher.run_once()
            if any(e.message == "db-1 down" for e in sandbox_state.entries):
                break
            clock.advance(wait)
    [alert] = [r for r in calls(sandbox_state) if r.at >= posted]
    assert alert.at - posted <= 5, f"the alert waited {alert.at - posted:g}s"
    assert max_in_window([r.at for r in sandbox_state.requests]) <= 3


class SlowFirstArrival(ToProvider):
    """The real transport over loopback; the first request takes `delay` (simulated) to
    reach the provider: a new TCP and TLS connection, a SYN retransmitted."""

    def __init__(self, clock: ManualClock, delay: float) -> None:
        super().__init__()
        self.clock = clock
        self.delay = delay
        self.slowed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if not self.slowed:
            self.slowed = True
            self.clock.advance(self.delay)
        return await self.inner.handle_async_request(request)


@pytest.mark.usefixtures("backend")  # the re-stamp is SQL of each backend
async def test_a_request_slow_to_arrive_counts_from_when_it_came_back(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """A booking was stamped before its call and the provider counts a request when it
    arrives: a request 1 s on its way (the first, GET /pricing, on a new connection) left
    the bridge's window 0.5 s (1 s less the window's margin) before the provider's, and
    130 distinct alerts put 101 requests in one of the provider's minutes: a 429. Each
    booking is now stamped again when its call comes back (the provider counted it
    before that): none reaches a 101st."""
    config = bridge_config(tmp_path, sandbox_url)
    transport = SlowFirstArrival(clock, 1.0)
    async with (
        running_bridge(config, clock, transport=transport) as (bridge, url),
        httpx.AsyncClient() as http,
    ):
        ids = []
        for i in range(130):
            r = await http.post(
                f"{url}/api/v1/messages", json={"to": numbers(1, i)[0], "message": f"alert {i}"}
            )
            assert r.status_code == 202, r.text
            ids += r.json()["ids"]

        async def sent() -> bool:
            states = [(await bridge.store.get(i)).state for i in ids]
            return all(s in (State.SENT, State.DELIVERED) for s in states)

        await pump(bridge, clock, sent, max_seconds=600, step_cap=0.25)
    assert sandbox_state.requests[0].path.endswith("/pricing")
    assert [r.status for r in sandbox_state.requests if r.status == 429] == []
    assert max_in_window([r.at for r in sandbox_state.requests]) <= 100
