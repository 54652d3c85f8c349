"""The provider's answers in the shapes sms-api.md leaves open, read for what they say,
end to end: the bridge built as `serve` builds it, the sandbox on loopback, a ManualClock.

An account that cannot send (no balance, key invalid, suspended) holds the queue rather
than failing it, and it goes once the provider sends again; a refusal naming a transient
cause is retried whatever its status; a 2xx whose success flag is falsy in any spelling
is a refusal with its reason; /logs pages read without a last page, or one as a string,
or fewer rows than asked; /logs statuses beyond the four documented; ids as floats, and
one id given to several recipients of a bulk.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from bridge.clock import ManualClock
from bridge.models import State
from bridge.provider.sandbox import Fault, SandboxState
from bridge.service import Bridge
from tests.helpers import ToProvider, bridge_config, pump, pump_until_state, running_bridge

ADMIN_NUMBER = "+12025550199"
ADMIN = f'[budget]\nadmin = ["{ADMIN_NUMBER}"]\n'


async def post(url: str, body: dict[str, object]) -> list[int]:
    async with httpx.AsyncClient() as http:
        answer = await http.post(f"{url}/api/v1/messages", json=body)
    ids: list[int] = answer.json()["ids"]
    return ids


def calls(state: SandboxState, path: str) -> list[int]:
    """The statuses the sandbox answered on `path`."""
    return [r.status for r in state.requests if r.path.endswith(path)]


async def run_for(bridge: Bridge, clock: ManualClock, seconds: float) -> None:
    """Dispatcher and poller steps for `seconds` of simulated time, whatever happens."""
    start = clock.now()
    while clock.now() - start < seconds:
        wait = min(await bridge.dispatcher.run_once(), await bridge.poller.run_once(), 30.0)
        clock.advance(max(wait, 0.01))


class Rewrite(ToProvider):
    """The sandbox's answers on one path rewritten by `change` (its JSON body, the
    request): the provider took the request for real."""

    def __init__(self, path: str, change: Callable[[Any, httpx.Request], Any]) -> None:
        super().__init__()
        self.path, self.change = path, change

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith(self.path) and self.path == "/logs":
            # Twenty rows a page whatever was asked, as a provider's own cap does.
            params = dict(request.url.params) | {"per_page": "20"}
            request = httpx.Request(
                request.method, request.url.copy_with(params=params), headers=request.headers
            )
        answer = await self.inner.handle_async_request(request)
        if not request.url.path.endswith(self.path):
            return answer
        body = json.loads(await answer.aread())
        return httpx.Response(answer.status_code, json=self.change(body, request))


# -- an account that cannot send ------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "words", "flag"),
    [
        (402, "Insufficient balance", False),
        (400, "insufficient_balance", False),
        (200, "Invalid API key", False),
        (200, "Your account has been suspended", False),
        (200, "Insufficient balance", 0),  # an answer saying nothing, read `is False`
    ],
)
async def test_an_account_that_cannot_send_holds_the_queue_and_sends_it_once_it_can(
    tmp_path,
    clock: ManualClock,
    sandbox_state: SandboxState,
    sandbox_url: str,
    status: int,
    words: str,
    flag: object,
) -> None:
    """A 402 or 400 was a permanent failure by its status alone, and the same words on a
    200 failed each text too: an empty balance failed every queued alert for good (a
    bulk split and each recipient failed), health green, no admin told, nothing sent
    after the top-up. The account's words now hold the queue as a 403 does: nothing
    failed, /readyz says why, the admins warned once, all sent once the provider is."""
    body = json.dumps({"success": flag, "message": words})
    for path in ("/send", "/send-bulk"):
        sandbox_state.faults.append(Fault(status=status, path=path, body=body, times=10**6))
    config = bridge_config(tmp_path, sandbox_url, ADMIN)
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        alerts = await post(url, {"to": "+12025550143", "message": "db down"})
        alerts += await post(url, {"to": "+12025550144", "message": "disk full"})
        alerts += await post(url, {"to": ["+12025550145", "+12025550146"], "message": "dns"})
        await run_for(bridge, clock, 1800)
        held = [await bridge.store.get(i) for i in alerts]
        ready = await http.get(f"{url}/readyz")
        warnings = [m for m in await bridge.store.query(limit=50) if m.recipient == ADMIN_NUMBER]

        sandbox_state.faults.clear()  # topped up, the key fixed, the account back

        async def all_went() -> bool:
            got = [await bridge.store.get(i) for i in [*alerts, *(m.id for m in warnings)]]
            return all(m.state in (State.SENT, State.DELIVERED) for m in got)

        await pump(bridge, clock, all_went, max_seconds=3600)
        after = await http.get(f"{url}/readyz")
    assert all(m.state == State.QUEUED for m in held), [(m.state, m.reason) for m in held]
    assert all("account cannot send" in (m.reason or "") for m in held)
    assert ready.status_code == 503
    assert "account cannot send" in ready.json()["problems"]["provider"]
    assert len(warnings) == 1 and "cannot send" in warnings[0].text
    assert after.status_code == 200
    # Waited as an inactive account: a probe now and then, not every text tried in turn.
    assert len(calls(sandbox_state, "/send")) + len(calls(sandbox_state, "/send-bulk")) < 25
    to = sorted(e.to for e in sandbox_state.entries)
    assert to == ["+12025550143", "+12025550144", "+12025550145", "+12025550146", ADMIN_NUMBER]


@pytest.mark.parametrize("status", [400, 413, 200])
async def test_a_refusal_naming_a_rate_limit_is_retried_whatever_its_status(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str, status: int
) -> None:
    """A 400 (or 413) "rate limit exceeded" failed its text for good, by status alone."""
    body = '{"success": false, "message": "Rate limit exceeded, try again later"}'
    sandbox_state.faults.append(Fault(status=status, path="/send", body=body))
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (bridge, url):
        [alert] = await post(url, {"to": "+12025550143", "message": "db down"})
        await pump_until_state(bridge, clock, alert, State.DELIVERED, max_seconds=600)
        message = await bridge.store.get(alert)
    assert calls(sandbox_state, "/send") == [status, 200] and message.attempts == 2


# -- a 2xx refusal in another spelling ------------------------------------------------


@pytest.mark.parametrize(
    "shape",
    [{"success": 0}, {"success": "false"}, {"status": "error"}, {"success": "error"}],
)
async def test_a_2xx_refusal_in_another_spelling_fails_with_the_providers_reason(
    tmp_path,
    clock: ManualClock,
    sandbox_state: SandboxState,
    sandbox_url: str,
    shape: dict[str, object],
) -> None:
    """Read `"success": false` only, these were answers that said nothing: sent twice,
    then `sent` "outcome unknown", the reason lost and /logs read for the text for 48 h."""
    body = json.dumps({**shape, "message": "Invalid number"})
    sandbox_state.faults.append(Fault(status=200, path="/send", body=body))
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (bridge, url):
        [alert] = await post(url, {"to": "+12025550143", "message": "db down"})
        await pump_until_state(bridge, clock, alert, State.FAILED, max_seconds=60)
        await run_for(bridge, clock, 120)
        message = await bridge.store.get(alert)
    assert message.state == State.FAILED and "Invalid number" in (message.reason or "")
    assert calls(sandbox_state, "/send") == [200] and not calls(sandbox_state, "/logs")


# -- /logs pages --------------------------------------------------------------------


def no_paging(body: Any, request: httpx.Request) -> Any:
    body.pop("pagination", None)
    return body


def paging_as_text(body: Any, request: httpx.Request) -> Any:
    body["pagination"]["last_page"] = str(body["pagination"]["last_page"])
    return body


def paging_as_is(body: Any, request: httpx.Request) -> Any:
    return body


OTHERS = [f"+120255502{i:02d}" for i in range(25)]


@pytest.mark.parametrize("paging", [no_paging, paging_as_text])
async def test_a_text_taken_behind_a_gateway_error_is_found_on_logs_second_page(
    tmp_path,
    clock: ManualClock,
    sandbox_state: SandboxState,
    sandbox_url: str,
    paging: Callable[[Any, httpx.Request], Any],
) -> None:
    """/logs serving 20 rows a page (per_page=100 ignored), without paging fields or
    with `last_page` as a string: the reconciler's walk ended at page 1, taken for the
    end since it held fewer rows than asked; the text the provider took behind a 502,
    below a bulk of 25, was "not found" and sent again: two SMS."""
    page = "<html><body>502 Bad Gateway</body></html>"
    sandbox_state.faults.append(Fault(status=502, path="/send", body=page, taken=True))
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock, transport=Rewrite("/logs", paging)) as (bridge, url):
        [alert] = await post(url, {"to": "+12025550143", "message": "db down"})
        await post(url, {"to": OTHERS, "message": "network flap"})
        await pump_until_state(bridge, clock, alert, State.DELIVERED, max_seconds=900)
    assert [e.to for e in sandbox_state.entries].count("+12025550143") == 1
    assert calls(sandbox_state, "/send") == [502]


@pytest.mark.parametrize(("paging", "others"), [(no_paging, 25), (paging_as_is, 150)])
async def test_the_poller_reads_logs_pages_of_fewer_rows_than_asked(
    tmp_path,
    clock: ManualClock,
    sandbox_state: SandboxState,
    sandbox_url: str,
    paging: Callable[[Any, httpx.Request], Any],
    others: int,
) -> None:
    """The poller read /logs as the reconciler did: without paging fields, a page of 20
    rows ended its round; and it skipped pages counted in 100s, past a state 150 sends
    deep on a provider serving 20 a page. Either way the text stayed `sent` for 48 h."""
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock, transport=Rewrite("/logs", paging)) as (bridge, url):
        [alert] = await post(url, {"to": "+12025550143", "message": "db down"})
        await bridge.dispatcher.run_once()
        numbers = [f"+1202555{i:04d}" for i in range(1000, 1000 + others)]
        for part in range(0, others, 50):  # under the API's recipients a request
            await post(url, {"to": numbers[part : part + 50], "message": "network flap"})
        await pump_until_state(bridge, clock, alert, State.DELIVERED, max_seconds=900)
    assert len(sandbox_state.entries) == 1 + others


# -- /logs statuses -------------------------------------------------------------------


def status_said(word: str, until: list[float], clock: ManualClock) -> Callable[[Any, Any], Any]:
    """/logs saying `word` for every entry the sandbox reports delivered, until until[0]."""

    def change(body: Any, request: httpx.Request) -> Any:
        for row in body["data"]:
            if row["status"] == "delivered" and clock.now() < until[0]:
                row["status"] = word
        return body

    return change


@pytest.mark.parametrize("word", ["undelivered", "REJECTED", "expired", "Undeliverable"])
async def test_a_final_status_beyond_the_documented_fails_the_text_with_its_word(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str, word: str
) -> None:
    """Only "delivered" and "failed" were final: an "undelivered" text stayed `sent`, and
    /logs was read for it 1,191 times in two hours, until `give_up_after` (48 h)."""
    change = status_said(word, [float("inf")], clock)
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock, transport=Rewrite("/logs", change)) as (bridge, url):
        [alert] = await post(url, {"to": "+12025550143", "message": "db down"})
        await pump_until_state(bridge, clock, alert, State.FAILED, max_seconds=600)
        message = await bridge.store.get(alert)
    assert message.reason == f"provider reports {word.lower()}"


async def test_an_unknown_status_is_asked_about_less_often_until_it_ends(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """A status neither final nor in flight is not final (the provider may report one
    later), but asked about at the poll interval it read /logs 12 times a minute for
    `give_up_after`. Now a minute after it is seen, then doubling up to 15 minutes; the
    message's events say so, once."""
    until = [float("inf")]
    change = status_said("dlr_unknown_7", until, clock)
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock, transport=Rewrite("/logs", change)) as (bridge, url):
        [alert] = await post(url, {"to": "+12025550143", "message": "db down"})
        await run_for(bridge, clock, 7200)
        still = await bridge.store.get(alert)
        reads = len(calls(sandbox_state, "/logs"))
        events = await bridge.store.events(alert)
        until[0] = clock.now()  # the provider reports it delivered now
        await pump_until_state(bridge, clock, alert, State.DELIVERED, max_seconds=1000)
    assert still.state == State.SENT
    assert reads <= 25, reads  # 1,191 before, in the same two hours
    noted = [e for e in events if "dlr_unknown_7" in json.dumps(e)]
    assert len(noted) == 1, events


