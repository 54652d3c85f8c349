"""The provider fault matrix: each fault ends with every message delivered or failed with
a reason, no duplicate sends where the outcome could be known, and the rate limit kept.

Faults come from the sandbox served for real (status codes, stalls, odd bodies) or, for
what a live server cannot easily do on cue, from a transport wrapped around the real one
(connect timeouts, a reset after the provider has taken the request).
"""

from __future__ import annotations

import copy
import email.utils
from collections import Counter
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from bridge.app import build as build_bridge
from bridge.clock import ManualClock
from bridge.delivery.reconcile import RECONCILE_DELAY
from bridge.models import State
from bridge.provider.sandbox import VARIANTS, Fault, SandboxState
from tests.helpers import ToProvider, bridge_config, max_in_window, pump, running_bridge, served

# Run on each store backend (tests/conftest.py `backend`).
on_each_backend = pytest.mark.usefixtures("backend")

GROUP = '[groups]\noncall = ["+12025550101", "+12025550102", "+12025550103"]\n'


class FaultyTransport(ToProvider):
    """The real HTTP transport, with faults injected on the first matching requests."""

    def __init__(self, faults: list[str], path: str = "/send") -> None:
        super().__init__()
        self.faults = faults
        self.path = path

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        fault = None
        if self.faults and request.url.path.endswith(self.path):
            fault = self.faults.pop(0)
        if fault == "connect-timeout":
            raise httpx.ConnectTimeout("connect timed out", request=request)
        if fault == "connect-refused":
            raise httpx.ConnectError("connection refused", request=request)
        response = await self.inner.handle_async_request(request)
        if fault == "reset-after-send":  # the provider took it; we never hear so
            await response.aread()
            raise httpx.RemoteProtocolError("peer closed connection", request=request)
        return response


def scenarios(clock_now: float) -> dict[str, dict]:
    date = email.utils.formatdate(clock_now + 90, usegmt=True)
    return {
        "500-burst": {"sandbox": [Fault(status=500, times=5, path="/send")]},
        "429-seconds": {"sandbox": [Fault(status=429, retry_after="30", path="/send")]},
        "429-http-date": {"sandbox": [Fault(status=429, retry_after=date, path="/send")]},
        "429-absent": {"sandbox": [Fault(status=429, times=2, path="/send")]},
        "connect-timeout": {"transport": ["connect-timeout"] * 3},
        "connect-refused": {"transport": ["connect-refused"] * 2},
        # The provider takes the SMS, then answers too late: checked in /logs, not resent.
        "read-timeout": {
            "sandbox": [Fault(status=0, delay=0.6, path="/send")],
            "timeout": "0.2s",
            "sends": 4,  # three singles and one bulk, each exactly once
        },
        "reset-after-send": {"transport": ["reset-after-send"] * 2, "sends": 4},
        "malformed-200": {"sandbox": [Fault(status=200, body="<html>ok</html>", path="/send")]},
        "unexpected-json-200": {
            "sandbox": [Fault(status=200, body='{"queued": true}', path="/send")]
        },
        "slow-provider": {
            "sandbox": [Fault(status=0, delay=1.0, path="/send", times=2)],
            "timeout": "5s",
        },
        "bulk-fails-whole": {"sandbox": [Fault(status=500, times=2, path="/send-bulk")]},
        "bulk-reset-after-send": {
            "transport": ["reset-after-send"],
            "transport_path": "/send-bulk",
            "sends": 4,
        },
        "400-refused": {
            "sandbox": [
                Fault(status=400, path="/send", body='{"success": false, "message": "Blocked."}')
            ]
        },
    }


