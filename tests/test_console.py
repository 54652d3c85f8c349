"""The web console's views, through the real HTTP listener with httpx.

Sign-in, scopes, CSRF and headers first (no page works without the scope it needs, no
change works without the CSRF token), then what each page shows, each also as JSON.
The browser's view of the same pages is in `test_console_browser.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import re
import sqlite3
import string
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest

from bridge.clock import ManualClock
from bridge.ingress.http.app import PROVIDER_REFUSED
from bridge.ingress.http.console import app as console_app
from bridge.ingress.http.console import sessions
from bridge.models import Message, NewMessage, State
from bridge.provider.sandbox import Fault, SandboxState
from tests.helpers import bridge_config, pump, pump_until_state, running_bridge
from tests.stores import faulty_store, seed
from tests.test_smtp import send as mail
from tests.test_smtp import smtp_listening

READER = "read-token-0123456789abcdef"
ADMIN = "admin-token-0123456789abcdef"
SENDER = "send-token-0123456789abcdef"
ROUTE_TOKEN = "route-secret-token-0123456789"
TOKENS = f"""
[tokens.ops]
token = "{READER}"
scopes = ["read"]
[tokens.root]
token = "{ADMIN}"
scopes = ["admin"]
[tokens.deploy]
token = "{SENDER}"
scopes = ["send"]
[groups]
oncall = ["+12025550101", "+12025550102"]
[routes.am]
format = "alertmanager"
to = ["oncall"]
token = "{ROUTE_TOKEN}"
"""
# The tokens and a GitHub route (its secret ROUTE_TOKEN): what a preview's event is for.
GITHUB_ROUTE = f"""{TOKENS}
[routes.gh]
format = "github"
to = ["oncall"]
secret = "{ROUTE_TOKEN}"
"""
# The tokens and a generic route that takes its recipients from the payload.
PAYLOAD_RECIPIENTS_ROUTE = f"""{TOKENS}
[routes.anyjson]
format = "generic"
allow_payload_to = true
token = "{ROUTE_TOKEN}"
"""
CSRF = re.compile(r'name="csrf" value="([^"]+)"')
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def csrf_of(page: httpx.Response) -> str:
    found = CSRF.search(page.text)
    assert found, f"no CSRF token on {page.url}"
    return found[1]


async def sign_in(http: httpx.AsyncClient, token: str) -> httpx.Response:
    form = await http.get("/ui/signin")
    return await http.post(
        "/ui/signin", data={"csrf": csrf_of(form), "token": token, "next": "/ui/messages"}
    )


async def send(http: httpx.AsyncClient, to: str, text: str) -> int:
    answer = await http.post(
        "/api/v1/messages",
        json={"to": to, "message": text},
        headers={"Authorization": f"Bearer {ADMIN}"},
    )
    assert answer.status_code == 202, answer.text
    return int(answer.json()["ids"][0])


async def cancelled(http: httpx.AsyncClient, to: str, text: str) -> int:
    """A message sent and cancelled at once (a failure that is no delivery failure)."""
    message_id = await send(http, to, text)
    answer = await http.post(
        f"/api/v1/messages/{message_id}/cancel", headers={"Authorization": f"Bearer {ADMIN}"}
    )
    assert answer.status_code == 200, answer.text
    return message_id


@pytest.fixture
def config(tmp_path, sandbox_url: str):
    return bridge_config(tmp_path, sandbox_url, TOKENS)


@pytest.fixture
async def served_bridge(config, clock: ManualClock) -> AsyncIterator[tuple[object, str]]:
    async with running_bridge(config, clock) as served:
        yield served


async def test_no_token_no_page(served_bridge) -> None:
    _, url = served_bridge
    async with httpx.AsyncClient(base_url=url) as http:
        for path in (
            "/ui/",
            "/ui/messages?state=failed",
            "/ui/messages/1",
            "/ui/routes",
            "/ui/send",
        ):
            answer = await http.get(path)
            assert answer.status_code == 303, path
            assert answer.headers["location"].startswith("/ui/signin?next=/ui/")
        for path in ("/ui/overview.json", "/ui/messages.json", "/ui/routes.json"):
            assert (await http.get(path)).status_code == 401
        retry = await http.post("/ui/messages/1/retry", data={"csrf": "x"})
        assert retry.status_code == 303 and retry.headers["location"].startswith("/ui/signin")
        assert (await http.get("/ui")).headers["location"] == "/ui/"


async def test_sign_in_needs_a_configured_token_with_read(served_bridge) -> None:
    _, url = served_bridge
    async with httpx.AsyncClient(base_url=url) as http:
        wrong = await sign_in(http, READER + "x")
        assert wrong.status_code == 401 and "not a configured API token" in wrong.text
        sender = await sign_in(http, SENDER)
        assert sender.status_code == 403 and "lacks the &#39;read&#39; scope" in sender.text
        assert (
            "sms_bridge_session" not in http.cookies or (await http.get("/ui/")).status_code == 303
        )  # a refused sign-in leaves no way in
        visitor = http.cookies["sms_bridge_session"]
        reader = await sign_in(http, READER)
        assert reader.status_code == 303 and reader.headers["location"] == "/ui/messages"
        cookie = reader.headers["set-cookie"]
        assert visitor not in cookie  # a new session id on sign-in: no fixation
        assert READER not in cookie  # the cookie is a random session id, not the token
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui" in cookie
        assert "Secure" not in cookie  # plain HTTP on loopback: a Secure cookie would vanish
        assert (await http.get("/ui/")).status_code == 200


async def test_a_signed_in_operator_passes_a_lockout_of_their_address(served_bridge) -> None:
    """Ten wrong tokens from the operator's address (a NAT, or loopback: every local
    client) locked their console out with it. A session signed in before the lockout
    passes it; a new sign-in from there waits for its end (the form's token is a guess)."""
    _, url = served_bridge
    async with httpx.AsyncClient(base_url=url) as http, httpx.AsyncClient(base_url=url) as other:
        assert (await sign_in(http, READER)).status_code == 303
        assert (await http.get("/ui/")).status_code == 200
        for n in range(10):
            wrong = {"Authorization": f"Bearer wrong-token-{n:04d}-0123456789"}
            assert (await other.get("/api/v1/messages", headers=wrong)).status_code == 401
        assert (await other.get("/ui/signin")).status_code == 503
        assert (await http.get("/ui/messages.json")).status_code == 200
        signin = await http.post("/ui/signin", data={"csrf": "x", "token": ADMIN})
        assert signin.status_code == 503


@pytest.mark.parametrize("path", ["/ui/signin", "/ui/signin/"])
async def test_wrong_sign_ins_lock_the_form_out_at_either_path(served_bridge, path: str) -> None:
    """The console serves a POST to `/ui/signin/` as `/ui/signin` (`SlashlessPosts`),
    but the lockout knew the sign-in by its exact path alone: at the slash path the
    token in the form was no credential to it, so wrong guesses went uncounted without
    end, and a client locked out at the exact path still had every guess checked there
    (the right one signed in). Ten wrong tokens lock out both paths, the right one too."""
    _, url = served_bridge
    async with httpx.AsyncClient(base_url=url) as http:
        csrf = csrf_of(await http.get("/ui/signin"))

        async def guess(token: str, at: str = path) -> int:
            form = {"csrf": csrf, "token": token, "next": "/ui/"}
            return (await http.post(at, data=form)).status_code

        assert [await guess(f"wrong-token-{n:04d}") for n in range(10)] == [401] * 10
        assert await guess("wrong-token-more") == 503
        for at in ("/ui/signin", "/ui/signin/"):
            assert await guess(READER, at) == 503, at


async def test_a_sender_in_use_keeps_passing_a_lockout_however_many_others_follow(
    tmp_path, sandbox_url: str, clock: ManualClock
) -> None:
    """The credentials that pass a lockout were kept per address sixteen at most, the
    first verified gone first, however often it was used since: on a loopback install
    (every local client 127.0.0.1) Alertmanager's route token, verified at its first
    alert and used a moment ago, went once sixteen other tokens had been used from
    there, and the next wrong token from a script locked Alertmanager out. The least
    recently used goes first."""
    tokens = "".join(
        f'[tokens.script{n}]\ntoken = "script-token-{n:02d}-0123456789abcdef"\nscopes = ["read"]\n'
        for n in range(16)
    )
    config = bridge_config(tmp_path, sandbox_url, TOKENS + tokens)
    route = {"Authorization": f"Bearer {ROUTE_TOKEN}"}

    def alert(n: int) -> dict[str, object]:
        labels = {"alertname": "DiskFull", "instance": f"db-{n}"}
        return {"version": "4", "status": "firing", "alerts": [{"labels": labels}]}

    async with (
        running_bridge(config, clock) as (_, url),
        httpx.AsyncClient(base_url=url) as http,
    ):
        for n in range(16):  # an alert, then a script with a token of its own
            sent = await http.post("/hooks/am", json=alert(n), headers=route)
            assert sent.status_code == 202, sent.text
            script = {"Authorization": f"Bearer script-token-{n:02d}-0123456789abcdef"}
            assert (await http.get("/api/v1/messages", headers=script)).status_code == 200
        for n in range(10):
            wrong = {"Authorization": f"Bearer wrong-token-{n:04d}-0123456789"}
            assert (await http.get("/api/v1/messages", headers=wrong)).status_code == 401
        locked = await http.post("/hooks/am", json=alert(99), headers=route)
        assert locked.status_code == 202, locked.text


async def test_next_after_sign_in_stays_in_the_console(served_bridge) -> None:
    _, url = served_bridge
    async with httpx.AsyncClient(base_url=url) as http:
        form = await http.get("/ui/signin")
        answer = await http.post(
            "/ui/signin",
            data={"csrf": csrf_of(form), "token": READER, "next": "//evil.example.org/"},
        )
        assert answer.headers["location"] == "/ui/"


async def test_a_signed_in_operator_is_sent_on_from_the_sign_in_page(served_bridge) -> None:
    """The sign-in page showed its form to someone already signed in (a bookmark of it,
    the back button): it asked for a token they had given. They go on to where they were
    going, or the overview; signed out, or their token removed, they get the form."""
    _, url = served_bridge
    async with httpx.AsyncClient(base_url=url) as http:
        await sign_in(http, READER)
        going = await http.get("/ui/signin", params={"next": "/ui/messages?state=failed"})
        assert going.status_code == 303
        assert going.headers["location"] == "/ui/messages?state=failed"
        for elsewhere in ("//evil.example.org/", ""):  # only the console, as at sign-in
            answer = await http.get("/ui/signin", params={"next": elsewhere})
            assert answer.status_code == 303 and answer.headers["location"] == "/ui/"
        assert (await http.get("/ui/signin")).headers["location"] == "/ui/"
        await http.post("/ui/signout", data={"csrf": csrf_of(await http.get("/ui/"))})
        form = await http.get("/ui/signin")
        assert form.status_code == 200 and 'name="token"' in form.text


async def test_a_signed_in_reader_can_still_sign_in_with_an_admin_token(
    served_bridge, config
) -> None:
    """The sign-in page sending signed-in operators on broke the way to another token: a
    reader's refused cancel linked "Sign in with another token" to it, which sent them
    back to the overview, with no form. That link, and the message page's for a reader,
    show the form; signed in there as an admin, they act. A session whose token lost
    `read` (a reload) gets the form too, not the overview's 403."""
    bridge, url = served_bridge
    held = NewMessage("+12025550144", "disk full", "http", "SMS", 1, 1, state=State.HELD)
    [message_id] = await seed(bridge.store, [held], 1.0)
    page = f"/ui/messages/{message_id}"
    async with httpx.AsyncClient(base_url=url) as http:
        await sign_in(http, READER)
        form = {"csrf": csrf_of(await http.get(page))}
        refused = await http.post(f"{page}/cancel", data=form)
        assert refused.status_code == 403
        [link] = re.findall(r'href="([^"]*)">Sign in with another token', refused.text)
        again = await http.get(link.replace("&amp;", "&"))
        assert again.status_code == 200 and 'name="token"' in again.text
        [offered] = re.findall(r'href="([^"]*)">sign in with one', (await http.get(page)).text)
        shown = await http.get(offered.replace("&amp;", "&"))
        assert shown.status_code == 200 and f'value="{page}"' in shown.text
        signed = await http.post(
            "/ui/signin", data={"csrf": csrf_of(shown), "token": ADMIN, "next": page}
        )
        assert signed.status_code == 303 and signed.headers["location"] == page
        done = await http.post(f"{page}/cancel", data={"csrf": csrf_of(await http.get(page))})
        assert done.status_code == 303
        assert (await bridge.store.get(message_id)).state == State.FAILED
        sender = dataclasses.replace(config.tokens["root"], scopes=("send",))
        bridge.reload(dataclasses.replace(config, tokens={**config.tokens, "root": sender}))
        lost = await http.get("/ui/signin")
        assert lost.status_code == 200 and 'name="token"' in lost.text


async def test_sign_in_form_is_csrf_protected_too(served_bridge) -> None:
    _, url = served_bridge
    async with httpx.AsyncClient(base_url=url) as http:
        await http.get("/ui/signin")
        forged = await http.post("/ui/signin", data={"token": ADMIN})
        assert forged.status_code == 403 and "CSRF" in forged.text
        assert (await http.get("/ui/")).status_code == 303


async def test_visitors_loading_the_sign_in_page_never_sign_out_another(
    served_bridge, monkeypatch
) -> None:
    """Anyone may load the sign-in page. Each load stored a visitor's session, 10,000 at
    most, the oldest evicted past that: a client loading it 2,500 times a second had
    every operator's sign-in refused ("wrong CSRF token"). Here the limit is 20."""
    monkeypatch.setattr(sessions, "MAX_SESSIONS", 20)
    _, url = served_bridge
    async with (
        httpx.AsyncClient(base_url=url) as operator,
        httpx.AsyncClient(base_url=url) as flood,
    ):
        form = await operator.get("/ui/signin")
        for _ in range(50):
            assert (await flood.get("/ui/signin")).status_code == 200
            flood.cookies.clear()
        answer = await operator.post(
            "/ui/signin", data={"csrf": csrf_of(form), "token": READER, "next": "/ui/messages"}
        )
        assert answer.status_code == 303 and answer.headers["location"] == "/ui/messages"
        assert (await operator.get("/ui/messages")).status_code == 200


async def test_a_sign_in_form_of_many_fields_or_bytes_is_refused_unparsed(served_bridge) -> None:
    """Anyone may post the sign-in form, and it was parsed, whatever its size, before its
    CSRF token was checked: 512 KB of `a=1&` held the event loop (every webhook, API
    call and mail) 0.8 s, and eight at once kept /healthz waiting 5 s."""
    _, url = served_bridge
    async with httpx.AsyncClient(base_url=url) as http:
        form = await http.get("/ui/signin")
        fields = f"csrf={csrf_of(form)}&token={READER}&" + "a=1&" * 100
        refused = await http.post("/ui/signin", content=fields, headers=FORM)
        assert refused.status_code == 400 and "more than 20 fields" in refused.text
        padded = f"csrf={csrf_of(form)}&token={READER}&next=/ui/&pad={'x' * 20_000}"
        refused = await http.post("/ui/signin", content=padded, headers=FORM)
        assert refused.status_code == 413 and "larger than 16384 bytes" in refused.text
        assert (await http.get("/ui/")).status_code == 303  # not signed in


async def test_a_form_body_trickled_past_body_timeout_gets_408_and_a_closed_socket(
    tmp_path, sandbox_url: str, clock: ManualClock
) -> None:
    """The sign-in form takes anyone's post: its body, like the API's, must arrive within
    http.body_timeout, or a few clients trickling forms hold every place under
    http.max_concurrency and the webhooks get 503."""
    config = bridge_config(tmp_path, sandbox_url, TOKENS + '[http]\nbody_timeout = "200ms"\n')
    async with running_bridge(config, clock) as (_, url):
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            b"POST /ui/signin HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\n"
            b"csrf="
        )
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)  # to the server's close
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"connection: close" in head.lower() and b"within 0.2s" in body


