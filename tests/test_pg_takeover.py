"""A dead instance's claims are taken over when its lease runs out, not at the next idle
look: an idle dispatcher sleeps until the first lease of another owner expires.

A real bridge on a real PostgreSQL database (tests/postgres.py) and the sandbox on
loopback; time is a ManualClock, so the lease passes without sleeping.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from bridge.clock import ManualClock
from bridge.delivery.cluster import Leader
from bridge.delivery.dispatcher import IDLE_WAIT, LEASE_SLACK
from bridge.delivery.reconcile import RECONCILE_DELAY
from bridge.models import Message, State
from bridge.provider.sandbox import SandboxState
from bridge.provider.sandbox.faults import Fault
from bridge.store.postgres.base import BUDGET_LOCK
from bridge.store.postgres.store import PostgresStore
from tests import helpers
from tests.helpers import bridge_config, pump, running_bridge

LEASE = 5.0


@pytest.fixture
def on_postgresql(postgres_url: str) -> Iterator[None]:
    helpers.STORE_URL["url"] = postgres_url
    try:
        yield
    finally:
        helpers.STORE_URL["url"] = ""


def _leased_bridge(
    tmp_path: Path, clock: ManualClock, sandbox_url: str, extra: str = "", **provider: object
) -> AbstractAsyncContextManager[Any]:
    """A bridge whose claims hold for LEASE."""
    extra = f'[cluster]\nlease = "{LEASE:g}s"\n{extra}'
    return running_bridge(bridge_config(tmp_path, sandbox_url, extra, **provider), clock)


async def _post(url: str, text: str, **more: str) -> int:
    async with httpx.AsyncClient() as http:
        response = await http.post(
            f"{url}/api/v1/messages", json={"to": "+12025550143", "message": text, **more}
        )
    [mid] = response.json()["ids"]
    return int(mid)


async def _in_flight(
    bridge: Any,
    sandbox_state: SandboxState,
    path: str = "/send",
    step: Callable[[], Awaitable[float | None]] | None = None,
) -> asyncio.Task[float | None]:
    """A dispatcher step (or `step`) started, once its call to `path` has reached the
    sandbox (whose fault holds the answer back): the message is claimed by then, the
    claim commits before the call. Waits for the call itself, not for a time: a starved
    machine only makes it later."""
    calls = len(sandbox_state.requests)
    sending = asyncio.create_task((step or bridge.dispatcher.run_once)())
    while not any(r.path.endswith(path) for r in sandbox_state.requests[calls:]):
        if sending.done():  # the step ended without the call: say why
            raise AssertionError(f"no call made; the step returned {sending.result()}")
        await asyncio.sleep(0.01)
    return sending


@pytest.mark.usefixtures("on_postgresql")
async def test_an_idle_dispatcher_wakes_when_a_dead_instances_lease_runs_out(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    async with _leased_bridge(tmp_path, clock, sandbox_url) as (bridge, url):
        mid = await _post(url, "ups on battery")
        # Another instance claimed it and died before sending: its lease is all that is left.
        now = clock.now()
        assert await bridge.store.claim([mid], now, owner="dead", lease_until=now + LEASE) == [mid]
        # Not the leader: the takeover is not this instance's, it idles as before.
        assert await bridge.dispatcher.run_once() == IDLE_WAIT
        # The leader (as Leader.run makes it: the role really taken in PostgreSQL) wakes
        # for the lease instead.
        assert await bridge.leader.leadership.check()
        bridge.leader.leading = True
        try:
            wait = await bridge.dispatcher.run_once()
        finally:  # its own connection: Leader.run resigns at the end, this test does too
            await bridge.leader.leadership.resign()
        assert wait == pytest.approx(LEASE + LEASE_SLACK) and wait < IDLE_WAIT
        clock.advance(wait)

        async def sent() -> bool:
            return (await bridge.store.get(mid)).state in (State.SENT, State.DELIVERED)

        await pump(bridge, clock, sent, max_seconds=120)
        # Checked in /logs first (the dead one never sent it), then sent exactly once.
        assert [r.path for r in sandbox_state.requests if r.path.endswith("/send")] == [
            "/api/v1/send"
        ]


async def test_taking_the_lead_wakes_the_dispatcher(postgres_url: str, clock: ManualClock) -> None:
    """A follower's dispatcher sleeps its idle wait (30 s): the leader that died may have
    left claims, so taking the role wakes it to look at their leases now."""
    store = PostgresStore(postgres_url, max_connections=2)
    await store.open()
    woken, stop = asyncio.Event(), asyncio.Event()
    leader = Leader(
        store.leadership("singletons", holder="b"), name="b", clock=clock, on_lead=woken.set
    )
    task = asyncio.create_task(leader.run(stop, []))
    try:
        await asyncio.wait_for(woken.wait(), 10)
        assert leader.leading
    finally:
        stop.set()
        await task
        await store.close()


async def _renewer_asleep(clock: ManualClock) -> None:
    """Until the claim's renewer sleeps again, due within the next step: moved before
    that, the clock would leave it asleep past the step (a slow renewal on a starved
    machine), and the lease would lapse for the test's haste, not the bridge's."""
    deadline = time.monotonic() + 60
    while not any(clock.now() < at <= clock.now() + LEASE / 2 for at in clock.wakes()):
        if time.monotonic() > deadline:
            raise AssertionError(f"the renewer is not asleep: {clock.wakes()}")
        await asyncio.sleep(0.01)


async def _lease_runs_past(store: PostgresStore, now: float, mid: int | None = None) -> bool:
    """Until the in-flight claim's lease runs past `now` (renewed if need be): waits for
    the renewal's write itself, not for a time (a starved machine only makes it later).
    With `mid`, or until that message is no longer `sending`: whether it still is."""
    deadline = time.monotonic() + 60  # only a renewal that never comes ends here
    while (await store.next_lease_expiry(owner="nobody") or 0) <= now:
        if mid is not None and (await store.get(mid)).state != State.SENDING:  # type: ignore[union-attr]
            return False
        if time.monotonic() > deadline:
            raise AssertionError(f"the claim in flight was not renewed past {now}")
        await asyncio.sleep(0.01)
    return True


async def _held_past_three_leases(
    bridge: Any,
    clock: ManualClock,
    sandbox_state: SandboxState,
    url: str,
    text: str,
    renewed: Callable[[], bool] = lambda: True,
) -> tuple[int, asyncio.Event, asyncio.Task[float | None]]:
    """`text` posted and its provider call held (the provider takes it; its answer waits
    for the event returned) while the clock moves three leases on, the lease renewed
    (when `renewed()` says a renewal was tried) each half lease."""
    mid = await _post(url, text)
    answer = asyncio.Event()
    sandbox_state.faults.append(Fault(status=0, hold=answer, path="/send"))
    sending = await _in_flight(bridge, sandbox_state)
    for _ in range(6):
        await _renewer_asleep(clock)
        clock.advance(LEASE / 2)
        if renewed():
            await _lease_runs_past(bridge.store, clock.now())
    return mid, answer, sending


@pytest.mark.usefixtures("on_postgresql")
async def test_a_send_in_flight_past_its_lease_is_not_taken_over(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """A provider call that outlasts the lease (held until the clock has moved three
    leases on) keeps its claim: renewed while in flight, so another instance's sweep
    finds nothing to take over, and the text goes once."""
    async with _leased_bridge(tmp_path, clock, sandbox_url) as (bridge, url):
        mid, answer, sending = await _held_past_three_leases(
            bridge, clock, sandbox_state, url, "pdu overload"
        )
        assert not sending.done()
        now = clock.now()
        taken = await bridge.store.unsettled(now, owner="other", lease_until=now + LEASE)
        assert taken == []
        answer.set()
        await sending
        assert (await bridge.store.get(mid)).state == State.SENT
        assert [r.path for r in sandbox_state.requests if r.path.endswith("/send")] == [
            "/api/v1/send"
        ]


@pytest.mark.usefixtures("on_postgresql")
async def test_a_send_answered_after_a_takeover_keeps_the_takers_record(
    tmp_path,
    clock: ManualClock,
    sandbox_state: SandboxState,
    sandbox_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Renewals cannot help an instance whose lease passed anyway (frozen, or another
    instance's clock ahead): the other takes the message over, sends it and the poller
    sees it delivered, all while this instance's call is in flight. The late answer
    leaves that record as it is; the message's events and the log say it went twice."""
    async with _leased_bridge(tmp_path, clock, sandbox_url) as (bridge, url):
        mid = await _post(url, "raid degraded")
        answer = asyncio.Event()  # the provider takes the text; its answer waits for this
        sandbox_state.faults.append(Fault(status=0, hold=answer, path="/send"))
        sending = await _in_flight(bridge, sandbox_state)
        ahead = clock.now() + 3 * LEASE  # the other instance's clock
        taken = await bridge.store.unsettled(ahead, owner="other", lease_until=ahead + LEASE)
        assert [m.id for m in taken] == [mid]
        await bridge.store.mark_sent([(mid, "other-1", 0.05)], ahead, owner="other")
        await bridge.store.record_status([(mid, State.DELIVERED, None)], ahead + 1)
        answer.set()
        with caplog.at_level(logging.WARNING, logger="bridge.delivery.outcomes"):
            await sending
        message = await bridge.store.get(mid)
        events = await bridge.store.events(mid)
    assert message is not None
    assert (message.state, message.provider_message_id) == (State.DELIVERED, "other-1")
    [ours] = [str(e.message_id) for e in sandbox_state.entries if e.message == "raid degraded"]
    me = bridge.dispatcher.owner
    assert events[-1]["detail"] == (
        f"sent also by {me} after its claim was taken over: provider id {ours}"
    )
    [warning] = [r for r in caplog.records if "taken over" in r.getMessage()]
    assert warning.levelno == logging.WARNING
    assert f"[{mid}]" in warning.getMessage() and ours in warning.getMessage()