NAMES = sorted(scenarios(0))


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.slow) if n == "slow-provider" else n  # real stalls
        for n in NAMES
    ],
)
@on_each_backend
async def test_fault(
    name: str, tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    case = scenarios(clock.now())[name]
    injected_429 = sum(f.times for f in case.get("sandbox", []) if f.status == 429)
    sandbox_state.faults.extend(case.get("sandbox", []))
    config = bridge_config(tmp_path, sandbox_url, GROUP, timeout=case.get("timeout", "5s"))
    transport = None
    if "transport" in case:
        transport = FaultyTransport(list(case["transport"]), case.get("transport_path", "/send"))
    async with (
        running_bridge(config, clock, transport=transport) as (bridge, url),
        httpx.AsyncClient() as http,
    ):
        ids = []
        for i in range(3):
            r = await http.post(
                f"{url}/api/v1/messages", json={"to": f"+1202555020{i}", "message": f"{name} {i}"}
            )
            ids += r.json()["ids"]
        r = await http.post(f"{url}/api/v1/messages", json={"to": "oncall", "message": name})
        ids += r.json()["ids"]

        async def final() -> bool:
            states = [(await bridge.store.get(i)).state for i in ids]
            return all(s in (State.DELIVERED, State.FAILED) for s in states)

        await pump(bridge, clock, final, max_seconds=3 * 3600)
        messages = [await bridge.store.get(i) for i in ids]
    for m in messages:
        assert m.state == State.DELIVERED or (m.state == State.FAILED and m.reason), m
    sent = Counter((e.to, e.message) for e in sandbox_state.entries)
    assert all(n == 1 for n in sent.values()), f"duplicates: {sent}"
    delivered = {(m.recipient, m.text) for m in messages if m.state == State.DELIVERED}
    assert delivered <= set(sent)
    assert max_in_window([r.at for r in sandbox_state.requests]) <= 100
    assert [r.status for r in sandbox_state.requests].count(429) <= injected_429
    if "sends" in case:  # an outcome /logs could settle: never a second request
        sends = [r for r in sandbox_state.requests if r.path.endswith(("/send", "/send-bulk"))]
        assert len(sends) == case["sends"], sends
    if name == "400-refused":
        assert sum(m.state == State.FAILED for m in messages) == 1
    else:
        assert all(m.state == State.DELIVERED for m in messages)


# -- every sandbox shape x every fault, over a simulated hour (issue 17) -------------------
MATRIX_FAULTS: dict[str, dict] = {
    "none": {},
    "read-timeout": {"sandbox": [Fault(status=0, delay=0.4, path="/send")], "timeout": "0.2s"},
    "5xx-json": {"sandbox": [Fault(status=500, times=3, path="/send")]},
    "502-after-send": {
        "sandbox": [Fault(status=502, body="<html>Bad Gateway</html>", taken=True, times=2)]
    },
    "bulk-reset": {"transport": ["reset-after-send"], "transport_path": "/send-bulk"},
    "429-absent": {"sandbox": [Fault(status=429, times=2)]},
    "logs-404": {"sandbox": [Fault(status=404, times=6, path="/logs")]},
    "silent-200": {"sandbox": [Fault(status=200, body='{"queued": true}', times=2, path="/send")]},
    # Taken and logged, answered with nothing, and /logs unreadable: only the cap stops it.
    "silent-200-taken-logs-hidden": {
        "sandbox": [
            Fault(status=200, body='{"queued": true}', taken=True, times=999, path="/send"),
            Fault(status=404, times=9999, path="/logs"),
        ],
        "logs_hidden": True,
    },
}


@pytest.mark.slow  # 72 simulated hours: ~80 s on two shared cores
@pytest.mark.parametrize("fault", sorted(MATRIX_FAULTS))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@on_each_backend
async def test_variant_and_fault_matrix(
    variant: str,
    fault: str,
    tmp_path,
    clock: ManualClock,
    sandbox_state: SandboxState,
    sandbox_url: str,
) -> None:
    """Whatever shape the provider answers in, and whatever goes wrong: every message ends
    in a state, never more than two copies to anyone, nothing `sending`, no 429."""
    case = MATRIX_FAULTS[fault]
    shape = VARIANTS[variant]
    sandbox_state.shape = shape
    sandbox_state.faults.extend(copy.deepcopy(case.get("sandbox", [])))
    # A poll every 30 s keeps the simulated hour to ~120 steps.
    extra = GROUP + '[budget]\nadmin = ["+12025550199"]\n[status]\npoll_interval = "30s"\n'
    config = bridge_config(
        tmp_path, sandbox_url, extra, timeout=case.get("timeout", "5s"), timezone=shape.timezone
    )
    transport = None
    if "transport" in case:
        transport = FaultyTransport(list(case["transport"]), case["transport_path"])
    scheduled_at = datetime.fromtimestamp(clock.now() + 600, UTC).isoformat()
    async with (
        build_bridge(config, clock=clock, transport=transport) as bridge,
        served(bridge.app) as url,
        httpx.AsyncClient() as http,
    ):
        await bridge.dispatcher.load_budget()
        for i in range(3):
            await http.post(
                f"{url}/api/v1/messages", json={"to": f"+1202555020{i}", "message": f"single {i}"}
            )
        await http.post(f"{url}/api/v1/messages", json={"to": "oncall", "message": "to a group"})
        later = await http.post(
            f"{url}/api/v1/messages",
            json={"to": "+12025550300", "message": "later", "schedule_time": scheduled_at},
        )
        assert later.status_code == 202, later.text
        start = clock.now()
        while clock.now() - start < 3600:
            wait = min(
                await bridge.dispatcher.run_once(),
                await bridge.poller.run_once(),
                await bridge.digests.run_once(),
                30.0,
            )
            counts = await bridge.store.counts()
            if set(counts) <= {"delivered", "failed"}:
                wait = 300.0  # all settled: the rest of the hour in long steps, still run
            clock.advance(max(wait, 0.01))
        messages = await bridge.store.query(limit=100)
    copies = Counter((e.to, e.message) for e in sandbox_state.entries)
    assert max(copies.values()) <= 2, copies
    for m in messages:
        assert m.state in (State.DELIVERED, State.SENT, State.FAILED), m
        if m.state == State.SENT and case.get("logs_hidden"):
            continue  # sent, and no /logs to say more: its last known state
        if m.state != State.DELIVERED:  # ends elsewhere only with a reason saying why
            assert m.reason and "outcome unknown" in m.reason, m
    injected_429 = sum(f.times for f in case.get("sandbox", []) if f.status == 429)
    assert [r.status for r in sandbox_state.requests].count(429) <= injected_429
    assert max_in_window([r.at for r in sandbox_state.requests]) <= 100
    delivered = {(m.recipient, m.text) for m in messages if m.state == State.DELIVERED}
    assert {("+12025550300", "later"), ("+12025550200", "single 0")} <= delivered | {
        (m.recipient, m.text) for m in messages if m.state == State.SENT
    }


@on_each_backend
async def test_an_unknown_outcome_is_looked_up_in_the_logs_after_the_reconcile_delay(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """A 502 after the provider took the text leaves it `sending` until /logs says what
    became of it, which the reconciler reads RECONCILE_DELAY (5 s) after the send. With
    nothing else queued, the dispatcher slept its idle wait (30 s) after that send and
    only then looked: the alert's fate, and a resend if it was not taken, came 25 s late.
    The wait the dispatcher asks for (what `Dispatcher.run` sleeps) is held here."""
    sandbox_state.faults.append(
        Fault(status=502, body="<html>Bad Gateway</html>", taken=True, path="/send")
    )
    config = bridge_config(tmp_path, sandbox_url)
    async with (
        build_bridge(config, clock=clock) as bridge,
        served(bridge.app) as url,
        httpx.AsyncClient() as http,
    ):
        await bridge.dispatcher.load_budget()
        body = {"to": "+12025550201", "message": "disk 97% on db-2"}
        (message_id,) = (await http.post(f"{url}/api/v1/messages", json=body)).json()["ids"]

        def requests(path: str) -> int:
            return sum(r.path.endswith(path) for r in sandbox_state.requests)

        wait = await bridge.dispatcher.run_once()
        assert requests("/send") == 1
        assert (await bridge.store.get(message_id)).state == State.SENDING
        assert wait <= RECONCILE_DELAY, f"the /logs look waits {wait:g}s"
        slept = 0.0
        for _ in range(20):  # a wait of 0 again and again fails here, not hangs
            if requests("/logs"):
                break
            clock.advance(wait)
            slept += wait
            wait = await bridge.dispatcher.run_once()
        assert requests("/logs") >= 1 and slept <= RECONCILE_DELAY + 0.1, slept
        assert (await bridge.store.get(message_id)).state in (State.SENT, State.DELIVERED)
        assert requests("/send") == 1  # taken: found in /logs, never sent again


async def test_a_failed_logs_read_is_asked_again_at_its_backoff_not_the_idle_wait(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """/logs answered 503 to the look for an unknown outcome: the reconciler asks again
    after the dispatcher's backoff (`backoff_initial` with jitter: 1-2 s here). The
    dispatcher's wait must end then, not at its idle wait (30 s), with nothing else
    queued. The wait it asks for (what `Dispatcher.run` sleeps) is held here."""
    sandbox_state.faults += [
        Fault(status=502, body="<html>Bad Gateway</html>", taken=True, path="/send"),
        Fault(status=503, path="/logs"),
    ]
    config = bridge_config(tmp_path, sandbox_url, backoff_initial="2s", backoff_max="2s")
    async with build_bridge(config, clock=clock) as bridge, served(bridge.app) as url:
        await bridge.dispatcher.load_budget()
        async with httpx.AsyncClient() as http:
            body = {"to": "+12025550202", "message": "disk 98% on db-3"}
            response = await http.post(f"{url}/api/v1/messages", json=body)
        (message_id,) = response.json()["ids"]
        await bridge.dispatcher.run_once()
        clock.advance(RECONCILE_DELAY)
        wait = await bridge.dispatcher.run_once()  # the look: 503
        logs = [r for r in sandbox_state.requests if r.path.endswith("/logs")]
        assert [r.status for r in logs] == [503]
        assert wait <= 2, f"/logs is asked again in {wait:g}s"
        clock.advance(wait)
        await bridge.dispatcher.run_once()
        logs = [r for r in sandbox_state.requests if r.path.endswith("/logs")]
        assert [r.status for r in logs] == [503, 200]
        assert (await bridge.store.get(message_id)).state in (State.SENT, State.DELIVERED)


@on_each_backend
async def test_yesterdays_text_in_the_logs_is_not_taken_for_todays_lost_send(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """A nightly job alerts at 00:00:30 with the same words to the same phone. Today
    the gateway answers 502 and the provider did not take the text: /logs, read from
    the day before our request (its `date_from` is a day, less CLOCK_SKEW), shows
    yesterday's alert, which our store no longer knows (purged: `sms-bridge purge
    --older-than 12h`; a text another client of the account sent is the same). Taken
    for today's, the alert was settled as sent, with yesterday's id, and never sent."""
    config = bridge_config(tmp_path, sandbox_url)
    body = {"to": "+12025550201", "message": "nightly backup of db-2 failed"}
    async with (
        build_bridge(config, clock=clock) as bridge,
        served(bridge.app) as url,
        httpx.AsyncClient() as http,
    ):
        await bridge.dispatcher.load_budget()

        async def alert() -> int:
            (message_id,) = (await http.post(f"{url}/api/v1/messages", json=body)).json()["ids"]
            return message_id

        async def settled(message_id: int) -> None:
            async def done() -> bool:
                state = (await bridge.store.get(message_id)).state
                return state in (State.SENT, State.DELIVERED)

            await pump(bridge, clock, done, max_seconds=600)

        midnight = datetime.fromtimestamp(clock.now(), UTC).replace(hour=0, minute=0, second=0)
        clock.advance(midnight.timestamp() + 86400 + 30 - clock.now())  # tomorrow, 00:00:30
        await settled(await alert())
        assert len(sandbox_state.entries) == 1
        clock.advance(sandbox_state.entries[0].created_at + 86400 - clock.now())
        assert await bridge.store.purge(clock.now() - 12 * 3600) == 1
        sandbox_state.faults.append(
            Fault(status=502, body="<html>Bad Gateway</html>", path="/send")  # not taken
        )
        today = await alert()
        await settled(today)
        message = await bridge.store.get(today)
    sends = [r.status for r in sandbox_state.requests if r.path.endswith("/send")]
    assert sends == [200, 502, 200]
    logs = [r for r in sandbox_state.requests if r.path.endswith("/logs")]
    assert any(r.query.get("date_from") == str(midnight.date() + timedelta(days=1)) for r in logs)
    yesterday, resent = sandbox_state.entries
    assert resent.created_at - yesterday.created_at >= 86400
    assert message.provider_message_id == str(resent.message_id)


async def test_readyz_says_when_no_send_has_gone_through_for_a_minute(
    tmp_path, clock: ManualClock, sandbox_url: str
) -> None:
    """The contract's readiness covers a reachable provider, but a provider refusing every
    connection left /readyz `ready` with nothing said, for as long as it lasted. It stays
    200 (this instance still takes alerts and keeps them, which a 503 would have a load
    balancer refuse) and says, once no send has gone through for a minute, that none has;
    that is gone with the first send that goes through."""
    transport = FaultyTransport(["connect-refused"] * 8)
    config = bridge_config(tmp_path, sandbox_url)
    async with (
        running_bridge(config, clock, transport=transport) as (bridge, url),
        httpx.AsyncClient() as http,
    ):
        (message_id,) = (
            await http.post(f"{url}/api/v1/messages", json={"to": "+12025550143", "message": "x"})
        ).json()["ids"]
        start, seen = clock.now(), []
        while transport.faults:
            wait = await bridge.dispatcher.run_once()
            answer = await http.get(f"{url}/readyz")
            assert answer.status_code == 200, answer.text
            seen.append((clock.now() - start, answer.json().get("warnings", {}).get("provider")))
            clock.advance(min(wait, 30.0) or 0.01)
        while (await bridge.store.get(message_id)).state == State.QUEUED:
            clock.advance(min(await bridge.dispatcher.run_once(), 30.0) or 0.01)
        after = (await http.get(f"{url}/readyz")).json()
    assert seen[0] == (0.0, None)  # one failure says nothing yet
    assert all(said is None for elapsed, said in seen if elapsed < 60), seen
    late = [said for elapsed, said in seen if elapsed >= 60]
    assert late and all(said and "no send has gone through for" in said for said in late), seen
    assert after == {"status": "ready"}


async def test_readyz_stops_saying_so_once_nothing_is_tried_any_more(
    tmp_path, clock: ManualClock, sandbox_url: str
) -> None:
    """Only a send that went through ended the warning: a text that failed and was then
    cancelled (or given up) left an idle bridge saying a day later that no send had gone
    through for 1440 min. Once nothing failed for longer than the longest wait between
    retries (`provider.backoff_max`), nothing is being tried and it says nothing."""
    transport = FaultyTransport(["connect-refused"] * 50)
    config = bridge_config(tmp_path, sandbox_url, backoff_max="2m")
    async with (
        running_bridge(config, clock, transport=transport) as (bridge, url),
        httpx.AsyncClient() as http,
    ):
        body = {"to": "+12025550143", "message": "x"}
        (message_id,) = (await http.post(f"{url}/api/v1/messages", json=body)).json()["ids"]
        start = clock.now()
        while clock.now() - start < 300:  # retried every 2 minutes at most: still said
            clock.advance(min(await bridge.dispatcher.run_once(), 30.0) or 0.01)
        during = (await http.get(f"{url}/readyz")).json()
        cancelled = await http.post(f"{url}/api/v1/messages/{message_id}/cancel")
        assert cancelled.status_code == 200, cancelled.text
        for _ in range(8):  # six minutes more with nothing to send
            clock.advance(min(await bridge.dispatcher.run_once(), 45.0) or 0.01)
        after = (await http.get(f"{url}/readyz")).json()
    assert "no send has gone through for" in during["warnings"]["provider"]
    assert after == {"status": "ready"}
