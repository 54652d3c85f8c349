"""Storm control, deduplication, budgets and cost estimates, on a manual clock."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime

import httpx
import pytest

from bridge.clock import ManualClock
from bridge.models import State
from bridge.provider.sandbox import SandboxState
from tests.helpers import bridge_config, max_in_window, pump, running_bridge
from tests.stores import faulty_store

# Run on each store backend (tests/conftest.py `backend`).
on_each_backend = pytest.mark.usefixtures("backend")

ONCALL = """
[groups]
oncall = ["+12025550101", "+12025550102"]
[routes.am]
format = "alertmanager"
to = ["oncall"]
public = true
"""


def alert(i: int) -> dict:
    name = "HighLatency" if i % 5 < 3 else "DiskFull"
    return {
        "version": "4",
        "groupKey": f'{{}}:{{alertname="{name}", n="{i}"}}',
        "status": "firing",
        "truncatedAlerts": 0,
        "commonLabels": {"alertname": name},
        "commonAnnotations": {"summary": "trouble"},
        "alerts": [
            {
                "status": "firing",
                "fingerprint": f"{i:016x}",
                "labels": {"alertname": name, "instance": f"host-{i}"},
                "annotations": {"summary": "trouble"},
            }
        ],
    }


async def settled(bridge) -> bool:
    counts = await bridge.store.counts()
    return not any(counts.get(s) for s in ("queued", "sending", "held"))


@pytest.mark.slow  # over ~2 s
@on_each_backend
async def test_storm_of_500_alerts_to_two_phones(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    extra = ONCALL + '[limits]\nper_recipient = 5\nper_recipient_window = "10m"\n'
    config = bridge_config(tmp_path, sandbox_url, extra)
    start = clock.now()
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        for i in range(500):  # 500 alerts in 60 s, the dispatcher running alongside
            response = await http.post(f"{url}/hooks/am", json=alert(i))
            assert response.status_code == 202
            clock.advance(0.12)
            if i % 50 == 0:
                await bridge.dispatcher.run_once()
        await pump(bridge, clock, lambda: settled(bridge), max_seconds=3600)
        clock.advance(30)
        await pump(bridge, clock, lambda: settled(bridge), max_seconds=60)
        messages = await bridge.store.query(limit=2000)
        stats = (await http.get(f"{url}/api/v1/stats")).json()
        held_listing = (await http.get(f"{url}/api/v1/messages?reason=storm&limit=5")).json()
    alerts = [m for m in messages if m.source == "hook"]
    assert len(alerts) == 1000
    for m in alerts:
        assert m.state in (State.SENT, State.DELIVERED, State.SUPPRESSED), m
        if m.state == State.SUPPRESSED:
            assert m.reason and "digest message" in m.reason
    for phone in ("+12025550101", "+12025550102"):
        texts = [e for e in sandbox_state.entries if e.to == phone]
        digests = [e for e in texts if e.message.startswith("+")]
        normal = [e for e in texts if not e.message.startswith("+")]
        assert len(normal) == 5
        assert len(digests) == 1
        assert max_in_window([e.created_at for e in normal], 600) <= 5
        assert (
            digests[0].message == "+495 more: HighLatency x297, DiskFull x198 (host-5, host-6...)"
        )
        assert digests[0].created_at - start >= 600  # when the window ends
    assert stats["reasons"]["suppressed"]["storm"] == 990
    digests = [m for m in messages if m.source == "digest"]
    assert len(digests) == 2 and {m.estimated_cost for m in digests} == {0.5}  # shaped, priced
    assert len(held_listing["messages"]) == 5


@on_each_backend
async def test_scheduled_texts_count_for_storm_control_when_they_are_due(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """Ten reminders for tomorrow 09:00, stored today, were counted today: seven were
    held and folded into a digest sent today (the reminders never went at their time),
    and an alert of today was held for a storm that was not happening. Tomorrow, an alert
    among the reminders passed uncounted. A scheduled text now counts when it is due."""
    extra = '[limits]\nper_recipient = 3\nper_recipient_window = "10m"\n'
    config = bridge_config(tmp_path, sandbox_url, extra)
    phone = "+12025550143"
    due = clock.now() + 86400 + 3600  # 2027-01-16 09:00 UTC
    iso = datetime.fromtimestamp(due, UTC).isoformat()
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:

        async def post(body: dict) -> dict:
            response = await http.post(f"{url}/api/v1/messages", json={"to": phone, **body})
            return response.json()["messages"][0]

        reminders = [
            await post({"message": f"standup reminder {i}", "schedule_time": iso})
            for i in range(10)
        ]
        today = await post({"message": "db-2 disk full"})
        assert [m["state"] for m in reminders] == ["queued"] * 3 + ["held"] * 7
        assert today["state"] == "queued"

        async def all_sent_today() -> bool:
            counts = await bridge.store.counts()
            return not counts.get("queued") and not counts.get("sending")

        await pump(bridge, clock, all_sent_today, max_seconds=900)
        assert (await bridge.store.counts())["held"] == 7
        # Nothing of tomorrow's went today: no digest, the three reminders scheduled.
        assert [e.message for e in sandbox_state.entries if e.created_at < due - 3600] == [
            *(f"standup reminder {i}" for i in range(3)),
            "db-2 disk full",
        ]
        clock.advance(due + 60 - clock.now())
        among = await post({"message": "db-2 disk full again"})
        assert among["state"] == "held"  # counted with the reminders due at 09:00
        await pump(bridge, clock, lambda: settled(bridge), max_seconds=900)
        messages = {m.id: m for m in await bridge.store.query(limit=100)}
    [digest] = [e for e in sandbox_state.entries if e.message.startswith("+")]
    assert digest.message.startswith("+8 more: ")
    assert digest.created_at >= due + 600  # when tomorrow's storm window ends
    for m in [*reminders[3:], among]:
        assert messages[m["id"]].state == State.SUPPRESSED
        assert "digest message" in messages[m["id"]].reason
    sent = {e.message: e.deliver_from for e in sandbox_state.entries if e.to == phone}
    assert all(sent[f"standup reminder {i}"] == due for i in range(3))


@on_each_backend
async def test_duplicates_inside_and_outside_the_window(
    tmp_path, clock: ManualClock, sandbox_url: str
) -> None:
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (_, url), httpx.AsyncClient() as http:

        async def post(body: dict) -> dict:
            return (await http.post(f"{url}/api/v1/messages", json=body)).json()["messages"][0]

        first = await post({"to": "+12025550143", "message": "Disk full on db-2"})
        same_text = await post({"to": "+12025550143", "message": "disk  FULL on db-2"})
        other_phone = await post({"to": "+12025550144", "message": "Disk full on db-2"})
        keyed_a = await post(
            {"to": "+12025550143", "message": "Disk full on db-2", "dedupe_key": "a"}
        )
        keyed_b = await post(
            {"to": "+12025550143", "message": "Disk full on db-2", "dedupe_key": "b"}
        )
        clock.advance(601)
        later = await post({"to": "+12025550143", "message": "Disk full on db-2"})
    assert first["state"] == "queued"
    assert same_text["state"] == "suppressed" and f"message {first['id']}" in same_text["reason"]
    assert other_phone["state"] == "queued"
    assert keyed_a["state"] == "queued" and keyed_b["state"] == "queued"  # keys never merged
    assert later["state"] == "queued"


@on_each_backend
async def test_per_route_dedupe_window(tmp_path, clock: ManualClock, sandbox_url: str) -> None:
    extra = '[routes.noisy]\nformat = "generic"\nto = ["+12025550143"]\ndedupe_window = "0s"\npublic = true\n'
    config = bridge_config(tmp_path, sandbox_url, extra)
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        for _ in range(3):
            await http.post(f"{url}/hooks/noisy", json={"message": "ping"})
        assert await bridge.store.counts() == {"queued": 3}


# Routes to one phone whose texts carry no key of their own: the text is the key.
FLAPPING = "".join(
    f'[routes.{name}]\nformat = "{form}"\nto = ["+12025550143"]\npublic = true\n{more}\n'
    for name, form, more in (
        ("grafana", "grafana", ""),
        ("kuma", "generic", 'text_path = "msg"'),
        ("other", "generic", 'text_path = "msg"'),
    )
)


def legacy_grafana(state: str) -> dict:
    """A legacy Grafana alert (no group key, no fingerprint: its text is its key)."""
    return {
        "ruleName": "Host down",
        "ruleId": 7,
        "ruleUrl": "http://grafana.example/d/7",
        "state": state,
        "title": f"[{state.title()}] Host down",
        "message": "web-1 does not answer",
        "tags": {},
        "evalMatches": [],
    }


@on_each_backend
async def test_a_text_keyed_alert_that_flaps_back_is_news_and_its_retry_is_not(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """Text-keyed routes (legacy Grafana, generic without dedupe_path): a repeat is a
    duplicate only while its key is still the route's last word to the phone."""
    config = bridge_config(tmp_path, sandbox_url, FLAPPING)
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:

        async def post(route: str, body: dict) -> dict:
            response = await http.post(f"{url}/hooks/{route}", json=body)
            assert response.status_code == 202, response.text
            clock.advance(120)  # all within the 10 minutes' dedupe window
            return response.json()["messages"][0]

        grafana = [await post("grafana", legacy_grafana(s)) for s in ("alerting", "ok", "alerting")]
        grafana.append(await post("grafana", legacy_grafana("alerting")))  # its retry
        down, up = {"msg": "[shop] [Down] timeout"}, {"msg": "[shop] [Up] 200 - OK"}
        kuma = [await post("kuma", body) for body in (down, up, down, down)]
        # Another route's words to the phone are not this route's news: a repeat after
        # them is still a repeat.
        before = await post("kuma", {"msg": "disk full"})
        await post("other", {"msg": "something else"})
        again = await post("kuma", {"msg": "disk full"})
        await pump(bridge, clock, lambda: settled(bridge), max_seconds=600)
    for first, change, flap, retry in (grafana, kuma):
        assert [m["state"] for m in (first, change, flap)] == ["queued"] * 3
        assert retry["state"] == "suppressed"
        # The original named is the key's first within the window, as for any key.
        assert f"duplicate of message {first['id']} " in retry["reason"]
    assert again["state"] == "suppressed" and str(before["id"]) in again["reason"]
    texts = [e.message for e in sandbox_state.entries]
    assert [t.split("]")[0] for t in texts if "Host down" in t] == ["[ALERTING", "[OK", "[ALERTING"]
    assert [t for t in texts if "[shop]" in t] == [down["msg"], up["msg"], down["msg"]]
    assert texts.count("disk full") == 1 and len(texts) == 8