# -- ids ------------------------------------------------------------------------------


def float_id(body: Any, request: httpx.Request) -> Any:
    body["data"]["message_id"] = float(body["data"]["message_id"])
    return body


async def test_an_id_written_as_an_integral_float_is_its_integer(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """`"message_id": 10000.0` was stored "10000.0", never the "10000" of /logs: the
    text stayed `sent`, /logs read for it 10 times a minute."""
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock, transport=Rewrite("/send", float_id)) as (
        bridge,
        url,
    ):
        [alert] = await post(url, {"to": "+12025550143", "message": "db down"})
        await pump_until_state(bridge, clock, alert, State.DELIVERED, max_seconds=600)
        message = await bridge.store.get(alert)
    [entry] = sandbox_state.entries
    assert message.provider_message_id == str(entry.message_id)


def one_id_for_all(body: Any, request: httpx.Request) -> Any:
    for item in body["data"]["messages"]:
        item["message_id"] = 777
    return body


async def test_one_id_given_to_every_recipient_of_a_bulk_is_no_ones(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """A bulk answer giving the same id to every recipient stored it on each: /logs
    could pair it with one at most, the others' states never learnt (and asked about for
    48 h). It is the call's: each is sent without an id, matched in /logs by recipient
    and text, and keeps the id found there; none is sent again."""
    recipients = ["+12025550143", "+12025550144", "+12025550145"]
    transport = Rewrite("/send-bulk", one_id_for_all)
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock, transport=transport) as (bridge, url):
        ids = await post(url, {"to": recipients, "message": "db down"})
        await bridge.dispatcher.run_once()
        after_send = [await bridge.store.get(i) for i in ids]

        async def delivered() -> bool:
            return all(m.state == State.DELIVERED for m in await bridge.store.query())

        await pump(bridge, clock, delivered, max_seconds=900)
        final = [await bridge.store.get(i) for i in ids]
    assert all(m.state == State.SENT and m.provider_message_id is None for m in after_send)
    by_number = {e.to: str(e.message_id) for e in sandbox_state.entries}
    assert {m.recipient: m.provider_message_id for m in final} == by_number
    assert len(calls(sandbox_state, "/send-bulk")) == 1 and not calls(sandbox_state, "/send")
