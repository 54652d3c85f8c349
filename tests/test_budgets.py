"""Daily caps and the provider's price list, through the real bridge on a manual clock:
what a reload of the caps does to texts already waiting for midnight, a price list that
failed at start or changed since, prices of 0, and a retention that would empty the caps.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import httpx
import pytest

from bridge.clock import ManualClock
from bridge.config import Config, load_config
from bridge.delivery.dispatcher import PRICED_NOW, PRICES_REFRESH
from bridge.errors import ConfigError
from bridge.models import State
from bridge.provider.sandbox import SandboxState, create_sandbox_app
from bridge.provider.sandbox.faults import Fault
from bridge.provider.sandbox.shapes import Shape
from tests.helpers import bridge_config, running_bridge, served, write_config
from tests.test_cli import run
from tests.test_console import ADMIN, READER, SENDER, TOKENS, send, sign_in
from tests.test_pacing import queue_age
from tests.test_reload import reloaded
from tests.test_retention import kept_for

on_each_backend = pytest.mark.usefixtures("backend")


async def post(http: httpx.AsyncClient, url: str, to: str, message: str) -> int:
    response = await http.post(f"{url}/api/v1/messages", json={"to": to, "message": message})
    assert response.status_code == 202, response.text
    return int(response.json()["messages"][0]["id"])


async def steps(bridge, clock: ManualClock, seconds: float, cap: float = 5.0) -> None:
    """Dispatcher steps for `seconds` of simulated time."""
    end = clock.now() + seconds
    while clock.now() < end:
        clock.advance(max(0.01, min(await bridge.dispatcher.run_once(), cap)))


# -- the price list --------------------------------------------------------------------
async def test_a_price_list_that_failed_at_start_is_fetched_again_and_then_daily(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """The list was fetched once per start: one 500 there and every text went unpriced
    (estimated at nothing, the cost cap guessing) until a restart, and a price changed
    by the provider was never seen. Now: again with backoff until it answers, then daily."""
    sandbox_state.faults.append(Fault(status=500, times=3, path="/pricing"))
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        await bridge.dispatcher.run_once()  # the first fetch fails
        first = await post(http, url, "+12025550101", "before")
        await steps(bridge, clock, 1200)  # 20 minutes: the provider answers again meanwhile
        fetches = [r for r in sandbox_state.requests if r.path.endswith("/pricing")]
        second = await post(http, url, "+12025550102", "after")
        sandbox_state.prices[1] = 0.7  # the provider changes a price
        await steps(bridge, clock, PRICES_REFRESH, cap=600)
        third = await post(http, url, "+12025550103", "a day later")
        estimates = [(await bridge.store.get(i)).estimated_cost for i in (first, second, third)]
    assert estimates == [None, 0.5, 0.7]
    # Backing off: four fetches in 20 minutes (3 failed), not one per step, each wait
    # longer than the one before.
    assert [r.status for r in fetches] == [500, 500, 500, 200]
    gaps = [b.at - a.at for a, b in itertools.pairwise(fetches)]
    assert gaps[0] >= 60 and gaps[1] >= 2 * gaps[0] - 5 and gaps[2] >= 2 * gaps[1] - 5, gaps


async def test_a_price_of_0_is_free_and_a_destination_not_listed_is_not(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """The list gives +44 at 0: "price": 0 was read as no price, so UK texts were counted
    at the default (1.0) and held by a cost cap they do not touch."""
    sandbox_state.prices[44] = 0.0
    admin = "+12025550199"
    config = bridge_config(
        tmp_path, sandbox_url, f'[budget]\ncost_per_day = 1\nadmin = ["{admin}"]\n'
    )
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        await bridge.dispatcher.run_once()  # the price list
        ids = [await post(http, url, to, to) for to in ("+12025550101", "+12025550102")]
        await steps(bridge, clock, 30)  # 1.0 spent: the cap reached
        ids += [await post(http, url, to, to) for to in ("+447911123456", "+447911123457")]
        await steps(bridge, clock, 30)
        states = [(await bridge.store.get(i)).state for i in ids]
    assert states == [State.SENT] * 4
    assert [e.to for e in sandbox_state.entries if e.to == admin] == []  # no cap bit


async def test_an_unlisted_destination_is_not_free_when_only_free_ones_are_listed(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """A list of one free country and no default: every other country is unknown, not
    the highest price listed (0). Counted at 0, all six went in one bulk call (3 points
    against a cap of 1); now one goes alone and its bill prices the rest."""
    body = '{"success": true, "data": {"countries": [{"country_code": "+44", "price": 0}]}}'
    sandbox_state.faults.append(Fault(status=200, body=body, path="/pricing"))
    config = bridge_config(tmp_path, sandbox_url, "[budget]\ncost_per_day = 1\n")
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        await bridge.dispatcher.run_once()  # the list
        for i in range(6):
            await post(http, url, f"+120255501{i:02d}", "same")
        await steps(bridge, clock, 60)
    assert sum(e.cost for e in sandbox_state.entries) <= 1
    assert len(sandbox_state.entries) == 2


async def test_a_country_code_with_a_footnote_mark_is_no_price_not_an_error(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """A price list whose country code carries a footnote mark ("+1\u00b9": str.isdigit()
    takes it, int() does not) raised out of the dispatcher's step before any send, and
    the fetch, still due, raised again at every step: not one text went while /pricing
    answered so. The entry is no price; the rest of the list is read."""
    body = (
        '{"success": true, "data": {"default": 1.0, "countries":'
        ' [{"country_code": "+1\u00b9", "price": 0.2}]}}'
    )
    sandbox_state.faults.append(Fault(status=200, body=body, path="/pricing", times=100))
    config = bridge_config(tmp_path, sandbox_url, "[budget]\ncost_per_day = 5\n")
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        first = await post(http, url, "+12025550101", "db-1 down")
        await steps(bridge, clock, 30)
        later = await post(http, url, "+447911123456", "db-2 down")  # unlisted, unbilled
        states = [(await bridge.store.get(i)).state for i in (first,)]
        estimate = (await bridge.store.get(later)).estimated_cost
    assert states == [State.SENT]
    assert estimate == 1.0  # the list's default: the list was read


async def test_a_price_list_that_cannot_be_read_is_a_failed_fetch_not_a_failed_step(
    tmp_path,
    clock: ManualClock,
    sandbox_state: SandboxState,
    sandbox_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Any error reading the list (its body is undocumented; the parser may meet a shape
    it does not expect) ended the step before any send, and the fetch stayed due: every
    step failed, and no text went at all. It is now a failed fetch like a 500, tried
    again with backoff, and the texts go meanwhile."""
    config = bridge_config(tmp_path, sandbox_url, "[budget]\ncost_per_day = 5\n")
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:

        def unreadable(data: object) -> bool:  # a parser's bug: no live answer makes one
            raise RuntimeError("a shape nobody expected")

        monkeypatch.setattr(bridge.dispatcher.prices, "load", unreadable)
        sent = await post(http, url, "+12025550101", "db-1 down")
        await steps(bridge, clock, 30)
        message = await bridge.store.get(sent)
    fetches = [r for r in sandbox_state.requests if r.path.endswith("/pricing")]
    assert message.state == State.SENT
    assert len(fetches) == 1  # backing off (60 s first), not once a step