async def _holds(store: PostgresStore, mid: int, at: float) -> None:
    """The taker is still settling the message (checking /logs): it stays its claim."""


async def _delivered(store: PostgresStore, mid: int, at: float) -> None:
    """The taker sent it (not in /logs yet) and the poller saw it delivered."""
    assert await store.mark_sent([(mid, "other-1", 0.05)], at, owner="other") == []
    await store.record_status([(mid, State.DELIVERED, None)], at + 1)


async def _requeued(store: PostgresStore, mid: int, at: float) -> None:
    """The taker met a retry of its own: back in the queue, on its schedule and count."""
    assert await store.requeue([mid], at, owner="other", at=at + 60, reason="retrying") == []


TAKERS: dict[str, Callable[[PostgresStore, int, float], Awaitable[None]]] = {
    "holds": _holds,
    "delivered": _delivered,
    "requeued": _requeued,
}
# The sandbox's late answer to our call, and what our instance learns from it.
LATE_ANSWERS: dict[str, tuple[dict[str, Any], str]] = {
    "refusal": (
        {"status": 400, "body": '{"success": false, "message": "Invalid number."}'},
        "failed: provider refused: Invalid number.",
    ),
    "429": ({"status": 429, "retry_after": "30"}, "queued again: rate limited by the provider"),
    "5xx": ({"status": 503}, "provider error, checking its logs before a retry"),
}


