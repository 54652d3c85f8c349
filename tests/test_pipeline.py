"""The spine end to end: HTTP in, stored, dispatched within the limit, states recorded.

Every test talks to real servers on loopback: the bridge's web app under uvicorn and the
sandbox provider under uvicorn, both on ephemeral ports; time is a ManualClock shared by
bridge and sandbox, so a minute of rate window passes without sleeping.
"""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from bridge.clock import ManualClock
from bridge.delivery import poller
from bridge.models import State
from bridge.provider.sandbox import Fault, SandboxState
from tests.helpers import bridge_config, max_in_window, pump, pump_until_state, running_bridge
from tests.stores import faulty_store

# Run on each store backend (tests/conftest.py `backend`): every test here but those that
# bring a SQLite store of their own to play a failing disk.
on_each_backend = pytest.mark.usefixtures("backend")


def numbers(count: int, start: int = 0) -> list[str]:
    """Real-shaped, distinct US numbers (+1 202 5xx xxxx)."""
    return [f"+1202{5000000 + start + i:07d}" for i in range(count)]


async def post(url: str, body: dict[str, object]) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.post(f"{url}/api/v1/messages", json=body)


async def post_each(url: str, count: int, label: str) -> None:
    """One text to each of `count` numbers, each its own text ("label 0", "label 1"...)."""
    for i, number in enumerate(numbers(count)):
        await post(url, {"to": number, "message": f"{label} {i}"})


def five_a_minute(tmp_path, sandbox_state: SandboxState, sandbox_url: str):
    """A bridge and its provider both held to 5 requests a minute."""
    sandbox_state.rate_limit = 5
    return bridge_config(tmp_path, sandbox_url, requests_per_minute=5)


async def states(bridge, ids: list[int]) -> list[State]:
    return [(await bridge.store.get(i)).state for i in ids]