@pytest.mark.parametrize("price", ["NaN", "-1", "Infinity"])
async def test_a_price_that_is_no_number_is_no_price(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str, price: str
) -> None:
    """JSON's NaN (Python's json reads it) priced +1: spent became NaN, every `spent +
    cost > cap` false, and the cost cap let everything through. A price below 0 paid
    for the others. Such an entry is no price: +1 falls to the default (1.0 a part)."""
    body = (
        '{"success": true, "data": {"default": 1.0, "countries":'
        f' [{{"country_code": "+1", "price": {price}}}]}}}}'
    )
    sandbox_state.faults.append(Fault(status=200, body=body, path="/pricing"))
    config = bridge_config(tmp_path, sandbox_url, "[budget]\ncost_per_day = 1.2\n")
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        await bridge.dispatcher.run_once()  # the list
        for i in range(4):  # estimated at ingest: 1.0 each, the list's default
            await post(http, url, f"+120255501{i:02d}", f"text {i}")
        await steps(bridge, clock, 30)
        waiting = await bridge.store.query(reason_kind="budget")
    assert len(sandbox_state.entries) == 1  # billed 0.5, the next at 1.0 would cross 1.2
    assert len(waiting) == 3


# -- a reload of the caps ----------------------------------------------------------------
@on_each_backend
async def test_a_reload_that_raises_or_removes_a_cap_releases_what_waits_for_midnight(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """texts_per_day = 1 and three alerts at 10:00 UTC: two wait for 00:00. The operator
    raises the cap to 2 with SIGHUP: one more goes at once, the other waits; then removes
    it: the last goes. Before, both waited 14 hours whatever the reload said."""
    clock.advance(3600 * 10 - clock.now() % 86400)  # 10:00 UTC
    config = bridge_config(tmp_path, sandbox_url, "[budget]\ntexts_per_day = 1\n")
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        ids = [await post(http, url, f"+120255501{i:02d}", f"alert {i}") for i in range(3)]
        await steps(bridge, clock, 30)
        assert len(sandbox_state.entries) == 1
        assert len(await bridge.store.query(reason_kind="budget", state="queued")) == 2
        reloaded(bridge, tmp_path, sandbox_url, "[budget]\ntexts_per_day = 2\n")
        await steps(bridge, clock, 30)
        assert len(sandbox_state.entries) == 2
        [waiting] = await bridge.store.query(reason_kind="budget", state="queued")
        assert "texts_per_day=2" in (waiting.reason or "")  # judged again, by the new cap
        reloaded(bridge, tmp_path, sandbox_url, "[budget]\n")
        await steps(bridge, clock, 30)
        states = [(await bridge.store.get(i)).state for i in ids]
        events = [e["detail"] for e in await bridge.store.events(waiting.id)]
    assert states == [State.SENT] * 3
    assert len(sandbox_state.entries) == 3
    assert any((e or "").startswith("daily caps changed by a reload: judged again") for e in events)


async def test_a_reload_that_removes_a_token_cap_releases_its_texts(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """The same for a cap of one API token (tokens.NAME.texts_per_day); a cap only
    lowered releases nothing."""
    token = "ci-token-0123456789abcdef"
    tokens = '[tokens.ci]\ntoken = "{}"\nscopes = ["send"]\ntexts_per_day = {}\n'
    config = bridge_config(tmp_path, sandbox_url, tokens.format(token, 2))
    headers = {"Authorization": f"Bearer {token}"}
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        for i in range(3):
            body = {"to": f"+120255501{i:02d}", "message": f"build {i} failed"}
            response = await http.post(f"{url}/api/v1/messages", json=body, headers=headers)
            assert response.status_code == 202
        await steps(bridge, clock, 30)
        assert len(sandbox_state.entries) == 2
        reloaded(bridge, tmp_path, sandbox_url, tokens.format(token, 1))  # lowered
        assert not bridge.budget.loosened
        reloaded(bridge, tmp_path, sandbox_url, tokens.format(token, 0))  # no cap
        await steps(bridge, clock, 30)
    assert len(sandbox_state.entries) == 3


async def test_a_restart_with_a_higher_cap_releases_what_waits_for_midnight(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """An operator who restarts instead of reloading (a container redeployed with the
    new cap) saw the same: the texts stored as waiting kept waiting for 00:00."""
    clock.advance(3600 * 10 - clock.now() % 86400)  # 10:00 UTC
    capped = bridge_config(tmp_path, sandbox_url, "[budget]\ntexts_per_day = 1\n")
    async with running_bridge(capped, clock) as (bridge, url), httpx.AsyncClient() as http:
        for i in range(2):
            await post(http, url, f"+120255501{i:02d}", f"alert {i}")
        await steps(bridge, clock, 30)
    assert len(sandbox_state.entries) == 1
    async with running_bridge(bridge_config(tmp_path, sandbox_url), clock) as (bridge, _):
        await steps(bridge, clock, 30)
        assert await bridge.store.counts() == {"sent": 2}
    assert len(sandbox_state.entries) == 2


@on_each_backend
async def test_a_restart_with_the_same_caps_leaves_what_waits_alone(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """Every start released all the texts waiting for midnight with "daily caps changed
    by a reload: judged again", and held them again: two events of a reload that never
    was in each one's history at every restart. A start now judges them again only when
    a cap they ran into is higher now (or gone), and says it was a restart."""
    clock.advance(3600 * 10 - clock.now() % 86400)  # 10:00 UTC
    capped = bridge_config(tmp_path, sandbox_url, "[budget]\ntexts_per_day = 1\n")
    async with running_bridge(capped, clock) as (bridge, url), httpx.AsyncClient() as http:
        ids = [await post(http, url, f"+120255501{i:02d}", f"alert {i}") for i in range(3)]
        await steps(bridge, clock, 30)
        held = await bridge.store.events(ids[2])
    async with running_bridge(capped, clock) as (bridge, _):  # the same cap
        await steps(bridge, clock, 30)
        assert await bridge.store.events(ids[2]) == held
    raised = bridge_config(tmp_path, sandbox_url, "[budget]\ntexts_per_day = 2\n")
    async with running_bridge(raised, clock) as (bridge, _):
        await steps(bridge, clock, 30)
        details = [e["detail"] or "" for e in await bridge.store.events(ids[2])]
        states = [(await bridge.store.get(i)).state for i in ids]
    assert states == [State.SENT, State.SENT, State.QUEUED]  # one more fits today
    assert not any("reload" in d for d in details), details
    assert any("raised while the bridge was stopped" in d for d in details), details
    assert len(sandbox_state.entries) == 2


async def test_a_restart_with_the_same_cost_cap_of_seven_digits_leaves_what_waits_alone(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """A held text's reason wrote the cost cap with `:g`, six significant digits:
    cost_per_day = 12345.25 read "cost_per_day=12345.2", and every start took the cap
    for raised while stopped (its held texts released and held again, two events each),
    and the reason named a cap that was not the one in force."""
    clock.advance(3600 * 10 - clock.now() % 86400)  # 10:00 UTC
    sandbox_state.prices[1] = 5000.0  # a part to +1, listed and billed
    capped = bridge_config(tmp_path, sandbox_url, "[budget]\ncost_per_day = 12345.25\n")
    async with running_bridge(capped, clock) as (bridge, url), httpx.AsyncClient() as http:
        await bridge.dispatcher.run_once()  # the list
        ids = [await post(http, url, f"+120255501{i:02d}", f"alert {i}") for i in range(3)]
        await steps(bridge, clock, 30)
        held = await bridge.store.events(ids[2])
        reason = (await bridge.store.get(ids[2])).reason or ""
    assert len(sandbox_state.entries) == 2
    assert "cost_per_day=12345.25" in reason, reason
    async with running_bridge(capped, clock) as (bridge, _):  # the same cap
        await steps(bridge, clock, 30)
        assert await bridge.store.events(ids[2]) == held


# -- retention under a day ---------------------------------------------------------------
@pytest.mark.parametrize(
    "caps",
    [
        "[budget]\ntexts_per_day = 100\n",
        "[budget]\ncost_per_day = 5\n",
        '[tokens.ci]\ntoken = "ci-token-0123456789abcdef"\nscopes = ["send"]\ntexts_per_day = 9\n',
    ],
)
def test_a_retention_under_a_day_is_refused_with_daily_caps(
    tmp_path, sandbox_url: str, caps: str
) -> None:
    """The caps count what today's stored messages sent: `store.retention = "1h"` purged
    them hourly and the caps let as many again through every hour. Refused, saying why;
    a day, 0 (keep) and no cap at all still load."""

    def load(retention: str, extra: str) -> Config:
        text = (
            f'[store]\npath = "{tmp_path / "bridge.db"}"\nretention = {retention}\n'
            f'[provider]\nbase_url = "{sandbox_url}/api/v1"\napi_key = "test-key"\n{extra}'
        )
        return load_config(write_config(tmp_path, text), env={})

    with pytest.raises(ConfigError) as refused:
        load('"1h"', caps)
    assert "store.retention" in str(refused.value) and "under a day" in str(refused.value)
    for retention in ('"1d"', "0"):
        load(retention, caps)
    load('"1h"', "")


async def test_a_reload_adding_a_cap_to_a_running_short_retention_is_refused(
    tmp_path, clock: ManualClock, sandbox_url: str
) -> None:
    """The store (and its retention) waits for a restart: a reload adding a daily cap is
    judged against the retention that keeps running."""
    config = kept_for(bridge_config(tmp_path, sandbox_url), 3600.0)
    async with running_bridge(config, clock) as (bridge, _):
        with pytest.raises(ConfigError) as refused:
            reloaded(bridge, tmp_path, sandbox_url, "[budget]\ntexts_per_day = 10\n")
        assert not bridge.budget.active
    assert "store.retention" in str(refused.value)


@pytest.mark.slow  # runs the CLI as a process
async def test_a_manual_purge_under_a_day_is_refused_with_daily_caps(
    tmp_path, clock: ManualClock, sandbox_url: str
) -> None:
    """`sms-bridge purge --older-than 1h` forgot today's sends as retention did: refused
    (exit 2, saying why, the store untouched) while the config sets a daily cap."""
    config = bridge_config(tmp_path, sandbox_url, "[budget]\ntexts_per_day = 5\n")
    async with running_bridge(config, clock) as (_, url), httpx.AsyncClient() as http:
        await post(http, url, "+12025550143", "kept")
    path = tmp_path / "bridge.toml"
    short = run("purge", "--older-than", "1h", "--config", str(path), cwd=tmp_path)
    day = run("purge", "--older-than", "1d", "--config", str(path), cwd=tmp_path)
    assert short.returncode == 2 and "under a day while budget.texts_per_day" in short.stderr
    assert day.returncode == 0, day.stderr


async def test_a_text_priced_by_another_countrys_bill_is_not_failed_as_too_large(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """No price list (404), cost_per_day = 1. A Lebanese text is billed 1.5 a part; with
    nothing else known, every later text was priced at 1.5 and failed for good as
    "larger than the daily budget", though a US text costs 0.5. Now a text whose only
    price is such a guess goes alone on a day with room, and its bill prices its country:
    the next day both US texts go."""
    sandbox_state.faults.append(Fault(status=404, times=100, path="/pricing"))
    clock.advance(3600 * 20 - clock.now() % 86400)  # 20:00 UTC
    config = bridge_config(tmp_path, sandbox_url, "[budget]\ncost_per_day = 1\n")
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        await post(http, url, "+96171123456", "Beirut")
        await steps(bridge, clock, 30)
        us = [await post(http, url, f"+120255501{i:02d}", f"us {i}") for i in range(2)]
        await steps(bridge, clock, 30)
        waiting = [(await bridge.store.get(i)).state for i in us]
        clock.advance(5 * 3600)  # the next UTC day
        await steps(bridge, clock, 60)
        states = [(await bridge.store.get(i)).state for i in us]
        later = await bridge.store.get(await post(http, url, "+12025550188", "priced"))
    assert waiting == [State.QUEUED, State.QUEUED]  # 1.5 spent today: no room
    assert later.estimated_cost == 0.5  # what a US part was billed
    assert states == [State.SENT, State.SENT]
    assert sum(e.cost for e in sandbox_state.entries[1:]) == 1.0


async def test_a_text_with_only_a_guess_for_a_price_waits_when_the_cap_is_spent(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """A text with nothing to price it by (or only a guess no day could hold) is counted
    at 0 until its bill: with the day's cap spent exactly (1.5 of 1.5), `spent + 0 >
    cap` was false and it went anyway. It waits for room."""
    sandbox_state.faults.append(Fault(status=404, times=100, path="/pricing"))
    clock.advance(3600 * 20 - clock.now() % 86400)  # 20:00 UTC
    config = bridge_config(tmp_path, sandbox_url, "[budget]\ncost_per_day = 1.5\n")
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        await post(http, url, "+96171123456", "Beirut")  # billed 1.5: the cap, exactly
        await steps(bridge, clock, 30)
        long = await post(http, url, "+12025550101", "word " * 40)  # 2 parts: 3.0 guessed
        await steps(bridge, clock, 30)
        message = await bridge.store.get(long)
    assert len(sandbox_state.entries) == 1
    assert message.state == State.QUEUED and "cost_per_day=1.5" in (message.reason or "")


async def test_a_country_priced_only_by_another_countrys_bill_goes_alone(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """No price list (404), cost_per_day = 2. A US text is billed 0.5; then one text to
    four Lebanese numbers, 1.5 each. Priced at the most a part was billed (0.5, another
    country's bill), they fitted the cap together and went in one bulk call: 5.0 spent
    against 2, what a cap that guards against toll fraud is for. A text priced only by
    such a guess now goes alone, and its bill prices its country: one goes, the day's
    cap is then spent and the others wait."""
    sandbox_state.faults.append(Fault(status=404, times=100, path="/pricing"))
    clock.advance(3600 * 10 - clock.now() % 86400)  # 10:00 UTC
    config = bridge_config(tmp_path, sandbox_url, "[budget]\ncost_per_day = 2\n")
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        await post(http, url, "+12025550101", "first")  # billed 0.5
        await steps(bridge, clock, 30)
        beirut = [await post(http, url, f"+9617112345{i}", "same") for i in range(4)]
        await steps(bridge, clock, 60)
        states = [(await bridge.store.get(i)).state for i in beirut]
    assert sum(e.cost for e in sandbox_state.entries) <= 2
    assert states.count(State.SENT) == 1 and states.count(State.QUEUED) == 3


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ("[budget]\nparts_per_day = -1\n", "budget.parts_per_day"),
        ("[budget]\nlow_balance = -5\n", "budget.low_balance"),
        (
            '[routes.am]\nformat = "generic"\nto = ["+12025550101"]\npublic = true\n'
            "max_texts_per_day = -5\n",
            "routes.am.max_texts_per_day",
        ),
    ],
)
def test_a_negative_cap_is_refused_by_its_own_key(
    tmp_path, sandbox_url: str, extra: str, key: str
) -> None:
    """A negative parts_per_day was reported as `budget.texts_per_day`; a route's
    negative max_texts_per_day and a negative low_balance loaded as no cap, no warning."""
    with pytest.raises(ConfigError) as refused:
        bridge_config(tmp_path, sandbox_url, extra)
    assert [k for k, _ in refused.value.problems] == [key]


@on_each_backend
async def test_the_console_shows_today_as_the_caps_count_it(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """The overview counted the admins' warning in today's parts (the caps leave it
    out: "3 of 3" parts shown while one more part could go) and never showed the cost
    cap at all, nor said that texts over it wait."""
    admin = "+12025550199"
    extra = TOKENS + f'[budget]\nparts_per_day = 3\ncost_per_day = 5\nadmin = ["{admin}"]\n'
    config = bridge_config(tmp_path, sandbox_url, extra)
    async with (
        running_bridge(config, clock) as (bridge, url),
        httpx.AsyncClient(base_url=url) as http,
    ):
        await bridge.dispatcher.run_once()  # the price list
        for i in range(3):  # the third crosses the parts cap: a warning goes
            await send(http, f"+120255501{i:02d}", f"text {i} " + "x" * 200 * (i == 0))
        await steps(bridge, clock, 30)
        assert [e.to for e in sandbox_state.entries].count(admin) == 1
        await sign_in(http, READER)
        today = (await http.get("/ui/overview.json")).json()["today"]
        page = (await http.get("/ui/")).text
    assert today["texts"] == 2 and today["parts"] == 3 and today["warnings"] == 1
    assert today["caps"]["cost_per_day"] == 5 and today["counted_cost"] == 1.5
    assert "1.5 of 5 counted against the cap" in page


async def test_an_unpriced_text_goes_alone_not_beside_priced_ones(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """One text to a Lebanese number the list leaves out (priced at its highest, 1.0,
    over the cap of 0.8: a guess) and four US numbers listed at 0.2. Counted at 0 until
    its bill, it went in one bulk call with the four, which filled the cap: 1.5 + 4 x 0.5
    billed against 0.8. Now it goes alone; its bill (1.5) spends the day."""
    body = (
        '{"success": true, "data": {"countries": [{"country_code": "+1", "price": 0.2},'
        ' {"country_code": "+44", "price": 1.0}]}}'
    )
    sandbox_state.faults.append(Fault(status=200, body=body, path="/pricing"))
    config = bridge_config(tmp_path, sandbox_url, "[budget]\ncost_per_day = 0.8\n")
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        await bridge.dispatcher.run_once()  # the list
        for to in ["+96171123456"] + [f"+120255501{i:02d}" for i in range(4)]:
            await post(http, url, to, "same")
        await steps(bridge, clock, 30)
    assert [e.to for e in sandbox_state.entries] == ["+96171123456"]


async def test_a_cap_raised_by_a_reload_that_bites_again_is_warned_of_again(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """One warning a day for every cap: an operator who raised texts_per_day from 1 to 2
    during an incident never heard that 2 was reached as well."""
    admin = "+12025550199"
    budget = '[budget]\ntexts_per_day = {}\nadmin = ["' + admin + '"]\n'
    clock.advance(3600 * 10 - clock.now() % 86400)  # 10:00 UTC
    config = bridge_config(tmp_path, sandbox_url, budget.format(1))
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        for i in range(3):
            await post(http, url, f"+120255501{i:02d}", f"alert {i}")
        await steps(bridge, clock, 30)
        reloaded(bridge, tmp_path, sandbox_url, budget.format(2))
        await steps(bridge, clock, 30)
    warnings = [e.message for e in sandbox_state.entries if e.to == admin]
    assert len(warnings) == 2, warnings
    assert "texts_per_day=1" in warnings[0] and "texts_per_day=2" in warnings[1]


@on_each_backend
async def test_a_text_the_caps_let_go_is_no_longer_held_by_the_budget(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """A text that once waited for midnight kept the reason kind `budget` through its
    send: refused by the provider, it showed as failed by the budget (in /metrics and
    `?reason=budget`), and a later reload that raised a cap "released" it from a retry's
    backoff. The kind goes when the caps let it go, as an unknown outcome's does."""
    clock.advance(3600 * 10 - clock.now() % 86400)  # 10:00 UTC
    config = bridge_config(tmp_path, sandbox_url, "[budget]\ntexts_per_day = 1\n")
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        _, second = [await post(http, url, f"+120255501{i:02d}", f"a{i}") for i in range(2)]
        await steps(bridge, clock, 30)
        sandbox_state.faults.append(Fault(status=400, path="/send"))  # refused for good
        reloaded(bridge, tmp_path, sandbox_url, "[budget]\ntexts_per_day = 5\n")
        await steps(bridge, clock, 30)
        message = (await http.get(f"{url}/api/v1/messages/{second}")).json()
        held = (await http.get(f"{url}/api/v1/messages", params={"reason": "budget"})).json()
        metrics = (await http.get(f"{url}/metrics")).text
    assert message["state"] == "failed" and "provider refused" in message["reason"]
    assert message["reason_kind"] != "budget"
    assert held["messages"] == []
    assert 'state="failed",reason="budget"' not in metrics


@on_each_backend
async def test_a_text_held_until_midnight_is_retried_then_and_due_since_then(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """texts_per_day = 1 and two alerts at 10:00 UTC: the second waits for 00:00. Its
    claim then forgot the hold (the reason kind `budget`), so its age counted from
    10:00: one 500 at 00:00 failed it ("gave up after 2 attempts", 14 h past
    provider.retry_max_age), and /metrics read it as queued for 14 h. Now it is due
    since 00:00 (its due_at): retried and sent, and its age is the retry's seconds."""
    clock.advance(3600 * 10 - clock.now() % 86400)  # 10:00 UTC
    config = bridge_config(tmp_path, sandbox_url, "[budget]\ntexts_per_day = 1\n")
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        _, second = [await post(http, url, f"+120255501{i:02d}", f"alert {i}") for i in range(2)]
        await steps(bridge, clock, 30)
        assert len(sandbox_state.entries) == 1
        clock.advance(86400 - clock.now() % 86400)  # 00:00 UTC: the caps' new day
        sandbox_state.faults.append(Fault(status=500, path="/send"))
        await bridge.dispatcher.run_once()  # claimed, answered 500
        for _ in range(100):  # the attempt's outcome stored
            if (await bridge.store.get(second)).state != State.SENDING:
                break
            await steps(bridge, clock, 0.1)
        retrying = (await http.get(f"{url}/api/v1/messages/{second}")).json()
        age = queue_age((await http.get(f"{url}/metrics")).text)
        await steps(bridge, clock, 120)
        sent = (await http.get(f"{url}/api/v1/messages/{second}")).json()
    assert [r.status for r in sandbox_state.requests if r.path.endswith("/send")][-2:] == [500, 200]
    assert retrying["state"] == "queued" and "retrying" in retrying["reason"], retrying
    assert age < 60
    assert sent["state"] == "sent" and sent["attempts"] == 2, sent
    assert len(sandbox_state.entries) == 2


@on_each_backend
async def test_a_text_an_operator_retries_a_day_later_gets_its_retries(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """A text failed yesterday (the provider refused it) and retried by an operator
    today kept its due time of yesterday: its first 500 today failed it again at once,
    a day past provider.retry_max_age. An operator's retry makes it due now."""
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        mid = await post(http, url, "+12025550101", "disk full on db-1")
        sandbox_state.faults.append(Fault(status=400, path="/send"))
        await steps(bridge, clock, 30)
        assert (await bridge.store.get(mid)).state == State.FAILED
        clock.advance(86400)
        assert await bridge.store.retry([mid], clock.now(), by="ops") == [mid]
        sandbox_state.faults.append(Fault(status=500, path="/send"))
        await steps(bridge, clock, 300)
        retried = await bridge.store.get(mid)
    assert [r.status for r in sandbox_state.requests if r.path.endswith("/send")] == [400, 500, 200]
    assert retried.state in (State.SENT, State.DELIVERED), retried.reason


@on_each_backend
async def test_texts_held_for_tomorrow_or_kept_for_their_time_are_not_waiting(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """`sms_bridge_oldest_queued_age_seconds` and the overview's oldest age counted a
    text waiting for 00:00 (a daily cap) or kept by the bridge for its schedule_time as
    waiting since it was stored: two hours later the recommended `> 600` alert fired with
    nothing late. The age is now from when a message became due."""
    clock.advance(3600 * 10 - clock.now() % 86400)  # 10:00 UTC
    sandbox_state.shape = Shape(timezone="America/New_York")
    ci = "ci-token-0123456789abcdef"
    extra = (
        f'[tokens.ci]\ntoken = "{ci}"\nscopes = ["send"]\ntexts_per_day = 1\n'
        f'[tokens.ops]\ntoken = "{READER}"\nscopes = ["read"]\n'
        f'[tokens.root]\ntoken = "{ADMIN}"\nscopes = ["admin"]\n'
    )
    config = bridge_config(tmp_path, sandbox_url, extra, timezone="America/New_York")

    async with (
        running_bridge(config, clock) as (bridge, url),
        httpx.AsyncClient(base_url=url) as http,
    ):

        async def post_as(token: str, body: dict[str, str]) -> int:
            answer = await http.post(
                "/api/v1/messages", json=body, headers={"Authorization": f"Bearer {token}"}
            )
            assert answer.status_code == 202, answer.text
            return int(answer.json()["ids"][0])

        async def ages() -> tuple[float, object]:
            reader = {"Authorization": f"Bearer {READER}"}
            metrics = (await http.get("/metrics", headers=reader)).text
            overview = (await http.get("/ui/overview.json", headers=reader)).json()
            return queue_age(metrics), overview["queue"]["oldest_age_seconds"]

        await post_as(ci, {"to": "+12025550100", "message": "alert 0"})
        await post_as(ci, {"to": "+12025550101", "message": "alert 1"})  # over the cap
        # 01:30 of a fall-back night in New York: kept by the bridge until then.
        at = "2027-11-07T01:30:00-05:00"
        await post_as(ci, {"to": "+12025550102", "message": "rotate", "schedule_time": at})
        await steps(bridge, clock, 30)
        assert len(sandbox_state.entries) == 1
        clock.advance(2 * 3600)  # 12:00: nothing is late
        assert await ages() == (0, None)
        clock.advance(86400 + 60 - clock.now() % 86400)  # 00:01: alert 1 goes
        await steps(bridge, clock, 30)
        assert len(sandbox_state.entries) == 2
        assert await ages() == (0, None)  # the scheduled one still waits for its time
        sandbox_state.faults.append(Fault(status=500, times=1000, path="/send"))
        late = await post_as(ADMIN, {"to": "+12025550103", "message": "late"})  # failing
        await steps(bridge, clock, 700, cap=60)
        while (await bridge.store.get(late)).state != State.QUEUED:  # not mid-attempt
            await steps(bridge, clock, 1)
        age, shown = await ages()
    assert 700 <= age < 800 and shown == pytest.approx(age, abs=1)


# -- what the provider may have billed -------------------------------------------------
EMPTY_LOGS = '{"success": true, "data": [], "pagination": {"last_page": 1}}'


@on_each_backend
@pytest.mark.parametrize(
    ("cap", "today_shows"),
    [
        ("cost_per_day = 1", {"counted_cost": 1.0}),  # a US part 0.5: billed twice, the cap
        ("parts_per_day = 2", {"parts": 2, "texts": 1}),  # one part, billed twice
    ],
)
async def test_a_text_sent_again_after_an_unknown_outcome_counts_every_attempt(
    tmp_path,
    clock: ManualClock,
    sandbox_state: SandboxState,
    sandbox_url: str,
    cap: str,
    today_shows: dict[str, float],
) -> None:
    """The provider takes a one-part text and its answer is lost (a read timeout); its
    /logs does not show it yet, so the text is sent again: billed twice. The cost cap
    (and then the parts cap) counted it once, and the next text went too: 1.5 billed
    against a cost cap of 1, three parts against a parts cap of 2. Every attempt is
    counted now, by both caps and by the console: the next text waits for tomorrow."""
    sandbox_state.faults += [
        Fault(status=0, delay=0.6, path="/send"),  # taken, answered past the timeout
        Fault(status=200, body=EMPTY_LOGS, path="/logs"),  # not shown there (yet)
    ]
    clock.advance(3600 * 10 - clock.now() % 86400)  # 10:00 UTC
    config = bridge_config(tmp_path, sandbox_url, f"{TOKENS}[budget]\n{cap}\n", timeout="0.2s")
    async with (
        running_bridge(config, clock) as (bridge, url),
        httpx.AsyncClient(base_url=url) as http,
    ):
        await bridge.dispatcher.run_once()  # the price list
        first = await send(http, "+12025550101", "db-1 down")
        await steps(bridge, clock, 60)
        resent = await bridge.store.get(first)
        second = await send(http, "+12025550102", "db-2 down")
        await steps(bridge, clock, 60)
        waiting = await bridge.store.get(second)
        await sign_in(http, READER)
        today = (await http.get("/ui/overview.json")).json()["today"]
    assert resent.unknown_resends == 1 and resent.state == State.SENT
    assert [e.to for e in sandbox_state.entries] == ["+12025550101"] * 2  # billed twice
    assert waiting.state == State.QUEUED and cap.replace(" ", "") in (waiting.reason or "")
    assert {key: today[key] for key in today_shows} == today_shows  # counted as the caps do


@on_each_backend
async def test_prices_learnt_from_bills_outlive_a_restart(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """No price list (404). A US text is billed 0.5 a part; the bridge restarts. The bill's
    price lived in memory only: after the restart US texts were stored unpriced and went
    one alone first, "its bill prices the rest", as on a first start. The store keeps it:
    they are priced at once, and go together."""
    sandbox_state.faults.append(Fault(status=404, times=100, path="/pricing"))
    clock.advance(3600 * 10 - clock.now() % 86400)  # 10:00 UTC
    config = bridge_config(tmp_path, sandbox_url, "[budget]\ncost_per_day = 5\n")
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        await post(http, url, "+12025550101", "first")  # billed 0.5
        await steps(bridge, clock, 30)
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        after = [await post(http, url, f"+120255502{i:02d}", "after") for i in range(3)]
        await steps(bridge, clock, 30)
        estimates = [(await bridge.store.get(i)).estimated_cost for i in after]
        states = [(await bridge.store.get(i)).state for i in after]
    sends = [r.path.rsplit("/", 1)[-1] for r in sandbox_state.requests if "send" in r.path]
    assert estimates == [0.5] * 3 and states == [State.SENT] * 3
    assert sends == ["send", "send-bulk"]  # the three in one call


NO_COST = '{"success": true, "message": "SMS sent successfully", "data": {"balance": 90}}'


def _nothing_priced_at_ten(
    tmp_path: Path, sandbox_url: str, sandbox_state: SandboxState, clock: ManualClock
) -> Config:
    """10:00 UTC, a cost cap of 1, no price list (404) and send answers without a cost."""
    sandbox_state.faults += [
        Fault(status=404, times=100, path="/pricing"),
        Fault(status=200, body=NO_COST, taken=True, times=100, path="/send"),
    ]
    clock.advance(3600 * 10 - clock.now() % 86400)
    return bridge_config(tmp_path, sandbox_url, "[budget]\ncost_per_day = 1\n")


@on_each_backend
async def test_texts_whose_cost_nobody_can_tell_do_not_pass_a_cost_cap(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """No price list (404), and send answers without a cost: every text went alone, each
    "priced by its bill", a bill that never said: counted as 0, four US texts (2.0) went
    against a cap of 1. After the first, the day's spend is unknown: the others wait,
    saying so. When a price is known (the list answers), they are judged again at once:
    one more fits (1.0), two wait for tomorrow."""
    config = _nothing_priced_at_ten(tmp_path, sandbox_url, sandbox_state, clock)
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        ids = [await post(http, url, f"+120255501{i:02d}", f"alert {i}") for i in range(4)]
        await steps(bridge, clock, 30)
        held = [await bridge.store.get(i) for i in ids[1:]]
        billed_before = len(sandbox_state.entries)
        sandbox_state.faults.clear()  # the list answers from now on
        await steps(bridge, clock, 600)
        states = [(await bridge.store.get(i)).state for i in ids]
    assert billed_before == 1
    assert all(m.state == State.QUEUED and "spend unknown" in (m.reason or "") for m in held)
    assert states.count(State.SENT) == 2 and states.count(State.QUEUED) == 2
    assert sum(e.cost for e in sandbox_state.entries) <= 1


@pytest.mark.parametrize("retry_after", ["30", None])
async def test_a_429_to_the_price_list_pauses_the_sends_too(
    retry_after: str | None,
    tmp_path,
    clock: ManualClock,
    sandbox_state: SandboxState,
    sandbox_url: str,
) -> None:
    """The key's window is full at the provider: the price list's 429 was taken for a
    failed fetch alone, and the same step sent the queued text at once, into the same
    window (a second 429, or a text the provider counted past its limit). Every request
    now waits: Retry-After when given, else the backoff of a send's 429."""
    sandbox_state.faults.append(Fault(status=429, retry_after=retry_after, path="/pricing"))
    config = bridge_config(tmp_path, sandbox_url, "[budget]\ncost_per_day = 5\n")
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        await post(http, url, "+12025550101", "db-1 down")
        await steps(bridge, clock, 60)
    refused, *later = [r for r in sandbox_state.requests if r.path.endswith(("/pricing", "/send"))]
    assert refused.status == 429
    pause = 30 if retry_after else bridge.dispatcher.limiter.backoff_initial * 0.99
    assert later and all(r.at >= refused.at + pause for r in later), later


@on_each_backend
async def test_texts_waiting_for_a_price_are_judged_again_when_one_is_known_after_a_restart(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """Texts waiting because the day's spend was unknown, and a restart: the price list
    answers only after it (its retry). What waited for a price was released by the
    process that held it; after the restart nobody watched for one, and they waited for
    midnight. The start sees what they wait for: released as the list answers."""
    config = _nothing_priced_at_ten(tmp_path, sandbox_url, sandbox_state, clock)
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        ids = [await post(http, url, f"+120255501{i:02d}", f"alert {i}") for i in range(4)]
        await steps(bridge, clock, 30)  # one goes; the day's spend is unknown
    async with running_bridge(config, clock) as (bridge, url):
        await steps(bridge, clock, 30)  # the list still fails
        sandbox_state.faults.clear()  # and answers from now on
        await steps(bridge, clock, 600)
        states = [(await bridge.store.get(i)).state for i in ids]
    assert states.count(State.SENT) == 2 and states.count(State.QUEUED) == 2
    assert sum(e.cost for e in sandbox_state.entries) <= 1


@on_each_backend
async def test_a_price_cut_lowers_the_most_a_part_was_billed_a_day_later(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """No price list (404), cost_per_day = 1. A Lebanese part was billed 0.95 yesterday;
    the provider has cut it to 0.1 since. The most a part was billed prices a country
    never billed (a UK text, alone): raised only, it stayed 0.95 for ever, and after
    today's 0.1 the UK text waited for tomorrow (0.1 + 0.95 over the cap), every day.
    A day after the 0.95 bill, today's bill says what a part costs."""
    sandbox_state.prices[961] = 0.95
    sandbox_state.faults.append(Fault(status=404, times=1000, path="/pricing"))
    clock.advance(3600 * 10 - clock.now() % 86400)  # 10:00 UTC
    config = bridge_config(tmp_path, sandbox_url, "[budget]\ncost_per_day = 1\n")
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        await post(http, url, "+9613123456", "yesterday")
        await steps(bridge, clock, 30)
        clock.advance(86400)  # the next day, 10:00
        sandbox_state.prices[961] = 0.1
        await post(http, url, "+9613123457", "today")
        await steps(bridge, clock, 30)
        uk = await post(http, url, "+447700900123", "today")
        await steps(bridge, clock, 30)
        sent = await bridge.store.get(uk)
    assert [e.cost for e in sandbox_state.entries] == [0.95, 0.1, 0.8]
    assert sent.state == State.SENT, sent.reason


@on_each_backend
async def test_a_price_known_now_frees_only_what_waited_for_one(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """No price list and answers without a cost: after the first text, what follows
    waits "spend unknown"; a text of a token over its own cap waits for that cap. When
    the list answers, every budget hold was released, the token's text too, and held
    again at once: two events of nothing in its history at every price. Only what
    waited for a price is judged again now."""
    config = _nothing_priced_at_ten(tmp_path, sandbox_url, sandbox_state, clock)
    tokens = (
        f'[tokens.ci]\ntoken = "{SENDER}"\nscopes = ["send"]\ntexts_per_day = 1\n'
        f'[tokens.root]\ntoken = "{ADMIN}"\nscopes = ["admin"]\n'
    )
    config = bridge_config(tmp_path, sandbox_url, tokens + "[budget]\ncost_per_day = 1\n")

    async def ci(http: httpx.AsyncClient, to: str) -> int:
        headers = {"Authorization": f"Bearer {SENDER}"}
        answer = await http.post(
            "/api/v1/messages", json={"to": to, "message": to}, headers=headers
        )
        assert answer.status_code == 202, answer.text
        return int(answer.json()["ids"][0])

    async with (
        running_bridge(config, clock) as (bridge, url),
        httpx.AsyncClient(base_url=url) as http,
    ):
        await ci(http, "+12025550101")
        await steps(bridge, clock, 30)  # it goes; today's spend is unknown
        token_held = await ci(http, "+12025550102")
        priced = await send(http, "+12025550103", "alert")
        await steps(bridge, clock, 30)
        before = await bridge.store.get(token_held)
        sandbox_state.faults.clear()  # the list answers from now on
        await steps(bridge, clock, 600)
        events = [e["detail"] or "" for e in await bridge.store.events(token_held)]
        freed = await bridge.store.get(priced)
    assert "tokens.ci.texts_per_day=1" in (before.reason or "")
    assert freed.state == State.SENT
    assert not any(PRICED_NOW in e for e in events), events
    assert sum("daily budget reached" in e for e in events) == 1, events


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
@pytest.mark.usefixtures("backend")
async def test_texts_another_instance_held_for_a_price_are_released_by_a_live_one(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """Two instances on one PostgreSQL. One holds texts because today's spend is unknown
    and is then removed for good. Only it (or one started later) watched for a price:
    the other, running all along, knew one as soon as the list answered, and the texts
    waited for midnight. Any live instance that knows a price releases them."""
    config = _nothing_priced_at_ten(tmp_path, sandbox_url, sandbox_state, clock)
    async with running_bridge(config, clock) as (live, _):
        async with running_bridge(config, clock) as (gone, url), httpx.AsyncClient() as http:
            ids = [await post(http, url, f"+120255501{i:02d}", f"alert {i}") for i in range(4)]
            await steps(gone, clock, 30)  # one goes; the day's spend is unknown
        sandbox_state.faults.clear()  # the list answers from now on
        await steps(live, clock, 600)
        states = [(await live.store.get(i)).state for i in ids]
    assert states.count(State.SENT) == 2 and states.count(State.QUEUED) == 2
    assert sum(e.cost for e in sandbox_state.entries) <= 1


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
@pytest.mark.usefixtures("backend")
async def test_an_instance_without_a_price_leaves_texts_released_for_one_alone(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """Two instances on one PostgreSQL; one's price list fails (it knows no price), the
    other's answers. Texts wait "spend unknown". The priced instance releases them; the
    unpriced one, woken too, claimed them first and held them again (spend still
    unknown there), and a minute later the priced one released them again: two events
    per text a minute until the priced one won the race. The unpriced instance leaves
    them due for the priced one, without spinning on them."""
    # The unpriced instance's provider: no price list, and sends answered without cost.
    unpriced_state = SandboxState(clock=clock, api_key="test-key")
    _nothing_priced_at_ten(tmp_path, sandbox_url, unpriced_state, clock)
    async with served(create_sandbox_app(unpriced_state)) as unpriced_url:
        cap = "[budget]\ncost_per_day = 1\n"
        unpriced_config = bridge_config(
            tmp_path, unpriced_url, f'{cap}[cluster]\ninstance = "unpriced"\n'
        )
        priced_config = bridge_config(
            tmp_path, sandbox_url, f'{cap}[cluster]\ninstance = "priced"\n'
        )
        async with (
            running_bridge(unpriced_config, clock) as (unpriced, url),
            running_bridge(priced_config, clock) as (priced, _),
            httpx.AsyncClient() as http,
        ):
            ids = [await post(http, url, f"+120255501{i:02d}", f"alert {i}") for i in range(4)]
            await steps(unpriced, clock, 30)  # one goes; the day's spend is unknown
            await priced.dispatcher.run_once()  # its list answers
            waits = []
            for _ in range(5):  # the race the unpriced instance won, five minutes running
                await priced.dispatcher.release_holds()
                waits.append(await unpriced.dispatcher.run_once())
                await steps(unpriced, clock, 60)
            events = {i: [e["detail"] or "" for e in await priced.store.events(i)] for i in ids[1:]}
            await steps(priced, clock, 30)
            states = [(await priced.store.get(i)).state for i in ids]
    assert all(sum(PRICED_NOW in e for e in es) == 1 for es in events.values()), events
    assert all(sum("spend unknown" in e for e in es) == 1 for es in events.values()), events
    assert min(waits) >= 1.0, waits  # it does not spin on what it leaves
    assert states.count(State.SENT) == 2 and states.count(State.QUEUED) == 2
    assert sum(e.cost for e in sandbox_state.entries) <= 1


@on_each_backend
async def test_texts_left_for_a_priced_instance_do_not_starve_what_is_due_behind_them(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """An instance that knows no price leaves texts released today (here by a reload)
    that wait for a price due, for one that knows one. The step reads only as many
    texts as the rate budget can send, and read past those it leaves once: with more
    left texts than that (six, two requests a minute), a text queued after them was
    never read, left due with no reason, unjudged, until midnight. It is judged: held
    with the reason the others have."""
    _nothing_priced_at_ten(tmp_path, sandbox_url, sandbox_state, clock)
    caps = "[budget]\ncost_per_day = {}\n"
    config = bridge_config(tmp_path, sandbox_url, caps.format(1), requests_per_minute=2)
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        ids = [await post(http, url, f"+120255501{i:02d}", f"alert {i}") for i in range(7)]
        await steps(bridge, clock, 120)  # one goes; the day's spend is unknown
        held = [(await bridge.store.get(i)).reason or "" for i in ids[1:]]
        assert all("spend unknown" in reason for reason in held), held
        reloaded(bridge, tmp_path, sandbox_url, "requests_per_minute = 2\n" + caps.format(2))
        await steps(bridge, clock, 120)  # released by the reload: left for a priced one
        behind = await post(http, url, "+12025550199", "disk full")
        await steps(bridge, clock, 120)
        late = await bridge.store.get(behind)
        left = [await bridge.store.get(i) for i in ids[1:]]
    assert all(m.state == State.QUEUED and m.next_attempt_at <= clock.now() for m in left)
    assert late.state == State.QUEUED and "spend unknown" in (late.reason or ""), late
    assert len(sandbox_state.entries) == 1


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
@pytest.mark.usefixtures("backend")
async def test_a_text_one_instance_released_for_its_raised_cap_and_another_holds_is_told(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str, caplog
) -> None:
    """Two instances, texts_per_day = 1; one is reloaded with 3, the other is not. The
    reloaded one releases what waits; the other takes it and holds it again by its own
    cap of 1. Caps are each instance's config (the text waits by the cap of the instance
    that judged it), but nothing said the cluster's caps differ: the log names both
    instances' caps, and a metric counts it."""
    config = bridge_config(tmp_path, sandbox_url, "[budget]\ntexts_per_day = 1\n")
    async with (
        running_bridge(config, clock) as (raised, url),
        running_bridge(config, clock) as (stale, stale_url),
        httpx.AsyncClient() as http,
    ):
        clock.advance(3600 * 10 - clock.now() % 86400)  # 10:00 UTC
        await post(http, url, "+12025550101", "db-1 down")
        await steps(raised, clock, 30)
        waiting = await post(http, url, "+12025550102", "db-2 down")
        await steps(raised, clock, 30)
        reloaded(raised, tmp_path, sandbox_url, "[budget]\ntexts_per_day = 3\n")
        await raised.dispatcher.release_holds()  # due now: the other instance takes it
        await steps(stale, clock, 30)
        held = await stale.store.get(waiting)
        metrics = (await http.get(f"{stale_url}/metrics")).text
    assert held.state == State.QUEUED and "texts_per_day=1" in (held.reason or "")
    told = [r.getMessage() for r in caplog.records if "caps differ" in r.getMessage()]
    assert len(told) == 1 and "texts_per_day=3" in told[0], told
    assert "\nsms_bridge_budget_cap_mismatch_total 1.0\n" in metrics


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("path", ["start", "midnight"])
async def test_a_text_held_again_by_a_lower_cap_is_told_whatever_released_it(
    path: str, tmp_path, clock: ManualClock, sandbox_url: str, caplog
) -> None:
    """Two instances: "high" with texts_per_day = 1 then 2, "low" with 1 (not reloaded).
    Texts "high" held are released by its start with a cap raised to 3, or by the day's
    end (held by its cap of 2); "low" holds one again by its cap of 1. Only a reload's
    release named its caps, so these were held again silently: no log, no
    `sms_bridge_budget_cap_mismatch_total`."""
    clock.advance(3600 * 10 - clock.now() % 86400)  # 10:00 UTC
    low = bridge_config(tmp_path, sandbox_url, "[budget]\ntexts_per_day = 1\n")
    high = '[cluster]\ninstance = "high"\n[budget]\ntexts_per_day = '
    async with (
        running_bridge(low, clock) as (stale, stale_url),
        httpx.AsyncClient() as http,
    ):
        # Held at start by a cap equal to "low"'s: only the start's release differs.
        first = high + ("1\n" if path == "start" else "2\n")
        async with running_bridge(bridge_config(tmp_path, sandbox_url, first), clock) as (
            raised,
            url,
        ):
            for i in range(4):
                await post(http, url, f"+120255501{i:02d}", f"db-{i} down")
                await steps(raised, clock, 30)  # one or two go, the rest wait for midnight
        if path == "start":
            again = bridge_config(tmp_path, sandbox_url, high + "3\n")
            async with running_bridge(again, clock) as (restarted, _):
                await restarted.dispatcher.load_budget()  # released: raised while stopped
        else:
            clock.advance(86400 - clock.now() % 86400)  # 00:00 UTC
        await steps(stale, clock, 30)
        metrics = (await http.get(f"{stale_url}/metrics")).text
    told = [r.getMessage() for r in caplog.records if "caps differ" in r.getMessage()]
    # "high" and its claims' tag (`instance_name`): who released it, as its claims say.
    judged_by_high = re.compile(r"by high:[0-9a-f]{6}, whose caps are texts_per_day=")
    assert told and all(judged_by_high.search(t) for t in told), told
    assert f"\nsms_bridge_budget_cap_mismatch_total {len(told)}.0\n" in metrics  # each told


@on_each_backend
async def test_a_start_with_a_price_known_frees_only_what_waited_for_one(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """As when a price becomes known while running, so at start: texts wait "spend
    unknown" and one for its token's cap; a bill (another instance's) prices a part
    while the bridge is stopped. The start released every budget hold as "raised while
    the bridge was stopped", the token's text too, held again at once. Only what waited
    for a price is judged again."""
    tokens = (
        f'[tokens.ci]\ntoken = "{SENDER}"\nscopes = ["send"]\ntexts_per_day = 1\n'
        f'[tokens.root]\ntoken = "{ADMIN}"\nscopes = ["admin"]\n'
    )
    _nothing_priced_at_ten(tmp_path, sandbox_url, sandbox_state, clock)
    config = bridge_config(tmp_path, sandbox_url, tokens + "[budget]\ncost_per_day = 1\n")
    ci = {"Authorization": f"Bearer {SENDER}"}
    async with (
        running_bridge(config, clock) as (bridge, url),
        httpx.AsyncClient(base_url=url) as http,
    ):
        first = {"to": "+12025550101", "message": "a"}
        assert (await http.post("/api/v1/messages", json=first, headers=ci)).status_code == 202
        await steps(bridge, clock, 30)  # it goes; today's spend is unknown
        second = {"to": "+12025550102", "message": "b"}
        answer = await http.post("/api/v1/messages", json=second, headers=ci)
        token_held = int(answer.json()["ids"][0])
        priced = await send(http, "+12025550103", "alert")
        await steps(bridge, clock, 30)
        await bridge.store.record_billed({0: 0.5, 1: 0.5}, clock.now())  # another's bill
    async with running_bridge(config, clock) as (bridge, _):
        await steps(bridge, clock, 30)
        events = [e["detail"] or "" for e in await bridge.store.events(token_held)]
        freed = await bridge.store.get(priced)
    assert freed.state == State.SENT, freed.reason
    assert sum("daily budget reached" in e for e in events) == 1, events


@on_each_backend
async def test_an_idle_bridge_with_a_cost_cap_writes_nothing_while_nothing_waits(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """A cost cap and a price known: every minute the dispatcher looks for texts any
    instance held for a price (`PRICE_HOLDS_LOOK`). Each look was a committed write
    releasing nothing (SQLite: a commit of the writer, an fsync; PostgreSQL: an UPDATE
    of nothing), all day on an idle bridge. Nothing waits: nothing is written."""
    clock.advance(3600 * 10 - clock.now() % 86400)  # 10:00 UTC
    config = bridge_config(tmp_path, sandbox_url, "[budget]\ncost_per_day = 5\n")
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        await post(http, url, "+12025550101", "db-1 down")
        await steps(bridge, clock, 60)  # sent, billed, priced
        before = bridge.store.stats().transactions
        await steps(bridge, clock, 300, cap=60)
        after = bridge.store.stats().transactions
    assert any(r.path.endswith("/pricing") for r in sandbox_state.requests)
    assert after == before


@on_each_backend
async def test_the_most_a_part_was_billed_recalled_at_start_falls_a_day_after_its_bill(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """No price list (404). A Lebanese part was billed 0.95; the bridge restarts and a US
    part is billed 0.1 an hour later. The store keeps 0.95 as the most a part was billed
    for a day after its bill; the price book recalled it without its time (as if billed
    at 0), so the 0.1 bill replaced it here at once: this process priced unlisted
    countries at 0.1 while the store (and every other instance) said 0.95."""
    sandbox_state.prices[961], sandbox_state.prices[1] = 0.95, 0.1
    sandbox_state.faults.append(Fault(status=404, times=1000, path="/pricing"))
    clock.advance(3600 * 10 - clock.now() % 86400)  # 10:00 UTC
    config = bridge_config(tmp_path, sandbox_url, "[budget]\ncost_per_day = 5\n")
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        await post(http, url, "+9613123456", "yesterday")
        await steps(bridge, clock, 30)
    clock.advance(3600)
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        await post(http, url, "+12025550101", "now")
        await steps(bridge, clock, 30)
        here = bridge.dispatcher.prices
        kept = (await bridge.store.billed_prices())[0]
    assert [e.cost for e in sandbox_state.entries] == [0.95, 0.1]
    assert here is not None and (here.billed_max, here.billed_max_at) == kept
    assert kept[0] == 0.95