async def test_reader_may_look_but_not_act(served_bridge, clock: ManualClock) -> None:
    bridge, url = served_bridge
    async with httpx.AsyncClient(base_url=url) as http:
        queued = await send(http, "+12025550143", "disk full on db-2")
        await sign_in(http, READER)
        page = await http.get(f"/ui/messages/{queued}")
        assert page.status_code == 200 and "need a token with the <code>admin</code>" in page.text
        token = csrf_of(page)
        for path in (f"/ui/messages/{queued}/cancel", f"/ui/messages/{queued}/retry", "/ui/send"):
            refused = await http.post(path, data={"csrf": token, "to": "oncall", "text": "x"})
            assert refused.status_code == 403, path
            assert "lacks the &#39;admin&#39; scope" in refused.text
        assert (await http.get("/ui/send")).status_code == 403
        assert (await bridge.store.get(queued)).state == State.QUEUED
        assert (await bridge.store.counts()) == {"queued": 1}  # no test message went in


async def test_a_forged_post_without_the_csrf_token_changes_nothing(served_bridge) -> None:
    bridge, url = served_bridge
    async with httpx.AsyncClient(base_url=url) as http:
        queued = await send(http, "+12025550143", "disk full on db-2")
        await sign_in(http, ADMIN)
        page = await http.get(f"/ui/messages/{queued}")
        missing = await http.post(f"/ui/messages/{queued}/cancel", data={"reason": "x"})
        wrong = await http.post(f"/ui/messages/{queued}/cancel", data={"csrf": "0" * 43})
        cross_site = await http.post(
            f"/ui/messages/{queued}/cancel",
            data={"csrf": csrf_of(page)},
            headers={"Origin": "https://evil.example.org"},
        )
        as_json = await http.post(f"/ui/messages/{queued}/cancel", json={"csrf": csrf_of(page)})
        assert [r.status_code for r in (missing, wrong, cross_site, as_json)] == [
            403,
            403,
            403,
            415,
        ]
        assert "CSRF" in missing.text and "evil.example.org" in cross_site.text
        assert (await bridge.store.get(queued)).state == State.QUEUED
        # Another signed-in browser's token does not fit this session either.
        async with httpx.AsyncClient(base_url=url) as other:
            await sign_in(other, ADMIN)
            theirs = csrf_of(await other.get("/ui/"))
        stolen = await http.post(f"/ui/messages/{queued}/cancel", data={"csrf": theirs})
        assert stolen.status_code == 403
        assert (await bridge.store.get(queued)).state == State.QUEUED


async def test_admin_cancels_and_retries_with_the_name_in_the_event_log(
    served_bridge, clock: ManualClock
) -> None:
    bridge, url = served_bridge
    async with httpx.AsyncClient(base_url=url) as http:
        queued = await send(http, "+12025550143", "disk full on db-2")
        await sign_in(http, ADMIN)
        token = csrf_of(await http.get(f"/ui/messages/{queued}"))
        cancelled = await http.post(f"/ui/messages/{queued}/cancel", data={"csrf": token})
        assert cancelled.status_code == 303
        message = await bridge.store.get(queued)
        assert message.state == State.FAILED and message.reason == "cancelled by root"
        page = await http.get(cancelled.headers["location"])
        assert "Message 1 cancelled." in page.text  # said once
        assert "Message 1 cancelled." not in (await http.get(f"/ui/messages/{queued}")).text
        again = await http.post(f"/ui/messages/{queued}/cancel", data={"csrf": token})
        assert again.status_code == 409 and "nothing to cancel" in again.text

        clock.advance(5)
        retried = await http.post(f"/ui/messages/{queued}/retry", data={"csrf": token})
        assert retried.status_code == 303
        assert (await bridge.store.get(queued)).state == State.QUEUED
        events = await bridge.store.events(queued)
        assert [(e["state"], e["detail"]) for e in events] == [
            ("queued", None),
            ("failed", "cancelled by root"),
            ("queued", "retried by root"),
        ]
        await pump(
            bridge,
            clock,
            lambda: _state_is(bridge, queued, State.DELIVERED),
            max_seconds=120,
        )
        delivery = (await http.get("/ui/overview.json")).json()["delivery"]
        assert (delivery["delivered"], delivery["failed"]) == (1, 0)  # the cancel is history
        delivered = await http.post(f"/ui/messages/{queued}/retry", data={"csrf": token})
        assert (
            delivered.status_code == 409 and "it was delivered; to text it again" in delivered.text
        )
        missing = await http.post("/ui/messages/999/retry", data={"csrf": token})
        assert missing.status_code == 404


async def _state_is(bridge, message_id: int, state: State) -> bool:
    message = await bridge.store.get(message_id)
    return message is not None and message.state == state


async def test_test_message_to_a_group_goes_out_and_names_its_sender(
    served_bridge, clock: ManualClock
) -> None:
    bridge, url = served_bridge
    async with httpx.AsyncClient(base_url=url) as http:
        await sign_in(http, ADMIN)
        token = csrf_of(await http.get("/ui/send"))
        bad = await http.post("/ui/send", data={"csrf": token, "to": "nobody", "text": "hi"})
        assert bad.status_code == 400 and "to[0]" in bad.text
        sent = await http.post("/ui/send", data={"csrf": token, "to": "oncall", "text": "hi"})
        assert sent.status_code == 303
        assert sent.headers["location"] == "/ui/messages?source=console"
        again = await http.post("/ui/send", data={"csrf": token, "to": "oncall", "text": "hi"})
        assert again.status_code == 303  # a second test is not a duplicate: it goes too
        messages = await bridge.store.query(source="console")
        assert len(messages) == 4 and {m.state for m in messages} == {State.QUEUED}
        events = await bridge.store.events(messages[0].id)
        assert events[-1]["detail"] == "test message sent from the console by root"
        await pump(
            bridge,
            clock,
            lambda: _state_is(bridge, messages[0].id, State.DELIVERED),
            max_seconds=120,
        )


async def test_session_ends_at_sign_out_and_when_its_token_goes(served_bridge, config) -> None:
    bridge, url = served_bridge
    async with httpx.AsyncClient(base_url=url) as http, httpx.AsyncClient(base_url=url) as b:
        await sign_in(http, ADMIN)
        copied = http.cookies["sms_bridge_session"]
        out = await http.post("/ui/signout", data={"csrf": csrf_of(await http.get("/ui/"))})
        assert out.status_code == 303 and out.headers["location"] == "/ui/signin"
        b.cookies.set("sms_bridge_session", copied)
        assert (await b.get("/ui/")).status_code == 303  # the copied cookie died with it

    async with httpx.AsyncClient(base_url=url) as http:
        await sign_in(http, READER)
        assert (await http.get("/ui/")).status_code == 200
        tokens = {k: v for k, v in config.tokens.items() if k != "ops"}
        bridge.reload(dataclasses.replace(config, tokens=tokens))
        assert (await http.get("/ui/")).status_code == 303


async def test_rotated_token_ends_its_sessions(served_bridge, config) -> None:
    bridge, url = served_bridge
    async with httpx.AsyncClient(base_url=url) as http:
        await sign_in(http, READER)
        rotated = dataclasses.replace(config.tokens["ops"], token="a-new-read-token-0123456789")
        bridge.reload(dataclasses.replace(config, tokens={**config.tokens, "ops": rotated}))
        assert (await http.get("/ui/")).status_code == 303


async def test_every_answer_carries_the_security_headers(served_bridge) -> None:
    _, url = served_bridge
    async with httpx.AsyncClient(base_url=url) as http:
        await sign_in(http, READER)
        for path in ("/ui/", "/ui/signin", "/ui/messages.json", "/ui/static/console.js"):
            answer = await http.get(path)
            csp = answer.headers["content-security-policy"]
            assert "script-src 'self'" in csp and "default-src 'none'" in csp, path
            assert "unsafe-inline" not in csp
            assert answer.headers["x-content-type-options"] == "nosniff"
            assert answer.headers["x-frame-options"] == "DENY"
        page = (await http.get("/ui/")).text
        assert "<script>" not in page and " style=" not in page and "http://" not in page
        assert (await http.get("/ui/")).headers["cache-control"] == "no-store"
        missing = await http.get("/ui/nowhere")
        assert missing.status_code == 404 and "content-security-policy" in missing.headers
        assert "no page /ui/nowhere" in missing.text


async def test_cookie_is_secure_over_tls(config, clock: ManualClock) -> None:
    from bridge.app import build as build_bridge

    async with build_bridge(config, clock=clock) as bridge:
        transport = httpx.ASGITransport(app=bridge.app)
        # The Host must be one the bridge serves (http.allowed_hosts): localhost is.
        async with httpx.AsyncClient(transport=transport, base_url="https://localhost") as http:
            answer = await sign_in(http, READER)
            assert answer.status_code == 303
            assert "Secure" in answer.headers["set-cookie"]


async def test_open_bridge_needs_no_sign_in_but_still_a_csrf_token(
    tmp_path, sandbox_url: str, clock: ManualClock
) -> None:
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (bridge, url):
        async with httpx.AsyncClient(base_url=url) as http:
            queued = await send(http, "+12025550143", "disk full")
            page = await http.get(f"/ui/messages/{queued}")
            assert page.status_code == 200 and "open bridge" in page.text
            assert (await http.get("/ui/signin")).headers["location"] == "/ui/"
            assert (await http.get("/ui/overview.json")).status_code == 200
            forged = await http.post(f"/ui/messages/{queued}/cancel", data={"a": "1"})
            assert forged.status_code == 403
            ok = await http.post(f"/ui/messages/{queued}/cancel", data={"csrf": csrf_of(page)})
            assert ok.status_code == 303
            assert (await bridge.store.get(queued)).reason == (
                "cancelled by the console (no tokens configured), from 127.0.0.1"
            )
        async with httpx.AsyncClient(base_url=url) as fresh:  # no cookie: no session to act in
            assert (
                await fresh.post(f"/ui/messages/{queued}/retry", data={"a": "1"})
            ).status_code == 403


async def test_json_pages_take_a_bearer_token(served_bridge) -> None:
    _, url = served_bridge
    async with httpx.AsyncClient(base_url=url) as http:
        reader = {"Authorization": f"Bearer {READER}"}
        sender = {"Authorization": f"Bearer {SENDER}"}
        assert (await http.get("/ui/overview.json", headers=reader)).status_code == 200
        refused = await http.get("/ui/messages.json", headers=sender)
        assert refused.status_code == 403 and "lacks the 'read' scope" in refused.json()["error"]


async def test_messages_list_filters_and_pages(served_bridge) -> None:
    _, url = served_bridge
    async with httpx.AsyncClient(base_url=url) as http:
        ids = [
            await send(http, f"+1202555014{i}", f"backup {i} failed on nas-{i}") for i in range(5)
        ]
        await send(http, "+12025550149", "100% disk_full")
        await sign_in(http, READER)

        async def listed(query: str) -> list[int]:
            answer = await http.get(f"/ui/messages.json?{query}")
            assert answer.status_code == 200, answer.text
            return [m["id"] for m in answer.json()["messages"]]

        assert await listed("q=NAS-3") == [ids[3]]
        assert await listed("recipient=%2B12025550142") == [ids[2]]
        assert await listed("recipient=2025550142") == [ids[2]]
        # a whole number is looked up (test_query_plans), as written by people too; a
        # part of one is still searched for
        assert await listed("recipient=%2B1%20(202)%20555-0142") == [ids[2]]
        assert await listed("recipient=%2B120255501") == [7 - i for i in range(1, 7)]
        assert await listed("recipient=%2B12025550148") == []
        assert len(await listed("q=%25")) == 1  # LIKE wildcards are literal
        assert len(await listed("q=_")) == 1
        assert await listed("state=failed") == []
        assert len(await listed("source=http")) == 6
        assert await listed("route=am") == []
        bad = await http.get("/ui/messages.json?state=lost")
        assert bad.status_code == 400 and "unknown state" in bad.json()["error"]

        first = (await http.get("/ui/messages.json?limit=4&source=http")).json()
        assert [m["id"] for m in first["messages"]] == [6, 5, 4, 3]
        second = (await http.get(f"/ui/messages.json{first['older']}")).json()
        assert [m["id"] for m in second["messages"]] == [2, 1] and second["older"] is None
        assert "source=http" in first["older"]
        html = await http.get("/ui/messages?q=nas-3")
        assert html.status_code == 200 and "backup 3 failed on nas-3" in html.text
        # a phone's page goes on in its own order (creation time, then id)
        more = [await send(http, "+12025550142", f"again {i}") for i in range(3)]
        pages, query = [], "limit=2&recipient=%2B12025550142"
        while query:
            page = (await http.get(f"/ui/messages.json?{query}")).json()
            pages.append([m["id"] for m in page["messages"]])
            query = (page["older"] or "").lstrip("?")
        assert pages == [more[:0:-1], [more[0], ids[2]]]
        assert "backup 2 failed" not in html.text