@pytest.mark.usefixtures("on_postgresql")
@pytest.mark.parametrize("taker", list(TAKERS))
@pytest.mark.parametrize("late", list(LATE_ANSWERS))
async def test_a_refusal_or_retry_answered_after_a_takeover_keeps_the_takers_record(
    tmp_path,
    clock: ManualClock,
    sandbox_state: SandboxState,
    sandbox_url: str,
    caplog: pytest.LogCaptureFixture,
    late: str,
    taker: str,
) -> None:
    """As a late send, so a late refusal (400) or retry (429, 5xx): the other instance
    took the message over while this one's call was in flight; what this one then
    learns is an event on the message, not a rewrite of the taker's row."""
    fault, learnt = LATE_ANSWERS[late]
    async with _leased_bridge(tmp_path, clock, sandbox_url) as (bridge, url):
        mid = await _post(url, "fan failure")
        answer = asyncio.Event()
        sandbox_state.faults.append(Fault(**fault, path="/send", hold=answer))
        sending = await _in_flight(bridge, sandbox_state)
        ahead = clock.now() + 3 * LEASE  # the other instance's clock
        taken = await bridge.store.unsettled(ahead, owner="other", lease_until=ahead + LEASE)
        assert [m.id for m in taken] == [mid]
        await TAKERS[taker](bridge.store, mid, ahead)
        takers = await bridge.store.get(mid)
        answer.set()
        with caplog.at_level(logging.WARNING, logger="bridge.delivery.outcomes"):
            await sending
        message = await bridge.store.get(mid)
        events = await bridge.store.events(mid)
        # Still the taker's to settle when it holds it: our answer did not release it.
        still = await bridge.store.unsettled(ahead, owner="other", lease_until=ahead + LEASE)
        assert [m.id for m in still] == ([mid] if taker == "holds" else [])
    assert message == takers  # state, provider id, attempts, reason, schedule: the taker's
    me = bridge.dispatcher.owner
    assert events[-1]["detail"].startswith(f"not applied, {me} no longer held it: {learnt}")
    [warning] = [r for r in caplog.records if "no longer held" in r.getMessage()]
    assert warning.levelno == logging.WARNING
    assert f"[{mid}]" in warning.getMessage() and me in warning.getMessage()


