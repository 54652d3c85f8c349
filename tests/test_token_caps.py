"""Per-token daily caps (`tokens.NAME.texts_per_day`), through the real HTTP API, the
sandbox provider and each store backend, on a manual clock.

A token over its cap behaves as the other daily caps do (bridge.policy.budgets): what it
sends beyond waits for 00:00 UTC (`budget.on_exceeded = "wait"`) or fails ("fail"), the
cap named in the message's reason and events, one warning a day to the budget's admins;
other tokens go on. The count is the store's, so a restart (or another instance) does
not hand the token a fresh day.
"""

from __future__ import annotations

import asyncio
import smtplib
from typing import Any

import httpx
import pytest

from bridge.clock import ManualClock
from bridge.config import Config, load_config
from bridge.errors import ConfigError
from bridge.provider.sandbox import SandboxState
from tests.helpers import bridge_config, pump, running_bridge, write_config
from tests.test_console import sign_in
from tests.test_smtp import smtp_listening, with_smtp

on_each_backend = pytest.mark.usefixtures("backend")

CI = "ci-token-0123456789abcdef"
OPS = "ops-token-0123456789abcdef"
HOOK = "hook-token-0123456789abcdef"  # the routes'
ADMIN_PHONE = "+12025550199"


def tokens(ci_cap: int | None = 2, on_exceeded: str = "wait") -> str:
    cap = f"texts_per_day = {ci_cap}\n" if ci_cap is not None else ""
    return (
        f'[tokens.ci]\ntoken = "{CI}"\nscopes = ["send"]\n{cap}'
        f'[tokens.ops]\ntoken = "{OPS}"\nscopes = ["admin"]\n'
        f'[budget]\nadmin = ["{ADMIN_PHONE}"]\non_exceeded = "{on_exceeded}"\n'
    )


async def send(http: httpx.AsyncClient, url: str, token: str, n: int, text: str) -> list[int]:
    ids = []
    for i in range(n):
        response = await http.post(
            f"{url}/api/v1/messages",
            json={"to": f"+120255501{i:02d}", "message": f"{text} {i}"},
            headers={"authorization": f"Bearer {token}"},
        )
        assert response.status_code == 202, response.text
        ids += response.json()["ids"]
    return ids


async def steps(bridge, clock: ManualClock, n: int = 6) -> None:
    for _ in range(n):
        clock.advance(min(await bridge.dispatcher.run_once(), 5))


def texted(sandbox_state: SandboxState, prefix: str) -> list[str]:
    return [e.message for e in sandbox_state.entries if e.message.startswith(prefix)]