@on_each_backend
async def test_an_api_text_without_a_key_repeats_only_while_it_is_the_last_word(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """API sends without `dedupe_key`: a repeat is a duplicate while it is still the API's
    last word to that phone (another phone's texts do not matter); after another text to
    it, news. A sender's own `dedupe_key` says "the same event" whatever came between."""
    config = bridge_config(tmp_path, sandbox_url)
    one, two = "+12025550143", "+12025550144"
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:

        async def post(to: str, text: str, **more: str) -> str:
            response = await http.post(
                f"{url}/api/v1/messages", json={"to": to, "message": text, **more}
            )
            assert response.status_code == 202, response.text
            clock.advance(30)  # all within the 10 minutes' dedupe window
            return str(response.json()["messages"][0]["state"])

        states = [
            await post(one, "db-1 DOWN"),
            await post(one, "db-1 down"),  # a repeat: the same text key
            await post(two, "db-1 UP"),  # to another phone
            await post(one, "db-1 DOWN"),  # still phone one's last word: a repeat
            await post(one, "db-1 UP"),
            await post(one, "db-1 DOWN"),  # a flap: news
            await post(one, "db-1 DOWN"),  # and its repeat
            await post(one, "deploy 7 done", dedupe_key="deploy-7"),
            await post(one, "db-1 UP"),
            await post(one, "deploy 7 done", dedupe_key="deploy-7"),  # the sender's key
        ]
        await pump(bridge, clock, lambda: settled(bridge), max_seconds=600)
    q, dup = "queued", "suppressed"
    assert states == [q, dup, q, dup, q, q, dup, q, q, dup]
    assert [(e.to, e.message) for e in sandbox_state.entries] == [
        (one, "db-1 DOWN"),
        (two, "db-1 UP"),
        (one, "db-1 UP"),
        (one, "db-1 DOWN"),
        (one, "deploy 7 done"),
        (one, "db-1 UP"),
    ]


@on_each_backend
async def test_budget_cap_waits_loses_nothing_and_warns_once(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    extra = '[budget]\ntexts_per_day = 3\nadmin = ["+12025550199"]\n'
    config = bridge_config(tmp_path, sandbox_url, extra)
    clock.advance(3600 * 20 - clock.now() % 86400)  # 20:00 UTC
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        for i in range(5):
            await http.post(
                f"{url}/api/v1/messages", json={"to": f"+120255501{i:02d}", "message": f"alert {i}"}
            )
        for _ in range(5):
            clock.advance(await bridge.dispatcher.run_once() or 1)
        await http.post(f"{url}/api/v1/messages", json={"to": "+12025550188", "message": "6th"})
        for _ in range(5):
            clock.advance(min(await bridge.dispatcher.run_once(), 30))
        sent_today = [e for e in sandbox_state.entries if e.to != "+12025550199"]
        warnings = [e for e in sandbox_state.entries if e.to == "+12025550199"]
        waiting = await bridge.store.query(reason_kind="budget")
        assert len(sent_today) == 3  # nothing over the cap
        assert len(warnings) == 1 and "texts_per_day=3" in warnings[0].message
        assert {m.state for m in waiting} == {State.QUEUED} and len(waiting) == 3
        # A count (what `increase()` reads), not a level that stayed above 0 until a
        # restart after the first cap bit.
        metrics = (await http.get(f"{url}/metrics")).text
        assert "# TYPE sms_bridge_budget_over_cap_total counter" in metrics
        assert "\nsms_bridge_budget_over_cap_total 3.0\n" in metrics
        clock.advance(5 * 3600)  # past midnight: a new day's budget

        async def all_sent() -> bool:
            counts = await bridge.store.counts()
            return set(counts) <= {"sent", "delivered"}

        await pump(bridge, clock, all_sent, max_seconds=600)
    assert len([e for e in sandbox_state.entries if e.to != "+12025550199"]) == 6
    assert len([e for e in sandbox_state.entries if e.to == "+12025550199"]) == 1


@on_each_backend
async def test_budget_fail_mode(tmp_path, clock: ManualClock, sandbox_url: str) -> None:
    extra = '[budget]\nparts_per_day = 2\non_exceeded = "fail"\n'
    config = bridge_config(tmp_path, sandbox_url, extra)
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        await http.post(f"{url}/api/v1/messages", json={"to": "+12025550143", "message": "a"})
        await http.post(
            f"{url}/api/v1/messages", json={"to": "+12025550144", "message": "long " * 40}
        )  # 2 parts
        for _ in range(4):
            clock.advance(min(await bridge.dispatcher.run_once(), 5))
        failed = await bridge.store.query(state="failed")
    assert len(failed) == 1 and "parts_per_day=2" in (failed[0].reason or "")


@on_each_backend
async def test_low_balance_warning_once_and_cost_estimates(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    sandbox_state.balance = 10.0
    extra = '[budget]\nlow_balance = 100\nadmin = ["+12025550199"]\n'
    config = bridge_config(tmp_path, sandbox_url, extra)
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        await bridge.dispatcher.run_once()  # loads the price list
        for i in range(3):
            r = await http.post(
                f"{url}/api/v1/messages",
                json={"to": "+447911123456", "message": f"x{i} " + "y" * 170},
            )
            [mid] = r.json()["ids"]
            for _ in range(3):
                clock.advance(min(await bridge.dispatcher.run_once(), 5))
        message = await bridge.store.get(mid)
        body = json.loads((await http.get(f"{url}/api/v1/messages/{mid}")).content)
    warnings = [e for e in sandbox_state.entries if e.to == "+12025550199"]
    assert len(warnings) == 1 and "balance" in warnings[0].message
    assert message.estimated_cost == 1.6  # UK at 0.8 a part, 2 parts
    assert body["estimated_cost"] == 1.6 and body["parts"] == 2 and body["message_type"] == 1


@on_each_backend
async def test_a_national_admin_number_gets_a_warning_shaped_like_any_text(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """`phone.default_region = "GB"` with `budget.admin = ["07400 123456"]` once passed
    check-config and then killed `serve` at start; the warning is priced as texts are."""
    extra = (
        '[phone]\ndefault_region = "GB"\n[budget]\ntexts_per_day = 1\nadmin = ["07400 123456"]\n'
    )
    config = bridge_config(tmp_path, sandbox_url, extra)
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        await bridge.dispatcher.run_once()  # loads the price list
        for i in range(2):
            await http.post(
                f"{url}/api/v1/messages", json={"to": "+447911123456", "message": f"alert {i}"}
            )
        for _ in range(5):
            clock.advance(min(await bridge.dispatcher.run_once(), 5))
        [warning] = await bridge.store.query(source="budget")
    assert warning.recipient == "+447400123456"
    assert "texts_per_day=1" in warning.text
    assert warning.estimated_cost == 0.8  # the sandbox's GB price, estimated at ingest
    assert [e.to for e in sandbox_state.entries].count("+447400123456") == 1


@on_each_backend
async def test_a_text_no_day_can_hold_fails_saying_so_instead_of_waiting_forever(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """parts_per_day = 2 and max_parts = 3: a 3-part text waited "until 00:00 UTC" every
    day, for ever, though `wait` promises it goes when the cap allows. It fails at once,
    saying why; a text that fits goes on."""
    extra = '[budget]\nparts_per_day = 2\nadmin = ["+12025550199"]\n'
    config = bridge_config(tmp_path, sandbox_url, extra)
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        big = await http.post(
            f"{url}/api/v1/messages", json={"to": "+12025550143", "message": "word " * 80}
        )
        small = await http.post(
            f"{url}/api/v1/messages", json={"to": "+12025550144", "message": "short"}
        )
        [big_id], [small_id] = big.json()["ids"], small.json()["ids"]
        await pump(bridge, clock, lambda: len(sandbox_state.entries) >= 1, max_seconds=600)
        for _ in range(3):
            clock.advance(min(await bridge.dispatcher.run_once(), 5))
        failed, sent = await bridge.store.get(big_id), await bridge.store.get(small_id)
    assert failed is not None and failed.parts == 3
    assert failed.state == State.FAILED, failed
    assert failed.reason and "parts_per_day=2" in failed.reason and "3 parts" in failed.reason
    assert sent is not None and sent.state in (State.SENT, State.DELIVERED)
    # Not the day's cap biting: no "further texts wait" warning to the admins.
    assert [e.to for e in sandbox_state.entries] == ["+12025550144"]


@on_each_backend
async def test_a_text_costing_more_than_the_day_fails_saying_so(
    tmp_path, clock: ManualClock, sandbox_url: str
) -> None:
    """cost_per_day = 2 and a 3-part UK text (0.8 a part in the sandbox): 2.4 > 2 on any
    day; it waited for ever."""
    config = bridge_config(tmp_path, sandbox_url, "[budget]\ncost_per_day = 2\n")
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        await bridge.dispatcher.run_once()  # loads the price list
        response = await http.post(
            f"{url}/api/v1/messages", json={"to": "+447911123456", "message": "word " * 80}
        )
        [mid] = response.json()["ids"]
        for _ in range(3):
            clock.advance(min(await bridge.dispatcher.run_once(), 5))
        message = await bridge.store.get(mid)
    assert message is not None and message.state == State.FAILED, message
    assert message.reason and "cost_per_day=2" in message.reason and "2.4" in message.reason


async def test_storm_questions_of_a_big_request_stay_under_sqlites_oldest_variable_limit(
    tmp_path, clock: ManualClock, sandbox_url: str
) -> None:
    """Storm control asks four values a phone now (its time, window, and since when a
    storm holds it), not two; the questions per statement stayed at 140, 9 parameters a
    pair: 1260, past the 999 an SQLite built with its oldest limit allows. A request to
    200 phones answered 503 ("too many SQL variables") there. The writer's connection
    is held to 999 as such a build is."""
    config = bridge_config(
        tmp_path,
        sandbox_url,
        "[limits]\nper_recipient = 3\n[http]\nmax_recipients = 1000\n",
    )
    store = faulty_store(config)
    async with running_bridge(config, clock, store) as (bridge, url):
        await store.on_writer(
            lambda db: db.conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
        )
        phones = [f"+1202{5000000 + i:07d}" for i in range(200)]
        async with httpx.AsyncClient() as http:
            answer = await http.post(
                f"{url}/api/v1/messages", json={"to": phones, "message": "db-1 down"}
            )
        assert answer.status_code == 202, answer.text
        assert await bridge.store.counts() == {"queued": 200}