ADMIN = "+12025550199"


@pytest.mark.usefixtures("on_postgresql")
@pytest.mark.parametrize("taken", [1, 2])  # of the two messages
@pytest.mark.parametrize("cap", [0, 1])  # max_unknown_resends: given up / sent again
async def test_unknown_outcomes_taken_over_while_reconciling_are_not_reported_here(
    tmp_path,
    clock: ManualClock,
    sandbox_state: SandboxState,
    sandbox_url: str,
    caplog: pytest.LogCaptureFixture,
    cap: int,
    taken: int,
) -> None:
    """This instance reconciles two unknown outcomes; while its /logs call is in flight
    its lease lapses on `taken` of them and another instance takes those over. It logs,
    and warns the admin of, only what it then resent or gave up on itself: the others
    are the taker's, and said once, as no longer held. Nothing of its own, no warning."""
    admin = f'[budget]\nadmin = ["{ADMIN}"]\n'
    leased = _leased_bridge(tmp_path, clock, sandbox_url, admin, max_unknown_resends=cap)
    async with leased as (bridge, url):
        # Each send answers a 200 that says nothing, and neither text reaches /logs.
        silent = Fault(status=200, body='{"queued": true}', path="/send", times=2)
        sandbox_state.faults.append(silent)
        ids = [await _post(url, text) for text in ("psu 1 lost", "psu 2 lost")]
        await bridge.dispatcher.run_once()
        assert [(await bridge.store.get(i)).reason_kind for i in ids] == ["unknown"] * 2
        clock.advance(RECONCILE_DELAY)
        answer = asyncio.Event()
        sandbox_state.faults.append(Fault(status=0, hold=answer, path="/logs"))
        reconcile = bridge.dispatcher.reconciler.run_once
        reconciling = await _in_flight(bridge, sandbox_state, "/logs", reconcile)
        me, lost, kept = bridge.dispatcher.owner, ids[:taken], ids[taken:]
        ahead = clock.now() + 3 * LEASE  # the other instance's clock
        # Renewed in time (as a send in flight is), the kept ones stay this instance's.
        await bridge.store.renew(kept, owner=me, lease_until=ahead + LEASE)
        swept = await bridge.store.unsettled(ahead, owner="other", lease_until=ahead + LEASE)
        assert [m.id for m in swept] == lost
        answer.set()
        with caplog.at_level(logging.WARNING, logger="bridge.delivery"):
            assert await reconciling is None
        states = [(await bridge.store.get(i)).state for i in ids]
        to_admin = [m.text for m in await bridge.store.query(limit=20) if m.recipient == ADMIN]
    done = State.SENT if cap == 0 else State.QUEUED
    assert states == [State.SENDING] * taken + [done] * (2 - taken)
    logged = [(r.name, r.getMessage()) for r in caplog.records]
    [not_held] = [m for _, m in logged if "no longer held" in m]
    assert f"{lost} were no longer held by this instance ({me})" in not_held
    counted = [m for name, m in logged if name == "bridge.delivery.reconcile"]
    if taken == 2:
        assert counted == []
        assert to_admin == []
    elif cap == 0:
        assert counted == [
            f"outcome of 1 messages unknown after 0 resends: not sent again ({kept})"
        ]
        [warning] = to_admin
        assert warning.startswith("sms-bridge: 1 texts have an unknown outcome")
    else:
        assert counted == ["1 messages not found in the provider's logs: sending again"]
        assert to_admin == []