@on_each_backend
async def test_a_token_over_its_cap_waits_for_tomorrow_and_others_go_on(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    config = bridge_config(tmp_path, sandbox_url, tokens(2))
    clock.advance(3600 * 20 - clock.now() % 86400)  # 20:00 UTC
    ops = {"authorization": f"Bearer {OPS}"}
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        await send(http, url, OPS, 3, "ops")  # sent first: not counted against ci
        await steps(bridge, clock)
        ci_ids = await send(http, url, CI, 4, "ci")
        await send(http, url, OPS, 1, "ops more")
        await steps(bridge, clock)
        assert len(texted(sandbox_state, "ci")) == 2  # nothing over the token's cap
        assert len(texted(sandbox_state, "ops")) == 4  # another token is not held back
        waiting = [
            (await http.get(f"{url}/api/v1/messages/{i}", headers=ops)).json() for i in ci_ids[2:]
        ]
        for message in waiting:
            assert message["state"] == "queued"
            assert message["token"] == "ci"
            assert "tokens.ci.texts_per_day=2" in message["last_error"]
            assert "waiting until 00:00 UTC" in message["last_error"]
            assert any(
                "tokens.ci.texts_per_day=2" in (e["detail"] or "") for e in message["events"]
            )
        listed = (await http.get(f"{url}/api/v1/messages?reason=budget", headers=ops)).json()
        assert sorted(m["id"] for m in listed["messages"]) == sorted(ci_ids[2:])
        overview = (await http.get(f"{url}/ui/overview.json", headers=ops)).json()
        assert overview["today"]["caps"]["tokens"] == {"ci": {"cap": 2, "used": 2}}
        async with httpx.AsyncClient(base_url=url) as browser:
            await sign_in(browser, OPS)
            page = (await browser.get("/ui/")).text
        assert "<dt>Token ci</dt><dd>2 of 2</dd>" in page
        # More from the same token the same day: one warning only.
        await send(http, url, CI, 1, "ci again")
        await steps(bridge, clock)
        warnings = [e.message for e in sandbox_state.entries if e.to == ADMIN_PHONE]
        assert len(warnings) == 1 and "tokens.ci.texts_per_day=2" in warnings[0]
        clock.advance(5 * 3600)  # past midnight: the token's new day, two more go
        await pump(bridge, clock, lambda: len(texted(sandbox_state, "ci")) >= 4, max_seconds=600)
        await steps(bridge, clock)
        still = await bridge.store.query(reason_kind="budget", state="queued")
    assert len(texted(sandbox_state, "ci")) == 4
    assert len(still) == 1 and still[0].next_attempt_at % 86400 == 0  # the next midnight


@on_each_backend
async def test_a_token_over_its_cap_fails_with_the_reason_in_fail_mode(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    config = bridge_config(tmp_path, sandbox_url, tokens(1, on_exceeded="fail"))
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        ci_ids = await send(http, url, CI, 3, "ci")
        await steps(bridge, clock)
        failed = await bridge.store.query(state="failed")
    assert sorted(m.id for m in failed) == ci_ids[1:]
    assert all(
        m.reason_kind == "budget" and "tokens.ci.texts_per_day=1" in (m.reason or "")
        for m in failed
    )
    assert len(texted(sandbox_state, "ci")) == 1


@on_each_backend
async def test_the_count_is_the_stores_not_the_process(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """A bridge started on the store another one sent from (a restart, or a second
    instance of a cluster on PostgreSQL) counts what that one sent today."""
    config = bridge_config(tmp_path, sandbox_url, tokens(3))
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        await send(http, url, CI, 2, "ci first")
        await steps(bridge, clock)
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        await send(http, url, CI, 2, "ci second")
        await steps(bridge, clock)
        waiting = await bridge.store.query(reason_kind="budget")
    assert len(texted(sandbox_state, "ci")) == 3
    assert len(waiting) == 1 and "tokens.ci.texts_per_day=3" in (waiting[0].reason or "")


@on_each_backend
async def test_a_reload_adds_the_cap(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    config = bridge_config(tmp_path, sandbox_url, tokens(None))
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        await send(http, url, CI, 2, "ci before")
        await steps(bridge, clock)
        # As SIGHUP loads it: the same store and provider, the token now capped.
        new = bridge_config(tmp_path, sandbox_url, tokens(3))
        assert bridge.reload(new) == []
        await send(http, url, CI, 2, "ci after")
        await steps(bridge, clock)
        waiting = await bridge.store.query(reason_kind="budget")
    assert len(texted(sandbox_state, "ci")) == 3
    assert len(waiting) == 1


STORM = '[limits]\nper_recipient = 2\nper_recipient_window = "10m"\n'
ONE, MIXED = "+12025550170", "+12025550171"  # one sender's storm; several senders'


async def storm_digests(
    config: Config, clock: ManualClock, posts: list[tuple[str, dict[str, str], str]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Post (path, JSON body, bearer token) in order, run the bridge until nothing waits
    (held texts folded, digests sent): the digests by phone, and the overview's caps."""
    ops = {"authorization": f"Bearer {OPS}"}
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        for path, body, token in posts:
            headers = {"authorization": f"Bearer {token}"}
            response = await http.post(f"{url}{path}", json=body, headers=headers)
            assert response.status_code == 202, response.text

        async def settled() -> bool:
            counts = await bridge.store.counts()
            return not any(counts.get(s) for s in ("queued", "sending", "held"))

        await pump(bridge, clock, settled, max_seconds=3600)
        digests = (await http.get(f"{url}/api/v1/messages?source=digest", headers=ops)).json()
        overview = (await http.get(f"{url}/ui/overview.json", headers=ops)).json()
    assert {m["state"] for m in digests["messages"]} == {"sent"}
    return {m["recipient"]: m for m in digests["messages"]}, overview["today"]["caps"]


@on_each_backend
async def test_a_storm_digest_counts_against_the_token_whose_texts_it_folds(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """A token's storm to one phone: two texts go, the rest are held and folded into a
    digest, which is one more of that token's texts today. A digest folding several
    tokens' texts is nobody's (bridge.delivery.digests.digest_token)."""
    config = bridge_config(tmp_path, sandbox_url, tokens(10) + STORM)
    senders = [(ONE, CI)] * 5 + [(MIXED, t) for t in (CI, CI, OPS, CI, OPS)]
    posts = [
        ("/api/v1/messages", {"to": phone, "message": f"loop {n}"}, token)
        for n, (phone, token) in enumerate(senders)
    ]
    by_phone, caps = await storm_digests(config, clock, posts)
    assert len(by_phone) == 2
    assert by_phone[ONE]["token"] == "ci" and by_phone[MIXED]["token"] is None
    # ci today: two texts to each phone, and the digest of its own storm.
    assert caps["tokens"] == {"ci": {"cap": 10, "used": 5}}
    assert len([e for e in sandbox_state.entries if e.message.startswith("+")]) == 2


@on_each_backend
async def test_a_storm_digest_counts_against_the_route_whose_texts_it_folds(
    tmp_path, clock: ManualClock, sandbox_url: str
) -> None:
    """As for tokens, by `routes.NAME.max_texts_per_day`: a digest of one route's storm
    is one more of that route's texts; one folding two routes' texts is neither's
    (bridge.delivery.digests.digest_route)."""
    routes = "".join(
        f'[routes.{name}]\nformat = "generic"\nto = ["{phone}"]\ntoken = "{HOOK}"\n'
        f"max_texts_per_day = 10\n"
        for name, phone in (("pager", ONE), ("left", MIXED), ("right", MIXED))
    )
    config = bridge_config(tmp_path, sandbox_url, tokens(None) + STORM + routes)
    names = ["pager"] * 5 + ["left", "left", "right", "left", "right"]
    posts = [(f"/hooks/{name}", {"message": f"loop {n}"}, HOOK) for n, name in enumerate(names)]
    by_phone, caps = await storm_digests(config, clock, posts)
    assert len(by_phone) == 2
    assert by_phone[ONE]["route"] == "pager" and by_phone[MIXED]["route"] is None
    # pager today: its two texts and the digest of its storm; left and right: their own.
    assert {name: cap["used"] for name, cap in caps["routes"].items()} == {
        "pager": 3,
        "left": 2,
        "right": 0,
    }


async def test_an_open_bridge_and_mail_record_no_token(
    tmp_path, clock: ManualClock, sandbox_url: str
) -> None:
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        [message_id] = (
            await http.post(f"{url}/api/v1/messages", json={"to": "+12025550143", "message": "x"})
        ).json()["ids"]
        stored = await bridge.store.get(message_id)
    assert stored is not None and stored.token is None


@pytest.mark.parametrize("value", ["-1", "many"])
def test_a_bad_cap_is_refused_by_its_key(tmp_path, value: str) -> None:
    from bridge.config import load_config
    from bridge.errors import ConfigError
    from tests.helpers import write_config

    text = f'[tokens.ci]\ntoken = "{CI}"\nscopes = ["send"]\ntexts_per_day = {value!s}\n'
    if value == "many":
        text = text.replace("= many", '= "many"')
    with pytest.raises(ConfigError) as refused:
        load_config(write_config(tmp_path, text), env={})
    assert "tokens.ci.texts_per_day" in str(refused.value)


def test_the_cap_can_come_from_the_environment(tmp_path) -> None:
    from bridge.config import load_config
    from tests.helpers import write_config

    path = write_config(tmp_path, "")
    env = {
        "SMS_BRIDGE_TOKENS_CI_TOKEN": CI,
        "SMS_BRIDGE_TOKENS_CI_SCOPES": "send",
        "SMS_BRIDGE_TOKENS_CI_TEXTS_PER_DAY": "25",
    }
    config = load_config(path, env=env)
    assert config.tokens["ci"].texts_per_day == 25


def _mail_as(port: int, login: str | None, n: int, text: str) -> None:
    """`n` mails, one recipient each, from `login` (None: without AUTH)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("tester")
        if login is not None:
            client.login(login, f"{login}-pass-0123456789")
        for i in range(n):
            to = f"+120255502{i:02d}@sms.localhost"
            client.sendmail("dev@example.org", [to], f"Subject: {text} {i}\r\n\r\nx\r\n")


@on_each_backend
async def test_an_smtp_user_over_its_cap_waits_and_other_mail_goes_on(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """`smtp.user_texts_per_day` caps what one SMTP login sends, as `texts_per_day` caps an
    API token: a UPS that loops cannot spend the day's budget. Other users, mail without
    AUTH and API tokens go on; the cap is named in the reason and the admins warned."""
    users = (
        "auth_allow_plaintext = true\n"
        'users = {ups = "ups-pass-0123456789", nas = "nas-pass-0123456789"}\n'
        "user_texts_per_day = {ups = 2}\n"
    )
    config = bridge_config(tmp_path, sandbox_url, with_smtp(users) + tokens(None))
    ops = {"authorization": f"Bearer {OPS}"}
    async with (
        running_bridge(config, clock) as (bridge, url),
        smtp_listening(bridge) as port,
        httpx.AsyncClient() as http,
    ):
        await asyncio.to_thread(_mail_as, port, "ups", 4, "ups")
        await asyncio.to_thread(_mail_as, port, "nas", 3, "nas")
        await asyncio.to_thread(_mail_as, port, None, 1, "anon")
        await send(http, url, CI, 1, "ci")
        await steps(bridge, clock)
        assert len(texted(sandbox_state, "ups")) == 2
        assert len(texted(sandbox_state, "nas")) == 3
        assert len(texted(sandbox_state, "anon")) == len(texted(sandbox_state, "ci")) == 1
        waiting = await bridge.store.query(reason_kind="budget", state="queued")
        assert len(waiting) == 2 and {m.token for m in waiting} == {"smtp:ups"}
        assert all("smtp.user_texts_per_day.ups=2" in (m.reason or "") for m in waiting)
        warnings = [e.message for e in sandbox_state.entries if e.to == ADMIN_PHONE]
        assert len(warnings) == 1 and "smtp.user_texts_per_day.ups=2" in warnings[0]
        overview = (await http.get(f"{url}/ui/overview.json", headers=ops)).json()
        assert overview["today"]["caps"]["smtp_users"] == {"ups": {"cap": 2, "used": 2}}
        # A reload that raises the cap lets what waits go at once, not at midnight.
        assert not bridge.dispatcher.budget.raised_over([waiting[0].reason or ""])


@pytest.mark.parametrize(
    ("setting", "problem"),
    [
        ("user_texts_per_day = {nobody = 3}", "smtp.user_texts_per_day.nobody: no user 'nobody'"),
        ("user_texts_per_day = {ups = -1}", "smtp.user_texts_per_day.ups: must be 0 (no cap)"),
        ('user_texts_per_day = {ups = "3"}', "smtp.user_texts_per_day: expected a table of"),
    ],
)
def test_a_bad_smtp_user_cap_is_refused_by_its_key(
    tmp_path, sandbox_url: str, setting: str, problem: str
) -> None:
    users = f'users = {{ups = "ups-pass-0123456789"}}\n{setting}\n'
    with pytest.raises(ConfigError) as refused:
        bridge_config(tmp_path, sandbox_url, with_smtp(users))
    assert problem in str(refused.value), refused.value


def test_an_smtp_user_cap_may_come_from_the_environment(tmp_path) -> None:
    body = '[smtp]\nusers = {ups = "ups-pass-0123456789", nas = "nas-pass-0123456789"}\n'
    env = {"SMS_BRIDGE_SMTP_USER_TEXTS_PER_DAY": "ups=20, nas=0"}
    config = load_config(write_config(tmp_path, body), env=env)
    assert config.smtp.user_texts_per_day == {"ups": 20, "nas": 0}
    with pytest.raises(ConfigError) as refused:
        load_config(
            write_config(tmp_path, body), env={"SMS_BRIDGE_SMTP_USER_TEXTS_PER_DAY": "ups=x"}
        )
    assert "SMS_BRIDGE_SMTP_USER_TEXTS_PER_DAY" in str(refused.value)