@on_each_backend
async def test_post_is_stored_before_202_and_reaches_delivered(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (bridge, url):
        commits_before = bridge.store.stats().transactions
        response = await post(url, {"to": "+12025550143", "message": "disk full on db-2"})
        assert response.status_code == 202
        [message_id] = response.json()["ids"]
        # The 202 came after a commit that holds the row: a reader connection sees it.
        assert bridge.store.stats().transactions > commits_before
        stored = await bridge.store.get(message_id)
        assert stored is not None and stored.state == State.QUEUED

        await pump_until_state(bridge, clock, message_id, State.DELIVERED, max_seconds=120)
        async with httpx.AsyncClient() as http:
            got = (await http.get(f"{url}/api/v1/messages/{message_id}")).json()
            logs = (
                await http.get(f"{sandbox_url}/api/v1/logs", headers={"X-API-Key": "test-key"})
            ).json()
        assert got["state"] == "delivered"
        assert [e["state"] for e in got["events"]] == ["queued", "sending", "sent", "delivered"]
        entry = next(e for e in logs["data"] if str(e["message_id"]) == got["provider_message_id"])
        assert entry["status"] == "delivered" and entry["to"] == "+12025550143"
        assert entry["message"] == "disk full on db-2"


@pytest.mark.slow  # over ~2 s
@on_each_backend
async def test_rate_limit_is_never_exceeded(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    sandbox_state.rate_limit = 20
    config = bridge_config(tmp_path, sandbox_url, requests_per_minute=20)
    async with running_bridge(config, clock) as (bridge, url):
        ids = []
        for i, number in enumerate(numbers(40)):
            ids += (await post(url, {"to": number, "message": f"alert {i}"})).json()["ids"]

        async def all_final() -> bool:
            return all(s in (State.SENT, State.DELIVERED) for s in await states(bridge, ids))

        await pump(bridge, clock, all_final, max_seconds=1800)
    statuses = [r.status for r in sandbox_state.requests]
    assert 429 not in statuses
    assert max_in_window([r.at for r in sandbox_state.requests]) <= 20
    sends = [r for r in sandbox_state.requests if r.path.endswith("/send")]
    assert len(sends) == 40
    # 40 sends need at least two full windows beyond the first.
    assert sends[-1].at - sends[0].at >= 60


@on_each_backend
async def test_2500_recipients_one_text_make_three_bulk_calls(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    config = bridge_config(tmp_path, sandbox_url, "[http]\nmax_recipients = 2500\n")
    recipients = numbers(2500)
    async with running_bridge(config, clock) as (bridge, url):
        response = await post(url, {"to": recipients, "message": "maintenance at 02:00 UTC"})
        assert response.status_code == 202
        ids = response.json()["ids"]
        assert len(ids) == 2500

        async def all_sent() -> bool:
            # The store's counts, not each message read (2500 reads per step: 100 s of the
            # fast target on PostgreSQL); these 2500 are all the store holds.
            counts = await bridge.store.counts()
            return counts.get("sent", 0) + counts.get("delivered", 0) == len(ids)

        await pump(bridge, clock, all_sent, max_seconds=120)
        assert set(await states(bridge, ids)) <= {State.SENT, State.DELIVERED}  # once
        one = await bridge.store.get(ids[1234])
    bulk = [r for r in sandbox_state.requests if r.path.endswith("/send-bulk")]
    assert len(bulk) == 3
    assert not [r for r in sandbox_state.requests if r.path.endswith("/send")]
    assert sorted(e.to for e in sandbox_state.entries) == sorted(recipients)
    assert one.provider_message_id is not None


@on_each_backend
async def test_500_three_times_then_delivered_after_four_attempts(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    sandbox_state.faults.append(Fault(status=500, times=3, path="/send"))
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (bridge, url):
        [message_id] = (await post(url, {"to": "+12025550143", "message": "x"})).json()["ids"]

        await pump_until_state(bridge, clock, message_id, State.DELIVERED, max_seconds=600)
        message = await bridge.store.get(message_id)
        events = await bridge.store.events(message_id)
    assert message.attempts == 4
    assert [e["state"] for e in events].count("sending") == 4
    assert len(sandbox_state.entries) == 1
    sends = [r.at for r in sandbox_state.requests if r.path.endswith("/send")]
    gaps = [b - a for a, b in itertools.pairwise(sends)]
    assert all(g > 0 for g in gaps) and gaps[2] > gaps[0]  # backoff grows


@on_each_backend
async def test_400_fails_at_once_with_the_providers_reason(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (bridge, url):
        # Possible for phonenumbers, refused by the provider's stricter validation.
        sandbox_state.faults.append(
            Fault(status=400, path="/send", body='{"success": false, "message": "Invalid number."}')
        )
        [message_id] = (await post(url, {"to": "+12025550143", "message": "x"})).json()["ids"]

        await pump_until_state(bridge, clock, message_id, State.FAILED, max_seconds=60)
        for _ in range(20):
            clock.advance(30)
            await bridge.dispatcher.run_once()
        message = await bridge.store.get(message_id)
    assert message.attempts == 1
    assert "Invalid number." in (message.reason or "")
    assert len([r for r in sandbox_state.requests if r.path.endswith("/send")]) == 1


@on_each_backend
async def test_bulk_refused_is_retried_one_by_one(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (bridge, url):
        sandbox_state.faults.append(Fault(status=400, path="/send-bulk"))
        sandbox_state.faults.append(Fault(status=400, path="/send", times=1))
        ids = (await post(url, {"to": numbers(3), "message": "x"})).json()["ids"]

        async def settled() -> bool:
            return all(
                s in (State.SENT, State.DELIVERED, State.FAILED) for s in await states(bridge, ids)
            )

        await pump(bridge, clock, settled, max_seconds=120)
        final = await states(bridge, ids)
    assert final.count(State.FAILED) == 1
    assert len(sandbox_state.entries) == 2


@on_each_backend
async def test_401_keeps_the_queue_turns_ready_red_and_recovers(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (bridge, url):
        sandbox_state.api_key = "rotated-key"
        ids = (await post(url, {"to": numbers(3), "message": "x"})).json()["ids"]
        for _ in range(10):
            clock.advance(await bridge.dispatcher.run_once())
        assert await states(bridge, ids) == [State.QUEUED] * 3
        async with httpx.AsyncClient() as http:
            ready = await http.get(f"{url}/readyz")
            assert ready.status_code == 503
            assert "provider" in ready.json()["problems"]
            sandbox_state.api_key = "test-key"  # the operator fixes the key upstream

            async def sent() -> bool:
                return set(await states(bridge, ids)) <= {State.SENT, State.DELIVERED}

            await pump(bridge, clock, sent, max_seconds=300)
            assert (await http.get(f"{url}/readyz")).status_code == 200
        messages = [await bridge.store.get(i) for i in ids]
    assert all(m.attempts == 1 for m in messages)  # waiting on a bad key is not an attempt
    assert len(sandbox_state.entries) == 3


@on_each_backend
async def test_a_key_refused_to_the_poller_is_probed_back_with_nothing_queued(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """The status poller's /logs read gets the 401 (the key rotated at the provider)
    while nothing is queued: health red, and the poller asks nothing more while it is.
    The operator fixes the key. No send will come to turn health green: the
    dispatcher's /balance probe must (`Dispatcher._wait_for_provider`), or /readyz
    stayed 503 and the sent text's state unread until the next text. The limiter's
    pause only holds requests back; it never says the key works again."""
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (bridge, url):
        [message_id] = (await post(url, {"to": "+12025550143", "message": "x"})).json()["ids"]
        await bridge.dispatcher.run_once()
        assert (await bridge.store.get(message_id)).state == State.SENT
        sandbox_state.api_key = "rotated-key"
        clock.advance(1)
        await bridge.poller.run_once()
        assert [r.status for r in sandbox_state.requests][-1] == 401
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{url}/readyz")).status_code == 503
            sandbox_state.api_key = "test-key"  # the operator fixes the key upstream
            fixed = len(sandbox_state.requests)
            await pump_until_state(bridge, clock, message_id, State.DELIVERED, max_seconds=300)
            assert (await http.get(f"{url}/readyz")).status_code == 200
    after = [r.path.rsplit("/", 1)[-1] for r in sandbox_state.requests[fixed:]]
    assert after[0] == "balance" and "send" not in after, after


@on_each_backend
async def test_429_pauses_the_key_and_loses_nothing(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    sandbox_state.faults.append(Fault(status=429, path="/send", retry_after="45"))
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (bridge, url):
        [message_id] = (await post(url, {"to": "+12025550143", "message": "x"})).json()["ids"]
        t0 = clock.now()

        async def sent() -> bool:
            return (await bridge.store.get(message_id)).state in (State.SENT, State.DELIVERED)

        await pump(bridge, clock, sent, max_seconds=300)
    sends = [r for r in sandbox_state.requests if r.path.endswith("/send")]
    assert [r.status for r in sends] == [429, 200]
    assert sends[1].at - t0 >= 45


@pytest.mark.parametrize("retry_after", ["inf", "1e12", "Fri, 31 Dec 9999 23:59:59 GMT"])
async def test_a_429s_retry_after_without_end_is_obeyed_for_an_hour_at_most(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str, retry_after
) -> None:
    """A gateway's "Retry-After: inf" (or a date years ahead) on a 429 paused every
    request of the key for good: nothing sent again, no final state. Obeyed up to an
    hour, then the provider is asked again."""
    sandbox_state.faults.append(Fault(status=429, path="/send", retry_after=retry_after))
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (bridge, url):
        [message_id] = (await post(url, {"to": "+12025550143", "message": "x"})).json()["ids"]

        async def sent() -> bool:
            return (await bridge.store.get(message_id)).state in (State.SENT, State.DELIVERED)

        await pump(bridge, clock, sent, max_seconds=3700, step_cap=60)
    sends = [r for r in sandbox_state.requests if r.path.endswith("/send")]
    assert sends[0].status == 429 and sends[-1].status == 200
    assert sends[-1].at - sends[0].at <= 3600 + 60


@on_each_backend
async def test_rate_window_survives_a_restart(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    config = five_a_minute(tmp_path, sandbox_state, sandbox_url)
    async with running_bridge(config, clock) as (bridge, url):
        await post_each(url, 4, "first")
        await bridge.dispatcher.run_once()  # the price list, then 4 sends: 5 requests
        assert len(sandbox_state.entries) == 4
        assert len(sandbox_state.requests) == 5
    async with running_bridge(config, clock) as (bridge, url):
        await post(url, {"to": "+12025550199", "message": "after restart"})
        wait = await bridge.dispatcher.run_once()
        assert len(sandbox_state.entries) == 4  # no fresh burst after the restart
        assert wait > 50
    assert 429 not in [r.status for r in sandbox_state.requests]


@on_each_backend
async def test_unknown_outcome_is_checked_in_logs_not_resent(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    # The provider takes the SMS and logs it, then answers later than our read timeout.
    sandbox_state.faults.append(Fault(status=0, delay=0.6, path="/send"))
    config = bridge_config(tmp_path, sandbox_url, timeout="0.2s")
    async with running_bridge(config, clock) as (bridge, url):
        [message_id] = (await post(url, {"to": "+12025550143", "message": "x"})).json()["ids"]
        await bridge.dispatcher.run_once()
        assert (await bridge.store.get(message_id)).state == State.SENDING
        # The stalled request is on the sandbox's list already (recorded on arrival).
        assert [r.path for r in sandbox_state.requests][-1].endswith("/send")

        async def sent() -> bool:
            return (await bridge.store.get(message_id)).state in (State.SENT, State.DELIVERED)

        await pump(bridge, clock, sent, max_seconds=120)
        for _ in range(30):  # and nothing goes out again later
            clock.advance(await bridge.dispatcher.run_once() or 10)
        message = await bridge.store.get(message_id)
    requests = [r.path.rsplit("/", 1)[-1] for r in sandbox_state.requests]
    assert requests.count("send") == 1  # checked in /logs, not resent
    assert "logs" in requests[requests.index("send") :]
    assert len(sandbox_state.entries) == 1
    assert message.provider_message_id == str(sandbox_state.entries[0].message_id)


async def test_a_bulk_whose_outcome_is_unknown_is_found_past_ten_pages_of_logs(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """A bulk of 1000 that the provider took but answered with a gateway's 502 page, and
    150 texts of another client of the account after it: /logs holds the bulk on pages
    2 to 12. Reconciliation read 10 pages and took the recipients it had not reached for
    "not in /logs": 150 phones texted twice. It now goes on from where it stopped."""
    sandbox_state.faults.append(
        Fault(status=502, path="/send-bulk", taken=True, body="<html>Bad Gateway</html>")
    )
    config = bridge_config(tmp_path, sandbox_url, "[http]\nmax_recipients = 1000\n")
    async with running_bridge(config, clock) as (bridge, url):
        ids = (await post(url, {"to": numbers(1000), "message": "maintenance tonight"})).json()
        await bridge.dispatcher.run_once()
        assert (await bridge.store.counts()) == {"sending": 1000}
        for number in numbers(150, 5000):  # the account's other client
            sandbox_state.record_send(number, "other", "SMS", 1, clock.now())

        async def all_sent() -> bool:
            return set(await states(bridge, ids["ids"])) <= {State.SENT, State.DELIVERED}

        await pump(bridge, clock, all_sent, max_seconds=600)
        for _ in range(30):  # and nothing goes out again later
            clock.advance(await bridge.dispatcher.run_once() or 10)
    ours = [e for e in sandbox_state.entries if e.message == "maintenance tonight"]
    assert len(ours) == 1000  # none sent twice
    assert [r.status for r in sandbox_state.requests if "/send" in r.path] == [502]


GATEWAY_AFTER_TAKING = {"taken": True, "status": 502, "body": "<html>Bad Gateway</html>"}


async def lost_bulk_under_others(bridge, url: str, clock, sandbox_state: SandboxState) -> list[int]:
    """A bulk of 1000 the provider took but answered with a gateway's 502 page, then 1500
    texts of another client of the account after it: /logs holds the bulk on pages 16 to
    25 (newest first). The bulk's ids."""
    sandbox_state.faults.append(Fault(path="/send-bulk", **GATEWAY_AFTER_TAKING))
    bulk = (await post(url, {"to": numbers(1000), "message": "maintenance tonight"})).json()
    await bridge.dispatcher.run_once()
    for number in numbers(1500, 5000):
        sandbox_state.record_send(number, "other", "SMS", 1, clock.now())
    return bulk["ids"]


@on_each_backend
async def test_a_logs_walk_stopped_at_its_page_cap_goes_on_at_the_next_step(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """A bulk's unknown outcome, its entries on /logs' pages 16 to 25: the walk reads 10
    pages a step. With nothing else queued, the dispatcher slept its idle wait (30 s)
    after each such step before reading on: the bulk's fate a minute late, with the
    window's room to spare. The wait it asks for (what `Dispatcher.run` sleeps) is held
    here: after a walk cut short by its cap, the next step is due at once."""
    config = bridge_config(tmp_path, sandbox_url, "[http]\nmax_recipients = 1000\n")
    async with running_bridge(config, clock) as (bridge, url):
        bulk = await lost_bulk_under_others(bridge, url, clock, sandbox_state)
        clock.advance(10)  # past RECONCILE_DELAY
        slept = 0.0
        for _ in range(20):  # a wait of 0 again and again fails here, not hangs
            wait = await bridge.dispatcher.run_once()
            if set(await states(bridge, bulk)) == {State.SENT}:
                break
            clock.advance(wait)
            slept += wait
    pages = [r.query["page"] for r in sandbox_state.requests if r.path.endswith("/logs")]
    assert pages == [str(page) for page in range(1, 26)], pages
    assert slept < 1, f"the walk waited {slept:g}s between its steps"
    assert len([e for e in sandbox_state.entries if e.message == "maintenance tonight"]) == 1000


async def test_a_deep_logs_walk_keeps_its_place_when_a_new_unknown_outcome_joins(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """The walk of a bulk's unknown outcome stopped at its page cap (page 11 next); a
    single text's answer was then lost too. The walk started again at page 1 for all of
    them: pages 1 to 10 read again, and under a steady trickle of new unknown outcomes
    the oldest recipients' page was never reached. The newcomer is looked for from page 1
    (found there, the newest entry), then the walk goes on from where it stopped."""
    config = bridge_config(tmp_path, sandbox_url, "[http]\nmax_recipients = 1000\n")
    async with running_bridge(config, clock) as (bridge, url):
        bulk = await lost_bulk_under_others(bridge, url, clock, sandbox_state)
        sandbox_state.faults.append(Fault(path="/send", **GATEWAY_AFTER_TAKING))
        [late] = (await post(url, {"to": "+12025559999", "message": "db-2 down"})).json()["ids"]
        clock.advance(10)
        await bridge.dispatcher.run_once()  # pages 1 to 10, then the text: unknown too
        assert (await bridge.store.get(late)).state == State.SENDING
        await bridge.dispatcher.run_once()  # pages 11 to 20: the text is too new to look
        clock.advance(10)  # it joins the walk

        for _ in range(100):  # the dispatcher alone: every /logs read is the walk's
            if set(await states(bridge, [*bulk, late])) == {State.SENT}:
                break
            clock.advance(max(0.01, min(await bridge.dispatcher.run_once(), 30)))
    requests = [r for r in sandbox_state.requests if r.path.endswith(("/logs", "/send"))]
    after = [
        r.query["page"]
        for r in requests[[r.path for r in requests].index("/api/v1/send") :]
        if r.path.endswith("/logs")
    ]
    assert after[:12] == [*map(str, range(11, 21)), "1", "21"], after
    assert len([e for e in sandbox_state.entries if e.message == "maintenance tonight"]) == 1000
    assert len([e for e in sandbox_state.entries if e.message == "db-2 down"]) == 1


async def test_a_logs_walk_that_meets_an_error_deep_in_goes_on_from_there(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """The walk of a bulk's unknown outcome met a 503 on /logs' page 6: when /logs
    answered again, the walk started over at page 1 (five pages read again, each one a
    request out of the sends' window). It goes on from page 6."""
    gateway = {"taken": True, "status": 502, "body": "<html>Bad Gateway</html>"}
    sandbox_state.faults += [
        Fault(path="/send-bulk", **gateway),
        Fault(status=503, path="/logs", query={"page": "6"}),
    ]
    config = bridge_config(tmp_path, sandbox_url, "[http]\nmax_recipients = 1000\n")
    async with running_bridge(config, clock) as (bridge, url):
        bulk = (await post(url, {"to": numbers(1000), "message": "maintenance tonight"})).json()

        for _ in range(100):  # the dispatcher alone: every /logs read is the walk's
            if set(await states(bridge, bulk["ids"])) == {State.SENT}:
                break
            clock.advance(max(0.01, min(await bridge.dispatcher.run_once(), 30)))
    pages = [(r.query["page"], r.status) for r in sandbox_state.requests if "/logs" in r.path]
    refused = pages.index(("6", 503))
    assert pages[refused + 1] == ("6", 200), pages
    assert len([e for e in sandbox_state.entries if e.message == "maintenance tonight"]) == 1000


@on_each_backend
async def test_bad_input_gets_json_errors_and_stores_nothing(
    tmp_path, clock: ManualClock, sandbox_url: str
) -> None:
    config = bridge_config(tmp_path, sandbox_url)
    cases = [
        ({"message": "x"}, 400, "to"),
        ({"to": "+12025550143"}, 400, "message"),
        ({"to": "123", "message": "x"}, 400, "to[0]"),
        ({"to": ["+12025550143", "nonsense"], "message": "x"}, 400, "to[1]"),
        ({"to": "+12025550143", "message": 5}, 400, "message"),
        ({"to": "+12025550143", "message": "x", "sender_id": "WAY-TOO-LONG-ID"}, 400, "sender_id"),
        ({"to": "+12025550143", "message": "x", "schedule_time": "tomorrow"}, 400, "schedule_time"),
        (["not", "an", "object"], 400, "body"),
    ]
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        for body, status, field in cases:
            response = await http.post(f"{url}/api/v1/messages", json=body)
            assert response.status_code == status, body
            assert response.json()["field"] == field, body
        # A name is a group's, misspelt: said so, as SMTP's RCPT does, not "only digits".
        typo = await http.post(f"{url}/api/v1/messages", json={"to": "oncal", "message": "x"})
        assert typo.json() == {
            "error": "to[0]: no group named 'oncal' in [groups]",
            "field": "to[0]",
        }
        raw = await http.post(
            f"{url}/api/v1/messages", content=b"{nope", headers={"content-type": "application/json"}
        )
        assert raw.status_code == 400 and "JSON" in raw.json()["error"]
        form = await http.post(f"{url}/api/v1/messages", data={"to": "x"})
        assert form.status_code == 415
        big = await http.post(
            f"{url}/api/v1/messages", json={"to": "+12025550143", "message": "x" * 2_000_000}
        )
        assert big.status_code == 413

        async def chunks():
            yield b'{"to": "+12025550143", "message": "'
            for _ in range(300):
                yield b"y" * 4096
            yield b'"}'

        streamed = await http.post(
            f"{url}/api/v1/messages", content=chunks(), headers={"content-type": "application/json"}
        )
        assert streamed.status_code == 413
        assert (await http.get(f"{url}/api/v1/messages/999")).status_code == 404
        assert (await http.get(f"{url}/nowhere")).json()["error"]
        assert await bridge.store.counts() == {}


async def test_store_unwritable_answers_503(tmp_path, clock: ManualClock, sandbox_url: str) -> None:
    config = bridge_config(tmp_path, sandbox_url)
    store = faulty_store(config)
    async with running_bridge(config, clock, store) as (bridge, url), httpx.AsyncClient() as http:
        store.disk_full()
        response = await http.post(
            f"{url}/api/v1/messages", json={"to": "+12025550143", "message": "x"}
        )
        assert response.status_code == 503
        assert "retry" in response.json()["error"]
        ready = await http.get(f"{url}/readyz")
        assert ready.status_code == 503 and "store" in ready.json()["problems"]
        assert await bridge.store.counts() == {}
        store.fail_commits(None)  # the disk recovers
        ok = await http.post(f"{url}/api/v1/messages", json={"to": "+12025550143", "message": "x"})
        assert ok.status_code == 202
        assert await bridge.store.counts() == {"queued": 1}


async def test_readyz_turns_red_when_the_disk_refuses_writes(
    tmp_path, clock: ManualClock, sandbox_url: str
) -> None:
    """A full disk refuses every row written while BEGIN and COMMIT of an empty
    transaction still pass. An SQLite authorizer that denies writes plays it on the
    writer's own connection; /readyz must turn red with POST, not stay 200."""

    def refuse_writes(action: int, *_: object) -> int:
        writes = (sqlite3.SQLITE_INSERT, sqlite3.SQLITE_UPDATE, sqlite3.SQLITE_DELETE)
        return sqlite3.SQLITE_DENY if action in writes else sqlite3.SQLITE_OK

    config = bridge_config(tmp_path, sandbox_url)
    store = faulty_store(config)
    async with running_bridge(config, clock, store) as (bridge, url), httpx.AsyncClient() as http:
        assert (await http.get(f"{url}/readyz")).status_code == 200
        await store.on_writer(lambda db: db.conn.set_authorizer(refuse_writes))
        post = await http.post(
            f"{url}/api/v1/messages", json={"to": "+12025550143", "message": "x"}
        )
        assert post.status_code == 503
        ready = await http.get(f"{url}/readyz")
        assert ready.status_code == 503, ready.text
        assert "not authorized" in ready.json()["problems"]["store"]
        await store.on_writer(lambda db: db.conn.set_authorizer(None))  # space freed
        assert (await http.get(f"{url}/readyz")).status_code == 200
        assert await bridge.store.counts() == {}


async def test_a_store_error_quoting_a_secret_is_masked_in_answers(
    tmp_path, clock: ManualClock, sandbox_url: str
) -> None:
    """What the store's driver said reaches /readyz and a 503's body for a caller that
    may read the messages (on this bridge with no tokens, every caller), with every
    configured secret masked as in the log. Other callers get no driver's words at all
    (tests/test_pg_pool.py)."""
    config = bridge_config(tmp_path, sandbox_url)
    key = config.provider.api_key

    def quoting() -> None:
        raise sqlite3.OperationalError(f"disk I/O error near '{key}'")

    store = faulty_store(config)
    async with running_bridge(config, clock, store) as (_, url), httpx.AsyncClient() as http:
        store.fail_commits(quoting)
        post = await http.post(
            f"{url}/api/v1/messages", json={"to": "+12025550143", "message": "x"}
        )
        ready = await http.get(f"{url}/readyz")
        store.fail_commits(None)
    assert post.status_code == 503 and "near '***'" in post.json()["error"], post.text
    assert ready.status_code == 503 and "near '***'" in ready.json()["problems"]["store"]
    assert key not in post.text + ready.text


@on_each_backend
async def test_dedupe_key_suppresses_a_repeat(
    tmp_path, clock: ManualClock, sandbox_url: str
) -> None:
    """The key, not the text: the repeat says other words (a disk at 91 %, then 93 %),
    which identical-text dedupe would let through."""
    config = bridge_config(tmp_path, sandbox_url)
    body = {"to": "+12025550143", "message": "db-2 disk 91%", "dedupe_key": "db-2-disk"}
    async with running_bridge(config, clock) as (_bridge, url):
        first = (await post(url, body)).json()["messages"][0]
        second = (await post(url, {**body, "message": "db-2 disk 93%"})).json()["messages"][0]
        clock.advance(601)
        third = (await post(url, {**body, "message": "db-2 disk 95%"})).json()["messages"][0]
    assert first["state"] == "queued"
    assert second["state"] == "suppressed" and str(first["id"]) in second["reason"]
    assert third["state"] == "queued"


@on_each_backend
async def test_delivery_states_are_found_deep_in_the_logs(
    tmp_path,
    clock: ManualClock,
    sandbox_state: SandboxState,
    sandbox_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A backlog of sent messages: the poller reads the pages where they are, not page 1.

    At a tenth of the scale (pages of 10, not 100; 50 messages tracked a round, not 500):
    the same 30 pages and 6 rounds' worth of waiting messages, for 300 texts, not 3000
    (the test's time: 13-17 s of a loaded suite run)."""
    monkeypatch.setattr(poller, "MAX_LOGS_PER_PAGE", poller.MAX_LOGS_PER_PAGE // 10)
    monkeypatch.setattr(poller, "MAX_TRACKED_PER_ROUND", poller.MAX_TRACKED_PER_ROUND // 10)
    config = bridge_config(tmp_path, sandbox_url, "[http]\nmax_recipients = 100\n")
    async with running_bridge(config, clock) as (bridge, url):
        for batch in range(3):
            await post(url, {"to": numbers(100, batch * 100), "message": f"wave {batch}"})
        for _ in range(5):
            clock.advance(await bridge.dispatcher.run_once() or 1)
        assert (await bridge.store.counts())["sent"] == 300
        clock.advance(10)  # the sandbox reports them all delivered by now
        rounds = 0
        while (await bridge.store.counts()).get("sent") and rounds < 40:
            clock.advance(await bridge.poller.run_once())
            rounds += 1
        counts = await bridge.store.counts()
    assert counts == {"delivered": 300}
    status_reads = [r for r in sandbox_state.requests if r.path.endswith("/logs")]
    assert {r.query["per_page"] for r in status_reads} == {"10"}
    assert len(status_reads) <= 50  # 30 pages of 10 hold them: few are read twice


async def _a_bulk_of_1000_one_phone_off(
    bridge: Any, url: str, clock: ManualClock, sandbox_state: SandboxState
) -> Callable[[], Awaitable[bool]]:
    """One text to 1000 phones sent in one call, the last phone off for a week; the
    condition that the 999 others are delivered."""
    await post(url, {"to": numbers(1000), "message": "maintenance tonight"})
    await bridge.dispatcher.run_once()
    assert len(sandbox_state.entries) == 1000
    sandbox_state.entries[-1].deliver_from = clock.now() + 7 * 86400

    async def the_others_delivered() -> bool:
        return (await bridge.store.counts()).get("delivered") == 999

    return the_others_delivered


async def test_a_message_still_waiting_does_not_hide_older_ones_deep_in_the_logs(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """A bulk of 1000 whose last recipient's phone is off. A round of the poller reads 5
    pages from the newest message waiting, so while that one waited (up to
    `status.give_up_after`, two days) the first 100 recipients, on page 10, were never
    read: `sent` for good, and the status budget spent rereading pages 1 to 5."""
    config = bridge_config(tmp_path, sandbox_url, "[http]\nmax_recipients = 1000\n")
    async with running_bridge(config, clock) as (bridge, url):
        the_others_delivered = await _a_bulk_of_1000_one_phone_off(
            bridge, url, clock, sandbox_state
        )
        await pump(bridge, clock, the_others_delivered, max_seconds=600)
        counts = await bridge.store.counts()
    assert counts == {"delivered": 999, "sent": 1}


async def test_a_429_mid_sweep_resumes_at_the_page_it_stopped_after_retry_after(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """The deep sweep of /logs, stopped by a 429 on its sixth page, started again at the
    newest page: under pressure (a 429 whenever it got that deep) it never reached the
    oldest messages waiting. It now goes on from the page refused, once Retry-After has
    passed."""
    config = bridge_config(tmp_path, sandbox_url, "[http]\nmax_recipients = 1000\n")
    async with running_bridge(config, clock) as (bridge, url):
        the_others_delivered = await _a_bulk_of_1000_one_phone_off(
            bridge, url, clock, sandbox_state
        )
        sandbox_state.faults.append(
            Fault(status=429, path="/logs", query={"page": "6"}, retry_after="40", times=3)
        )
        await pump(bridge, clock, the_others_delivered, max_seconds=900)
    reads = [r for r in sandbox_state.requests if r.path.endswith("/logs")]
    refused = [i for i, r in enumerate(reads) if r.status == 429]
    assert refused, "the sweep never reached page 6"
    for i in refused:  # each time: page 6 again next, not before Retry-After
        assert reads[i + 1].query["page"] == "6"
        assert reads[i + 1].at >= reads[i].at + 40
    after = [r.query["page"] for r in reads[refused[-1] + 1 :]]
    assert after[:5] == ["6", "7", "8", "9", "10"]  # on down, to the oldest's page


@on_each_backend
async def test_six_hundred_messages_that_never_report_do_not_hide_a_newer_ones_state(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """A round of the poller tracks the 500 oldest messages waiting for a state. With 600
    whose phones never report (off, or a network without delivery reports), the newer
    ones were never tracked: a text delivered (or failed) an hour later stayed `sent`
    for `status.give_up_after`, two days. Rounds now take the waiting in turn."""
    config = bridge_config(tmp_path, sandbox_url, "[http]\nmax_recipients = 1000\n")
    async with running_bridge(config, clock) as (bridge, url):
        await post(url, {"to": numbers(600), "message": "maintenance tonight"})
        await bridge.dispatcher.run_once()
        for entry in sandbox_state.entries:
            entry.deliver_from = clock.now() + 7 * 86400  # never a final state here
        clock.advance(3600)
        [later] = (await post(url, {"to": "+12025559999", "message": "db-2 down"})).json()["ids"]
        await pump_until_state(bridge, clock, later, State.DELIVERED, max_seconds=900)
        assert (await bridge.store.counts()) == {"sent": 600, "delivered": 1}


async def test_requests_booked_by_the_cli_count_against_the_window(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """`sms-bridge provider ...` books its calls in the store; the dispatcher counts them,
    including those booked while its own budget was spent, so together they never pass
    the limit (no 429)."""
    config = five_a_minute(tmp_path, sandbox_state, sandbox_url)
    async with running_bridge(config, clock) as (bridge, url):
        await post_each(url, 3, "first")
        await bridge.dispatcher.run_once()  # the price list, then 3 sends: 4 requests
        assert len(sandbox_state.entries) == 3
        clock.advance(30)
        await bridge.store.record_request(clock.now(), "cli:balance")  # the 5th
        await post(url, {"to": "+12025550199", "message": "second"})
        wait = await bridge.dispatcher.run_once()
        assert len(sandbox_state.entries) == 3  # the CLI took the last request
        assert wait > 25
        assert await bridge.dispatcher.run_once() > 25  # spent: returns before any read
        clock.advance(wait)  # the first four have left the window; the CLI's has not
        for i in range(4):  # the CLI fills the window again before the dispatcher runs
            await bridge.store.record_request(clock.now(), f"cli:logs-{i}")
        await post(url, {"to": "+12025550198", "message": "third"})
        wait = await bridge.dispatcher.run_once()
        assert len(sandbox_state.entries) == 3
        assert wait > 20


@on_each_backend
async def test_a_nul_character_is_stored_without_it_on_every_backend(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """JSON's `\\u0000` in a text or a key was a 500 on PostgreSQL (its text type cannot
    hold NUL) and stored as sent on SQLite; in a search, a 500 too. Now the same on both:
    stored and sent without it, the key still meets its repeat; a search for it is a 400."""
    config = bridge_config(tmp_path, sandbox_url)
    body = {"to": "+12025550143", "message": "disk\u0000 full", "dedupe_key": "db-2\u0000"}
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        first = await post(url, body)
        again = await post(url, body)
        assert first.status_code == 202 and again.status_code == 202, first.text + again.text
        [message_id] = first.json()["ids"]
        stored = (await http.get(f"{url}/api/v1/messages/{message_id}")).json()
        search = await http.get(f"{url}/api/v1/messages", params={"q": "disk\u0000"})
        await pump_until_state(bridge, clock, message_id, State.SENT, max_seconds=60)
    assert stored["text"] == "disk full"
    assert again.json()["messages"][0]["state"] == "suppressed"
    assert search.status_code == 400 and search.json()["field"] == "q"
    assert [e.message for e in sandbox_state.entries] == ["disk full"]


@on_each_backend
async def test_one_phone_twice_with_one_text_goes_in_two_calls_and_both_learn_their_state(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """Two messages of one text to one phone (different dedupe keys) went in one bulk
    call naming the phone twice. The answer's ids are read by recipient, so both got the
    second one's id: the first showed the second's state. A call now
    names each phone once; the repeat goes in the next call, and each message has its
    own id and state (the first one's phone failed here, the second's was delivered)."""
    config = bridge_config(tmp_path, sandbox_url)
    a, b = numbers(2)
    async with running_bridge(config, clock) as (bridge, url):
        ids = (await post(url, {"to": [a, b], "message": "drill", "dedupe_key": "k1"})).json()
        again = (await post(url, {"to": a, "message": "drill", "dedupe_key": "k2"})).json()
        ids = ids["ids"] + again["ids"]
        assert len(ids) == 3
        await bridge.dispatcher.run_once()
        next(e for e in sandbox_state.entries if e.to == a).fails = True  # the first to a

        async def all_final() -> bool:
            return State.SENT not in await states(bridge, ids)

        await pump(bridge, clock, all_final, max_seconds=600)
        assert await states(bridge, ids) == [State.FAILED, State.DELIVERED, State.DELIVERED]
        pids = [(await bridge.store.get(i)).provider_message_id for i in ids]
    assert len(set(pids)) == 3
    assert sorted(e.to for e in sandbox_state.entries) == sorted([a, a, b])
    bulks = {e.bulk_id for e in sandbox_state.entries if e.bulk_id}
    for bulk in bulks:
        called = [e.to for e in sandbox_state.entries if e.bulk_id == bulk]
        assert len(set(called)) == len(called)


async def test_a_trailing_slash_on_a_post_is_served_not_redirected(
    tmp_path, clock: ManualClock, sandbox_url: str
) -> None:
    """`POST /api/v1/messages/` answered 307 (the router's redirect), which curl and most
    scripts do not follow for a POST: the alert was silently not sent. The same for
    `/hooks/NAME/` and the admin actions. Each is served as the path without the slash,
    a client that follows no redirect (httpx's default, as curl's) included."""
    route = '[routes.plain]\nformat = "generic"\nto = ["+12025550143"]\npublic = true\n'
    config = bridge_config(tmp_path, sandbox_url, route)
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        api = await http.post(
            f"{url}/api/v1/messages/", json={"to": "+12025550144", "message": "disk full"}
        )
        assert api.status_code == 202, (api.status_code, api.headers.get("location"))
        hook = await http.post(f"{url}/hooks/plain/", json={"message": "backup failed"})
        assert hook.status_code == 202, (hook.status_code, hook.headers.get("location"))
        [hooked] = hook.json()["ids"]
        assert (await bridge.store.get(hooked)).route == "plain"
        unknown = await http.post(f"{url}/hooks/nosuch/", json={"message": "x"})
        assert unknown.status_code == 404 and "nosuch" in unknown.json()["error"]
        [sent] = api.json()["ids"]
        cancel = await http.post(f"{url}/api/v1/messages/{sent}/cancel/")
        assert cancel.status_code == 200, cancel.text
        assert (await bridge.store.get(sent)).state == State.FAILED


async def test_a_trailing_slash_on_the_list_is_not_a_405(
    tmp_path, clock: ManualClock, sandbox_url: str
) -> None:
    """`GET /api/v1/messages/` was the router's 307 to the list. Serving `POST
    /api/v1/messages/` made the path a POST route's, and a GET of it a bare "Method Not
    Allowed": a dashboard polling the list with a trailing slash saw nothing. It is the
    list, as `/api/v1/messages` is, its filters and scope too."""
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (_, url), httpx.AsyncClient() as http:
        await http.post(f"{url}/api/v1/messages", json={"to": "+12025550144", "message": "x"})
        listed = await http.get(f"{url}/api/v1/messages/", params={"state": "queued", "_": "1"})
        assert listed.status_code == 200, (listed.status_code, listed.text)
        assert [m["recipient"] for m in listed.json()["messages"]] == ["+12025550144"]
        wrong = await http.get(f"{url}/api/v1/messages/", params={"stat": "queued"})
        assert wrong.status_code == 400 and "stat" in wrong.json()["error"]