async def test_older_pages_keep_the_page_size_asked_for(served_bridge) -> None:
    """`limit` is kept by the "Older" and "Newest" links: a script paging through
    `/ui/messages.json?limit=2` by them gets pages of 2, not 2 and then 50."""
    _, url = served_bridge
    async with httpx.AsyncClient(base_url=url) as http:
        ids = [await send(http, f"+1202555014{i}", f"backup {i} failed") for i in range(5)]
        await sign_in(http, READER)
        pages, query = [], "limit=2"
        while query:
            page = (await http.get(f"/ui/messages.json?{query}")).json()
            pages.append([m["id"] for m in page["messages"]])
            query = (page["older"] or "").lstrip("?")
        assert pages == [ids[:2:-1], ids[2:0:-1], ids[:1]]
        second = (await http.get(f"/ui/messages.json?limit=2&before={ids[3]}")).json()
        assert second["newest"] == "?limit=2"


async def test_the_lists_times_say_their_zone(served_bridge, clock: ManualClock) -> None:
    """The list shows creation times in UTC as every other console time is, and says
    so: "08:00:00" bare reads as local time to someone on call in New York."""
    _, url = served_bridge
    async with httpx.AsyncClient(base_url=url) as http:
        await send(http, "+12025550143", "disk full")
        await sign_in(http, READER)
        page = (await http.get("/ui/messages")).text
    assert '<th scope="col">Created (UTC)</th>' in page
    assert ">2027-01-15 08:00:00</time>" in page  # ManualClock's start, in UTC


async def test_a_part_of_a_number_that_is_a_possible_number_finds_the_longer_ones(
    served_bridge,
) -> None:
    """`+4930123456` is a possible Berlin number and a part of `+493012345678`: looked up
    exactly it finds nothing, so its digits are searched for as a part, on its older
    pages too. Once it has been texted itself, it is found exactly (itself only)."""
    _, url = served_bridge
    async with httpx.AsyncClient(base_url=url) as http:
        longer = [await send(http, "+493012345678", f"backup {i} failed") for i in range(3)]
        other = await send(http, "+493012345699", "disk full")
        await send(http, "+12025550142", "elsewhere")
        await sign_in(http, READER)

        async def pages(typed: str) -> list[list[int]]:
            found, query = [], f"limit=2&{urlencode({'recipient': typed})}"
            while query:
                answer = await http.get(f"/ui/messages.json?{query}")
                assert answer.status_code == 200, answer.text
                found.append([m["id"] for m in answer.json()["messages"]])
                query = (answer.json()["older"] or "").lstrip("?")
            return found

        assert await pages("+49 30 123456") == [[other, longer[2]], [longer[1], longer[0]]]
        assert await pages("+4930123456") == [[other, longer[2]], [longer[1], longer[0]]]
        exact = await send(http, "+4930123456", "exactly this one")
        assert await pages("+49 30 123456") == [[exact]]
        page = await http.get("/ui/messages?recipient=%2B4930123456")
        assert page.status_code == 200 and "exactly this one" in page.text
        assert "backup 2 failed" not in page.text


async def test_message_page_shows_text_encoding_timeline_and_duplicates(
    served_bridge, clock: ManualClock
) -> None:
    bridge, url = served_bridge
    async with httpx.AsyncClient(base_url=url) as http:
        first = await send(http, "+12025550143", "Température élevée sur db-2 ✓")
        duplicate = await send(http, "+12025550143", "Température élevée sur db-2 ✓")
        long_id = await send(http, "+12025550144", "x" * 200)
        await pump(
            bridge, clock, lambda: _state_is(bridge, first, State.DELIVERED), max_seconds=120
        )
        await sign_in(http, READER)
        data = (await http.get(f"/ui/messages/{first}.json")).json()
        assert data["encoding"] == "UCS-2" and data["parts"] == 1
        assert data["provider_message_id"] and data["attempts"] == 1
        assert [e["state"] for e in data["events"]] == ["queued", "sending", "sent", "delivered"]
        page = await http.get(f"/ui/messages/{duplicate}")
        assert f'<a href="/ui/messages/{first}">message {first}</a>' in page.text
        assert "suppressed" in page.text
        [twin] = data["mentioned_by"]  # the original names its duplicate
        assert twin["id"] == duplicate and twin["reason"].startswith(
            f"duplicate of message {first}"
        )
        assert (await http.get(f"/ui/messages/{long_id}.json")).json()["mentioned_by"] == []
        long_page = (await http.get(f"/ui/messages/{long_id}.json")).json()
        assert long_page["encoding"] == "GSM-7" and long_page["parts"] == 2
        assert [len(p) for p in long_page["parts_text"]] == [153, 47]
        assert (await http.get("/ui/messages/999")).status_code == 404


async def test_overview_counts_ratio_rate_and_storms(
    tmp_path, sandbox_url: str, clock: ManualClock
) -> None:
    extra = TOKENS + "[limits]\nper_recipient = 1\n[budget]\ntexts_per_day = 50\n"
    config = bridge_config(tmp_path, sandbox_url, extra)
    async with (
        running_bridge(config, clock) as (bridge, url),
        httpx.AsyncClient(base_url=url) as http,
    ):
        first = await send(http, "+12025550143", "disk full on db-1")
        await send(http, "+12025550143", "disk full on db-2")  # held: storm control
        other = await send(http, "+12025550144", "disk full on db-3")
        await pump(
            bridge, clock, lambda: _state_is(bridge, other, State.DELIVERED), max_seconds=120
        )
        await sign_in(http, READER)
        data = (await http.get("/ui/overview.json")).json()
        assert data["states"]["delivered"] == 2 and data["states"]["held"] == 1
        assert data["delivery"]["ratio"] == 1.0 and data["delivery"]["delivered"] == 2
        assert sum(data["rate"]["chart"]["messages"]) == 2
        assert sum(data["rate"]["chart"]["requests"]) >= 2  # sends, plus status polls
        assert data["rate"]["limit_per_minute"] == 100
        assert data["today"]["texts"] == 2 and data["today"]["caps"]["texts_per_day"] == 50
        assert data["today"]["cost"] is not None and data["provider"]["balance"] is not None
        [storm] = data["storms"]
        assert storm["recipient"] == "+12025550143" and storm["held"] == 1
        assert data["provider"]["ready"] is True
        assert first  # delivered: none of it is a failure
        assert data["failures"] == []
        html = await http.get("/ui/")
        assert "<svg" in html.text and "limit 100/min" in html.text
        assert 'aria-labelledby="chart-title chart-desc"' in html.text


async def test_a_day_with_nothing_sent_has_spent_nothing(served_bridge) -> None:
    """Before the day's first send the overview said "Spend: unknown; 0 of 5 counted
    against the cap" (a sum over no rows): nothing sent costs 0. A text sent whose price
    is not known yet is still "unknown"."""
    _, url = served_bridge
    async with httpx.AsyncClient(base_url=url) as http:
        await send(http, "+12025550143", "disk full")  # queued: not sent, nothing spent
        await sign_in(http, READER)
        today = (await http.get("/ui/overview.json")).json()["today"]
        assert today["texts"] == 0 and today["cost"] == 0, today
        html = (await http.get("/ui/")).text
        spend = html[html.index("<dt>Spend</dt>") :].split("</dd>")[0]
        assert "<dd>0" in spend and "unknown" not in spend, spend


async def test_todays_figures_count_a_text_in_flight_as_the_caps_do(
    tmp_path, sandbox_url: str, clock: ManualClock, backend: str
) -> None:
    """A text being sent (a provider call under way, or one whose lease has not run out)
    counts against the daily caps already; the Today card left it out until its answer:
    "SMS parts 0 of 4" while the next text waited for tomorrow's budget. Both stores."""
    config = bridge_config(tmp_path, sandbox_url, TOKENS)
    in_flight = NewMessage(
        "+12025550143", "disk full", "http", "SMS", 1, 3, state=State.SENDING, token="root"
    )
    async with (
        running_bridge(config, clock) as (bridge, url),
        httpx.AsyncClient(base_url=url) as http,
    ):
        await seed(bridge.store, [in_flight], clock.now())
        await sign_in(http, READER)
        today = (await http.get("/ui/overview.json")).json()["today"]
    assert (today["texts"], today["parts"], today["tokens"]) == (1, 3, {"root": 1}), today


async def test_routes_show_auth_snippets_last_call_and_never_a_secret(served_bridge) -> None:
    _, url = served_bridge
    async with httpx.AsyncClient(base_url=url) as http:
        await sign_in(http, READER)
        listing = (await http.get("/ui/routes.json")).json()
        [route] = listing["routes"]
        assert route["url"] == f"{url}/hooks/am" and route["last_call"] is None
        assert route["authentication"] == ["bearer token (Authorization: Bearer ...)"]
        refused = await http.post(f"{url}/hooks/am", json={})
        assert refused.status_code == 401
        route = (await http.get("/ui/routes/am.json")).json()
        assert route["last_call"] is None  # refused: counted apart, with its real reason
        assert route["refused"]["count"] == 1 and route["refused"]["last"]["status"] == 401
        assert "bearer token" in route["refused"]["last"]["answer"]
        assert "webhook_configs" in route["snippets"][0]["text"]
        page = await http.get("/ui/routes/am")
        assert ROUTE_TOKEN not in page.text and ROUTE_TOKEN not in str(route)
        assert "transport_maps" in (await http.get("/ui/routes")).text
        await http.post("/hooks/nonexistent", json={})
        assert "nonexistent" not in (await http.get("/ui/routes")).text


async def test_ci_setup_snippets_subscribe_one_level_of_events(
    tmp_path, clock: ManualClock, sandbox_url: str
) -> None:
    """A failed Actions run sends its workflow_run and its check suite (app
    github-actions); a failed pipeline its pipeline and its failed jobs: a webhook set
    up with both levels texts each failure twice. The snippets pick one (the recipes'
    "Pick one level"), the same in the form's words and the command line's."""
    gitlab = f'[routes.gl]\nformat = "gitlab"\nto = ["oncall"]\nsecret = "{ROUTE_TOKEN}"\n'
    config = bridge_config(tmp_path, sandbox_url, GITHUB_ROUTE + gitlab)
    async with (
        running_bridge(config, clock) as (_, url),
        httpx.AsyncClient(base_url=url) as http,
    ):
        await sign_in(http, READER)
        github, gitlab = [
            "\n".join(
                s["text"] for s in (await http.get(f"/ui/routes/{n}.json")).json()["snippets"]
            )
            for n in ("gh", "gl")
        ]
    levels = {
        "workflow_run": "Workflow runs",
        "workflow_job": "Workflow jobs",
        "check_suite": "Check suites",
        "check_run": "Check runs",
    }
    assert "Events:        Workflow runs, Deployment statuses\n" in github
    assert [e for e in re.findall(r"events\[\]=(\w+)", github) if e in levels] == ["workflow_run"]
    assert not [words for words in levels.values() if words in github and words != "Workflow runs"]
    assert "Trigger:       Pipeline events, Deployment events\n" in gitlab
    assert "pipeline_events=true" in gitlab and "job_events=true" not in gitlab
    assert "Job events" not in gitlab


async def test_preview_shows_the_sms_and_stores_nothing(served_bridge) -> None:
    bridge, url = served_bridge
    async with httpx.AsyncClient(base_url=url) as http:
        await sign_in(http, READER)  # read is enough: a preview changes nothing
        token = csrf_of(await http.get("/ui/routes/am"))
        sample = await http.post("/ui/routes/am/preview", data={"csrf": token, "sample": "1"})
        assert sample.status_code == 200
        assert "[FIRING:1] HighLatency api-1: p99 above 2s" in sample.text
        assert "+12025550101, +12025550102" in sample.text and "GSM-7" in sample.text
        broken = await http.post("/ui/routes/am/preview", data={"csrf": token, "payload": "{"})
        assert "not valid JSON" in broken.text
        wrong = await http.post(
            "/ui/routes/am/preview", data={"csrf": token, "payload": '{"alerts": 3}'}
        )
        assert "Refused" in wrong.text and "alerts" in wrong.text
        forged = await http.post("/ui/routes/am/preview", data={"sample": "1"})
        assert forged.status_code == 403
        assert (await http.get("/ui/routes/nope")).status_code == 404
        assert await bridge.store.counts() == {}


def templated_route(name: str, template: str) -> str:
    """A generic route to the on-call group whose text is `template` (Jinja, as written)."""
    return f"""{TOKENS}
    [routes.{name}]
    format = "generic"
    to = ["oncall"]
    token = "{ROUTE_TOKEN}"
    template = "{template}"
    """


