"""Each provider answer handled for what it means, end to end (issue 17).

The bridge built as `serve` builds it, the sandbox served on loopback, a ManualClock:
an unknown outcome is resent at most once and then ends `sent` with "outcome unknown";
a 2xx without ids is a success the poller still follows; 403 pauses without flapping;
a 404 from /logs is not an auth failure; `success: false` is read for transient words;
429 without Retry-After backs off exponentially; a 5xx is checked in /logs first.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from bridge.app import build as build_bridge
from bridge.clock import ManualClock
from bridge.delivery.reconcile import RECONCILE_DELAY
from bridge.models import State
from bridge.provider.sandbox import VARIANTS, Fault, SandboxState
from bridge.service import Bridge
from tests.helpers import ToProvider, bridge_config, pump, pump_until_state, running_bridge, served

ADMIN = '[budget]\nadmin = ["+12025550199"]\n'


async def post(url: str, body: dict[str, object]) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.post(f"{url}/api/v1/messages", json=body)


def went(bridge: Bridge, message_id: int) -> Callable[[], Awaitable[bool]]:
    """Whether the message reached the provider (`sent`, or already `delivered`)."""

    async def check() -> bool:
        message = await bridge.store.get(message_id)
        return message is not None and message.state in (State.SENT, State.DELIVERED)

    return check


def sends(state: SandboxState) -> list[float]:
    return [r.at for r in state.requests if r.path.endswith(("/send", "/send-bulk"))]


async def test_an_unknown_outcome_is_resent_once_then_ends_sent_outcome_unknown(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    # Every send answers a 200 that says nothing, and nothing ever shows in /logs.
    sandbox_state.faults.append(Fault(status=200, body='{"queued": true}', path="/send", times=99))
    config = bridge_config(tmp_path, sandbox_url, ADMIN)
    async with running_bridge(config, clock) as (bridge, url):
        [message_id] = (await post(url, {"to": "+12025550143", "message": "db down"})).json()["ids"]

        start = clock.now()
        while clock.now() - start < 3600:  # a simulated hour: no third copy, ever
            clock.advance(min(await bridge.dispatcher.run_once(), 30.0) or 0.01)
        message = await bridge.store.get(message_id)
        warnings = await bridge.store.query(limit=10)
    to_him = [r for r in sandbox_state.requests if r.path.endswith("/send")]
    assert message.state == State.SENT and message.reason_kind == "unknown"
    assert "outcome unknown" in (message.reason or "") and message.unknown_resends == 1
    # Two copies to the recipient (one resend); the admin's warning meets the same silent
    # provider and gets its two copies too; nothing more in an hour.
    assert len(to_him) == 4
    assert any(m.recipient == "+12025550199" and "unknown outcome" in m.text for m in warnings)


async def test_max_unknown_resends_zero_never_resends(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    sandbox_state.faults.append(Fault(status=200, body='{"queued": true}', path="/send", times=99))
    config = bridge_config(tmp_path, sandbox_url, max_unknown_resends=0)
    async with running_bridge(config, clock) as (bridge, url):
        [message_id] = (await post(url, {"to": "+12025550143", "message": "x"})).json()["ids"]
        for _ in range(60):
            clock.advance(min(await bridge.dispatcher.run_once(), 30.0) or 0.01)
        message = await bridge.store.get(message_id)
    assert message.state == State.SENT and "outcome unknown" in (message.reason or "")
    assert len(sends(sandbox_state)) == 1


async def test_a_2xx_without_ids_is_sent_and_the_poller_matches_recipient_and_text(
    tmp_path, clock: ManualClock, sandbox_url: str, sandbox_state: SandboxState
) -> None:
    # The measured stand-in: count-only bulk answers, /logs with phone/sms/state keys and
    # numbers without "+". Before: 6 copies in 150 s, 121 in 10 minutes.
    sandbox_state.shape = VARIANTS["stand-in"]
    config = bridge_config(tmp_path, sandbox_url)
    recipients = ["+12025550152", "+12025550153", "+12025550154"]
    async with running_bridge(config, clock) as (bridge, url):
        ids = (await post(url, {"to": recipients, "message": "rack 4 on fire"})).json()["ids"]
        [solo] = (await post(url, {"to": "+12025550155", "message": "alone"})).json()["ids"]
        await bridge.dispatcher.run_once()
        after_send = [await bridge.store.get(i) for i in [*ids, solo]]

        async def delivered() -> bool:
            return all(m.state == State.DELIVERED for m in await bridge.store.query())

        await pump(bridge, clock, delivered, max_seconds=600)
        clock.advance(600)
        for _ in range(20):
            clock.advance(await bridge.dispatcher.run_once() or 1)
        final = [await bridge.store.get(i) for i in [*ids, solo]]
    assert all(m.state == State.SENT and m.provider_message_id is None for m in after_send)
    assert len(sends(sandbox_state)) == 2  # one bulk, one single: nothing resent
    assert len(sandbox_state.entries) == 4
    by_number = {e.to: str(e.message_id) for e in sandbox_state.entries}
    assert all(m.provider_message_id == by_number[m.recipient] for m in final)


@pytest.mark.usefixtures("backend")
async def test_an_unknown_outcome_never_takes_the_entry_of_an_earlier_send_without_an_id(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """Two alerts of one text to one phone (two hosts, one template: two dedupe keys), the
    provider answering without ids; the second's request dies at a gateway (a 502 page)
    before the provider. /logs was matched from the oldest claim less CLOCK_SKEW, and only
    ids already stored were not free: the first's entry, which it has no id for, was
    taken for the second, recorded `sent` with that id (then `delivered`), and the first
    kept none. An entry is taken only for a message claimed before it (less the skew), and
    the oldest entries of a recipient and text go to our earlier sends without an id, the
    oldest to the oldest: the second, never sent, is sent again."""
    sandbox_state.shape = VARIANTS["count-only"]  # /send answers success, cost, no id
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (bridge, url):
        body = {"to": "+12025550111", "message": "FIRING: HighCPU"}
        [first] = (await post(url, {**body, "dedupe_key": "host-a"})).json()["ids"]
        await bridge.dispatcher.run_once()
        assert (await bridge.store.get(first)).state == State.SENT
        clock.advance(20)
        sandbox_state.faults.append(
            Fault(status=502, body="<html>Bad Gateway</html>", path="/send")
        )
        [second] = (await post(url, {**body, "dedupe_key": "host-b"})).json()["ids"]
        await bridge.dispatcher.run_once()
        assert (await bridge.store.get(second)).state == State.SENDING
        clock.advance(RECONCILE_DELAY + 0.1)
        await bridge.dispatcher.run_once()  # /logs read: the one entry is the first's
        looked = await bridge.store.get(second)  # not found: sent again in this step
        await pump(bridge, clock, went(bridge, second), max_seconds=600)
        for _ in range(4):  # the poller reads both entries' states
            clock.advance(5)
            await bridge.poller.run_once()
        final = {i: await bridge.store.get(i) for i in (first, second)}
    assert looked.unknown_resends == 1 and looked.provider_message_id is None, looked
    one, two = sandbox_state.entries  # the second went once, when sent again
    assert final[first].provider_message_id == str(one.message_id)
    assert final[second].provider_message_id == str(two.message_id)


@pytest.mark.usefixtures("backend")
async def test_an_unknown_outcome_never_takes_the_entry_of_a_later_send_without_an_id(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """The first of two alerts of one text to one phone dies at a gateway before the
    provider; the second goes while the first waits for its look (new texts no longer
    wait for it), answered without an id. Only id-less sends made up to the newest
    claim looked up held their entries, and of two sends both able to be an entry's, the
    older took it: the first, never sent, was recorded sent on the second's entry. A send
    the provider answered has an entry for sure, an unknown outcome may not: the
    answered sends take theirs first, and the first is sent again."""
    sandbox_state.shape = VARIANTS["count-only"]  # /send answers success, cost, no id
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (bridge, url):
        body = {"to": "+12025550111", "message": "FIRING: HighCPU"}
        sandbox_state.faults.append(
            Fault(status=502, body="<html>Bad Gateway</html>", path="/send")
        )
        [first] = (await post(url, {**body, "dedupe_key": "host-a"})).json()["ids"]
        await bridge.dispatcher.run_once()
        assert (await bridge.store.get(first)).state == State.SENDING  # type: ignore[union-attr]
        clock.advance(1.0)
        [second] = (await post(url, {**body, "dedupe_key": "host-b"})).json()["ids"]
        await bridge.dispatcher.run_once()  # the first's look is not due: this one goes
        assert (await bridge.store.get(second)).state == State.SENT  # type: ignore[union-attr]
        clock.advance(RECONCILE_DELAY)
        await bridge.dispatcher.run_once()  # /logs: the one entry is the second's
        looked = await bridge.store.get(first)
        await pump(bridge, clock, went(bridge, first), max_seconds=600)
    assert looked.unknown_resends == 1, looked  # type: ignore[union-attr]
    assert len(sandbox_state.entries) == 2  # the second's, then the first's, sent again


async def test_an_unknown_outcome_waits_for_logs_to_show_a_send_made_while_it_waited(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """The provider took the first of two alerts of one text to one phone but its answer
    was a 502 page; the second went a second later, answered without an id, and /logs
    showed it only some seconds after. Our answered sends take their entries first, so
    at the first's look the second took the first's entry (its own not there yet): the
    first, "not found", was sent again. A look waits until /logs can show every id-less
    send to the number (RECONCILE_DELAY after it)."""
    sandbox_state.shape = VARIANTS["count-only"]
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (bridge, url):
        body = {"to": "+12025550111", "message": "FIRING: HighCPU"}
        gateway = "<html>Bad Gateway</html>"
        sandbox_state.faults.append(Fault(status=502, body=gateway, path="/send", taken=True))
        [first] = (await post(url, {**body, "dedupe_key": "host-a"})).json()["ids"]
        await bridge.dispatcher.run_once()  # taken, answered 502: looked up in 5 s
        clock.advance(1.0)
        [second] = (await post(url, {**body, "dedupe_key": "host-b"})).json()["ids"]
        await bridge.dispatcher.run_once()
        assert (await bridge.store.get(second)).state == State.SENT  # type: ignore[union-attr]
        logged_late = sandbox_state.entries.pop()  # /logs does not show it yet
        clock.advance(RECONCILE_DELAY - 1.0 + 0.1)  # the first's look is due
        await bridge.dispatcher.run_once()
        sandbox_state.entries.append(logged_late)  # now it does
        await pump(bridge, clock, went(bridge, first), max_seconds=60)
        looked = await bridge.store.get(first)
    assert looked.unknown_resends == 0, looked  # type: ignore[union-attr]
    assert len(sandbox_state.entries) == 2  # each went once


GATEWAY_PAGE = "<html>Bad Gateway</html>"


class LogsLag(ToProvider):
    """The real transport; /logs shows an entry only `lag` seconds (on the manual clock)
    after the provider took it: a log that catches up late, which the sandbox, logging
    at once, cannot play."""

    def __init__(self, state: SandboxState, clock: ManualClock, lag: float) -> None:
        super().__init__()
        self.state, self.clock, self.lag = state, clock, lag

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if not request.url.path.endswith("/logs") or response.status_code != 200:
            return response
        body = json.loads(await response.aread())
        shown = self.clock.now() - self.lag
        hidden = {e.message_id for e in self.state.entries if e.created_at > shown}
        body["data"] = [e for e in body["data"] if e["id"] not in hidden]
        return httpx.Response(200, json=body)


async def storm_behind_an_unknown_outcome(
    bridge: Bridge,
    url: str,
    clock: ManualClock,
    sandbox_state: SandboxState,
    text: str,
    *,
    taken: bool = True,
    alerts: int = 30,
) -> int:
    """A text to the on-call phone behind a 502 page (the provider took it, or not), then
    `alerts` alerts to that phone 2 s apart (a minute's: `text`, numbered if it has a
    `{}`), answered without ids: the text's id, stepped through the storm by the
    dispatcher."""
    sandbox_state.shape = VARIANTS["count-only"]
    body = {"to": "+12025550111", "message": "FIRING: HighCPU"}
    sandbox_state.faults.append(Fault(status=502, body=GATEWAY_PAGE, path="/send", taken=taken))
    [first] = (await post(url, {**body, "dedupe_key": "first"})).json()["ids"]
    await bridge.dispatcher.run_once()
    assert (await bridge.store.get(first)).state == State.SENDING  # type: ignore[union-attr]
    for n in range(alerts):
        clock.advance(2.0)
        alert = {**body, "message": text.format(n), "dedupe_key": f"storm-{n}"}
        await post(url, alert)
        await bridge.dispatcher.run_once()
    return int(first)


@pytest.mark.usefixtures("backend")
async def test_a_look_is_put_off_for_an_alert_storm_to_its_number_a_while_only(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """A look waits until /logs can show the id-less sends to its number (above); alerts
    to that phone less than RECONCILE_DELAY apart, from a provider that never names
    ids, put it off for as long as they came: the text stayed `sending`, unsettled,
    through the storm. It is put off a few RECONCILE_DELAYs at most, then looked up
    with the young sends counted as pending: found, and never sent again."""
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (bridge, url):
        first = await storm_behind_an_unknown_outcome(
            bridge, url, clock, sandbox_state, "disk {}% on db-1"
        )
        final = await bridge.store.get(first)
    assert final.state == State.SENT and final.unknown_resends == 0, final  # type: ignore[union-attr]
    assert final.provider_message_id == str(sandbox_state.entries[0].message_id), final  # type: ignore[union-attr]
    assert len(sandbox_state.entries) == 31  # nothing sent twice


@pytest.mark.usefixtures("backend")
async def test_a_look_in_a_storm_of_its_own_text_never_sends_it_twice(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """The storm is of the very text looked for, and /logs shows an entry 3 s after the
    provider took it. Looked up with the young sends holding entries first, one /logs
    did not show yet took the text's own: "not found", sent again; holding none, a
    text that never went takes a young send's. Whose the entry is cannot be told while
    the storm lasts: the text is looked up again, never sent twice, and after
    `retry_max_age` (30 s here) ends `sent`, "outcome unknown"."""
    config = bridge_config(tmp_path, sandbox_url, retry_max_age="30s")
    transport = LogsLag(sandbox_state, clock, 3.0)
    async with running_bridge(config, clock, transport=transport) as (bridge, url):
        first = await storm_behind_an_unknown_outcome(
            bridge, url, clock, sandbox_state, "FIRING: HighCPU"
        )
        final = await bridge.store.get(first)
    assert final.state == State.SENT and final.unknown_resends == 0, final  # type: ignore[union-attr]
    assert final.reason_kind == "unknown", final  # type: ignore[union-attr]
    assert len(sandbox_state.entries) == 31  # nothing sent twice


def logs_reads(state: SandboxState) -> list[float]:
    return [r.at for r in state.requests if r.path.endswith("/logs")]


async def test_a_look_unsure_through_a_long_storm_of_its_text_backs_off(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """As above for ten minutes (`retry_max_age` an hour): a look that cannot tell the
    text's entry from a young send's was made again every RECONCILE_DELAY for as long
    as the storm lasted, 196 /logs reads out of the window its 300 sends share (a fifth
    of it). The wait between such looks doubles up to `backoff_max`: a few reads, and
    once the storm ends the text is found, never sent twice, a backoff_max later at most."""
    config = bridge_config(tmp_path, sandbox_url)
    transport = LogsLag(sandbox_state, clock, 3.0)
    async with running_bridge(config, clock, transport=transport) as (bridge, url):
        first = await storm_behind_an_unknown_outcome(
            bridge, url, clock, sandbox_state, "FIRING: HighCPU", alerts=300
        )
        during = await bridge.store.get(first)
        reads = logs_reads(sandbox_state)
        await pump(bridge, clock, went(bridge, first), max_seconds=config.provider.backoff_max)
        final = await bridge.store.get(first)
    assert during.state == State.SENDING, during  # type: ignore[union-attr]
    # 1 % of the 1,000 requests of those ten minutes' windows, at most.
    assert len(reads) <= 10, reads
    # Found: one of its text's 301 entries (which, the storm's repeats cannot tell).
    assert final.unknown_resends == 0 and final.provider_message_id, final  # type: ignore[union-attr]
    assert len(sandbox_state.entries) == 301  # nothing sent twice


async def test_a_text_that_never_went_is_sent_once_a_storm_of_its_text_ends(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """As above, the text never reaching the provider: through the storm whose entries
    are whose cannot be told, and it is not recorded sent (a young send's entry taken
    for it, never sent); once the storm ends its look finds none: sent again, once."""
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (bridge, url):
        first = await storm_behind_an_unknown_outcome(
            bridge, url, clock, sandbox_state, "FIRING: HighCPU", taken=False
        )
        during = await bridge.store.get(first)
        await pump(bridge, clock, went(bridge, first), max_seconds=120)
        final = await bridge.store.get(first)
    assert during.state == State.SENDING, during  # type: ignore[union-attr]
    assert final.unknown_resends == 1, final  # type: ignore[union-attr]
    assert len(sandbox_state.entries) == 31  # the storm's 30, and the text once


async def repeat_behind_a_bulk(
    bridge: Bridge, url: str, clock: ManualClock, sandbox_state: SandboxState, gap: float = 0.0
) -> int:
    """An id-less send of a text to a phone, `gap` s on a bulk of 1,100 to others, then
    200 s after the send a repeat of the text whose answer was a 502 page after the
    provider took it (more than a walk's 10 pages between the two entries): the repeat's
    id, `sending`."""
    body = {"to": "+12025550111", "message": "FIRING: HighCPU"}
    await post(url, {**body, "dedupe_key": "host-a"})
    await bridge.dispatcher.run_once()
    clock.advance(gap)
    await post(url, {"to": [f"+1202{5000000 + i:07d}" for i in range(1100)], "message": "x"})
    await bridge.dispatcher.run_once()
    clock.advance(200 - gap)
    sandbox_state.faults.append(Fault(status=502, body=GATEWAY_PAGE, path="/send", taken=True))
    [repeat] = (await post(url, {**body, "dedupe_key": "host-b"})).json()["ids"]
    await bridge.dispatcher.run_once()
    assert (await bridge.store.get(repeat)).state == State.SENDING  # type: ignore[union-attr]
    return int(repeat)


async def found_not_sent_again(bridge: Bridge, clock: ManualClock, repeat: int) -> None:
    """Four steps of the dispatcher after the repeat's look is due: found in /logs."""
    clock.advance(RECONCILE_DELAY + 0.1)
    for _ in range(4):
        await bridge.dispatcher.run_once()
        clock.advance(1.0)
    final = await bridge.store.get(repeat)
    assert final.state == State.SENT and final.unknown_resends == 0, final  # type: ignore[union-attr]


async def test_a_walk_cut_by_its_page_cap_goes_on_from_where_it_stopped(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """An id-less send of a text to a phone, a bulk of 1,100 to others, then a repeat of
    the text whose answer was a 502 page after the provider took it. The repeat's walk
    read its entry on page 1 (the earlier send's first, as answered sends are), read on
    for the earlier send's own, and stopped at its 10-page cap; to pair them again the
    next walk went back to page 1, and stopped at the same cap: the repeat stayed
    `sending` for good, 10 /logs reads a step. The walk keeps what it collected and goes
    on from where it stopped: the repeat is found, never sent again."""
    sandbox_state.shape = VARIANTS["count-only"]
    config = bridge_config(tmp_path, sandbox_url, "[http]\nmax_recipients = 2000\n")
    async with running_bridge(config, clock) as (bridge, url):
        repeat = await repeat_behind_a_bulk(bridge, url, clock, sandbox_state)
        await found_not_sent_again(bridge, clock, repeat)
    assert len(sandbox_state.entries) == 1102  # nothing sent twice


async def test_a_carried_walk_reads_from_the_day_of_the_oldest_send_it_pairs(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """As above across midnight: the earlier send at 23:59, the bulk at 00:00:30 and the
    repeat at 00:02:20. The walk goes on from page 11 to the earlier send's entry, the
    last of page 12, read from the day of the oldest send it pairs (less CLOCK_SKEW):
    yesterday, for both the cut walk and the one carrying it on. From today (the repeat's
    claim, the newest send; or the step's clock) /logs ended at page 12 without it, the
    repeat took the earlier send's entry's place, "not found", and was sent again."""
    sandbox_state.shape = VARIANTS["count-only"]
    config = bridge_config(tmp_path, sandbox_url, "[http]\nmax_recipients = 2000\n")
    midnight = datetime.fromtimestamp(clock.now(), UTC).replace(hour=0, minute=0, second=0)
    midnight += timedelta(days=1)
    clock.advance(midnight.timestamp() - 60 - clock.now())  # 23:59:00
    async with running_bridge(config, clock) as (bridge, url):
        repeat = await repeat_behind_a_bulk(bridge, url, clock, sandbox_state, gap=90)
        await found_not_sent_again(bridge, clock, repeat)
    logs = [r.query for r in sandbox_state.requests if r.path.endswith("/logs")]
    assert [q["page"] for q in logs] == [str(page) for page in range(1, 13)]  # cut at 10
    assert {q["date_from"] for q in logs} == {str(midnight.date() - timedelta(days=1))}
    assert len(sandbox_state.entries) == 1102  # nothing sent twice


async def test_a_message_joining_a_cut_walk_leaves_no_carried_entry_unread(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """As above, with 150 texts after the repeat (its entry on page 2), and another
    number's text taken behind a 502 page while the repeat's walk was cut. The next walk
    read from page 1 for the newcomer without what the cut walk had carried, and jumped
    to where the repeat's had stopped: the repeat's entry, on page 2, was never read
    again, and the repeat, "not found", was sent again. The carried ones are read again
    from where their entries were."""
    sandbox_state.shape = VARIANTS["count-only"]
    config = bridge_config(tmp_path, sandbox_url, "[http]\nmax_recipients = 2000\n")
    async with running_bridge(config, clock) as (bridge, url):
        repeat = await repeat_behind_a_bulk(bridge, url, clock, sandbox_state)
        await post(url, {"to": [f"+1303{5000000 + i:07d}" for i in range(150)], "message": "y"})
        await bridge.dispatcher.run_once()
        clock.advance(RECONCILE_DELAY + 0.1)
        sandbox_state.faults.append(Fault(status=502, body=GATEWAY_PAGE, path="/send", taken=True))
        await post(url, {"to": "+14155550199", "message": "db-9 down"})
        await bridge.dispatcher.run_once()  # the repeat's walk cut at 10 pages; the newcomer
        await found_not_sent_again(bridge, clock, repeat)
    assert len(sandbox_state.entries) == 1 + 1100 + 1 + 150 + 1  # nothing sent twice


@pytest.mark.usefixtures("backend")
async def test_each_unknown_outcome_is_matched_from_its_own_claim(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """Two unknown outcomes looked up in one walk (the first's look met a 503 from /logs,
    and the second was sent meanwhile), neither of which reached the provider; /logs
    holds the second's text to its phone from another client of the account, 118 s
    before the first's claim. Entries were kept from the oldest claim less CLOCK_SKEW
    for all of them, so that entry, 123 s older than the second's claim, was taken for
    it: recorded sent, never sent. Each message is matched only to entries no older
    than its own claim less the skew: the second is sent again."""
    gateway = {"status": 502, "body": "<html>Bad Gateway</html>", "path": "/send"}
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (bridge, url):
        sandbox_state.record_send("+12025550112", "FIRING: HighCPU", "SMS", 1, clock.now())
        clock.advance(118)
        sandbox_state.faults += [
            Fault(**gateway),
            Fault(**gateway),
            Fault(status=503, body="<html>busy</html>", path="/logs"),
        ]
        [first] = (await post(url, {"to": "+12025550111", "message": "db down"})).json()["ids"]
        await bridge.dispatcher.run_once()
        clock.advance(RECONCILE_DELAY + 0.1)
        body = {"to": "+12025550112", "message": "FIRING: HighCPU"}
        [second] = (await post(url, body)).json()["ids"]
        await bridge.dispatcher.run_once()  # /logs answers 503; the second goes meanwhile
        assert {(await bridge.store.get(i)).state for i in (first, second)} == {State.SENDING}
        clock.advance(30)
        await bridge.dispatcher.run_once()  # one walk for both
        looked = await bridge.store.get(second)
    assert looked.unknown_resends == 1, looked  # not found: sent again
    assert looked.provider_message_id != str(sandbox_state.entries[0].message_id), looked
    assert [e.to for e in sandbox_state.entries].count("+12025550112") == 2


class SendsBetweenPages(ToProvider):
    """The real transport; once /logs' first page is read, another client of the account
    sends a text: every entry moves one place on, the first page's last onto the second."""

    def __init__(self, state: SandboxState, clock: ManualClock) -> None:
        super().__init__()
        self.state, self.clock = state, clock
        self.done = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if not self.done and request.url.path.endswith("/logs"):
            self.done = True
            self.state.record_send("+12025559000", "other", "SMS", 1, self.clock.now())
        return response


@pytest.mark.usefixtures("backend")
async def test_an_entry_read_twice_in_one_walk_is_taken_once(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """Two repeats of one text to one phone, both unknown outcomes, the provider took one;
    its entry the last on /logs' first page, and a text of another client between the
    two reads put it first on the second. Only ids already stored were not free, and
    what the walk found was stored at its end: that one entry was taken for both, both
    recorded sent under its id. An entry taken in a walk is not free for the rest of
    it: one is found, the other sent again."""
    for i in range(5):  # older entries: /logs has a second page
        sandbox_state.record_send(f"+1202555800{i}", "older", "SMS", 1, clock.now())
    gateway = {"status": 502, "body": "<html>Bad Gateway</html>", "path": "/send"}
    sandbox_state.faults += [
        Fault(**gateway, taken=True),
        Fault(status=503, body="<html>busy</html>", path="/logs"),
        Fault(**gateway),
    ]
    config = bridge_config(tmp_path, sandbox_url)
    transport = SendsBetweenPages(sandbox_state, clock)
    transport.done = True  # not yet
    async with (
        build_bridge(config, clock=clock, transport=transport) as bridge,
        served(bridge.app) as url,
    ):
        await bridge.dispatcher.load_budget()
        body = {"to": "+12025550111", "message": "FIRING: HighCPU"}
        [first] = (await post(url, {**body, "dedupe_key": "host-a"})).json()["ids"]
        await bridge.dispatcher.run_once()  # the provider takes it; a 502 says otherwise
        clock.advance(RECONCILE_DELAY + 0.1)
        [second] = (await post(url, {**body, "dedupe_key": "host-b"})).json()["ids"]
        await bridge.dispatcher.run_once()  # /logs answers 503; the second goes meanwhile
        ids = [first, second]
        assert {(await bridge.store.get(i)).state for i in ids} == {State.SENDING}
        [taken] = [e for e in sandbox_state.entries if e.to == "+12025550111"]
        for i in range(99):  # the entry is the last of /logs' first page (100 a page)
            sandbox_state.record_send(f"+1202555{7000 + i}", "newer", "SMS", 1, clock.now())
        clock.advance(30)
        transport.done = False  # the walk's first read is the one a text follows
        await bridge.dispatcher.run_once()
        after = [await bridge.store.get(i) for i in ids]
    assert [m.provider_message_id for m in after].count(str(taken.message_id)) == 1, after
    assert sorted(m.unknown_resends for m in after) == [0, 1], after


async def each_gets_its_own_entry(
    bridge: Bridge, clock: ManualClock, sandbox_state: SandboxState, ids: list[int]
) -> None:
    """Two id-less sends, `ids`, whose entries are the sandbox's two: the second fails at
    the handset; the poller's rounds must give each its own entry's id and state."""
    first_entry, second_entry = sandbox_state.entries
    second_entry.fails = True  # the first arrives, the second fails at the handset
    for _ in range(4):
        clock.advance(5)
        await bridge.poller.run_once()
    first, second = [await bridge.store.get(i) for i in ids]
    assert first.provider_message_id == str(first_entry.message_id), (first, second)  # type: ignore[union-attr]
    assert second.provider_message_id == str(second_entry.message_id), (first, second)  # type: ignore[union-attr]
    assert first.state == State.DELIVERED and second.state == State.FAILED  # type: ignore[union-attr]


async def test_two_sends_without_an_id_get_their_own_entries_states(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """Two sends of one text to one phone, both answered without an id, the second failing
    at the handset. /logs lists the newest first and the poller gave each entry to the
    oldest message waiting: the second's failure was recorded on the first, and each
    kept the other's id. Entries go to messages in time order, the oldest to the
    oldest."""
    sandbox_state.shape = VARIANTS["count-only"]
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (bridge, url):
        body = {"to": "+12025550111", "message": "FIRING: HighCPU"}
        ids = []
        for key in ("host-a", "host-b"):
            ids += (await post(url, {**body, "dedupe_key": key})).json()["ids"]
        for _ in range(10):  # two calls (one phone twice): two entries
            if len(sandbox_state.entries) == 2:
                break
            clock.advance(max(0.01, await bridge.dispatcher.run_once()))
        await each_gets_its_own_entry(bridge, clock, sandbox_state, ids)


@pytest.mark.usefixtures("backend")
async def test_a_timed_out_repeat_reads_as_deep_as_the_earlier_sends_entries(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """The sequence above, with 98 texts of another client of the account 10 s before the
    second send: /logs' first page holds the third's and the second's entries and those
    98, its oldest older than the third's claim less CLOCK_SKEW; the first's entry is on
    the second page. Read only as deep as the third's own entry can be, the two entries
    read went to the two earlier sends, the third "not found", sent again. The walk
    reads as deep as the entries of the earlier sends of its text can be."""
    sandbox_state.shape = VARIANTS["count-only"]
    config = bridge_config(tmp_path, sandbox_url)
    transport = TakenThenTimesOut(nth=3)
    async with running_bridge(config, clock, transport=transport) as (bridge, url):
        body = {"to": "+12025550111", "message": "FIRING: HighCPU"}
        ids = (await post(url, {**body, "dedupe_key": "host-a"})).json()["ids"]
        await bridge.dispatcher.run_once()
        clock.advance(110)
        for i in range(98):  # page 1: the third's, the second's and these (100 a page)
            sandbox_state.record_send(f"+1202555{7000 + i}", "other", "SMS", 1, clock.now())
        clock.advance(10)
        for key in ("host-b", "host-c"):
            ids += (await post(url, {**body, "dedupe_key": key})).json()["ids"]
            await bridge.dispatcher.run_once()
            if key == "host-b":
                clock.advance(120)
        third = await bridge.store.get(ids[2])
        assert third.state == State.SENDING and third.reason_kind == "unknown", third
        # The reconciler's walk alone (the poller, reading first, stores the earlier
        # sends' ids, and their entries are then known to the walk).
        for _ in range(10):
            if await went(bridge, third.id)():
                break
            clock.advance(max(0.01, await bridge.dispatcher.run_once() or 1.0))
        final = await bridge.store.get(third.id)
    logs = [r.query for r in sandbox_state.requests if r.path.endswith("/logs")]
    assert final.unknown_resends == 0, final  # found in /logs, not sent again
    assert [q["page"] for q in logs] == ["1", "2"], logs  # one walk, two pages
    assert len(sends(sandbox_state)) == 3


async def test_two_sends_without_an_id_minutes_apart_get_their_own_entries_states(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """Two sends of one text to one phone 200 s apart, answered without an id, the second
    failing at the handset. Read newest first and settled as read, the second's entry
    went to the first, and the first's, too old for the second (less CLOCK_SKEW), to
    none: the first got the second's id and failure, the second was never matched. Every
    entry that can be theirs is collected, then paired the oldest first."""
    sandbox_state.shape = VARIANTS["count-only"]
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (bridge, url):
        body = {"to": "+12025550111", "message": "FIRING: HighCPU"}
        ids = []
        for key in ("host-a", "host-b"):
            if ids:
                clock.advance(200)
            ids += (await post(url, {**body, "dedupe_key": key})).json()["ids"]
            await bridge.dispatcher.run_once()
        await each_gets_its_own_entry(bridge, clock, sandbox_state, ids)


async def test_a_status_round_cut_short_pairs_no_sends_without_an_id(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """Two sends of one text to one phone, answered without an id, 150 texts between
    them: the first's entry on /logs' second page, which answers 503. The round stopped
    there and paired what it had read: the second's entry went to the first (the
    oldest), for good, and the second, its entry known now, could never be matched (and
    a reconciler looking for a repeat of it would send it again). A round cut short
    pairs no id-less send; the next, reading both pages, gives each its own."""
    sandbox_state.shape = VARIANTS["count-only"]
    config = bridge_config(tmp_path, sandbox_url, "[http]\nmax_recipients = 1000\n")
    async with running_bridge(config, clock) as (bridge, url):
        body = {"to": "+12025550111", "message": "FIRING: HighCPU"}
        [first] = (await post(url, {**body, "dedupe_key": "host-a"})).json()["ids"]
        await bridge.dispatcher.run_once()
        others = [f"+1202{5000000 + i:07d}" for i in range(150)]
        await post(url, {"to": others, "message": "x"})
        await bridge.dispatcher.run_once()
        clock.advance(200)
        [second] = (await post(url, {**body, "dedupe_key": "host-b"})).json()["ids"]
        await bridge.dispatcher.run_once()
        assert len(sandbox_state.entries) == 152
        page = "<html><body><h1>503 Service Temporarily Unavailable</h1></body></html>"
        sandbox_state.faults.append(
            Fault(status=503, body=page, path="/logs", query={"page": "2"}, times=1)
        )
        clock.advance(5)
        await bridge.poller.run_once()  # page 1, then page 2's 503
        cut = [await bridge.store.get(i) for i in (first, second)]
        for _ in range(4):
            clock.advance(60)
            await bridge.poller.run_once()
        final = [await bridge.store.get(i) for i in (first, second)]
    assert [m.provider_message_id for m in cut] == [None, None], cut  # type: ignore[union-attr]
    ours = [e for e in sandbox_state.entries if e.message == "FIRING: HighCPU"]
    assert [m.provider_message_id for m in final] == [str(e.message_id) for e in ours], final  # type: ignore[union-attr]


async def id_less_behind_a_backlog(
    bridge: Bridge, url: str, clock: ManualClock, sandbox_state: SandboxState
) -> tuple[int, str]:
    """A send answered without an id, then a bulk of 499 (ids given) whose phones are
    off, for good: the id-less send's entry is the last on /logs' fifth page, the last a
    round reads, with another client's text below it on page 6. Its id, and its entry's;
    sends are answered without ids from here on."""
    sandbox_state.record_send("+12025559000", "other", "SMS", 1, clock.now())
    clock.advance(200)
    sandbox_state.shape = VARIANTS["count-only"]
    body = {"to": "+12025550111", "message": "FIRING: HighCPU"}
    [alone] = (await post(url, body)).json()["ids"]
    await bridge.dispatcher.run_once()
    sandbox_state.shape = VARIANTS["documented"]
    await post(url, {"to": [f"+1202{5000000 + i:07d}" for i in range(499)], "message": "x"})
    await bridge.dispatcher.run_once()
    sandbox_state.shape = VARIANTS["count-only"]
    _, entry, *backlog = sandbox_state.entries
    assert len(backlog) == 499 and (await bridge.store.get(alone)).state == State.SENT  # type: ignore[union-attr]
    for off in backlog:
        off.deliver_from = float("inf")  # phones off: no final state, ever
    return int(alone), str(entry.message_id)


@pytest.mark.usefixtures("backend")
async def test_a_send_without_an_id_on_a_rounds_last_page_is_paired_by_the_next_round(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """An id-less send's entry the last on the last page a round reads, behind a backlog
    of phones off. A round cut short pairs nothing; the next went on from page 6 without
    what the cut one had read, and the one after started over at page 1: the send stayed
    `sent`, no id and no final state, until `give_up_after`. The walk goes on from where
    its round stopped with what it collected, and pairs when whole."""
    config = bridge_config(tmp_path, sandbox_url, "[http]\nmax_recipients = 1000\n")
    async with running_bridge(config, clock) as (bridge, url):
        alone, entry = await id_less_behind_a_backlog(bridge, url, clock, sandbox_state)
        for _ in range(6):  # a round a minute (the status budget: 10 /logs reads a minute)
            clock.advance(60)
            await bridge.poller.run_once()
        final = await bridge.store.get(alone)
    assert final.provider_message_id == entry and final.state == State.DELIVERED, final  # type: ignore[union-attr]


async def test_a_send_without_an_id_right_after_a_burst_is_paired(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """600 texts of another client of the account 10 s before a send answered without
    an id: six pages of entries within CLOCK_SKEW below its own, which can be its, and
    the rounds read no deeper than the page after its (`deepest`, five pages here):
    started over at page 1 each round, it was never paired. The walk reads on past
    that while it is not whole."""
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (bridge, url):
        for i in range(600):
            sandbox_state.record_send(f"+1202555{7000 + i}", "other", "SMS", 1, clock.now())
        clock.advance(10)
        sandbox_state.shape = VARIANTS["count-only"]
        body = {"to": "+12025550111", "message": "FIRING: HighCPU"}
        [alone] = (await post(url, body)).json()["ids"]
        await bridge.dispatcher.run_once()
        for _ in range(4):  # a round a minute (the status budget: 10 /logs reads a minute)
            clock.advance(60)
            await bridge.poller.run_once()
        final = await bridge.store.get(alone)
    entry = str(sandbox_state.entries[-1].message_id)
    assert final.provider_message_id == entry and final.state == State.DELIVERED, final  # type: ignore[union-attr]


async def test_alerts_sent_while_a_walk_goes_on_are_paired_by_the_next(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """The backlog above, and an id-less alert to another phone before each round: the
    first ones' entries, within CLOCK_SKEW of the bulk's, were read for as deep as the
    id-less send's, and stuck with it. A walk left unfinished goes on with the alerts
    sent before it began; those sent after (entries above where it goes on) wait for the
    next walk, and every send gets its own entry."""
    config = bridge_config(tmp_path, sandbox_url, "[http]\nmax_recipients = 1000\n")
    async with running_bridge(config, clock) as (bridge, url):
        alone, entry = await id_less_behind_a_backlog(bridge, url, clock, sandbox_state)
        later = []
        for n in range(12):  # the alerts are tracked once a sweep read the 500 before them
            if n < 4:
                alert = {"to": f"+1202555013{n}", "message": f"disk {90 + n}% on db-{n}"}
                later += (await post(url, alert)).json()["ids"]
                await bridge.dispatcher.run_once()
            clock.advance(60)
            await bridge.poller.run_once()
        ids = [(await bridge.store.get(i)).provider_message_id for i in [alone, *later]]  # type: ignore[union-attr]
    assert ids == [entry, *(str(e.message_id) for e in sandbox_state.entries[-4:])], ids


class TakenThenTimesOut(ToProvider):
    """The real transport; the `nth` /send reaches the provider (taken and logged), and
    its answer never comes back: the client's read timeout (an unknown outcome)."""

    def __init__(self, nth: int) -> None:
        super().__init__()
        self.nth, self.seen = nth, 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if request.url.path.endswith("/send"):
            self.seen += 1
            if self.seen == self.nth:
                await response.aread()
                raise httpx.ReadTimeout("timed out", request=request)
        return response


@pytest.mark.usefixtures("backend")
async def test_a_timed_out_repeat_after_two_sends_without_an_id_is_found_not_resent(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """Two sends of one text to one phone 120 s apart, answered without an id, then a
    third 120 s later whose answer times out after the provider took it. /logs lists the
    newest first, and each entry went to the oldest message it could be as read: the
    newest to the first send, the middle one to the second, and the oldest, too old for
    the third's claim (less CLOCK_SKEW), to none: the third "not found", sent again, a
    second SMS. Every entry that can be one of them is collected, then paired the oldest
    entry to the oldest message: the third is found, and never sent again."""
    sandbox_state.shape = VARIANTS["count-only"]  # /send answers success, cost, no id
    config = bridge_config(tmp_path, sandbox_url)
    transport = TakenThenTimesOut(nth=3)
    async with running_bridge(config, clock, transport=transport) as (bridge, url):
        body = {"to": "+12025550111", "message": "FIRING: HighCPU"}
        ids = []
        for key in ("host-a", "host-b", "host-c"):
            if ids:
                clock.advance(120)
            ids += (await post(url, {**body, "dedupe_key": key})).json()["ids"]
            await bridge.dispatcher.run_once()
        first, second, third = [await bridge.store.get(i) for i in ids]
        assert first.state == second.state == State.SENT, (first, second)
        assert first.provider_message_id is None and second.provider_message_id is None
        assert third.state == State.SENDING and third.reason_kind == "unknown", third
        assert len(sandbox_state.entries) == 3
        await pump(bridge, clock, went(bridge, third.id), max_seconds=600)
        for _ in range(20):  # anything a resend would do, done
            clock.advance(max(0.01, await bridge.dispatcher.run_once() or 5))
        final = await bridge.store.get(third.id)
    assert final.unknown_resends == 0, final  # found in /logs, not sent again
    assert len(sends(sandbox_state)) == 3 and len(sandbox_state.entries) == 3
    entries = {str(e.message_id) for e in sandbox_state.entries}
    assert final.provider_message_id in entries, final


async def test_a_batch_id_is_never_taken_for_a_message_id(
    tmp_path, clock: ManualClock, sandbox_url: str, sandbox_state: SandboxState
) -> None:
    sandbox_state.shape = VARIANTS["batch-only"]
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (bridge, url):
        ids = (await post(url, {"to": ["+12025550152", "+12025550153"], "message": "x"})).json()[
            "ids"
        ]
        await bridge.dispatcher.run_once()
        sent = [await bridge.store.get(i) for i in ids]

        async def delivered() -> bool:
            return all(m.state == State.DELIVERED for m in await bridge.store.query())

        await pump(bridge, clock, delivered, max_seconds=300)
    assert [m.provider_message_id for m in sent] == [None, None]
    assert len(sends(sandbox_state)) == 1


async def test_403_inactive_account_pauses_with_a_growing_wait_and_no_flapping(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    body = '{"success": false, "message": "Account is not active."}'
    sandbox_state.faults.append(Fault(status=403, path="/send", body=body, times=3))
    config = bridge_config(tmp_path, sandbox_url)
    readiness = []
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        [message_id] = (await post(url, {"to": "+12025550143", "message": "x"})).json()["ids"]

        async def sent() -> bool:
            readiness.append((await http.get(f"{url}/readyz")).json())
            return (await bridge.store.get(message_id)).state in (State.SENT, State.DELIVERED)

        await pump(bridge, clock, sent, max_seconds=900)
        message = await bridge.store.get(message_id)
    attempts = [r for r in sandbox_state.requests if r.path.endswith("/send")]
    assert [r.status for r in attempts] == [403, 403, 403, 200]
    gaps = [b.at - a.at for a, b in itertools.pairwise(attempts)]
    assert gaps[0] >= 30 and gaps[1] >= 2 * gaps[0] * 0.99 and gaps[2] >= 2 * gaps[1] * 0.99
    # /balance answers for an inactive account: it must not turn health green between.
    assert not [r for r in sandbox_state.requests if r.path.endswith("/balance")]
    red = [r for r in readiness if r["status"] != "ready"]
    first_red = readiness.index(red[0])
    assert all(r["status"] != "ready" for r in readiness[first_red : first_red + len(red)])
    assert "account not active" in red[0]["problems"]["provider"]
    assert message.attempts == 1


async def test_403_is_never_tried_again_sooner_than_the_probe_interval(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """The 403's doubling wait is capped at `backoff_max`, which may be shorter than the
    probe interval (at 0, accepted then, an inactive account was sent to back to back, 98
    requests in 5 s). Its lowest now, 1 s, is still a fifth of the probe's 5 s."""
    body = '{"success": false, "message": "Account is not active."}'
    sandbox_state.faults.append(Fault(status=403, path="/send", body=body, times=9999))
    config = bridge_config(
        tmp_path, sandbox_url, backoff_initial="1s", backoff_max="1s", auth_probe_interval="5s"
    )
    async with running_bridge(config, clock) as (bridge, url):
        await post(url, {"to": "+12025550143", "message": "x"})
        with contextlib.suppress(AssertionError):  # never sent: the minute runs out
            await pump(bridge, clock, lambda: False, max_seconds=60)
    attempts = [r.at for r in sandbox_state.requests if r.path.endswith("/send")]
    assert 2 <= len(attempts) <= 13, len(attempts)
    assert min(b - a for a, b in itertools.pairwise(attempts)) >= 5 * 0.99


async def test_404_from_logs_is_not_an_auth_failure(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        [message_id] = (await post(url, {"to": "+12025550143", "message": "x"})).json()["ids"]
        await bridge.dispatcher.run_once()
        sandbox_state.faults.append(Fault(status=404, path="/logs", times=3))
        for _ in range(3):
            clock.advance(10)
            await bridge.poller.run_once()
        ready = await http.get(f"{url}/readyz")
        assert bridge.dispatcher.health.ready and ready.status_code == 200

        await pump_until_state(bridge, clock, message_id, State.DELIVERED, max_seconds=300)
    assert [r.status for r in sandbox_state.requests if r.path.endswith("/logs")][:3] == [404] * 3


async def test_success_false_with_a_transient_reason_is_retried_not_failed(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    # A transient cause; the balance is the account's (tests/test_provider_readings.py).
    low = '{"success": false, "message": "Daily limit reached, please try again later"}'
    sandbox_state.faults.append(Fault(status=200, body=low, path="/send", times=2))
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (bridge, url):
        [first] = (await post(url, {"to": "+12025550143", "message": "a"})).json()["ids"]

        await pump_until_state(bridge, clock, first, State.DELIVERED, max_seconds=600)
        invalid = '{"success": false, "message": "Invalid sender."}'
        sandbox_state.faults.append(Fault(status=200, body=invalid, path="/send"))
        [second] = (await post(url, {"to": "+12025550144", "message": "b"})).json()["ids"]

        await pump_until_state(bridge, clock, second, State.FAILED, max_seconds=60)
        refused = await bridge.store.get(second)
        taken = await bridge.store.get(first)
    assert taken.attempts == 3
    assert "Invalid sender." in (refused.reason or "") and refused.attempts == 1


@pytest.mark.parametrize("taken", [True, False])
@pytest.mark.parametrize("words", ["Upstream SMSC request timed out", "context deadline exceeded"])
async def test_a_2xx_refusal_that_says_it_timed_out_is_looked_up_in_logs_before_the_retry(
    tmp_path,
    clock: ManualClock,
    sandbox_state: SandboxState,
    sandbox_url: str,
    taken: bool,
    words: str,
) -> None:
    """A 200 `"success": false` saying "timed out" was retried blind, as a refusal that
    says nothing went (no balance, a rate limit): but a timeout upstream of the provider
    (its SMSC) may come after the text went, and the retry texted twice. The same body
    on a 5xx was looked up in /logs first; so is it on a 2xx, and retried only if the
    provider's logs do not have it. "Deadline exceeded" (Go's and gRPC's words for a
    timeout) was a permanent refusal: failed, for a text the provider may have sent."""
    said = json.dumps({"success": False, "message": words})
    sandbox_state.faults.append(Fault(status=200, body=said, path="/send", taken=taken))
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (bridge, url):
        alert = {"to": "+12025550143", "message": "DiskFull on db-1"}
        [message_id] = (await post(url, alert)).json()["ids"]
        await pump_until_state(bridge, clock, message_id, State.DELIVERED, max_seconds=600)
    paths = [r.path.rsplit("/", 1)[-1] for r in sandbox_state.requests]
    order = [p for p in paths if p in ("send", "logs")]
    assert order[:2] == ["send", "logs"], order  # /logs read before anything is resent
    assert len(sandbox_state.entries) == 1, "texted twice"
    assert order.count("send") == (1 if taken else 2), order


async def test_a_long_refusal_from_the_provider_is_cut_in_the_reason(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """The provider's `message` became the text's reason whole when it was a string (any
    other shape was cut at 200 characters): 100 kB of it in every reason and event the
    API and the console show, for each text it refused."""
    long = '{"success": false, "message": "Invalid sender: ' + "x" * 100_000 + '"}'
    sandbox_state.faults.append(Fault(status=400, body=long, path="/send"))
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        [message_id] = (await post(url, {"to": "+12025550143", "message": "x"})).json()["ids"]
        await pump_until_state(bridge, clock, message_id, State.FAILED, max_seconds=60)
        shown = (await http.get(f"{url}/api/v1/messages/{message_id}")).json()
    assert "Invalid sender: xxx" in shown["reason"] and len(shown["reason"]) < 300, shown["reason"]


async def test_a_transient_reason_past_the_cut_is_still_retried(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """A refusal is judged retryable on its words ("throttled", "try again later")
    before they are cut for the reason: judged on the cut, one whose words came after 200
    characters of numbers failed for good."""
    listed = ", ".join(f"+96130000{i:02d}" for i in range(30))
    words = f"Not sent to {listed}: throttled, try again later"
    assert words.index("throttled") > 200
    body = '{"success": false, "message": "' + words + '"}'
    sandbox_state.faults.append(Fault(status=200, body=body, path="/send"))
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (bridge, url):
        [message_id] = (await post(url, {"to": "+12025550143", "message": "x"})).json()["ids"]
        await pump_until_state(bridge, clock, message_id, State.DELIVERED, max_seconds=600)
        message = await bridge.store.get(message_id)
    assert message.attempts == 2


async def test_a_transient_word_inside_another_does_not_make_a_refusal_retryable(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """Judged on its whole words, an invalid number's refusal that offered "unlimited"
    plans further on was taken for "limit" (a rate limit) and retried until it gave up,
    each try a request of the minute's budget."""
    words = "Invalid recipient number. " + "x " * 150 + "Upgrade to unlimited plans today."
    body = '{"success": false, "message": "' + words + '"}'
    sandbox_state.faults.append(Fault(status=200, body=body, path="/send", times=9))
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (bridge, url):
        [message_id] = (await post(url, {"to": "+12025550143", "message": "x"})).json()["ids"]
        await pump_until_state(bridge, clock, message_id, State.FAILED, max_seconds=60)
        message = await bridge.store.get(message_id)
    assert message.attempts == 1 and "Invalid recipient number" in (message.reason or "")


@pytest.mark.parametrize("retry_after", [None, "0", "Thu, 01 Jan 1970 00:00:00 GMT"])
async def test_429_without_retry_after_backs_off_exponentially(
    tmp_path,
    clock: ManualClock,
    sandbox_state: SandboxState,
    sandbox_url: str,
    retry_after: str | None,
) -> None:
    """No Retry-After, or one that says "now" (0, a date past): a 429 says the window is
    full, so "now" was taken at its word and the text sent again at once, into the same
    429, as often as the bridge's own window allowed (100 a minute). It backs off."""
    sandbox_state.faults.append(Fault(status=429, path="/send", times=4, retry_after=retry_after))
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (bridge, url):
        [message_id] = (await post(url, {"to": "+12025550143", "message": "x"})).json()["ids"]

        async def sent() -> bool:
            return (await bridge.store.get(message_id)).state in (State.SENT, State.DELIVERED)

        await pump(bridge, clock, sent, max_seconds=900)
    attempts = [r.at for r in sandbox_state.requests if r.path.endswith("/send")]
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert len(attempts) == 5
    assert gaps[0] >= 5 and all(b >= 1.9 * a for a, b in itertools.pairwise(gaps))


async def test_a_5xx_after_the_provider_took_it_is_found_in_logs_not_resent(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    class TookItThen502(ToProvider):
        def __init__(self) -> None:
            super().__init__()
            self.left = 1

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            response = await self.inner.handle_async_request(request)
            if request.url.path.endswith("/send") and self.left:
                self.left -= 1
                await response.aread()
                return httpx.Response(502, text="<html>Bad Gateway</html>")
            return response

    from bridge.app import build as build_bridge
    from tests.helpers import served

    config = bridge_config(tmp_path, sandbox_url)
    async with (
        build_bridge(config, clock=clock, transport=TookItThen502()) as bridge,
        served(bridge.app) as url,
    ):
        [message_id] = (await post(url, {"to": "+12025550143", "message": "x"})).json()["ids"]

        await pump_until_state(bridge, clock, message_id, State.DELIVERED, max_seconds=300)
        message = await bridge.store.get(message_id)
    assert len([r for r in sandbox_state.requests if r.path.endswith("/send")]) == 1
    assert message.provider_message_id == str(sandbox_state.entries[0].message_id)
    logs = [r for r in sandbox_state.requests if r.path.endswith("/logs")]
    assert logs and logs[0].at < clock.now()


async def test_a_5xx_error_answer_is_looked_up_in_logs_before_the_retry(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    sandbox_state.faults.append(Fault(status=500, path="/send", times=2))
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (bridge, url):
        [message_id] = (await post(url, {"to": "+12025550143", "message": "x"})).json()["ids"]

        await pump_until_state(bridge, clock, message_id, State.DELIVERED, max_seconds=600)
    paths = [r.path.rsplit("/", 1)[-1] for r in sandbox_state.requests]
    print(paths, [(r.path, r.status) for r in sandbox_state.requests])
    first_send = paths.index("send")
    # After each 5xx, a /logs read comes before the next send.
    order = [p for p in paths[first_send:] if p in ("send", "logs")]
    assert order[:5] == ["send", "logs", "send", "logs", "send"]


async def test_an_answer_whose_body_cannot_be_decoded_is_an_unknown_outcome_not_a_crash(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """A gateway's `Content-Encoding: gzip` over a body that is not gzip: httpx raises
    DecodingError, which is no transport error. Nothing caught it: the dispatcher's step
    raised, and with it `serve`'s task group (the bridge exited), the message left in
    `sending`; on /logs the same for the reconciler and the poller. The provider did
    answer, unreadably: an unknown outcome, found in /logs and not sent again; a /logs
    page so answered is a failed read."""
    gzip = {"Content-Encoding": "gzip"}
    took_it = '{"success": true, "data": {"message_id": 1}}'
    sandbox_state.faults.append(
        Fault(status=200, body=took_it, path="/send", taken=True, headers=gzip)
    )
    sandbox_state.faults.append(Fault(status=200, body="{}", path="/logs", headers=gzip))
    sandbox_state.delivered_after = 120  # the poller reads /logs before it is delivered
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (bridge, url):
        [message_id] = (await post(url, {"to": "+12025550143", "message": "x"})).json()["ids"]

        await pump_until_state(bridge, clock, message_id, State.SENT, max_seconds=60)
        sandbox_state.faults.append(Fault(status=200, body="{}", path="/logs", headers=gzip))
        await pump_until_state(bridge, clock, message_id, State.DELIVERED, max_seconds=300)
        message = await bridge.store.get(message_id)
    assert len(sends(sandbox_state)) == 1
    assert message.provider_message_id == str(sandbox_state.entries[0].message_id)
    assert not sandbox_state.faults  # both unreadable /logs pages were read, and survived


async def test_a_provider_down_behind_its_gateway_loses_nothing(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """Five minutes of a gateway's 503 page to every request, /send and /logs alike. The
    failed /logs reads were taken for "not in /logs": the one resend went into the
    outage too, and 30 seconds in the text ended `sent`, "outcome unknown", never sent.
    An unreadable /logs now decides nothing: the text waits for it, and goes once."""
    page = "<html><body><h1>503 Service Temporarily Unavailable</h1></body></html>"
    sandbox_state.faults.append(Fault(status=503, body=page, times=10_000))
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (bridge, url):
        [message_id] = (await post(url, {"to": "+12025550143", "message": "db down"})).json()["ids"]
        start = clock.now()
        await pump(bridge, clock, lambda: clock.now() - start > 300, max_seconds=400)
        during = await bridge.store.get(message_id)
        sandbox_state.faults.clear()

        await pump_until_state(bridge, clock, message_id, State.DELIVERED, max_seconds=900)
    assert during.state == State.SENDING and "checking the provider's logs" in during.reason
    assert [e.to for e in sandbox_state.entries] == ["+12025550143"]
    assert len(sends(sandbox_state)) == 2  # one into the outage, one after it


async def test_a_text_found_in_logs_before_a_page_fails_is_sent_and_not_resent(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """Two unknown outcomes: one the provider took (on /logs' first page), one it never
    saw, and /logs' second page answering a gateway's 503 for good. What page 1 showed was
    dropped at each failed read, so the text found there stayed `sending`, and once it
    had waited `retry_max_age` it was resent with the one never seen: a second SMS of a
    text the provider had sent. Found is found: it is sent at once, and only the text
    /logs never showed is sent again."""
    page = "<html><body><h1>503 Service Temporarily Unavailable</h1></body></html>"
    gateway = "<html><body><h1>502 Bad Gateway</h1></body></html>"
    config = bridge_config(tmp_path, sandbox_url, "[http]\nmax_recipients = 1000\n")
    async with running_bridge(config, clock) as (bridge, url):
        # 150 texts before them: /logs' newest page holds 100, so it has a second.
        await post(url, {"to": [f"+1202{5000000 + i:07d}" for i in range(150)], "message": "x"})
        await bridge.dispatcher.run_once()
        sandbox_state.faults.extend(
            [
                Fault(status=502, body=gateway, path="/send", taken=True),
                Fault(status=502, body=gateway, path="/send"),
                Fault(status=503, body=page, path="/logs", query={"page": "2"}, times=10_000),
            ]
        )
        [first] = (await post(url, {"to": "+12025550143", "message": "db down"})).json()["ids"]
        [second] = (await post(url, {"to": "+12025550144", "message": "db up"})).json()["ids"]
        await bridge.dispatcher.run_once()
        assert len(sandbox_state.entries) == 151
        # Which of the two the provider took depends on the order they went in.
        [took] = [e for e in sandbox_state.entries if e.to in ("+12025550143", "+12025550144")]
        taken, never = (first, second) if took.to == "+12025550143" else (second, first)

        await pump(bridge, clock, went(bridge, taken), max_seconds=120)
        await pump(bridge, clock, went(bridge, never), max_seconds=7200)
        message = await bridge.store.get(taken)
    to = sorted(e.to for e in sandbox_state.entries if e.to in ("+12025550143", "+12025550144"))
    assert to == ["+12025550143", "+12025550144"]  # each sent once
    assert message.provider_message_id == str(took.message_id)


async def test_a_logs_down_for_long_never_stops_the_dispatcher(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """Every failed /logs read doubled the next wait's exponent, and nothing reset the
    count while /logs kept failing: past about 1024 reads `5.0 * 2 ** 1024` raised
    OverflowError out of the dispatcher's step, which ended `serve`. (A /logs that
    fails for good with an unknown outcome waiting: days at the default backoff, or a
    `retry_max_age` of days.) The wait stays `backoff_max`, and the text is settled
    once /logs answers."""
    gateway = "<html><body><h1>502 Bad Gateway</h1></body></html>"
    sandbox_state.faults.extend(
        [
            Fault(status=502, body=gateway, path="/send", taken=True),
            Fault(status=503, body=gateway, path="/logs", times=100_000),
        ]
    )
    config = bridge_config(
        tmp_path, sandbox_url, retry_max_age="30d", backoff_initial="1s", backoff_max="1s"
    )
    async with running_bridge(config, clock) as (bridge, url):
        [message_id] = (await post(url, {"to": "+12025550143", "message": "db down"})).json()["ids"]

        def reads() -> int:
            return sum(r.path.endswith("/logs") for r in sandbox_state.requests)

        await pump(bridge, clock, lambda: reads() > 1100, max_seconds=86400, step_cap=60)
        assert (await bridge.store.get(message_id)).state == State.SENDING  # type: ignore[union-attr]
        sandbox_state.faults.clear()
        await pump(bridge, clock, went(bridge, message_id), max_seconds=60)
    assert len(sends(sandbox_state)) == 1


async def test_no_text_goes_in_a_step_after_the_poller_found_the_key_refused(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """Why the dispatcher reads health after each send of a step, besides the pause: the
    status poller, in a task of its own, turns health red on a refused key without
    pausing the rate window (`StatusPoller._failed`). While one text's call was in
    flight it did; that call then failed otherwise (a 500). "Sending paused", the log
    said, yet without the check the step sent the next text into the refused key; with
    it the step ends there, and the next one asks /balance before any text goes."""
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (bridge, url):
        await post(url, {"to": "+12025550140", "message": "disk 91% on db-1"})
        await bridge.dispatcher.run_once()  # sent: the poller tracks it
        await post(url, {"to": "+12025550141", "message": "disk 98% on db-2"})
        await post(url, {"to": "+12025550142", "message": "db-3 down"})  # another call
        answer = asyncio.Event()
        sandbox_state.faults.extend(
            [
                Fault(status=500, path="/send", hold=answer),
                Fault(status=401, path="/logs"),
                Fault(status=401, path="/balance"),
                Fault(status=401, path="/send"),
            ]
        )
        before = len(sends(sandbox_state))
        step = asyncio.create_task(bridge.dispatcher.run_once())
        while len(sends(sandbox_state)) == before:  # the first text's call, held
            assert not step.done(), step.result()
            await asyncio.sleep(0.01)
        await bridge.poller.run_once()  # /logs: 401
        assert not bridge.dispatcher.health.ready
        answer.set()
        await asyncio.wait_for(step, 10)
        assert len(sends(sandbox_state)) == before + 1  # nothing more in that step
        await bridge.dispatcher.run_once()
    paths = [r.path.rsplit("/", 1)[-1] for r in sandbox_state.requests]
    assert paths[paths.index("logs") :] == ["logs", "balance"]  # a probe, no text


async def test_a_look_after_every_overdue_outcome_was_decided_is_not_put_off(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """An unknown outcome that had waited `retry_max_age` met a /logs that answered 503:
    decided without it, resent, and the resend's outcome unknown again (the provider took
    it this time). Nothing waited for /logs any more, yet the failed read still set when
    /logs could be asked again (the backoff, 30-60 s here): the resend's look, due
    RECONCILE_DELAY after its claim with /logs answering again, waited for it (and an
    alert the provider never got waited as long to be sent again)."""
    gateway = "<html><body><h1>502 Bad Gateway</h1></body></html>"
    sandbox_state.faults.append(Fault(status=502, body=gateway, path="/send"))
    config = bridge_config(
        tmp_path, sandbox_url, retry_max_age="60s", backoff_initial="60s", backoff_max="60s"
    )
    async with running_bridge(config, clock) as (bridge, url):
        [message_id] = (await post(url, {"to": "+12025550143", "message": "db down"})).json()["ids"]
        await bridge.dispatcher.run_once()  # not taken; its outcome unknown
        assert (await bridge.store.get(message_id)).state == State.SENDING  # type: ignore[union-attr]
        clock.advance(61)  # overdue: waited retry_max_age since its claim
        sandbox_state.faults.extend(
            [
                Fault(status=503, body=gateway, path="/logs"),
                Fault(status=502, body=gateway, path="/send", taken=True),
            ]
        )
        await pump(bridge, clock, lambda: len(sends(sandbox_state)) == 2, max_seconds=5)
        assert (await bridge.store.get(message_id)).state == State.SENDING  # type: ignore[union-attr]
        await pump(bridge, clock, went(bridge, message_id), max_seconds=RECONCILE_DELAY + 5)
    assert [e.to for e in sandbox_state.entries] == ["+12025550143"]  # the resend's, once
    assert len(sends(sandbox_state)) == 2


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("cost", ["1e13", "Infinity", "NaN", "-0.5"])
async def test_a_cost_that_is_no_price_is_stored_as_unknown(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str, cost: str
) -> None:
    """Costs are counted in whole millionths (the running totals): 1e13 overflowed
    PostgreSQL's bigint in the trigger, the dispatcher stopped at every try and left the
    message `sending`. A cost past any real price, negative or not finite (Python's json
    reads `Infinity` and `NaN`) is no price: the message is sent, its cost unknown."""
    body = '{"success": true, "data": {"message_id": "m-1", "cost": COST}}'.replace("COST", cost)
    sandbox_state.faults.append(Fault(status=200, body=body, path="/send"))
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (bridge, url):
        [message_id] = (await post(url, {"to": "+12025550143", "message": "db down"})).json()["ids"]

        await pump_until_state(bridge, clock, message_id, State.SENT, max_seconds=60)
        message = await bridge.store.get(message_id)
        async with httpx.AsyncClient() as http:
            metrics = (await http.get(f"{url}/metrics")).text
    assert message.provider_message_id == "m-1" and message.cost is None
    assert "sms_bridge_cost_sent 0.0" in metrics


NUL_ANSWERS = {
    # A refusal, and a success whose id holds NUL, as JSON writes it (`\\u0000`).
    "refusal": (400, '{"success": false, "message": "bad sender\\u0000id"}', State.FAILED),
    "id": (200, '{"success": true, "data": {"message_id": "ab\\u0000c"}}', State.SENT),
}


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("answer", sorted(NUL_ANSWERS))
async def test_a_provider_answer_holding_nul_is_recorded_and_never_resent(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str, answer: str
) -> None:
    """PostgreSQL's text cannot hold NUL: an answer whose reason or id held one could not
    be written, the dispatcher took the outcome for unknown, found nothing in /logs and
    sent the text again (a refused text ended `sent`, a sent one went twice). What the
    provider says is stored with NUL shown as U+FFFD, on both stores alike."""
    status, body, final = NUL_ANSWERS[answer]
    sandbox_state.faults.append(Fault(status=status, body=body, path="/send", taken=True))
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (bridge, url):
        [message_id] = (await post(url, {"to": "+12025550143", "message": "db down"})).json()["ids"]

        await pump_until_state(bridge, clock, message_id, final, max_seconds=120)
        for _ in range(40):  # a simulated ten minutes more: nothing goes again
            clock.advance(min(await bridge.dispatcher.run_once(), 15.0) or 0.01)
        message = await bridge.store.get(message_id)
    assert len(sends(sandbox_state)) == 1
    assert message.state == final
    shown = message.reason if answer == "refusal" else message.provider_message_id
    assert "\ufffd" in (shown or ""), shown


@pytest.mark.parametrize("taken", [False, True])
async def test_a_bulk_answer_naming_some_recipients_leaves_the_others_unknown(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str, taken: bool
) -> None:
    """A /send-bulk answer with ids for some recipients and not the others (a provider
    that took 8 of 10 and says which): those it did not name were recorded `sent`
    without an id and, never found in /logs, stayed `sent` for good although no SMS went
    (an alert lost under a state that says it went). They are an unknown outcome: found
    in /logs if the provider took them after all (not sent again), sent again if not."""
    first, second = "+12025550143", "+12025550144"
    names_one = f'{{"success": true, "data": {{"messages": [{{"to": "{first}", "id": 900}}]}}}}'
    sandbox_state.faults.append(Fault(status=200, body=names_one, path="/send-bulk", taken=taken))
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (bridge, url):
        ids = (await post(url, {"to": [first, second], "message": "disk full"})).json()["ids"]

        async def settled() -> bool:
            message = await bridge.store.get(ids[1])
            return message.state == State.DELIVERED

        await pump(bridge, clock, settled, max_seconds=600)
        named, unnamed = [await bridge.store.get(i) for i in ids]
    assert named.provider_message_id == "900"
    delivered_to_second = [e for e in sandbox_state.entries if e.to == second]
    assert len(delivered_to_second) == 1  # taken: found in /logs; not taken: sent again
    assert unnamed.provider_message_id == str(delivered_to_second[0].message_id)


@pytest.mark.parametrize("taken", [False, True])
async def test_a_bulk_answer_with_fewer_ids_than_recipients_is_an_unknown_outcome(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str, taken: bool
) -> None:
    """A /send-bulk answer listing bare ids, two for three recipients: ids in the order
    sent only when there is one for each, so they were ignored, and the call read as a
    success without ids: all three `sent`, though the provider took two at most (or,
    here, none). Which ones it took is unknown: /logs decides for each, found there if
    taken (not sent again), sent again if not."""
    to = ["+12025550143", "+12025550144", "+12025550145"]
    two_ids = '{"success": true, "data": {"message_ids": [901, 902]}}'
    sandbox_state.faults.append(Fault(status=200, body=two_ids, path="/send-bulk", taken=taken))
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (bridge, url):
        ids = (await post(url, {"to": to, "message": "disk full"})).json()["ids"]

        async def delivered() -> bool:
            found = [await bridge.store.get(i) for i in ids]
            return all(m.state == State.DELIVERED for m in found)

        await pump(bridge, clock, delivered, max_seconds=600)
    assert sorted(e.to for e in sandbox_state.entries) == to  # each texted once


@pytest.mark.parametrize("empty", ['""', "null", '" "'])
async def test_a_send_answer_with_an_empty_id_is_a_send_without_an_id(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str, empty: str
) -> None:
    """`"message_id": ""` was kept as the provider's id: the poller looked for an entry
    of id "" and never found one, and the text stayed `sent`, its delivery never known.
    An empty id is no id: the poller matches the text by recipient and words."""
    answer = f'{{"success": true, "data": {{"message_id": {empty}, "cost": 0.5}}}}'
    sandbox_state.faults.append(Fault(status=200, body=answer, path="/send", taken=True))
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (bridge, url):
        [message_id] = (await post(url, {"to": "+12025550143", "message": "x"})).json()["ids"]
        await pump_until_state(bridge, clock, message_id, State.DELIVERED, max_seconds=600)
        message = await bridge.store.get(message_id)
    assert message.provider_message_id == str(sandbox_state.entries[0].message_id)


@pytest.mark.parametrize(
    ("money", "each"),
    [('"price": 0.5', 0.5), ('"cost": 1.5', 0.5), ('"cost": 1.5, "price": 0.5', 0.5)],
)
async def test_a_bulk_answers_price_is_what_each_message_cost(
    tmp_path,
    clock: ManualClock,
    sandbox_state: SandboxState,
    sandbox_url: str,
    money: str,
    each: float,
) -> None:
    """sms-api.md's words: a `price` is what one SMS costs (the price list), a `cost` what
    a send cost (`/send`'s `"cost": 1.5`). A bulk answer giving only a `price` was read as
    the whole call's cost: three US texts billed 1.5 were counted 0.5, a third each, and
    the cost cap let three times as much through. It is each message's price; a `cost`,
    where given, is the call's."""
    to = ["+12025550143", "+12025550144", "+12025550145"]
    answer = f'{{"success": true, "data": {{"batch_id": "b-1", "count": 3, {money}}}}}'
    sandbox_state.faults.append(Fault(status=200, body=answer, path="/send-bulk", taken=True))
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (bridge, url):
        ids = (await post(url, {"to": to, "message": "disk full"})).json()["ids"]
        await pump(bridge, clock, went(bridge, ids[-1]), max_seconds=60)
        costs = [(await bridge.store.get(i)).cost for i in ids]
    assert sum(e.cost for e in sandbox_state.entries) == 1.5  # what the provider billed
    assert costs == [each] * 3


async def test_a_text_left_sending_across_a_long_stop_is_not_resent_at_the_first_failed_look(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """A text the provider took while answering a 502, then the bridge stopped before it
    looked in /logs, and stayed down for longer than `retry_max_age`. Its patience was
    counted from its claim: at the restart the first /logs read that failed (one 503)
    found it "overdue" and resent it at once, a second SMS, although it had not waited
    for /logs at all. The wait for /logs counts from this bridge's first look."""
    gateway = "<html><body><h1>502 Bad Gateway</h1></body></html>"
    config = bridge_config(tmp_path, sandbox_url, retry_max_age="1h")
    sandbox_state.faults.append(Fault(status=502, body=gateway, path="/send", taken=True))
    async with running_bridge(config, clock) as (bridge, url):
        [message_id] = (await post(url, {"to": "+12025550143", "message": "db down"})).json()["ids"]
        await bridge.dispatcher.run_once()  # taken, answered 502: its outcome unknown
    assert len(sandbox_state.entries) == 1
    clock.advance(2 * 86400)  # down for two days
    sandbox_state.faults.append(Fault(status=503, body=gateway, path="/logs"))
    async with running_bridge(config, clock) as (bridge, url):
        await pump(bridge, clock, went(bridge, message_id), max_seconds=600)
    assert len(sends(sandbox_state)) == 1  # never sent again
    assert [e.to for e in sandbox_state.entries] == ["+12025550143"]


async def test_an_inactive_accounts_probe_that_says_nothing_is_tried_again_after_the_interval(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """While the account is inactive (403) the next send is the probe. A probe answered
    with a 500 said nothing of the account: health stayed red, but the time of the next
    probe stayed in the past, so every step (10 ms apart) sent the next queued text into
    an account known to be inactive, as many as the window allowed. An inconclusive
    probe waits `auth_probe_interval` like a failed one."""
    body = '{"success": false, "message": "Account is not active."}'
    config = bridge_config(tmp_path, sandbox_url, auth_probe_interval="30s")
    async with running_bridge(config, clock) as (bridge, url):
        for n in range(6):
            await post(url, {"to": f"+1202555014{n}", "message": f"disk {90 + n}% on db-{n}"})
        sandbox_state.faults.append(Fault(status=403, path="/send", body=body))
        sandbox_state.faults.append(Fault(status=500, path="/send", times=100))
        with contextlib.suppress(AssertionError):  # the 500s never end
            await pump(bridge, clock, lambda: False, max_seconds=65)
    attempts = [r for r in sandbox_state.requests if r.path.endswith("/send")]
    # At 0 (the 403), then a probe at 30 s and at 60 s: no text in between.
    assert [r.status for r in attempts] == [403, 500, 500], [r.status for r in attempts]
    gaps = [b.at - a.at for a, b in itertools.pairwise(attempts)]
    assert min(gaps) >= 30 * 0.99, gaps


async def test_an_alert_after_an_idle_step_of_an_inactive_account_goes_as_the_probe(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """While the account is inactive the next send is the probe, once its time comes.
    A step with nothing to send then put the probe off by the interval all the same, so
    an alert that came a second later waited up to `auth_probe_interval` (30 s) on an
    account that may be active again. It goes at once, as the probe."""
    body = '{"success": false, "message": "Account is not active."}'
    sandbox_state.faults.append(Fault(status=403, path="/send", body=body))
    config = bridge_config(tmp_path, sandbox_url, auth_probe_interval="30s")
    async with running_bridge(config, clock) as (bridge, url):
        [first] = (await post(url, {"to": "+12025550140", "message": "disk 91% on db-1"})).json()[
            "ids"
        ]
        await bridge.dispatcher.run_once()  # 403: the next send in 30 s is the probe
        assert bridge.dispatcher.health.inactive
        clock.advance(30.5)
        await pump(bridge, clock, went(bridge, first), max_seconds=5)  # the probe: active
        sandbox_state.faults.append(Fault(status=403, path="/send", body=body))
        [second] = (await post(url, {"to": "+12025550141", "message": "db-2 down"})).json()["ids"]
        await bridge.dispatcher.run_once()  # inactive again
        async with httpx.AsyncClient() as http:  # an operator cancels it: nothing is due
            cancel = await http.post(f"{url}/api/v1/messages/{second}/cancel")
        assert cancel.status_code == 200, cancel.text
        clock.advance(30.5)
        await bridge.dispatcher.run_once()  # the probe's time, nothing to send
        clock.advance(1.0)
        [third] = (await post(url, {"to": "+12025550142", "message": "db-3 down"})).json()["ids"]
        await bridge.dispatcher.run_once()
        assert (await bridge.store.get(third)).state == State.SENT  # type: ignore[union-attr]


class SlowToLog(ToProvider):
    """The first /send reaches a provider still working on it when the client's read
    timeout fires (`provider.timeout`, on the manual clock); the provider takes it, and
    logs it, only when `provider_finishes` is called. A live server cannot be made to
    answer after the clock moved, so the timeout is raised here."""

    def __init__(self, clock: ManualClock, timeout: float) -> None:
        super().__init__()
        self.clock, self.timeout = clock, timeout
        self.held: httpx.Request | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.held is None and request.url.path.endswith("/send"):
            await request.aread()
            self.held = request
            self.clock.advance(self.timeout)
            raise httpx.ReadTimeout("timed out", request=request)
        return await self.inner.handle_async_request(request)

    async def provider_finishes(self) -> None:
        assert self.held is not None
        held = self.held
        again = httpx.Request(held.method, held.url, headers=held.headers, content=held.content)
        await (await self.inner.handle_async_request(again)).aread()


@pytest.mark.usefixtures("backend")
async def test_a_read_timeout_is_looked_up_in_logs_a_delay_after_the_timeout_not_the_claim(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """RECONCILE_DELAY (time for the provider to log a request) counted from the claim,
    but a read timeout makes the outcome unknown `provider.timeout` (10 s) after it: the
    next step read /logs at once, before the slow provider had logged the request it was
    still working on, found nothing and sent the text again; the provider then logged
    the first request too, and the recipient got two SMS. An unknown outcome is looked
    up RECONCILE_DELAY after it became unknown."""
    config = bridge_config(tmp_path, sandbox_url, timeout="10s")
    transport = SlowToLog(clock, 10.0)
    async with running_bridge(config, clock, transport=transport) as (bridge, url):
        alert = {"to": "+12025550111", "message": "DiskFull on db-1"}
        [message_id] = (await post(url, alert)).json()["ids"]
        await bridge.dispatcher.run_once()  # claimed at 0, the read timeout at 10 s
        timed_out = clock.now()
        assert (await bridge.store.get(message_id)).state == State.SENDING
        # Another alert wakes the dispatcher a moment later (a busy bridge steps whenever
        # a text is stored or a request frees).
        await post(url, {"to": "+12025550112", "message": "another alert"})
        clock.advance(0.1)
        await bridge.dispatcher.run_once()
        clock.advance(0.5)
        await transport.provider_finishes()  # the provider logs the first request now
        await pump(bridge, clock, went(bridge, message_id), max_seconds=60)
        # Settled by the reconciler's look, no sooner than the delay after the timeout
        # (the status poller reads /logs too, for the other alert: not its reads).
        events = await bridge.store.events(message_id)
    [settled] = [e["at"] for e in events if e["state"] == State.SENT]
    assert settled >= timed_out + RECONCILE_DELAY, (settled, timed_out)
    copies = [e for e in sandbox_state.entries if e.message == "DiskFull on db-1"]
    assert len(copies) == 1, "texted twice"


async def test_new_alerts_go_while_an_unknown_outcome_waits_for_its_look(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """An unknown outcome waits RECONCILE_DELAY after its timeout (or, left by a crash
    mid-call, the call's timeouts and the delay after its claim: 20 s at the defaults)
    before /logs is read for it. The reconciler answered that wait to the dispatcher as
    one before anything new may go: every new alert waited for it, up to 20 s after a
    restart. The look waits; new texts go at once."""
    config = bridge_config(tmp_path, sandbox_url, timeout="10s")
    transport = SlowToLog(clock, 10.0)
    async with running_bridge(config, clock, transport=transport) as (bridge, url):
        [unknown] = (await post(url, {"to": "+12025550111", "message": "db-1 down"})).json()["ids"]
        await bridge.dispatcher.run_once()  # the read timeout at 10 s: looked up at 15 s
        [new] = (await post(url, {"to": "+12025550112", "message": "db-2 down"})).json()["ids"]
        clock.advance(0.1)
        wait = await bridge.dispatcher.run_once()
        assert (await bridge.store.get(new)).state == State.SENT  # type: ignore[union-attr]
        assert 0 < wait <= RECONCILE_DELAY  # and it wakes for the look
        await transport.provider_finishes()
        await pump(bridge, clock, went(bridge, unknown), max_seconds=60)
    assert [e.message for e in sandbox_state.entries] == ["db-2 down", "db-1 down"]


@pytest.mark.usefixtures("backend")
async def test_a_text_a_crash_left_mid_call_is_looked_up_after_the_calls_timeouts(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """A text claimed, its call under way, then the bridge killed: no answer was ever
    noted, so nothing says when its outcome became unknown. Its call could have lasted
    `connect_timeout` + `timeout` (15 s here), the provider working on it all along;
    looked up RECONCILE_DELAY after the claim by the restarted bridge, /logs did not
    show it yet and it was sent again. It waits for the call's timeouts and the delay."""
    config = bridge_config(tmp_path, sandbox_url, timeout="10s", connect_timeout="5s")
    async with running_bridge(config, clock) as (bridge, url):
        alert = {"to": "+12025550143", "message": "db down"}
        [message_id] = (await post(url, alert)).json()["ids"]
        claimed = clock.now()  # the killed process's claim, under this one's name
        owner = bridge.dispatcher.owner
        assert await bridge.store.claim([message_id], claimed, owner=owner, lease_until=claimed)
        clock.advance(3.0)  # restarted
        for _ in range(3):
            clock.advance(min(await bridge.dispatcher.run_once(), 4.0))
        # The provider takes the killed process's request near the end of its timeout.
        clock.advance(claimed + 14.0 - clock.now())
        async with httpx.AsyncClient() as http:
            taken = await http.post(
                f"{sandbox_url}/api/v1/send", json=alert, headers={"X-API-Key": "test-key"}
            )
        assert taken.status_code == 200
        await pump(bridge, clock, went(bridge, message_id), max_seconds=60)
    logs = [r.at for r in sandbox_state.requests if r.path.endswith("/logs")]
    assert logs and logs[0] >= claimed + 15.0 + RECONCILE_DELAY, (logs, claimed)
    assert len(sends(sandbox_state)) == 1  # the killed process's call: never sent again


class SlowProvider(ToProvider):
    """Every /send answered `seconds` after it went (on the manual clock): a provider
    slow to answer, as the takeover benchmark's sandbox holds each send."""

    def __init__(self, clock: ManualClock, seconds: float) -> None:
        super().__init__()
        self.clock, self.seconds = clock, seconds

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/send"):
            self.clock.advance(self.seconds)
        return await self.inner.handle_async_request(request)


async def test_a_look_that_falls_due_during_a_step_of_sends_ends_the_step(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """A text a killed process left mid-call is looked up 20 s after its claim. A step
    that began just before then sent every due text first, and each of eight took the
    slow provider 3 s: the look came 24 s late (in the takeover benchmark, where the
    sandbox holds each send 10 s, a dead instance's text was settled 40 s after the
    kill, not 20). The step ends once the look is due; the rest goes in the next."""
    config = bridge_config(tmp_path, sandbox_url, timeout="10s", connect_timeout="5s")
    async with running_bridge(config, clock, transport=SlowProvider(clock, 3.0)) as (
        bridge,
        url,
    ):
        alert = {"to": "+12025550143", "message": "db down"}
        [left] = (await post(url, alert)).json()["ids"]
        claimed = clock.now()  # the killed process's claim, under this one's name
        owner = bridge.dispatcher.owner
        assert await bridge.store.claim([left], claimed, owner=owner, lease_until=claimed)
        async with httpx.AsyncClient() as http:  # the provider took the killed call
            taken = await http.post(
                f"{sandbox_url}/api/v1/send", json=alert, headers={"X-API-Key": "test-key"}
            )
        assert taken.status_code == 200
        for n in range(8):
            await post(url, {"to": f"+1202555020{n}", "message": f"disk {90 + n}% on db-{n}"})
        clock.advance(claimed + 19.0 - clock.now())  # its look is due in 1 s
        assert await bridge.dispatcher.run_once() == 0.0
        assert len(sends(sandbox_state)) == 2  # the killed call's, and one text: 3 s
        await bridge.dispatcher.run_once()  # the look first
        events = await bridge.store.events(left)
    [settled] = [e["at"] for e in events if e["state"] == State.SENT]
    assert settled <= claimed + 20.0 + 3.0 + 3.0, settled - claimed


async def test_a_retry_time_left_with_nothing_waiting_for_logs_cuts_no_step_short(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """A failed /logs read sets when to ask it again; if its texts then left `sending`
    another way (taken over, cancelled), nothing cleared it: due for good, it ended every
    step of sends after its first call (`Reconciler.look_due`). With nothing waiting for
    /logs it is spent, and a step sends all that is due."""
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (bridge, url):
        for n in range(3):
            await post(url, {"to": f"+1202555030{n}", "message": f"disk {90 + n}% on db-{n}"})
        bridge.dispatcher.reconciler.logs_retry_at = clock.now() - 1.0  # as such a read left
        await bridge.dispatcher.run_once()
    assert len(sends(sandbox_state)) == 3


async def test_a_text_not_ready_for_its_look_when_another_is_settled_is_looked_up_on_time(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """Two texts in `sending`: one whose 502 came 5 s ago (its look is due), one a
    killed process left mid-call a moment ago (due 20 s after its claim). The step
    that settled the first left the second to the idle wait: looked up 30 s later, not
    at its time. The dispatcher wakes for it."""
    gateway = "<html>Bad Gateway</html>"
    sandbox_state.faults.append(Fault(status=502, body=gateway, path="/send", taken=True))
    config = bridge_config(tmp_path, sandbox_url, timeout="10s", connect_timeout="5s")
    async with running_bridge(config, clock) as (bridge, url):
        [first] = (await post(url, {"to": "+12025550143", "message": "db down"})).json()["ids"]
        await bridge.dispatcher.run_once()  # taken, answered 502: looked up in 5 s
        clock.advance(4.0)
        [left] = (await post(url, {"to": "+12025550144", "message": "db up"})).json()["ids"]
        claimed = clock.now()  # a killed process's claim: looked up at claimed + 20 s
        owner = bridge.dispatcher.owner
        assert await bridge.store.claim([left], claimed, owner=owner, lease_until=claimed)
        clock.advance(1.0)
        wait = await bridge.dispatcher.run_once()  # the first one's look: found, sent
        assert await went(bridge, first)()
        assert wait <= claimed + 15.0 + RECONCILE_DELAY - clock.now(), wait
        clock.advance(wait)
        await bridge.dispatcher.run_once()
        message = await bridge.store.get(left)
    logs = [r.at for r in sandbox_state.requests if r.path.endswith("/logs")]
    assert len(logs) == 2 and logs[1] >= claimed + 15.0 + RECONCILE_DELAY, (logs, claimed)
    assert message.unknown_resends == 1  # not in /logs: the killed process never sent it