class RacedStore(PostgresStore):
    """Once `race` is set, the next `due` answers, then another instance claims what it
    answered: the daily cap's decision on queued rows meets a claim made between its
    read and its write, as two instances' steps may interleave."""

    race = False

    async def due(self, now: float, limit: int, *, texts: int | None = None) -> list[Message]:
        found = await super().due(now, limit, texts=texts)
        if self.race and found:
            self.race = False
            assert await self.claim(
                [m.id for m in found], now, owner="other", lease_until=now + LEASE
            ) == [m.id for m in found]
        return found


@pytest.mark.usefixtures("on_postgresql")
@pytest.mark.parametrize("on_exceeded", ["wait", "fail"])
async def test_a_daily_cap_met_after_another_claimed_the_message_says_so(
    tmp_path,
    clock: ManualClock,
    sandbox_state: SandboxState,
    sandbox_url: str,
    postgres_url: str,
    caplog: pytest.LogCaptureFixture,
    on_exceeded: str,
) -> None:
    """The daily cap decides on queued messages it never claimed: one that another
    instance claimed in between is left to it, and the event and the warning say that
    this instance found it no longer queued (it never held it, so it did not lose it);
    no "waiting until 00:00" on a message that goes now."""
    extra = f'[budget]\ntexts_per_day = 1\non_exceeded = "{on_exceeded}"\n'
    config = bridge_config(tmp_path, sandbox_url, extra)
    store = RacedStore(postgres_url)
    async with running_bridge(config, clock, store=store) as (bridge, url):
        await _post(url, "first of the day")

        async def sent() -> bool:
            return bool(await bridge.store.query(state="sent"))

        await pump(bridge, clock, sent, max_seconds=60)
        mid = await _post(url, "over the cap")
        store.race = True
        with caplog.at_level(logging.WARNING, logger="bridge.delivery.outcomes"):
            await bridge.dispatcher.run_once()
        message = await bridge.store.get(mid)
        events = await bridge.store.events(mid)
    assert message is not None and message.state == State.SENDING  # the other's to send
    me = bridge.dispatcher.owner
    outcome = "queued again" if on_exceeded == "wait" else "failed"
    assert events[-1]["detail"].startswith(
        f"not applied, {me} found it no longer queued: {outcome}: daily budget reached"
    )
    assert not any("waiting until" in (e["detail"] or "") for e in events[:-1])
    [warning] = [r for r in caplog.records if "no longer queued" in r.getMessage()]
    assert f"[{mid}]" in warning.getMessage() and f"({me}) decided" in warning.getMessage()