@contextlib.asynccontextmanager
async def previewing(
    tmp_path, sandbox_url: str, clock: ManualClock, route: str, template: str
) -> AsyncIterator[Callable[[dict[str, object]], Awaitable[str]]]:
    """A reader signed in to a bridge with `route` templated: posts a payload to the
    route's preview and gives the page (a 200, or the test fails)."""
    config = bridge_config(tmp_path, sandbox_url, templated_route(route, template))
    async with running_bridge(config, clock) as (_, url), httpx.AsyncClient(base_url=url) as http:
        await sign_in(http, READER)
        token = csrf_of(await http.get(f"/ui/routes/{route}"))

        async def preview(payload: dict[str, object]) -> str:
            answer = await http.post(
                f"/ui/routes/{route}/preview",
                data={"csrf": token, "payload": json.dumps(payload)},
            )
            assert answer.status_code == 200, answer.text
            return answer.text

        yield preview


async def test_a_preview_says_when_the_template_was_not_used(
    tmp_path, sandbox_url: str, clock: ManualClock
) -> None:
    """A route's template that fails on a payload (or renders nothing) is replaced by the
    format's default text, as the webhook does. The preview showed that text alone, as
    if it were the template's: whoever checked a template there saw it "work". It now
    says the template was not used, and why, above the text that goes out."""
    template = "Jenkins {{ name }} #{{ build.number }}: {{ build.status.lower() }}"
    async with previewing(tmp_path, sandbox_url, clock, "jenkins", template) as preview:
        good = await preview({"name": "nightly", "build": {"number": 7, "status": "FAILURE"}})
        assert "Jenkins nightly #7: failure" in good and "Not the route's template" not in good
        # A call of what the payload lacks fails (its attribute alone is printed as empty)
        bad = await preview({"name": "nightly", "message": "disk full"})
        assert '<pre class="sms">disk full</pre>' in bad
        [line] = re.findall(r"<p class=\"problem\">Not the route's template: (.*?)</p>", bad)
        assert "build" in line and "default text" in line


async def test_a_preview_names_the_fields_its_template_printed_as_empty(
    tmp_path, sandbox_url: str, clock: ManualClock
) -> None:
    """A template prints a field the payload lacks as empty, and the webhook's 202 and
    the message's events name it; the preview showed the text with its gap and not a
    word of why. It now names them above the text, masked as the rest of it is."""
    template = "Jenkins {{ name }} #{{ build.number }}: {{ labels[key] }}"
    async with previewing(tmp_path, sandbox_url, clock, "jenkins", template) as preview:
        whole = {"name": "nightly", "build": {"number": 7}, "labels": {"a": "ok"}, "key": "a"}
        assert "Printed as empty" not in await preview(whole)
        gaps = await preview({"name": "nightly", "labels": {}, "key": ROUTE_TOKEN})
        assert '<pre class="sms">Jenkins nightly #:</pre>' in gaps
        [line] = re.findall(r'<p class="problem">Printed as empty, (.*?)</p>', gaps)
        # a name may be a payload's value: a secret there is masked, as in the log
        assert line.startswith("as the payload lacks them: build, ") and ROUTE_TOKEN not in line


async def test_a_preview_names_a_field_looked_up_by_a_lone_surrogate(
    tmp_path, sandbox_url: str, clock: ManualClock
) -> None:
    """A template that looks a field up by a name made of a payload's number (55296, a
    lone surrogate) named it in the preview raw: the page could not be written as
    UTF-8, a 500. The name is shown with its escape, as in the 202 and the events."""
    template = "{{ summary }}{{ labels['%c' | format(code)] }}"
    async with previewing(tmp_path, sandbox_url, clock, "odd", template) as preview:
        page = await preview({"summary": "disk full", "labels": {}, "code": 0xD800})
        [line] = re.findall(r'<p class="problem">Printed as empty, (.*?)</p>', page)
        assert line == "as the payload lacks them: \\ud800."


async def test_a_preview_refuses_the_recipients_the_webhook_refuses(
    tmp_path, sandbox_url: str, clock: ManualClock
) -> None:
    """The preview resolved recipients its own way: a payload naming more than
    `http.max_recipients` showed the texts and their cost, while the webhook answers the
    same payload 400. Both now take their recipients from one function."""
    config = bridge_config(tmp_path, sandbox_url, PAYLOAD_RECIPIENTS_ROUTE)
    many = [f"+120255501{n % 100:02d}" for n in range(101)]  # a duplicate counts too
    payload = json.dumps({"to": many, "message": "disk full"})
    async with running_bridge(config, clock) as (_, url), httpx.AsyncClient(base_url=url) as http:
        hook = await http.post(
            "/hooks/anyjson",
            content=payload,
            headers={"authorization": f"Bearer {ROUTE_TOKEN}", "content-type": "application/json"},
        )
        assert hook.status_code == 400
        await sign_in(http, READER)
        token = csrf_of(await http.get("/ui/routes/anyjson"))
        answer = await http.post(
            "/ui/routes/anyjson/preview", data={"csrf": token, "payload": payload}
        )
    assert answer.status_code == 200
    [line] = re.findall(r'<p class="problem">Refused: (.*?)</p>', answer.text)
    assert line == "to: 101 recipients in one request; at most 100 (http.max_recipients)"
    assert hook.json()["error"] == line


async def test_a_preview_keeps_the_event_it_was_made_for(
    tmp_path, sandbox_url: str, clock: ManualClock
) -> None:
    """The event typed for a GitHub route's preview stays in its field beside the
    result: emptied, the result no longer says which event it is for, and the next
    preview of an edited payload would quietly be made for the sample's event."""
    config = bridge_config(tmp_path, sandbox_url, GITHUB_ROUTE)
    async with running_bridge(config, clock) as (_, url), httpx.AsyncClient(base_url=url) as http:
        await sign_in(http, READER)
        page = await http.get("/ui/routes/gh")
        assert '<input id="event" name="event" value="">' in page.text
        form = {"csrf": csrf_of(page), "payload": "{}", "event": "ping"}
        answer = await http.post("/ui/routes/gh/preview", data=form)
    assert answer.status_code == 200
    assert "Ignored (answered 200, nobody texted): ping: pong" in answer.text
    assert '<input id="event" name="event" value="ping">' in answer.text


def test_chart_puts_requests_against_the_limit() -> None:
    from bridge.ingress.http.console.chart import build

    requests = [0] * 10
    requests[9] = 60  # this minute
    messages = [0] * 9 + [300]
    drawn = build(requests, messages, limit=100, since=0.0, bucket=60.0)
    [bar] = drawn.bars
    assert bar.label == "00:09 UTC: 60 requests, 300 messages"
    assert drawn.y_ticks[-1].label == "400"  # the axis holds the tallest series
    assert drawn.plot_top < drawn.limit_y < bar.y < drawn.plot_bottom  # limit above the bar
    assert round(bar.height / (drawn.plot_bottom - drawn.plot_top), 3) == 60 / 400
    quiet = build([1, 0], [1, 0], limit=100, since=0.0, bucket=60.0)
    assert quiet.y_ticks[-1].label == "120" and len(quiet.bars) == 1


async def test_an_unknown_state_is_a_400_on_the_api_as_on_the_console(served_bridge) -> None:
    """`?state=faild` listed nothing with a 200: a script asking for failures by a typo
    was told there were none. The API refuses it, naming the states, as the console does."""
    _, url = served_bridge
    async with httpx.AsyncClient(base_url=url) as http:
        failed = await cancelled(http, "+12025550143", "disk full")
        reader = {"Authorization": f"Bearer {READER}"}
        for key in ("state", "status"):
            typo = await http.get(f"/api/v1/messages?{key}=faild", headers=reader)
            assert typo.status_code == 400, typo.text
            assert typo.json()["field"] == key
            assert "'faild'" in typo.json()["error"] and "failed" in typo.json()["error"]
            listed = await http.get(f"/api/v1/messages?{key}=failed", headers=reader)
            assert [m["id"] for m in listed.json()["messages"]] == [failed]
        await sign_in(http, READER)
        assert (await http.get("/ui/messages.json?state=faild")).status_code == 400


async def test_api_retry_and_cancel_need_admin_and_name_the_token(served_bridge) -> None:
    bridge, url = served_bridge
    async with httpx.AsyncClient(base_url=url) as http:
        queued = await send(http, "+12025550143", "disk full on db-2")
        cancel = f"/api/v1/messages/{queued}/cancel"
        reader = await http.post(cancel, headers={"Authorization": f"Bearer {READER}"})
        nobody = await http.post(cancel)
        assert [reader.status_code, nobody.status_code] == [403, 401]
        admin = {"Authorization": f"Bearer {ADMIN}"}
        done = await http.post(cancel, headers=admin)
        assert done.status_code == 200 and done.json()["reason"] == "cancelled by root"
        again = await http.post(cancel, headers=admin)
        assert again.status_code == 409 and "a retry queues it again" in again.json()["error"]
        retried = await http.post(f"/api/v1/messages/{queued}/retry", headers=admin)
        assert retried.status_code == 200 and retried.json()["state"] == "queued"
        assert (await http.post("/api/v1/messages/77/retry", headers=admin)).status_code == 404
        assert (await http.post(f"/api/v1/messages/{queued}/purge", headers=admin)).status_code in (
            404,
            405,
        )
        found = await http.get(
            "/api/v1/messages?q=db-2&recipient=2025550143",
            headers={"Authorization": f"Bearer {READER}"},
        )
        assert [m["id"] for m in found.json()["messages"]] == [queued]
        assert [e["detail"] for e in await bridge.store.events(queued)][-2:] == [
            "cancelled by root",
            "retried by root",
        ]


async def test_digest_page_lists_what_it_folded(
    tmp_path, sandbox_url: str, clock: ManualClock
) -> None:
    config = bridge_config(tmp_path, sandbox_url, TOKENS + "[limits]\nper_recipient = 1\n")
    async with (
        running_bridge(config, clock) as (bridge, url),
        httpx.AsyncClient(base_url=url) as http,
    ):
        await send(http, "+12025550143", "disk full on db-1")
        held = [await send(http, "+12025550143", f"disk full on db-{i}") for i in (2, 3)]
        await pump(bridge, clock, lambda: _state_is(bridge, held[-1], State.SUPPRESSED))
        reason = (await bridge.store.get(held[0])).reason
        digest = int(reason.rsplit(" ", 1)[1])
        await sign_in(http, READER)
        data = (await http.get(f"/ui/messages/{digest}.json")).json()
        assert data["source"] == "digest" and data["text"].startswith("+2 more")
        assert [m["id"] for m in data["mentioned_by"]] == held
        page = await http.get(f"/ui/messages/{held[0]}")
        assert f'<a href="/ui/messages/{digest}">message {digest}</a>' in page.text
        assert "Folded into this digest (2)" in (await http.get(f"/ui/messages/{digest}")).text


async def test_a_digest_that_folded_more_than_the_page_lists_does_not_say_fewer(
    served_bridge, clock: ManualClock
) -> None:
    """A storm of 250 texts folded into one digest: its page lists the first 200 and
    says there are more, not "(200)" beside a digest that reads "+250 more"."""
    bridge, url = served_bridge
    digest = NewMessage("+12025550144", "+250 more: DiskFull x250", "digest", "SMS", 1, 1)
    [digest_id] = await seed(bridge.store, [digest._replace(state=State.SENT)], clock.now())
    folded = NewMessage("+12025550144", "disk full", "http", "SMS", 1, 1, state=State.SUPPRESSED)
    reason = f"storm control: folded into digest message {digest_id}"
    await seed(bridge.store, [folded._replace(reason=reason)] * 250, clock.now())
    few = await seed(bridge.store, [digest._replace(state=State.SENT)], clock.now())
    await seed(bridge.store, [folded._replace(reason=f"{reason[:-1]}{few[0]}")] * 3, clock.now())
    async with httpx.AsyncClient(base_url=url) as http:
        await sign_in(http, READER)
        page = (await http.get(f"/ui/messages/{digest_id}")).text
        assert "Folded into this digest (200)" not in page
        assert "Folded into this digest (more than 200; the first 200 listed)" in page
        data = (await http.get(f"/ui/messages/{digest_id}.json")).json()
        assert len(data["mentioned_by"]) == 200 and data["mentioned_by_more"] is True
        small = await http.get(f"/ui/messages/{few[0]}")
        assert "Folded into this digest (3)" in small.text
        assert (await http.get(f"/ui/messages/{few[0]}.json")).json()["mentioned_by_more"] is False


async def test_mentions_match_whole_message_numbers(served_bridge) -> None:
    bridge, url = served_bridge
    async with httpx.AsyncClient(base_url=url) as http:
        for i in range(3):
            await send(http, f"+1202555014{i}", f"text {i}")
    repeat = NewMessage("+12025550140", "text 0", "http", "SMS", 1, 1, state=State.SUPPRESSED)
    [suppressed] = await seed(
        bridge.store, [repeat._replace(reason="duplicate of message 12 within 600s")], 1.0
    )
    assert await bridge.store.mentioned_by(1) == []
    assert [m["id"] for m in await bridge.store.mentioned_by(12)] == [suppressed]


async def test_ids_beyond_sqlites_integers_are_not_found_not_500(
    tmp_path, clock: ManualClock
) -> None:
    """A console or API path id past 2**63-1 cannot be bound by SQLite: absent, not a 500.
    A cursor (`before`) outside the ids the store holds is a 400 naming it, as the API's
    is: below -2**63 SQLite could not bind it either (a 500 before)."""

    huge = 2**63
    async with httpx.AsyncClient() as http:
        config = bridge_config(tmp_path, "http://127.0.0.1:9")
        async with running_bridge(config, clock) as (_, url):
            page = await http.get(f"{url}/ui/messages/{huge}.json")
            listed = [
                await http.get(f"{url}/ui/messages{suffix}", params={"before": str(before)})
                for suffix in (".json", "")
                for before in (huge, -huge - 1)
            ]
            api = await http.post(f"{url}/api/v1/messages/{huge}/retry")
    assert page.status_code == 404, page.text
    for answer in listed:
        assert answer.status_code == 400 and "before" in answer.text, answer.text
    assert api.status_code == 400 and "'id'" in api.json()["error"]


async def test_hostile_previews_and_oversized_sends_are_refused_not_500(
    served_bridge,
) -> None:
    """A preview reads a payload as the webhook does (depth, lone surrogates), and the
    console's send form is held to http.max_recipients like the API."""
    bridge, url = served_bridge
    async with httpx.AsyncClient(base_url=url) as http:
        await sign_in(http, ADMIN)
        token = csrf_of(await http.get("/ui/routes/am"))
        deep = "[" * 50_000 + "]" * 50_000
        for payload, why in ((deep, "nested"), ('{"message": "\\ud800"}', "surrogate")):
            answer = await http.post(
                "/ui/routes/am/preview", data={"csrf": token, "payload": payload}
            )
            assert answer.status_code == 200, answer.text[:300]
            assert why in answer.text
        token = csrf_of(await http.get("/ui/send"))
        many = ",".join(f"+1202555{i:04d}" for i in range(101))
        refused = await http.post("/ui/send", data={"csrf": token, "to": many, "text": "hi"})
        assert refused.status_code == 400 and "http.max_recipients" in refused.text
    assert await bridge.store.counts() == {}


def _provider_quotes_the_key(config, sandbox_state: SandboxState, status: int, words: str) -> str:
    """The provider's next /send answers `status` with `words` and our API key (which
    it returns)."""
    key = config.provider.api_key
    echo = json.dumps({"success": False, "message": f"{words} {key}"})
    sandbox_state.faults.append(Fault(status=status, body=echo, path="/send"))
    return str(key)


async def test_a_provider_quoting_our_key_shows_it_nowhere(
    config, clock: ManualClock, sandbox_state: SandboxState
) -> None:
    """A 401 whose text quotes our API key: /readyz, open to anyone, says so in the
    bridge's words; the console (a token's) shows the provider's answer, masked as the
    log masks it."""
    key = _provider_quotes_the_key(config, sandbox_state, 401, "invalid API key")
    async with (
        running_bridge(config, clock) as (bridge, url),
        httpx.AsyncClient(base_url=url) as http,
    ):
        await send(http, "+12025550143", "disk full")
        await bridge.dispatcher.run_once()
        assert not bridge.dispatcher.health.ready
        ready = await http.get("/readyz")
        assert ready.status_code == 503 and key not in ready.text
        assert ready.json()["problems"] == {"provider": PROVIDER_REFUSED}
        await sign_in(http, READER)
        overview = await http.get("/ui/overview.json")
        assert overview.json()["provider"]["problem"].endswith("invalid API key ***")
        assert key not in overview.text


async def test_a_provider_quoting_our_key_in_a_refusal_leaves_it_in_no_message(
    config, clock: ManualClock, sandbox_state: SandboxState
) -> None:
    """A 400 whose text quotes our API key fails the message with the provider's words as
    its reason, and a 401's words are a waiting message's reason: a `read` token (a
    dashboard's) saw the key in the API, on the message page and in the overview."""
    key = _provider_quotes_the_key(config, sandbox_state, 400, "no such sender for API key")
    async with (
        running_bridge(config, clock) as (bridge, url),
        httpx.AsyncClient(base_url=url) as http,
    ):
        refused = await send(http, "+12025550143", "disk full")
        await bridge.dispatcher.run_once()
        _provider_quotes_the_key(config, sandbox_state, 401, "no such sender for API key")
        waiting = await send(http, "+12025550144", "disk full again")
        await bridge.dispatcher.run_once()
        assert (await bridge.store.get(refused)).state == State.FAILED  # type: ignore[union-attr]
        assert (await bridge.store.get(waiting)).state == State.QUEUED  # type: ignore[union-attr]
        reader = {"Authorization": f"Bearer {READER}"}
        one = await http.get(f"/api/v1/messages/{refused}", headers=reader)
        assert one.json()["reason"] == "provider refused: no such sender for API key ***"
        answers = [one, await http.get("/api/v1/messages", headers=reader)]
        answers.append(await http.get(f"/api/v1/messages/{waiting}", headers=reader))
        await sign_in(http, READER)
        for path in (f"/ui/messages/{refused}", f"/ui/messages/{waiting}", "/ui/messages"):
            answers += [await http.get(path), await http.get(f"{path}.json")]
        answers += [await http.get("/ui/"), await http.get("/ui/overview.json")]
        for answer in answers:
            assert answer.status_code == 200, answer.url
            assert key not in answer.text, answer.url
            assert "API key ***" in answer.text, answer.url


async def test_a_store_error_quoting_a_secret_is_masked_on_console_pages(
    config, clock: ManualClock
) -> None:
    """What the store's driver said reaches the console's error page with every
    configured secret masked, as /readyz and the API's 503 show it."""
    key = config.provider.api_key

    def quoting() -> None:
        raise sqlite3.OperationalError(f"disk I/O error near '{key}' and '{ROUTE_TOKEN}'")

    store = faulty_store(config)
    async with (
        running_bridge(config, clock, store) as (_, url),
        httpx.AsyncClient(base_url=url) as http,
    ):
        await sign_in(http, ADMIN)
        token = csrf_of(await http.get("/ui/send"))
        store.fail_commits(quoting)
        answer = await http.post(
            "/ui/send", data={"csrf": token, "to": "+12025550143", "text": "hi"}
        )
        store.fail_commits(None)
    assert answer.status_code == 503, answer.text[:300]
    assert "near &#39;***&#39; and &#39;***&#39;" in answer.text, answer.text[:1000]
    assert key not in answer.text and ROUTE_TOKEN not in answer.text


async def test_a_previews_refusal_is_masked_as_the_log_is(
    tmp_path, sandbox_url: str, clock: ManualClock
) -> None:
    """The refusal quotes what the payload wrote: a secret of this config pasted into
    it (here a token, where the route takes its recipients from the payload) is masked,
    as in every other console answer."""
    config = bridge_config(tmp_path, sandbox_url, PAYLOAD_RECIPIENTS_ROUTE)
    async with running_bridge(config, clock) as (_, url), httpx.AsyncClient(base_url=url) as http:
        await sign_in(http, READER)
        token = csrf_of(await http.get("/ui/routes/anyjson"))
        payload = json.dumps({"to": ADMIN, "message": "x"})
        refused = await http.post(
            "/ui/routes/anyjson/preview", data={"csrf": token, "payload": payload}
        )
    assert refused.status_code == 200
    [line] = re.findall(r'<p class="problem">Refused: (.*?)</p>', refused.text)
    assert "***" in line and ADMIN not in line  # the payload's own box shows it as pasted


async def test_a_routes_last_answer_is_masked_before_it_is_cut(
    tmp_path, sandbox_url: str, clock: ManualClock
) -> None:
    """The route page's last call shows what the sender was told, which may quote its
    payload (here a recipient as written): a secret of this config pasted there is
    masked, as in the preview. Masked before the cut to 200 characters: cut first, a
    token across the cut kept its first characters, and neither part was a whole secret
    for the mask to find."""
    config = bridge_config(tmp_path, sandbox_url, PAYLOAD_RECIPIENTS_ROUTE)
    recipient = "a" * 167 + ADMIN  # quoted after "to[0]: no group named '" (23 characters)
    async with running_bridge(config, clock) as (_, url), httpx.AsyncClient(base_url=url) as http:
        hook = await http.post(
            "/hooks/anyjson",
            json={"to": recipient, "message": "disk full"},
            headers={"authorization": f"Bearer {ROUTE_TOKEN}"},
        )
        told = hook.json()["error"]  # the sender's own words, unmasked: its own to see
        assert hook.status_code == 400 and told.index(ADMIN) < 200 < told.index(ADMIN) + len(ADMIN)
        await sign_in(http, READER)
        shown = (await http.get("/ui/routes/anyjson.json")).json()["last_call"]["answer"]
        page = (await http.get("/ui/routes")).text
    assert shown == told.replace(ADMIN, "***")[:200] and shown.endswith("a***' in [g"), shown
    assert ADMIN[:4] not in shown and ADMIN[:4] not in page


async def test_a_past_schedule_time_is_masked_before_its_echo_is_cut(
    tmp_path, sandbox_url: str, clock: ManualClock
) -> None:
    """A past `schedule_time` is refused quoting it, cut to 40 characters; its fraction
    digits are any number, so it can carry a secret of digits (here a token). Cut before
    any mask, the route page's last answer kept the token's first part, which neither
    the page's mask nor the log's could then find."""
    digits = "908172635445362718091234"  # a configured secret of digits alone
    config = bridge_config(
        tmp_path,
        sandbox_url,
        f'{PAYLOAD_RECIPIENTS_ROUTE}[tokens.digits]\ntoken = "{digits}"\nscopes = ["read"]\n',
    )
    past = "2020-01-01T00:00:00." + "1" * 15 + digits  # the token spans characters 36-59
    async with running_bridge(config, clock) as (_, url), httpx.AsyncClient(base_url=url) as http:
        hook = await http.post(
            "/hooks/anyjson",
            params={"schedule_time": past},
            json={"to": "+12025550143", "message": "disk full"},
            headers={"authorization": f"Bearer {ROUTE_TOKEN}"},
        )
        await sign_in(http, READER)
        shown = (await http.get("/ui/routes/anyjson.json")).json()["last_call"]["answer"]
    assert hook.status_code == 400 and "is in the past" in hook.json()["error"], hook.text
    # Masked first, what is left is short enough to quote whole.
    assert shown.startswith(f"schedule_time: '{past.replace(digits, '***')}' is in"), shown
    assert digits[:4] not in shown and digits[:4] not in hook.text


async def test_a_previews_ignored_line_is_masked_as_its_refusal_is(
    tmp_path, sandbox_url: str, clock: ManualClock
) -> None:
    """The reason a payload is ignored quotes what was typed (here the GitHub event): a
    secret of this config there is masked, as on the "Refused" line."""
    config = bridge_config(tmp_path, sandbox_url, GITHUB_ROUTE)
    async with running_bridge(config, clock) as (_, url), httpx.AsyncClient(base_url=url) as http:
        await sign_in(http, READER)
        token = csrf_of(await http.get("/ui/routes/gh"))
        form = {"csrf": token, "payload": "{}", "event": f"{ADMIN}-push"}
        ignored = await http.post("/ui/routes/gh/preview", data=form)
    assert ignored.status_code == 200
    [line] = re.findall(r"<p>Ignored \(answered 200, nobody texted\): (.*?)</p>", ignored.text)
    assert line == "event ***-push is not texted"
    assert ADMIN not in ignored.text


async def test_a_page_size_outside_its_range_is_a_400_that_says_the_range(served_bridge) -> None:
    """`limit=0` listed one message (clamped up, silently), `limit=5000` a thousand and
    `before=0` the newest page, each with a 200 as if it were what was asked. Now a 400
    naming the field and the range, on the API (1-1000) as on the console (1-500)."""
    _, url = served_bridge
    async with httpx.AsyncClient(base_url=url) as http:
        ids = [await send(http, f"+1202555014{i}", f"disk {i} full") for i in range(3)]
        reader = {"Authorization": f"Bearer {READER}"}
        for path, top in (("/api/v1/messages", 1000), ("/ui/messages.json", 500)):
            for query, field in (
                ("limit=0", "limit"),
                ("limit=-1", "limit"),
                (f"limit={top + 1}", "limit"),
                ("limit=99999999999999999999", "limit"),
                ("before=0", "before"),
            ):
                answer = await http.get(f"{path}?{query}", headers=reader)
                assert answer.status_code == 400, (path, query, answer.text)
                assert f"'{field}' must be an integer from 1 to" in answer.json()["error"]
            limit = await http.get(f"{path}?limit=0", headers=reader)
            assert f"from 1 to {top}" in limit.json()["error"]
            edge = await http.get(f"{path}?limit={top}&before={ids[2]}", headers=reader)
            assert [m["id"] for m in edge.json()["messages"]] == ids[1::-1]
            one = await http.get(f"{path}?limit=1", headers=reader)
            assert [m["id"] for m in one.json()["messages"]] == [ids[2]]
        await sign_in(http, READER)
        page = await http.get("/ui/messages?limit=0")
        assert page.status_code == 400 and "from 1 to 500" in page.text


async def test_a_filter_the_bridge_does_not_know_is_a_400_not_an_empty_list(
    served_bridge,
) -> None:
    """`?source=api` or `?reason=canceled` listed nothing with a 200 (no such source or
    kind), and `?state=failed&status=queued` or `?state=failed&state=queued` listed the
    queued ones. Each now says what it takes."""
    _, url = served_bridge
    async with httpx.AsyncClient(base_url=url) as http:
        cancelled_id = await cancelled(http, "+12025550143", "disk full")
        reader = {"Authorization": f"Bearer {READER}"}
        for query, field in (
            ("source=api", "source"),
            ("reason=canceled", "reason"),
            ("state=failed&status=queued", "status"),
            ("state=failed&state=queued", "state"),
            ("limit=1&limit=2", "limit"),
        ):
            answer = await http.get(f"/api/v1/messages?{query}", headers=reader)
            assert answer.status_code == 400, (query, answer.text)
            assert answer.json()["field"] == field
        unknown = await http.get("/api/v1/messages?source=api", headers=reader)
        assert "'api'" in unknown.json()["error"] and "http" in unknown.json()["error"]
        ok = await http.get("/api/v1/messages?reason=cancelled&source=http", headers=reader)
        assert [m["id"] for m in ok.json()["messages"]] == [cancelled_id]
        await sign_in(http, READER)
        bad = await http.get("/ui/messages.json?source=api")
        assert bad.status_code == 400 and "'api'" in bad.json()["error"]
        twice = await http.get("/ui/messages.json?state=failed&state=queued")
        assert twice.status_code == 400 and "more than once" in twice.json()["error"]