@pytest.mark.usefixtures("on_postgresql")
async def test_a_daily_cap_counts_another_instances_send_in_flight(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """Two instances, one cap of 2 texts a day, 3 texts queued. While B's call for the
    second text is in flight, A (its own call answered) decides on the third: B's claim
    counts as sent, so A holds it for tomorrow and the provider gets 2 texts, not 3."""
    cap = 'instance = "{}"\n[budget]\ntexts_per_day = 2\n'
    async with (
        _leased_bridge(tmp_path, clock, sandbox_url, cap.format("a")) as (a, url),
        _leased_bridge(tmp_path, clock, sandbox_url, cap.format("b")) as (b, _),
    ):
        ids = [await _post(url, f"disk {n} full") for n in (1, 2, 3)]
        a_answer, b_answer = asyncio.Event(), asyncio.Event()
        sandbox_state.faults += [
            Fault(status=0, hold=a_answer, path="/send"),
            Fault(status=0, hold=b_answer, path="/send"),
        ]
        a_step = await _in_flight(a, sandbox_state)  # A: the first text, answer held
        b_step = await _in_flight(b, sandbox_state)  # B: the second, answer held
        a_answer.set()
        await a_step  # A: its text sent; the second is B's; the third over the cap
        b_answer.set()
        await b_step
        states = [await b.store.get(i) for i in ids]
    sends = [r for r in sandbox_state.requests if r.path.endswith("/send")]
    assert len(sends) == 2
    assert [m.state for m in states if m is not None] == [State.SENT, State.SENT, State.QUEUED]
    assert states[2] is not None and states[2].reason == (
        "daily budget reached (texts_per_day=2); waiting until 00:00 UTC"
    )


@pytest.mark.usefixtures("on_postgresql")
async def test_a_dispatcher_with_caps_claims_only_in_its_turn(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """Another instance deciding on the caps holds the turn: this one's step waits for
    it before it counts and claims (then sends, the cap not reached)."""
    cap = "[budget]\ntexts_per_day = 5\n"
    async with _leased_bridge(tmp_path, clock, sandbox_url, cap) as (bridge, url):
        mid = await _post(url, "ups on battery")
        other = PostgresStore(helpers.STORE_URL["url"])
        await other.open()
        try:
            async with other.budget_turn():
                step = asyncio.create_task(bridge.dispatcher.run_once())
                # Nothing says "waiting for the lock": a wait the step would end well
                # within if it did not wait (a starved machine only makes this vacuous).
                await asyncio.wait([step], timeout=0.5)
                assert not step.done()
                assert (await bridge.store.get(mid)).state == State.QUEUED
            await step
        finally:
            await other.close()
        assert (await bridge.store.get(mid)).state == State.SENT


@pytest.mark.usefixtures("on_postgresql")
async def test_a_dispatcher_with_caps_claims_inside_its_turn(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """The claim is made while the turn is still held: another instance counting in
    between would not see it and could spend the same room. Seen from another session
    at the moment of the claim: the turn's lock cannot be had."""
    cap = "[budget]\ntexts_per_day = 5\n"
    async with _leased_bridge(tmp_path, clock, sandbox_url, cap) as (bridge, url):
        await _post(url, "ups on battery")
        other = await asyncpg.connect(helpers.STORE_URL["url"])
        free_at_claim: list[bool] = []
        claim = bridge.store.claim

        async def watched_claim(*args: Any, **kwargs: Any) -> list[int]:
            async with other.transaction():
                free_at_claim.append(
                    await other.fetchval(f"SELECT pg_try_advisory_xact_lock({BUDGET_LOCK})")
                )
            return await claim(*args, **kwargs)

        bridge.store.claim = watched_claim
        try:
            await bridge.dispatcher.run_once()
        finally:
            await other.close()
    assert free_at_claim == [False]
    assert len([r for r in sandbox_state.requests if r.path.endswith("/send")]) == 1


async def test_two_instances_of_one_host_and_pid_are_two_owners(
    tmp_path, clock: ManualClock, sandbox_url: str
) -> None:
    """Every container runs the bridge as pid 1: replicas given one `hostname:` (or on
    the host's network) were one owner by default ("host:1"), each taking the other's
    claims in flight for its own, looking them up in /logs and sending them again. Two
    bridges in this one process have the same host and pid."""
    owners = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        config = bridge_config(tmp_path / name, sandbox_url)
        assert config.cluster.instance == ""
        async with running_bridge(config, clock) as (bridge, _):
            owners.append(bridge.dispatcher.owner)
    assert owners[0] != owners[1]
    assert all(owner.startswith(f"{socket.gethostname()}:{os.getpid()}:") for owner in owners)


@pytest.mark.usefixtures("on_postgresql")
async def test_a_renewal_that_fails_unexpectedly_does_not_end_the_renewals(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """The renewals of a claim in flight survived only an unavailable store: any other
    error in one (a deadlock the server broke, a driver's error nobody classified) ended
    the renewing task without a word, the lease lapsed while the provider still held the
    call, and another instance's sweep took the text over to send it again. Now one
    failed renewal is logged and the next one holds the claim as before."""
    async with _leased_bridge(tmp_path, clock, sandbox_url) as (bridge, url):
        real_renew = bridge.store.renew
        failures = 0

        async def renew(ids: Any, *, owner: str, lease_until: float) -> None:
            nonlocal failures
            if failures == 0:  # shaped here: a live server gives no deadlock on demand
                failures += 1
                raise asyncpg.exceptions.DeadlockDetectedError("deadlock detected")
            await real_renew(ids, owner=owner, lease_until=lease_until)

        bridge.store.renew = renew  # type: ignore[method-assign]
        mid, answer, sending = await _held_past_three_leases(
            bridge, clock, sandbox_state, url, "ups on battery", renewed=lambda: failures > 0
        )
        assert failures == 1 and not sending.done()
        now = clock.now()
        assert await bridge.store.unsettled(now, owner="other", lease_until=now + LEASE) == []
        answer.set()
        await sending
        assert (await bridge.store.get(mid)).state == State.SENT


@pytest.mark.usefixtures("on_postgresql")
async def test_a_logs_walk_past_its_lease_keeps_the_claims_it_is_deciding(
    tmp_path,
    clock: ManualClock,
    sandbox_state: SandboxState,
    sandbox_url: str,
) -> None:
    """The provider took a text behind a 502 page; its look's /logs read is slow (held
    until the clock has moved three leases on: a big backlog, a provider under load). The
    walk did not renew the claims it was deciding: past the lease the leader took the
    text over and read /logs for it again (another request of the shared window) and
    found it; this walk, its page then showing an entry already recorded, decided "not
    found: resend", dropped only because it no longer held the text (an event that says
    it). The walk's claims are renewed while it reads: nothing to take over, one read,
    the text found by the walk that looked, sent once. (Without renewals no renewer
    sleeps on the clock: `_renewer_asleep` says so.)"""
    async with _leased_bridge(tmp_path, clock, sandbox_url) as (bridge, url):
        sandbox_state.faults.append(
            Fault(status=502, body="<html>Bad Gateway</html>", path="/send", taken=True)
        )
        mid = await _post(url, "rack 4 on battery")
        await bridge.dispatcher.run_once()
        assert (await bridge.store.get(mid)).state == State.SENDING
        clock.advance(RECONCILE_DELAY)
        answer = asyncio.Event()
        sandbox_state.faults.append(Fault(status=0, hold=answer, path="/logs"))
        reconcile = bridge.dispatcher.reconciler.run_once
        reconciling = await _in_flight(bridge, sandbox_state, "/logs", reconcile)
        for _ in range(6):
            await _renewer_asleep(clock)
            clock.advance(LEASE / 2)
            await _lease_runs_past(bridge.store, clock.now())
        now = clock.now()
        assert await bridge.store.unsettled(now, owner="other", lease_until=now + LEASE) == []
        answer.set()
        assert await reconciling is None
        message = await bridge.store.get(mid)
        events = await bridge.store.events(mid)
    assert message is not None and message.state == State.SENT, message
    [entry] = sandbox_state.entries
    assert message.provider_message_id == str(entry.message_id)
    assert [r.path for r in sandbox_state.requests if r.path.endswith("/logs")] == ["/api/v1/logs"]
    assert not [e for e in events if (e["detail"] or "").startswith("not applied")]


@pytest.mark.usefixtures("on_postgresql")
async def test_an_unknown_outcome_waiting_for_logs_past_its_lease_stays_its_instances(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """The provider took a text behind a 502 page, and /logs answers 503 four times: the
    look waits for it at the dispatcher's backoff (5 s doubling), longer than the lease.
    Its claim was renewed only by the dispatcher's steps, asleep until the look: it
    lapsed, and the leader took the text over and read /logs at once, past the backoff.
    The dispatcher's loop renews what its reconciler holds while it sleeps: the claim
    holds, the text is found once /logs answers, sent once."""
    async with _leased_bridge(tmp_path, clock, sandbox_url) as (bridge, url):
        gateway = "<html>Bad Gateway</html>"
        sandbox_state.faults += [
            Fault(status=502, body=gateway, path="/send", taken=True),
            Fault(status=503, body="<html>busy</html>", path="/logs", times=4),
        ]
        mid = await _post(url, "chiller 2 tripped")
        stop = asyncio.Event()
        loop = asyncio.create_task(bridge.dispatcher.run(stop))
        try:
            deadline = time.monotonic() + 60  # the loop's first step sends it
            while (await bridge.store.get(mid)).reason_kind is None:  # type: ignore[union-attr]
                assert time.monotonic() < deadline, "the loop sent nothing"
                await asyncio.sleep(0.01)
            start = now = clock.now()
            while await _lease_runs_past(bridge.store, now, mid):
                await asyncio.sleep(0.05)  # the loop's step under way ends, then sleeps
                clock.advance(1.0)
                now = clock.now()
                assert now < start + 600, "never settled"
        finally:
            stop.set()
            await loop
        message = await bridge.store.get(mid)
    logs = [r.status for r in sandbox_state.requests if r.path.endswith("/logs")]
    assert logs == [503, 503, 503, 503, 200]
    assert message is not None and message.state == State.SENT, message
    [entry] = sandbox_state.entries
    assert message.provider_message_id == str(entry.message_id)


class MatchedStore(PostgresStore):
    """Once `hold` is set, the next look at which /logs entries are known answers as
    it found them, but only once `go` is set: another instance records an entry between
    this walk's reading it and this walk's recording."""

    hold: asyncio.Event | None = None
    go = asyncio.Event()

    async def known_provider_ids(self, provider_ids: Any) -> set[str]:
        known = await super().known_provider_ids(provider_ids)
        if self.hold is not None and provider_ids:
            self.hold.set()
            self.hold = None
            await self.go.wait()
        return known


@pytest.mark.usefixtures("on_postgresql")
async def test_an_entry_two_instances_read_at_once_settles_one_of_their_texts(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str, postgres_url: str
) -> None:
    """Two instances each sent "db-1 down" to one phone behind a 502 page; the provider
    took A's only. Each looked in /logs for its own (the other's `sending` text is not
    its to count): both walks read the one entry before either recorded it, and both
    recorded it, B's text sent with A's provider id and never texted. A walk records
    no entry another instance recorded meanwhile: B's text stays `sending`, and its next
    look, with that entry known, finds none: sent again, once."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    b_store = MatchedStore(postgres_url)
    config_b = bridge_config(tmp_path / "b", sandbox_url, f'[cluster]\nlease = "{LEASE:g}s"\n')
    async with (
        _leased_bridge(tmp_path / "a", clock, sandbox_url) as (a, url_a),
        running_bridge(config_b, clock, store=b_store) as (b, url_b),
    ):
        gateway = "<html>Bad Gateway</html>"
        sandbox_state.faults.append(Fault(status=502, body=gateway, path="/send", taken=True))
        ours = await _post(url_a, "db-1 down", dedupe_key="db-1 on a")
        await a.dispatcher.run_once()
        clock.advance(1.0)
        sandbox_state.faults.append(Fault(status=502, body=gateway, path="/send"))
        theirs = await _post(url_b, "db-1 down", dedupe_key="db-1 on b")
        await b.dispatcher.run_once()
        clock.advance(RECONCILE_DELAY)
        matched = b_store.hold = asyncio.Event()
        walk_b = asyncio.create_task(b.dispatcher.reconciler.run_once())
        await asyncio.wait_for(matched.wait(), 60)  # B read the entry: not known yet
        assert await a.dispatcher.reconciler.run_once() is None  # A found and recorded it
        b_store.go.set()
        assert await walk_b is None
        [entry] = sandbox_state.entries
        assert (await b.store.get(theirs)).state == State.SENDING  # type: ignore[union-attr]
        await pump(b, clock, lambda: len(sandbox_state.entries) == 2, max_seconds=60)
        found, resent = [await a.store.get(i) for i in (ours, theirs)]
    assert found is not None and found.provider_message_id == str(entry.message_id), found
    assert resent is not None and resent.unknown_resends == 1, resent
    assert resent.provider_message_id != found.provider_message_id, resent