async def test_a_query_of_many_parameters_costs_no_more_than_reading_it(
    tmp_path, sandbox_url: str, clock: ManualClock
) -> None:
    """The check for a parameter given twice counted each one's values anew, every one
    of them read each time: a list query of n parameters cost n * n. A reader's request
    of 16,000 short names (60 KB, under a raised `http.max_header_bytes`) held the event
    loop, every listener's, for ~5 s; 4,000 under the default 16 KB, ~0.3 s. One pass
    now: the same request answers in milliseconds (a 400 since the list refuses names it
    does not take)."""
    extra = f"{TOKENS}\n[http]\nmax_header_bytes = 1048576\n"
    config = bridge_config(tmp_path, sandbox_url, extra)
    chars = string.ascii_letters + string.digits
    names = [*chars, *map("".join, itertools.product(chars, repeat=2))]
    names += map("".join, itertools.product(chars, repeat=3))
    query = "&".join(names[:16_000])
    assert len(query) < 62_000  # past httpx's longest URL: sent raw

    async def get(url: str, target: str) -> bytes:
        port = int(url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        writer.write(f"{head}Authorization: Bearer {READER}\r\n\r\n".encode())
        try:
            return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
        finally:
            writer.close()

    async with running_bridge(config, clock) as (_, url):
        # Each a 400 now (names the list does not take, then one given twice): in time.
        answer = await get(url, f"/api/v1/messages?{query}")
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
        twice = await get(url, f"/api/v1/messages?{query}&a")
        assert twice.startswith(b"HTTP/1.1 400 "), twice[:200]


async def test_other_reasons_in_the_stats_are_a_filter_too(
    tmp_path, sandbox_url: str, sandbox_state: SandboxState, clock: ManualClock
) -> None:
    """/api/v1/stats counts failed messages with no reason kind (the provider refused
    it) as 'other'; `?reason=other` lists exactly those."""
    config = bridge_config(tmp_path, sandbox_url, TOKENS)
    sandbox_state.faults.append(Fault(status=400, path="/send"))
    async with (
        running_bridge(config, clock) as (bridge, url),
        httpx.AsyncClient(base_url=url) as http,
    ):
        refused = await send(http, "+12025550143", "disk full")
        await pump_until_state(bridge, clock, refused, State.FAILED, max_seconds=120)
        await send(http, "+12025550144", "disk full")  # queued: no reason at all
        reader = {"Authorization": f"Bearer {READER}"}
        stats = (await http.get("/api/v1/stats", headers=reader)).json()
        assert stats["reasons"] == {"failed": {"other": 1}}
        other = await http.get("/api/v1/messages?reason=other", headers=reader)
        assert [m["id"] for m in other.json()["messages"]] == [refused]


async def test_recent_failures_are_the_latest_failed_not_the_newest_ids(
    tmp_path, sandbox_url: str, sandbox_state: SandboxState, clock: ManualClock, backend: str
) -> None:
    """An old message retried and failed just now was listed below every newer failure
    (ordered by id), off the overview's ten for a busy bridge. And a cancelled message
    was listed there while the delivery ratio left it out: both leave it out now (an
    operator's act, not a delivery that failed), on both stores."""
    config = bridge_config(tmp_path, sandbox_url, TOKENS)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    async with (
        running_bridge(config, clock) as (bridge, url),
        httpx.AsyncClient(base_url=url) as http,
    ):

        async def refused(message_id: int) -> None:
            sandbox_state.faults.append(Fault(status=400, path="/send"))
            await pump_until_state(bridge, clock, message_id, State.FAILED, max_seconds=120)
            clock.advance(60)

        old = await send(http, "+12025550143", "backup failed")
        await refused(old)
        newer = await send(http, "+12025550144", "disk full")
        await refused(newer)
        retried = await http.post(f"/api/v1/messages/{old}/retry", headers=admin)
        assert retried.status_code == 200
        await refused(old)  # failed again, after `newer`
        cancelled = await send(http, "+12025550145", "never mind")
        assert (await http.post(f"/api/v1/messages/{cancelled}/cancel", headers=admin)).is_success
        await sign_in(http, READER)
        data = (await http.get("/ui/overview.json")).json()
        assert [f["id"] for f in data["failures"]] == [old, newer]
        assert data["delivery"]["failed"] == 2
        assert data["failures"][0]["updated_at"] > data["failures"][1]["updated_at"]
        page = (await http.get("/ui/")).text
        assert page.index(f"#{old}<") < page.index(f"#{newer}<")
        assert f"#{cancelled}<" not in page


async def test_every_time_in_the_json_is_written_as_the_apis(served_bridge) -> None:
    """A message's events had `at` in epoch seconds on the API and in ISO 8601 (plus an
    `epoch`) on the console; a route's last call had `at` in epoch seconds. Every time
    is now the API's message times' format: ISO 8601, UTC, milliseconds."""
    _, url = served_bridge
    iso = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00")
    async with httpx.AsyncClient(base_url=url) as http:
        sent = await send(http, "+12025550143", "disk full")
        hook = await http.post(
            "/hooks/am",
            json={"status": "firing", "alerts": [{"status": "firing", "labels": {"a": "b"}}]},
            headers={"Authorization": f"Bearer {ROUTE_TOKEN}"},
        )
        assert hook.status_code in (200, 202), hook.text
        reader = {"Authorization": f"Bearer {READER}"}
        api = (await http.get(f"/api/v1/messages/{sent}", headers=reader)).json()
        console = (await http.get(f"/ui/messages/{sent}.json", headers=reader)).json()
        assert api["events"] and all(iso.fullmatch(e["at"]) for e in api["events"])
        assert console["events"] == api["events"]
        assert iso.fullmatch(api["created_at"])
        [route] = (await http.get("/ui/routes.json", headers=reader)).json()["routes"]
        assert iso.fullmatch(route["last_call"]["at"]), route["last_call"]
        overview = (await http.get("/ui/overview.json", headers=reader)).json()
        assert iso.fullmatch(overview["queue"]["oldest_due_at"])


async def test_a_cancelled_message_retried_is_no_longer_counted_as_cancelled(
    tmp_path, sandbox_url: str, sandbox_state: SandboxState, clock: ManualClock, backend: str
) -> None:
    """A retry kept the message's reason kind: a cancelled message retried and then
    refused by the provider was still `cancelled` to /api/v1/stats and `?reason=`, and
    so left out of the overview's failures and its delivery ratio. On both stores."""
    config = bridge_config(tmp_path, sandbox_url, TOKENS)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    async with (
        running_bridge(config, clock) as (bridge, url),
        httpx.AsyncClient(base_url=url) as http,
    ):
        message = await send(http, "+12025550143", "disk full")
        assert (await http.post(f"/api/v1/messages/{message}/cancel", headers=admin)).is_success
        assert (await http.post(f"/api/v1/messages/{message}/retry", headers=admin)).is_success
        sandbox_state.faults.append(Fault(status=400, path="/send"))
        await pump_until_state(bridge, clock, message, State.FAILED, max_seconds=120)
        stats = (await http.get("/api/v1/stats", headers=admin)).json()
        assert stats["reasons"] == {"failed": {"other": 1}}
        listed = await http.get("/api/v1/messages?reason=cancelled", headers=admin)
        assert listed.json()["messages"] == []
        overview = (await http.get("/ui/overview.json", headers=admin)).json()
        assert [f["id"] for f in overview["failures"]] == [message]
        assert overview["delivery"]["failed"] == 1


async def test_a_scheduled_time_is_shown_with_its_zone(
    tmp_path, sandbox_url: str, clock: ManualClock
) -> None:
    """`schedule_time` is given in provider.timezone and stored in UTC; the API answered
    it bare (`2027-01-16 09:00:00`), which read as the Berlin time the sender gave, an
    hour off. It is now written as every other time, with its zone."""
    config = bridge_config(tmp_path, sandbox_url, TOKENS, timezone="Europe/Berlin")
    admin = {"Authorization": f"Bearer {ADMIN}"}
    async with (
        running_bridge(config, clock) as (_, url),
        httpx.AsyncClient(base_url=url) as http,
    ):
        answer = await http.post(
            "/api/v1/messages",
            json={"to": "+12025550143", "message": "x", "schedule_time": "2027-01-16 10:00:00"},
            headers=admin,
        )
        [message] = answer.json()["ids"]
        shown = (await http.get(f"/api/v1/messages/{message}", headers=admin)).json()
        assert shown["schedule_time"] == "2027-01-16T09:00:00.000+00:00"
        listed = (await http.get("/api/v1/messages", headers=admin)).json()["messages"]
        assert listed[0]["schedule_time"] == shown["schedule_time"]
        await sign_in(http, READER)
        page = (await http.get(f"/ui/messages/{message}")).text
        assert "2027-01-16 09:00:00 UTC" in page


async def test_a_number_typed_with_its_plus_finds_its_messages_on_the_api(
    served_bridge,
) -> None:
    """`?recipient=+12025550143` as typed in a shell: the `+` arrives as a space, and the
    API searched for " 12025550143", an empty list with a 200. The console did not."""
    _, url = served_bridge
    async with httpx.AsyncClient(base_url=url) as http:
        mine = await send(http, "+12025550143", "disk full")
        await send(http, "+12025550144", "disk full")
        reader = {"Authorization": f"Bearer {READER}"}
        for typed in ("+12025550143", "%2B12025550143", "2025550143"):
            found = await http.get(f"/api/v1/messages?recipient={typed}", headers=reader)
            assert [m["id"] for m in found.json()["messages"]] == [mine], typed


async def list_ids(http: httpx.AsyncClient, path: str, **headers: str) -> list[int]:
    """The ids a list answers with (200 asserted)."""
    answer = await http.get(path, headers=headers)
    assert answer.status_code == 200, (path, answer.text)
    return [m["id"] for m in answer.json()["messages"]]


async def test_a_removed_routes_messages_stay_listed_and_an_unknown_route_is_a_400(
    backend: str, served_bridge
) -> None:
    """The route filter took any name: a typo listed nothing with a 200, while the
    console's select said "any" over a removed route's messages. A route removed from
    the config is still a filter while stored messages carry it, on the API and the
    console alike (the select shows it, marked removed); any other name is a 400. Both
    stores."""
    bridge, url = served_bridge
    gone = NewMessage("+12025550143", "disk full", "hook", "SMS", 1, 1, route="old-grafana")
    [old] = await seed(bridge.store, [gone], 1.0)
    async with httpx.AsyncClient(base_url=url) as http:
        await send(http, "+12025550144", "not from a route")
        reader = {"Authorization": f"Bearer {READER}"}
        for path in ("/api/v1/messages", "/ui/messages.json"):
            assert await list_ids(http, f"{path}?route=old-grafana", **reader) == [old]
            assert await list_ids(http, f"{path}?route=am", **reader) == []  # configured
            typo = await http.get(f"{path}?route=old-grafna", headers=reader)
            assert typo.status_code == 400, (path, typo.text)
            assert typo.json()["field"] == "route"
            assert "'old-grafna'" in typo.json()["error"] and "am" in typo.json()["error"]
        await sign_in(http, READER)
        page = await http.get("/ui/messages?route=old-grafana")
        assert '<option value="old-grafana" selected>old-grafana (removed)</option>' in page.text
        assert (await http.get("/ui/messages?route=old-grafna")).status_code == 400


async def test_a_recipient_filter_of_nothing_but_a_plus_is_a_400(served_bridge) -> None:
    """`?recipient=+` (a space once decoded) searched for "": every message, with a 200.
    A 400 that says why now, on the API and the console; an empty one is no filter."""
    _, url = served_bridge
    async with httpx.AsyncClient(base_url=url) as http:
        ids = [await send(http, f"+1202555014{i}", "disk full") for i in range(2)]
        reader = {"Authorization": f"Bearer {READER}"}
        for path in ("/api/v1/messages", "/ui/messages.json"):
            for typed in ("+", "%2B", "%20%2B%20"):
                answer = await http.get(f"{path}?recipient={typed}", headers=reader)
                assert answer.status_code == 400, (path, typed, answer.text)
                assert answer.json()["field"] == "recipient"
                assert "nothing to search for" in answer.json()["error"]
            assert await list_ids(http, f"{path}?recipient=", **reader) == ids[::-1]
        await sign_in(http, READER)
        page = await http.get("/ui/messages?recipient=%2B")
        assert page.status_code == 400 and "nothing to search for" in page.text


async def test_an_empty_limit_or_cursor_is_the_default_on_the_api_as_on_the_console(
    served_bridge,
) -> None:
    """`?limit=` (a form's empty field) was a 400 on the API and the default page on the
    console. An empty parameter is one not given, on both."""
    _, url = served_bridge
    async with httpx.AsyncClient(base_url=url) as http:
        ids = [await send(http, f"+1202555014{i}", "disk full") for i in range(3)]
        reader = {"Authorization": f"Bearer {READER}"}
        for path in ("/api/v1/messages", "/ui/messages.json"):
            for query in ("limit=", "before=", "limit=&before=&state=&q="):
                assert await list_ids(http, f"{path}?{query}", **reader) == ids[::-1], query


async def test_the_consoles_400s_name_their_field_once_and_in_json(served_bridge) -> None:
    """The console's 400 said "limit: 'limit' must be ..." (the field twice), and its
    `.json` answer had no `field`, where the API's has one."""
    _, url = served_bridge
    async with httpx.AsyncClient(base_url=url) as http:
        reader = {"Authorization": f"Bearer {READER}"}
        for query, field in (
            ("limit=0", "limit"),
            ("before=x", "before"),
            ("state=sent2", "state"),
        ):
            api = (await http.get(f"/api/v1/messages?{query}", headers=reader)).json()
            console = await http.get(f"/ui/messages.json?{query}", headers=reader)
            assert console.status_code == 400
            assert console.json()["field"] == api["field"] == field, (console.json(), api)
            assert not console.json()["error"].startswith(f"{field}:"), console.json()
            if field != "limit":  # the console's pages are shorter (500, not 1000)
                assert console.json() == api
        await sign_in(http, READER)
        page = await http.get("/ui/messages?limit=0")
        [problem] = re.findall(r'<p class="problem" role="alert">(.*?)</p>', page.text)
        assert problem == "&#39;limit&#39; must be an integer from 1 to 500", problem


async def test_the_spend_line_says_what_was_priced_and_what_is_estimated(
    tmp_path, sandbox_url: str, clock: ManualClock, backend: str
) -> None:
    """ "Spend: 4.5 (estimated 0.5)" put the provider's prices beside the estimates of
    every text, priced ones too: two different sets, neither what was spent. Now the
    sum of both as best known, then the part the provider priced and the estimate of
    the texts it has not priced yet. Both stores."""
    config = bridge_config(tmp_path, sandbox_url, TOKENS)
    async with (
        running_bridge(config, clock) as (bridge, url),
        httpx.AsyncClient(base_url=url) as http,
    ):
        await bridge.dispatcher.run_once()  # the price list: estimates for what is sent
        priced = await send(http, "+12025550143", "disk full")
        await pump(
            bridge, clock, lambda: _state_is(bridge, priced, State.DELIVERED), max_seconds=120
        )
        cost = (await bridge.store.get(priced)).cost
        assert cost, "the sandbox prices what it sends"
        in_flight = NewMessage(
            "+12025550144", "disk full", "http", "SMS", 1, 1, state=State.SENDING
        )
        await seed(bridge.store, [in_flight._replace(estimated_cost=0.25)], clock.now())
        await sign_in(http, READER)
        today = (await http.get("/ui/overview.json")).json()["today"]
        assert today["spent"] == pytest.approx(cost + 0.25), today
        assert today["cost"] == cost and today["unpriced_estimated_cost"] == 0.25
        html = (await http.get("/ui/")).text
        spend = html[html.index("<dt>Spend</dt>") :].split("</dd>")[0]
        money = f"{cost + 0.25:.4f}".rstrip("0").rstrip(".")
        price = f"{cost:.4f}".rstrip("0").rstrip(".")
        assert (
            f"<dd>{money}: {price} priced by the provider, 0.25 estimated for texts it has"
            " not priced yet" in spend
        ), spend


async def test_the_overviews_failed_count_links_to_the_messages_it_counts(
    backend: str, served_bridge, clock: ManualClock
) -> None:
    """ "N failed" (created in the last 24 h, cancelled ones left out) linked to every
    failed message: older ones and cancelled ones too, more than N. Its link lists the
    N now, and the API takes the same filters. Both stores."""
    bridge, url = served_bridge
    failed = NewMessage("+12025550143", "disk full", "http", "SMS", 1, 1, state=State.FAILED)
    refused = failed._replace(reason="provider refused", reason_kind="provider-error")
    [old] = await seed(bridge.store, [refused], clock.now() - 2 * 86400)
    [recent, other] = await seed(
        bridge.store, [refused, failed._replace(reason="gave up")], clock.now()
    )
    async with httpx.AsyncClient(base_url=url) as http:
        cancelled_id = await cancelled(http, "+12025550144", "never mind")
        await sign_in(http, READER)
        assert (await http.get("/ui/overview.json")).json()["delivery"]["failed"] == 2
        page = (await http.get("/ui/")).text
        [link] = re.findall(r'<a href="([^"]+)">2 failed</a>', page)
        target = link.replace("&amp;", "&")
        listed = await http.get(target)
        assert listed.status_code == 200, listed.text
        shown = {int(i) for i in re.findall(r'aria-label="Message (\d+)"', listed.text)}
        assert shown == {recent, other}, (target, shown)
        assert "cancelled ones left out" in listed.text
        as_json = await http.get(target.replace("/ui/messages?", "/ui/messages.json?"))
        assert {m["id"] for m in as_json.json()["messages"]} == {recent, other}
        query = target.split("?", 1)[1]
        reader = {"Authorization": f"Bearer {READER}"}
        assert set(await list_ids(http, f"/api/v1/messages?{query}", **reader)) == {recent, other}
        assert old and cancelled_id
        bad = await http.get("/api/v1/messages?since=yesterday", headers=reader)
        assert bad.status_code == 400 and bad.json()["field"] == "since"


async def test_an_actions_note_waits_for_its_page_whatever_another_tab_loads(
    served_bridge,
) -> None:
    """The note of a retry ("queued again") was said by whichever page of the session
    rendered next: another tab's page took it before the browser followed the redirect,
    and it was never seen. The page the action went back to says it."""
    bridge, url = served_bridge
    failed = NewMessage("+12025550143", "disk full", "http", "SMS", 1, 1, state=State.FAILED)
    [message_id] = await seed(bridge.store, [failed], 1.0)
    async with httpx.AsyncClient(base_url=url) as http:
        await sign_in(http, ADMIN)
        page = await http.get(f"/ui/messages/{message_id}")
        done = await http.post(f"/ui/messages/{message_id}/retry", data={"csrf": csrf_of(page)})
        assert done.status_code == 303
        other_tab = await http.get("/ui/messages")
        assert "queued again" not in other_tab.text
        back = await http.get(done.headers["location"])
        assert f"Message {message_id} queued again." in back.text
        assert "queued again" not in (await http.get(done.headers["location"])).text  # once


async def test_a_session_keeps_the_notes_of_its_last_twenty_actions_only(
    served_bridge,
) -> None:
    """A note waits for its page (above), so the notes of pages never visited (a script
    cancelling in a loop, tabs closed) would pile up in the session for its 12 hours.
    A session keeps the last 20: the oldest go first, the newest are still said."""
    bridge, url = served_bridge
    held = NewMessage("+12025550143", "disk full", "http", "SMS", 1, 1, state=State.HELD)
    ids = await seed(bridge.store, [held] * 25, 1.0)
    async with httpx.AsyncClient(base_url=url) as http:
        await sign_in(http, ADMIN)
        token = csrf_of(await http.get("/ui/"))
        for message_id in ids:  # each note's page never visited
            done = await http.post(f"/ui/messages/{message_id}/cancel", data={"csrf": token})
            assert done.status_code == 303
        said = [
            f"Message {i} cancelled." in (await http.get(f"/ui/messages/{i}")).text for i in ids
        ]
        assert said == [False] * 5 + [True] * 20


async def test_a_loop_mail_quoting_a_message_number_is_not_shown_under_it(
    tmp_path, sandbox_url: str, clock: ManualClock, backend: str
) -> None:
    """A mail suppressed as a loop, its Auto-Submitted value `auto-replied; re message 1
    of yours`, was listed on message 1's page as "suppressed because of this message",
    and its reason linked to message 1: words anyone can send, read as the bridge's own.
    Both stores."""
    config = bridge_config(tmp_path, sandbox_url, TOKENS + '[smtp]\ndomains = ["sms.localhost"]\n')
    async with (
        running_bridge(config, clock) as (bridge, url),
        smtp_listening(bridge) as port,
        httpx.AsyncClient(base_url=url) as http,
    ):
        first = await send(http, "+12025550143", "disk full")
        raw = (
            "From: someone@example.org\r\nTo: +12025550144@sms.localhost\r\n"
            f"Subject: Out of office\r\nAuto-Submitted: auto-replied; re message {first} of yours\r\n\r\n"
            "I am away.\r\n"
        )
        await asyncio.to_thread(
            mail, port, "someone@example.org", ["+12025550144@sms.localhost"], raw
        )
        [loop] = await bridge.store.query(source="smtp")
        assert loop.state == State.SUPPRESSED and f"message {first}" in (loop.reason or "")
        await sign_in(http, READER)
        assert (await http.get(f"/ui/messages/{first}.json")).json()["mentioned_by"] == []
        assert (
            "Suppressed because of this message"
            not in (await http.get(f"/ui/messages/{first}")).text
        )
        for path in (f"/ui/messages/{loop.id}", "/ui/messages?source=smtp"):
            assert f'href="/ui/messages/{first}"' not in (await http.get(path)).text, path


async def test_cancelling_a_phones_held_messages_needs_admin_and_the_csrf_token(
    served_bridge,
) -> None:
    """The storms card's "Cancel all" is an admin's action, behind the CSRF token, as
    every change is; it cancels that phone's held messages and no one else's."""
    bridge, url = served_bridge
    held = NewMessage("+12025550144", "disk full", "http", "SMS", 1, 1, state=State.HELD)
    mine = await seed(bridge.store, [held, held], 1.0)
    [theirs] = await seed(bridge.store, [held._replace(recipient="+12025550145")], 1.0)
    async with httpx.AsyncClient(base_url=url) as reader, httpx.AsyncClient(base_url=url) as admin:
        await sign_in(reader, READER)
        form = {"csrf": csrf_of(await reader.get("/ui/")), "recipient": "+12025550144"}
        assert (await reader.post("/ui/held/cancel", data=form)).status_code == 403
        await sign_in(admin, ADMIN)
        wrong = {"csrf": "not-the-token", "recipient": "+12025550144"}
        assert (await admin.post("/ui/held/cancel", data=wrong)).status_code == 403
        assert {(await bridge.store.get(i)).state for i in mine} == {State.HELD}
        form["csrf"] = csrf_of(await admin.get("/ui/"))
        done = await admin.post("/ui/held/cancel", data=form)
        assert done.status_code == 303
        assert (
            "Cancelled 2 held messages to +12025550144."
            in (await admin.get(done.headers["location"])).text
        )
        assert {(await bridge.store.get(i)).state for i in mine} == {State.FAILED}
        assert (await bridge.store.get(theirs)).state == State.HELD
        nothing = await admin.post("/ui/held/cancel", data=form)
        assert "nothing cancelled" in (await admin.get(nothing.headers["location"])).text
        empty = await admin.post("/ui/held/cancel", data={**form, "recipient": ""})
        assert empty.status_code == 400


async def test_the_storms_card_offers_a_phones_pile_of_queued_texts(
    tmp_path, sandbox_url: str, clock: ManualClock, backend: str, monkeypatch
) -> None:
    """The overview's storms card listed held storms only: texts piling up queued for one
    phone (storm control off, a script looping) were found by filtering the list. The
    card lists a phone with QUEUED_PILE_MIN or more of the queue's next texts, linked to
    them, with an admin's "Cancel all" (a reader's card has none); a phone with fewer is
    not listed. Counted among the next QUEUED_PILE_SCAN only ("+": more are queued).
    Both stores."""
    monkeypatch.setattr(console_app, "QUEUED_PILE_MIN", 3)
    monkeypatch.setattr(console_app, "QUEUED_PILE_SCAN", 5)
    config = bridge_config(tmp_path, sandbox_url, TOKENS)
    queued = NewMessage("+12025550144", "disk full", "http", "SMS", 1, 1)
    async with (
        running_bridge(config, clock) as (bridge, url),
        httpx.AsyncClient(base_url=url) as reader,
        httpx.AsyncClient(base_url=url) as admin,
    ):
        few = queued._replace(recipient="+12025550145")
        pile = await seed(bridge.store, [queued] * 3 + [few] * 2, 1.0)
        await sign_in(reader, READER)
        await sign_in(admin, ADMIN)
        shown = (await reader.get("/ui/overview.json")).json()
        assert shown["queued_piles"] == [{"recipient": "+12025550144", "queued": 3}]
        assert shown["queued_piles_partial"] is False
        assert 'action="/ui/queued/cancel"' not in (await reader.get("/ui/")).text
        page = await admin.get("/ui/")
        assert "/ui/messages?state=queued&amp;recipient=%2B12025550144" in page.text
        assert 'name="recipient" value="+12025550144"' in page.text
        assert "+12025550145" not in page.text
        await seed(bridge.store, [few] * 2, 2.0)  # due after the pile: beyond the 5 read
        later = (await admin.get("/ui/overview.json")).json()
        assert later["queued_piles_partial"] is True  # +12025550145's 4: 2 of them read
        assert later["queued_piles"] == [{"recipient": "+12025550144", "queued": 3}]
        assert ">3+</td>" in (await admin.get("/ui/")).text
        done = await admin.post(
            "/ui/queued/cancel", data={"csrf": csrf_of(page), "recipient": "+12025550144"}
        )
        assert done.status_code == 303
        assert {(await bridge.store.get(i)).state for i in pile[:3]} == {State.FAILED}
        assert (await admin.get("/ui/overview.json")).json()["queued_piles"] == [
            {"recipient": "+12025550145", "queued": 4}
        ]


async def test_cancelling_a_phones_messages_reads_the_phone_as_a_number(
    tmp_path, sandbox_url: str, clock: ManualClock, backend: str
) -> None:
    """`/ui/queued/cancel` and `/ui/held/cancel` looked the recipient up as posted: one
    holding a NUL was a 500 on PostgreSQL (a traceback in the log) and "nothing
    cancelled" on SQLite, and `+1 202 555 0144` cancelled nothing of +12025550144's.
    A recipient is read as a phone number: not one is a 400 saying so, on both stores;
    written with spaces, it is that phone's."""
    config = bridge_config(tmp_path, sandbox_url, TOKENS)
    queued = NewMessage("+12025550144", "disk full", "http", "SMS", 1, 1)
    async with (
        running_bridge(config, clock) as (bridge, url),
        httpx.AsyncClient(base_url=url) as admin,
    ):
        ids = await seed(bridge.store, [queued, queued._replace(state=State.HELD)], 1.0)
        await sign_in(admin, ADMIN)
        csrf = csrf_of(await admin.get("/ui/"))
        for state in ("queued", "held"):
            for wrong in ("+1\x00", "\x00", "nas.example.org", "%"):
                answer = await admin.post(
                    f"/ui/{state}/cancel", data={"csrf": csrf, "recipient": wrong}
                )
                assert answer.status_code == 400, (state, wrong, answer.status_code)
                assert "not a possible phone number" in answer.text
        assert {(await bridge.store.get(i)).state for i in ids} == {State.QUEUED, State.HELD}
        for state in ("queued", "held"):
            done = await admin.post(
                f"/ui/{state}/cancel", data={"csrf": csrf, "recipient": "+1 202 555 0144"}
            )
            assert done.headers["location"] == "/ui/messages?recipient=%2B12025550144"
        assert {(await bridge.store.get(i)).state for i in ids} == {State.FAILED}


async def test_a_misspelt_list_parameter_is_a_400_not_every_message(served_bridge) -> None:
    """`?stat=failed` (for `state`) was ignored: every message, with a 200, to a script
    that asked for the failed ones. A 400 naming it and what the list takes, on the API
    and the console; the console's 404s name their field in JSON as the API's do."""
    _, url = served_bridge
    async with httpx.AsyncClient(base_url=url) as http:
        await send(http, "+12025550143", "disk full")
        reader = {"Authorization": f"Bearer {READER}"}
        for path in ("/api/v1/messages", "/ui/messages.json"):
            typo = await http.get(f"{path}?stat=failed", headers=reader)
            assert typo.status_code == 400, (path, typo.text)
            assert typo.json()["field"] == "stat" and "state" in typo.json()["error"]
        for path, field in (("/messages/999", "id"), ("/routes/nosuch", "name")):
            console = await http.get(f"/ui{path}.json", headers=reader)
            assert console.status_code == 404 and console.json()["field"] == field, console.text
        api = await http.get("/api/v1/messages/999", headers=reader)
        assert api.json()["field"] == "id"
        await sign_in(http, READER)
        aliased = await http.get("/ui/messages?status=failed")  # the API's other name
        assert '<option value="failed" selected>' in aliased.text


async def test_a_cache_buster_is_ignored_and_other_unknown_names_stay_400s(
    served_bridge,
) -> None:
    """jQuery's `cache: false` and many dashboards add `?_=<epoch ms>` to every GET: once
    unknown names became 400s, such a client's every list failed. `_` selects nothing and
    is ignored, on the API and the console; `?stat=` stays a 400."""
    _, url = served_bridge
    async with httpx.AsyncClient(base_url=url) as http:
        message_id = await send(http, "+12025550143", "disk full")
        reader = {"Authorization": f"Bearer {READER}"}
        for path in ("/api/v1/messages", "/ui/messages.json"):
            busted = await http.get(f"{path}?state=queued&_=1700000000123", headers=reader)
            assert busted.status_code == 200, (path, busted.text)
            assert [m["id"] for m in busted.json()["messages"]] == [message_id]
            typo = await http.get(f"{path}?_=1&stat=failed", headers=reader)
            assert typo.status_code == 400 and typo.json()["field"] == "stat", path
        spec = (await http.get("/openapi.json", headers=reader)).json()
        listing = spec["paths"]["/api/v1/messages"]["get"]["parameters"]
        assert "_" in {p["name"] for p in listing}


async def test_a_refused_retry_or_cancel_says_the_state_and_what_can_be_done(
    tmp_path, sandbox_url: str, clock: ManualClock, backend: str
) -> None:
    """A 409 reading "message 5 is delivered: only failed can retry" said the rule, not
    what had become of the message or what to do instead. The API's 409 (and the
    console's, the same words) says the state, in words and as `state`, and the way on.
    Both stores."""
    config = bridge_config(tmp_path, sandbox_url, TOKENS)
    seeded = {
        state: NewMessage("+12025550143", f"disk {state}", "http", "SMS", 1, 1, state=state)
        for state in (State.DELIVERED, State.SUPPRESSED, State.FAILED, State.SENT)
    }
    admin = {"Authorization": f"Bearer {ADMIN}"}
    expected = {
        ("retry", State.DELIVERED): "it was delivered; to text it again, send it as a new message",
        ("retry", State.SUPPRESSED): "it was never sent",
        ("retry", State.SENT): "the provider accepted it",
        ("cancel", State.FAILED): "nothing to cancel; a retry queues it again",
        ("cancel", State.DELIVERED): "too late to cancel",
    }
    async with (
        running_bridge(config, clock) as (bridge, url),
        httpx.AsyncClient(base_url=url) as http,
    ):
        ids = dict(zip(seeded, await seed(bridge.store, list(seeded.values()), 1.0), strict=True))
        for (action, state), words in expected.items():
            answer = await http.post(f"/api/v1/messages/{ids[state]}/{action}", headers=admin)
            assert answer.status_code == 409, answer.text
            body = answer.json()
            doing = "retried" if action == "retry" else "cancelled"
            assert body["state"] == str(state)
            assert body["error"].startswith(
                f"message {ids[state]} is {state} and cannot be {doing}: "
            ), body
            assert words in body["error"], body
            assert "only failed can" not in body["error"]
        await sign_in(http, ADMIN)
        token = csrf_of(await http.get(f"/ui/messages/{ids[State.DELIVERED]}"))
        page = await http.post(f"/ui/messages/{ids[State.DELIVERED]}/retry", data={"csrf": token})
        assert page.status_code == 409
        assert expected["retry", State.DELIVERED] in page.text


async def test_a_since_without_its_zone_is_a_400_that_says_what_to_add(served_bridge) -> None:
    """`?since=2027-01-15T08:00:00` was refused with "'since' needs its zone: Z for UTC,
    or an offset", which read oddly and showed no example. The 400 names the value, says
    it lacks a time zone and shows it with one, on the API and the console alike."""
    _, url = served_bridge
    reader = {"Authorization": f"Bearer {READER}"}
    async with httpx.AsyncClient(base_url=url) as http:
        for path in ("/api/v1/messages", "/ui/messages.json"):
            for given, shown in (
                ("2027-01-15T08:00:00", "2027-01-15T08:00:00"),
                ("2027-01-15", "2027-01-15T00:00:00"),
            ):
                bad = await http.get(path, params={"since": given}, headers=reader)
                assert bad.status_code == 400 and bad.json()["field"] == "since", bad.text
                words = bad.json()["error"]
                assert f"'since' '{given}' has no time zone" in words, words
                assert f"{shown}Z or {shown}+02:00" in words, words
            fine = await http.get(
                path, params={"since": "2027-01-15T08:00:00+02:00"}, headers=reader
            )
            assert fine.status_code == 200, fine.text


async def test_a_since_outside_the_years_utc_can_write_is_a_400(served_bridge) -> None:
    """A `since` whose instant falls before the year 1 or after 9999 in UTC (its own
    zone's date within them) passed the check, and the console's pages, which write it
    back in UTC, answered 500 with a traceback logged. It is a 400 naming the field, on
    the API too, on the console's JSON and on its page."""
    _, url = served_bridge
    reader = {"Authorization": f"Bearer {READER}"}
    async with httpx.AsyncClient(base_url=url) as http:
        assert (await sign_in(http, READER)).status_code == 303  # for the page
        for path in ("/api/v1/messages", "/ui/messages.json", "/ui/messages"):
            for given in ("0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-23:59"):
                bad = await http.get(path, params={"since": given}, headers=reader)
                assert bad.status_code == 400, (path, given, bad.status_code)
                assert "outside the years 1 to 9999 in UTC" in bad.text, bad.text


async def test_a_messages_page_says_which_token_or_smtp_login_sent_it(served_bridge) -> None:
    """Messages carry the token that sent them (`root`, or `smtp:LOGIN` for mail from
    an SMTP user), but the message page did not say it: an operator could not tell which
    script or device was texting. It says so, by name, and never the secret."""
    bridge, url = served_bridge
    async with httpx.AsyncClient(base_url=url) as http:
        by_api = await send(http, "+12025550143", "disk full")  # with the ADMIN token
        mail = NewMessage("+12025550144", "UPS on battery", "smtp", "SMS", 1, 1, token="smtp:ups")
        hooked = NewMessage("+12025550145", "alert", "hook", "SMS", 1, 1, route="am")
        by_mail, by_hook = await seed(bridge.store, [mail, hooked], 1.0)
        await sign_in(http, READER)
        shown = {
            by_api: "API token root",
            by_mail: "SMTP login ups",
            by_hook: "its route (a route&#39;s own credentials are no API token)",
        }
        for message_id, words in shown.items():
            page = await http.get(f"/ui/messages/{message_id}")
            assert f'<dt>Sent by</dt><dd id="sent-by">{words}</dd>' in page.text, page.text
            assert ADMIN not in page.text and ROUTE_TOKEN not in page.text
        data = (await http.get(f"/ui/messages/{by_mail}.json")).json()
        assert data["sent_by"] == {"kind": "smtp", "name": "ups", "text": "SMTP login ups"}
        assert data["token"] == "smtp:ups"


async def test_a_storm_of_queued_texts_to_one_phone_is_cancelled_at_once(
    tmp_path, sandbox_url: str, clock: ManualClock, backend: str
) -> None:
    """Only held messages could be cancelled in one go: an operator facing hundreds of
    texts queued to one phone (a provider paused, a script looping) cancelled them one
    page at a time. `POST /ui/queued/cancel` cancels that phone's queued messages, an
    admin's action behind the CSRF token as `/ui/held/cancel` is, each failed with its
    reason and an event; its held ones, other phones' and those already sent stay.
    Both stores."""
    config = bridge_config(tmp_path, sandbox_url, TOKENS)
    queued = NewMessage("+12025550144", "disk full", "http", "SMS", 1, 1)
    async with (
        running_bridge(config, clock) as (bridge, url),
        httpx.AsyncClient(base_url=url) as reader,
        httpx.AsyncClient(base_url=url) as admin,
    ):
        mine = await seed(bridge.store, [queued] * 3, 1.0)
        held, theirs, sent = await seed(
            bridge.store,
            [
                queued._replace(state=State.HELD),
                queued._replace(recipient="+12025550145"),
                queued._replace(state=State.SENT),
            ],
            1.0,
        )
        await sign_in(reader, READER)
        form = {"csrf": csrf_of(await reader.get("/ui/")), "recipient": "+12025550144"}
        assert (await reader.post("/ui/queued/cancel", data=form)).status_code == 403
        await sign_in(admin, ADMIN)
        listed = await admin.get("/ui/messages?state=queued&recipient=%2B12025550144")
        assert 'action="/ui/queued/cancel"' in listed.text
        assert "Cancel every queued message to +12025550144" in listed.text
        page = await admin.get(f"/ui/messages/{mine[0]}")
        assert 'action="/ui/queued/cancel"' in page.text
        wrong = {"csrf": "not-the-token", "recipient": "+12025550144"}
        assert (await admin.post("/ui/queued/cancel", data=wrong)).status_code == 403
        assert {(await bridge.store.get(i)).state for i in mine} == {State.QUEUED}
        form["csrf"] = csrf_of(page)
        done = await admin.post("/ui/queued/cancel", data=form)
        assert done.status_code == 303
        assert (
            "Cancelled 3 queued messages to +12025550144."
            in (await admin.get(done.headers["location"])).text
        )
        for message_id in mine:
            message = await bridge.store.get(message_id)
            assert (message.state, message.reason) == (State.FAILED, "cancelled by root")
            assert message.reason_kind == "cancelled"
            events = await bridge.store.events(message_id)
            assert [(e["state"], e["detail"]) for e in events][-1] == (
                "failed",
                "cancelled by root",
            )
        assert (await bridge.store.get(held)).state == State.HELD
        assert (await bridge.store.get(theirs)).state == State.QUEUED
        assert (await bridge.store.get(sent)).state == State.SENT
        nothing = await admin.post("/ui/queued/cancel", data=form)
        assert (
            "Nothing was queued for +12025550144"
            in (await admin.get(nothing.headers["location"])).text
        )
        empty = await admin.post("/ui/queued/cancel", data={**form, "recipient": ""})
        assert empty.status_code == 400


@pytest.mark.parametrize(
    ("between", "after", "told"),
    [
        (
            "sent",
            State.SENT,
            "Nothing cancelled. 3 found queued were no longer queued (already sent, or ended).",
        ),
        (
            "claimed",
            State.SENDING,
            "Nothing cancelled. 3 being handed to the provider now (3 taken after this cancel"
            " found them): too late to cancel.",
        ),
    ],
)
async def test_a_bulk_cancel_says_what_the_dispatcher_took_between_its_read_and_write(
    between: str,
    after: State,
    told: str,
    tmp_path,
    sandbox_url: str,
    clock: ManualClock,
    backend: str,
    monkeypatch,
) -> None:
    """The queued texts to a phone are read, then cancelled: the dispatcher claims them
    in between (a step woken by their ingest), and has sent them by the write, or (another
    instance) is sending them still. The note said "Nothing was queued for +12025550144:
    nothing cancelled.", and the operator took it that nothing had been about to go. Then
    of those still being sent it said "3 found queued were no longer queued (already being
    sent, or ended). 3 being handed to the provider now": six texts, of three. It says
    they were found, and what became of each, once."""
    config = bridge_config(tmp_path, sandbox_url, TOKENS)
    texts = [NewMessage("+12025550144", f"disk {i} full", "http", "SMS", 1, 1) for i in range(3)]
    async with (
        running_bridge(config, clock) as (bridge, url),
        httpx.AsyncClient(base_url=url) as admin,
    ):
        mine = await seed(bridge.store, texts, clock.now())
        reads = bridge.store.query

        async def read_then_dispatch(**filters: Any) -> list[Message]:
            found = await reads(**filters)
            if filters.get("state") != "queued":
                return found
            if between == "sent":  # between the console's read and its write
                await bridge.dispatcher.run_once()
            else:
                ids = [m.id for m in found]
                await bridge.store.claim(ids, clock.now(), owner="b", lease_until=clock.now() + 60)
            return found

        await sign_in(admin, ADMIN)
        page = await admin.get(f"/ui/messages/{mine[0]}")
        form = {"csrf": csrf_of(page), "recipient": "+12025550144"}
        monkeypatch.setattr(bridge.store, "query", read_then_dispatch)
        done = await admin.post("/ui/queued/cancel", data=form)
        monkeypatch.undo()
        shown = (await admin.get(done.headers["location"])).text
        states = {(await bridge.store.get(i)).state for i in mine}
    assert states == {after}
    assert told in shown, shown
