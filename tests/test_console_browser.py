"""The web console in a real browser: Debian's Chromium driven by Playwright.

The bridge runs as `serve` runs it (uvicorn on 127.0.0.1, dispatcher, status poller and
the in-process sandbox provider on the real clock), so the browser sees messages arrive
and turn delivered by itself. Every page must load without a console error (a CSP
violation is one). Screenshots of the main pages go to the test's temporary directory,
or to `docs/` with `SMS_BRIDGE_SCREENSHOTS=docs` (how the ones in the README are made).

Skipped only where /usr/bin/chromium is absent (`apt-get install chromium`); CI
installs it and fails when these tests were skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import async_playwright

from bridge.app import build as build_bridge
from bridge.clock import ManualClock
from bridge.config import Config, load_config
from bridge.models import NewMessage, State
from bridge.provider.sandbox import Fault, SandboxState
from bridge.service import Bridge
from bridge.sockets import bind_socket
from tests.helpers import bridge_config, pump_until_state, running_bridge, write_config
from tests.stores import seed

CHROMIUM = Path("/usr/bin/chromium")
DOCS = Path(__file__).resolve().parent.parent / "docs"


def shots(tmp_path: Path) -> Path:
    return DOCS if os.environ.get("SMS_BRIDGE_SCREENSHOTS") == "docs" else tmp_path


ADMIN = "admin-token-0123456789abcdef"
READER = "read-token-0123456789abcdef"
WAIT_MS = 30_000
# For the tests on the manual clock (tests.helpers.running_bridge, no dispatcher).
CLOCKED_TOKENS = f"""
[tokens.root]
token = "{ADMIN}"
scopes = ["admin"]
"""

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="/usr/bin/chromium is absent: apt-get install chromium"
    ),
]


def console_config(tmp_path: Path) -> Config:
    return load_config(
        write_config(
            tmp_path,
            f"""
            [store]
            path = "{tmp_path / "bridge.db"}"
            [smtp]
            listen = ""
            [sandbox]
            sent_after = "0.2s"
            delivered_after = "0.5s"
            [status]
            poll_interval = "1s"  # the least it takes
            [limits]
            per_recipient = 1
            [groups]
            oncall = ["+12025550101", "+12025550102"]
            [routes.alertmanager]
            format = "alertmanager"
            to = ["oncall"]
            token = "route-secret-token-0123456789"
            [tokens.root]
            token = "{ADMIN}"
            scopes = ["admin"]
            [tokens.ops]
            token = "{READER}"
            scopes = ["read"]
            """,
        ),
        env={},
    )


@contextlib.asynccontextmanager
async def serving(config: Config) -> AsyncIterator[tuple[Bridge, str]]:
    """The whole bridge on the real clock, its HTTP listener on an ephemeral port."""
    sock = bind_socket("127.0.0.1:0")
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    async with build_bridge(config) as bridge:
        started = asyncio.Event()
        runner = asyncio.create_task(bridge.run(http_socket=sock, started=started))
        waiter = asyncio.create_task(started.wait())
        await asyncio.wait({runner, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if runner.done():
            waiter.cancel()
            await runner
        try:
            yield bridge, url
        finally:
            bridge.stop.set()
            await runner
    sock.close()


class ConsoleErrors:
    """Console errors and uncaught exceptions of every page it watches."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def watch(self, page) -> None:  # type: ignore[no-untyped-def]
        page.on(
            "console",
            lambda m: self.errors.append(f"{page.url}: {m.text}") if m.type == "error" else None,
        )
        page.on("pageerror", lambda e: self.errors.append(f"{page.url}: {e}"))


@pytest.fixture
async def browser() -> AsyncIterator[object]:
    async with async_playwright() as p:
        chromium = await p.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            yield chromium
        finally:
            await chromium.close()


async def post_messages(url: str, messages: list[tuple[str, str]]) -> list[int]:
    async with httpx.AsyncClient(base_url=url) as http:
        ids = []
        for to, text in messages:
            answer = await http.post(
                "/api/v1/messages",
                json={"to": to, "message": text},
                headers={"Authorization": f"Bearer {ADMIN}"},
            )
            assert answer.status_code == 202, answer.text
            ids.append(answer.json()["ids"][0])
        return ids


async def sign_in(page, url: str, token: str) -> None:  # type: ignore[no-untyped-def]
    await page.goto(f"{url}/ui/")
    assert "/ui/signin" in page.url
    await page.get_by_label("API token").fill(token)
    await page.get_by_role("button", name="Sign in").click()
    await page.wait_for_url(f"{url}/ui/")


async def test_admin_signs_in_filters_cancels_retries_previews_and_signs_out(
    tmp_path: Path, browser
) -> None:
    errors = ConsoleErrors()
    async with serving(console_config(tmp_path)) as (bridge, url):
        first, held, other = await post_messages(
            url,
            [
                ("+12025550143", "disk full on db-1"),
                ("+12025550143", "disk full on db-2"),  # held: storm control, 1 per window
                ("+12025550144", "backup failed on nas-1"),
            ],
        )
        context = await browser.new_context(viewport={"width": 1280, "height": 900})
        page = await context.new_page()
        errors.watch(page)

        # Sign-in: a wrong token is refused with a reason, the admin token lets in.
        await page.goto(f"{url}/ui/messages")
        assert "/ui/signin" in page.url
        await page.get_by_label("API token").fill("not-a-token-0123456789")
        await page.get_by_role("button", name="Sign in").click()
        await page.get_by_role("alert").wait_for()
        assert "not a configured API token" in await page.get_by_role("alert").inner_text()
        errors.errors = [e for e in errors.errors if "401" not in e]  # the refusal's status
        await page.get_by_label("API token").fill(ADMIN)
        await page.get_by_role("button", name="Sign in").click()
        await page.wait_for_url(f"{url}/ui/messages")

        # The list refreshes itself: the first message turns delivered without a reload.
        row = page.locator("tr", has=page.get_by_role("link", name=f"Message {first}", exact=True))
        await row.locator(".s-delivered").wait_for(timeout=WAIT_MS)

        # A filter: text search.
        await page.get_by_label("Text contains").fill("nas-1")
        await page.get_by_role("button", name="Filter").click()
        await page.wait_for_url(re.compile(r".*q=nas-1.*"))
        links = page.locator("table.messages tbody tr")
        assert await links.count() == 1
        assert "backup failed on nas-1" in await links.first.inner_text()

        # A held message: its timeline says why; cancel it (after the confirmation).
        await page.goto(f"{url}/ui/messages?state=held")
        await page.get_by_role("link", name=f"Message {held}", exact=True).click()
        await page.wait_for_url(f"{url}/ui/messages/{held}")
        timeline = page.locator("ol.timeline")
        assert "held for the digest" in await timeline.inner_text()
        page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
        await page.get_by_role("button", name="Cancel", exact=True).click()
        await page.get_by_role("status").filter(has_text="cancelled").wait_for()
        assert "cancelled by root" in await timeline.inner_text()

        # Retry it: it goes out and the page shows it delivered by itself.
        await page.get_by_role("button", name="Retry").click()
        await page.get_by_role("status").filter(has_text="queued again").wait_for()
        assert "retried by root" in await page.locator("ol.timeline").inner_text()
        await page.locator("h1 .s-delivered").wait_for(timeout=WAIT_MS)
        assert (await bridge.store.get(held)).state == "delivered"
        await page.screenshot(path=str(shots(tmp_path) / "console-message.png"), full_page=True)

        # The route page: preview the format's sample without sending anything.
        before = await bridge.store.counts()
        await page.goto(f"{url}/ui/routes/alertmanager")
        assert "route-secret-token" not in await page.content()
        await page.get_by_role("button", name="Preview the sample payload").click()
        result = page.locator("section.preview")
        await result.wait_for()
        assert "[FIRING:1] HighLatency api-1: p99 above 2s" in await result.inner_text()
        assert await bridge.store.counts() == before
        await page.screenshot(path=str(shots(tmp_path) / "console-route.png"), full_page=True)

        # The overview, as an on-call engineer sees it: screenshot for the docs.
        await page.goto(f"{url}/ui/")
        await page.locator("svg.chart").wait_for()
        await page.screenshot(path=str(shots(tmp_path) / "console-overview.png"), full_page=True)
        await page.goto(f"{url}/ui/messages")
        await page.screenshot(path=str(shots(tmp_path) / "console-messages.png"), full_page=True)

        # Sign out: the console is closed again.
        await page.get_by_role("button", name="Sign out").click()
        await page.wait_for_url(f"{url}/ui/signin")
        await page.goto(f"{url}/ui/")
        assert "/ui/signin" in page.url
        await context.close()
    assert errors.errors == []
    assert other


async def test_reader_sees_no_actions_and_is_refused_them(tmp_path: Path, browser) -> None:
    errors = ConsoleErrors()
    async with serving(console_config(tmp_path)) as (bridge, url):
        _, held = await post_messages(
            url, [("+12025550143", "disk full on db-1"), ("+12025550143", "disk full on db-2")]
        )
        context = await browser.new_context()
        page = await context.new_page()
        errors.watch(page)
        await sign_in(page, url, READER)
        await page.goto(f"{url}/ui/messages/{held}")
        assert await page.get_by_role("button", name="Cancel").count() == 0
        assert "need a token with the admin scope" in await page.locator("main").inner_text()
        assert await page.get_by_role("link", name="Send a test").count() == 0
        csrf = await page.locator("input[name=csrf]").first.get_attribute("value")
        # The browser's own session, CSRF token and all: the scope still says no.
        refused = await page.request.post(
            f"{url}/ui/messages/{held}/cancel", form={"csrf": csrf or ""}
        )
        assert refused.status == 403
        assert (await bridge.store.get(held)).state == "held"
        await context.close()
    assert errors.errors == []


async def test_phone_screen_and_keyboard(tmp_path: Path, browser) -> None:
    errors = ConsoleErrors()
    async with serving(console_config(tmp_path)) as (_, url):
        await post_messages(url, [("+12025550143", "disk full on db-1")])
        context = await browser.new_context(
            viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True
        )
        page = await context.new_page()
        errors.watch(page)
        await sign_in(page, url, ADMIN)
        for path in ("/ui/", "/ui/messages", "/ui/routes/alertmanager", "/ui/send"):
            await page.goto(url + path)
            overflow = await page.evaluate(
                "document.documentElement.scrollWidth - document.documentElement.clientWidth"
            )
            assert overflow <= 0, f"{path} scrolls sideways on a phone by {overflow}px"
        await page.goto(f"{url}/ui/")
        await page.screenshot(path=str(shots(tmp_path) / "console-phone.png"), full_page=False)

        # Keyboard: the first Tab reaches "Skip to content", Enter moves to the page.
        await page.keyboard.press("Tab")
        assert await page.evaluate("document.activeElement.textContent") == "Skip to content"
        await page.keyboard.press("Enter")
        assert await page.evaluate("document.activeElement.id") == "main"
        # Every form control has a label a screen reader can read.
        await page.goto(f"{url}/ui/messages")
        unlabelled = await page.evaluate(
            """[...document.querySelectorAll('input:not([type=hidden]), select, textarea')]
                 .filter(e => !e.labels || e.labels.length === 0).map(e => e.name)"""
        )
        assert unlabelled == []
        await context.close()
    assert errors.errors == []


# A reason as a provider or a transport error may word it: one long unbroken run (a URL,
# an undecodable answer quoted) that a phone's screen cannot hold on one line.
LONG_REASON = (
    "gave up after 5 attempts: undecodable provider answer: "
    + "x" * 120
    + (" https://api.provider.example/api/v1/" + "path/" * 20 + "end-of-the-reason")
)


async def test_a_long_reason_wraps_on_a_phone_and_is_read_whole(
    tmp_path: Path, sandbox_url: str, clock: ManualClock, browser
) -> None:
    """The overview's recent failures and a message's page (its reason, its timeline)
    keep a long reason on a phone's screen: wrapped, not past its right edge."""
    errors = ConsoleErrors()
    config = bridge_config(tmp_path, sandbox_url, CLOCKED_TOKENS)
    async with running_bridge(config, clock) as (bridge, url):
        failed = NewMessage("+12025550144", "disk full", "http", "SMS", 1, 1, state=State.FAILED)
        [message_id] = await seed(bridge.store, [failed._replace(reason=LONG_REASON)], 1.0)
        await bridge.store.note([message_id], LONG_REASON, clock.now())
        context = await browser.new_context(
            viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True
        )
        page = await context.new_page()
        errors.watch(page)
        await sign_in(page, url, ADMIN)
        for path in ("/ui/", f"/ui/messages/{message_id}"):
            await page.goto(url + path)
            overflow = await page.evaluate(
                "document.documentElement.scrollWidth - document.documentElement.clientWidth"
            )
            assert overflow <= 0, f"{path} scrolls sideways on a phone by {overflow}px"
            ends = page.get_by_text("end-of-the-reason")
            assert await ends.count() >= 1
            for index in range(await ends.count()):
                box = await ends.nth(index).bounding_box()
                assert box is not None and box["x"] + box["width"] <= 390, path
        await context.close()
    assert errors.errors == []


async def test_the_overviews_time_moves_with_its_figures(
    tmp_path: Path, sandbox_url: str, clock: ManualClock, browser
) -> None:
    """The overview refreshes its figures in place; its "As of" time says when they were
    read, not when the page was first loaded (an hour later, the figures are an hour
    newer than that)."""
    errors = ConsoleErrors()
    config = bridge_config(tmp_path, sandbox_url, CLOCKED_TOKENS)
    async with running_bridge(config, clock) as (bridge, url):
        context = await browser.new_context()
        page = await context.new_page()
        errors.watch(page)
        await page.clock.install()  # the page's timers move when the test says
        await sign_in(page, url, ADMIN)
        stamp = page.locator(".updated time")
        assert await stamp.inner_text() == "2027-01-15 08:00:00 UTC"
        queued = page.locator('.states a[href$="state=queued"] strong')
        assert await queued.inner_text() == "0"

        clock.advance(3600)
        queued_message = NewMessage("+12025550144", "disk full", "http", "SMS", 1, 1)
        await seed(bridge.store, [queued_message], clock.now())
        await page.clock.run_for(11_000)  # past the overview's 10 s refresh
        # A locator's wait, not wait_for_function: a string predicate the page polls is
        # an eval, which the console's Content-Security-Policy refuses (a flaky failure
        # whenever the refresh was not done at the first look).
        await queued.filter(has_text="1").wait_for()
        assert await stamp.inner_text() == "2027-01-15 09:00:00 UTC"
        await context.close()
    assert errors.errors == []


async def test_the_overview_lists_the_latest_failure_first(
    tmp_path: Path, sandbox_url: str, sandbox_state: SandboxState, clock: ManualClock, browser
) -> None:
    """An old message retried and refused again just now heads "Recent failures" (it was
    listed below every newer failure, by id); a cancelled one is not there, as the
    delivery ratio beside it leaves it out."""
    errors = ConsoleErrors()
    config = bridge_config(tmp_path, sandbox_url, CLOCKED_TOKENS)
    async with running_bridge(config, clock) as (bridge, url):

        async def refused(message_id: int) -> None:
            sandbox_state.faults.append(Fault(status=400, path="/send"))
            await pump_until_state(bridge, clock, message_id, State.FAILED, max_seconds=120)
            clock.advance(120)

        [old] = await post_messages(url, [("+12025550143", "backup failed")])
        await refused(old)
        [newer] = await post_messages(url, [("+12025550144", "disk full")])
        await refused(newer)
        async with httpx.AsyncClient(base_url=url) as http:
            admin = {"Authorization": f"Bearer {ADMIN}"}
            assert (await http.post(f"/api/v1/messages/{old}/retry", headers=admin)).is_success
            await refused(old)
            [cancelled] = await post_messages(url, [("+12025550145", "never mind")])
            assert (
                await http.post(f"/api/v1/messages/{cancelled}/cancel", headers=admin)
            ).is_success
        context = await browser.new_context()
        page = await context.new_page()
        errors.watch(page)
        await sign_in(page, url, ADMIN)
        texts = await page.locator("ul.failures li").all_inner_texts()
        assert [t.split(" ")[0] for t in texts] == [f"#{old}", f"#{newer}"], texts
        assert await page.get_by_text("cancelled messages are left out").is_visible()
        await context.close()
    assert errors.errors == []


async def test_the_list_keeps_refreshing_after_a_click_in_it(
    tmp_path: Path, sandbox_url: str, clock: ManualClock, browser
) -> None:
    """A click in the messages table (to select a number, or a ctrl-click opening a
    message in another tab) leaves the mouse's focus there: the list stopped refreshing
    until the focus left it, silently, with "Pause updates" still offered. Only the
    keyboard's focus holds the refresh, so that Tab never loses its place."""
    errors = ConsoleErrors()
    config = bridge_config(tmp_path, sandbox_url, CLOCKED_TOKENS)
    async with running_bridge(config, clock) as (bridge, url):
        first = NewMessage("+12025550144", "disk full on db-1", "http", "SMS", 1, 1)
        await seed(bridge.store, [first], clock.now())
        context = await browser.new_context()
        page = await context.new_page()
        errors.watch(page)
        await page.clock.install()
        await sign_in(page, url, ADMIN)
        await page.goto(f"{url}/ui/messages")
        rows = page.locator("table.messages tbody tr")
        await page.get_by_text("disk full on db-1").click()  # the mouse, in the table
        assert await page.evaluate("document.activeElement.className") == "table-wrap"

        second = NewMessage("+12025550145", "disk full on db-2", "http", "SMS", 1, 1)
        await seed(bridge.store, [second], clock.now())
        await page.clock.run_for(11_000)  # past the list's 10 s refresh
        await page.get_by_text("disk full on db-2").wait_for(timeout=WAIT_MS)
        assert await rows.count() == 2
        await context.close()
    assert errors.errors == []


async def test_a_lockout_is_said_on_the_sign_in_page_not_in_raw_json(
    tmp_path: Path, sandbox_url: str, clock: ManualClock, browser
) -> None:
    """Wrong tokens from the operator's address lock it out; their session passes, and
    sign-in waits. Signing out then landed on `{"error": "too many failed logins..."}`
    as bare text, and so did the sign-in form's post: the sign-in page says it now, with
    the wait (503 and Retry-After as before, the token typed not even read)."""
    errors = ConsoleErrors()
    config = bridge_config(tmp_path, sandbox_url, CLOCKED_TOKENS)
    async with running_bridge(config, clock) as (_, url):
        context = await browser.new_context()
        page = await context.new_page()
        errors.watch(page)
        await sign_in(page, url, ADMIN)
        async with httpx.AsyncClient(base_url=url) as http:
            for n in range(10):
                wrong = {"Authorization": f"Bearer wrong-token-{n:04d}-0123456789"}
                assert (await http.get("/api/v1/messages", headers=wrong)).status_code == 401
        assert (await page.goto(f"{url}/ui/messages")).status == 200  # type: ignore[union-attr]

        async with page.expect_response(f"{url}/ui/signin") as signed_out:
            await page.get_by_role("button", name="Sign out").click()
        answer = await signed_out.value
        assert answer.status == 503 and answer.headers["retry-after"] == "300"
        alert = page.get_by_role("alert")
        assert "try again in 300 s" in await alert.inner_text()

        clock.advance(60)
        await page.get_by_label("API token").fill(ADMIN)
        async with page.expect_response(f"{url}/ui/signin") as posted:
            await page.get_by_role("button", name="Sign in").click()
        assert (await posted.value).status == 503
        assert "try again in 240 s" in await page.get_by_role("alert").inner_text()
        await page.goto(f"{url}/ui/")
        assert "/ui/signin" in page.url  # not signed in by the right token
        await context.close()
    assert [e for e in errors.errors if "503" not in e] == []


async def test_a_long_route_name_stays_on_a_phones_screen(
    tmp_path: Path, sandbox_url: str, clock: ManualClock, browser
) -> None:
    """The messages page's Route filter is as wide as its longest option: a route named
    as people name them (`grafana-production-alerts-for-the-database-cluster`) pushed
    it, and the page, 80 px past a phone's right edge."""
    errors = ConsoleErrors()
    name = "grafana-production-alerts-for-the-database-cluster"
    extra = f'{CLOCKED_TOKENS}\n[routes.{name}]\nformat = "grafana"\nto = ["+12025550143"]\n'
    extra += 'token = "route-secret-token-0123456789"\n'
    async with running_bridge(bridge_config(tmp_path, sandbox_url, extra), clock) as (_, url):
        context = await browser.new_context(
            viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True
        )
        page = await context.new_page()
        errors.watch(page)
        await sign_in(page, url, ADMIN)
        for path in ("/ui/messages", f"/ui/messages?route={name}", f"/ui/routes/{name}"):
            await page.goto(url + path)
            if path.startswith("/ui/messages"):  # the filter form, folded on a phone, open
                await page.locator("summary", has_text="Filter").click()
                assert await page.get_by_label("Route").is_visible()
            overflow = await page.evaluate(
                "document.documentElement.scrollWidth - document.documentElement.clientWidth"
            )
            assert overflow <= 0, f"{path} scrolls sideways on a phone by {overflow}px"
        await page.goto(f"{url}/ui/messages")
        await page.locator("summary", has_text="Filter").click()
        await page.get_by_label("Route").select_option(name)  # still chosen whole
        await page.get_by_role("button", name="Filter", exact=True).click()
        await page.wait_for_url(re.compile(f".*route={name}.*"))
        await context.close()
    assert errors.errors == []


async def test_a_refusal_quoting_a_long_value_wraps_on_a_phone(
    tmp_path: Path, sandbox_url: str, clock: ManualClock, browser
) -> None:
    """What the console refuses it quotes (a group name typed, a recipient in a pasted
    payload, a query, an event typed): one long run without spaces (a pasted URL or
    token) went past a phone's right edge, the words after it off the screen: the send
    form, the error pages, a route's last call and a preview's "ignored" line. Wrapped
    now, as reasons are."""
    errors = ConsoleErrors()
    run = "https://alerts.example/" + "x" * 120
    extra = f"""{CLOCKED_TOKENS}
    [routes.anyjson]
    format = "generic"
    allow_payload_to = true
    token = "route-secret-token-0123456789"
    [routes.gh]
    format = "github"
    to = ["+12025550143"]
    secret = "route-secret-token-0123456789"
    """
    config = bridge_config(tmp_path, sandbox_url, extra)
    async with running_bridge(config, clock) as (_, url):
        async with httpx.AsyncClient(base_url=url) as http:
            refused = await http.post(
                "/hooks/anyjson",
                json={"to": [run], "message": "disk full"},
                headers={"Authorization": "Bearer route-secret-token-0123456789"},
            )
            assert refused.status_code == 400 and run in refused.text
        context = await browser.new_context(
            viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True
        )
        page = await context.new_page()
        errors.watch(page)
        await sign_in(page, url, ADMIN)

        async def wrapped(where: str, shown) -> None:  # type: ignore[no-untyped-def]
            assert run in await shown.inner_text(), where
            box = await shown.bounding_box()
            assert box is not None and box["x"] + box["width"] <= 390, where
            overflow = await page.evaluate(
                "document.documentElement.scrollWidth - document.documentElement.clientWidth"
            )
            assert overflow <= 0, f"{where} scrolls sideways on a phone by {overflow}px"

        await page.goto(f"{url}/ui/send")
        await page.get_by_label("To").fill(run)
        await page.get_by_role("button", name="Send").click()
        await page.get_by_role("alert").wait_for()
        await wrapped("the send form", page.get_by_role("alert"))
        await page.goto(f"{url}/ui/messages?state={run}")
        await wrapped("the error page", page.get_by_role("alert"))
        await page.goto(f"{url}/ui/routes/anyjson")
        await wrapped("a route's last call", page.locator("dd", has_text="400:"))
        await page.goto(f"{url}/ui/routes/gh")
        await page.get_by_label("X-GitHub-Event (the event)").fill(run)
        await page.get_by_role("button", name="Preview", exact=True).click()
        await wrapped("a preview ignored", page.locator("section.preview p"))
        await context.close()
    assert [e for e in errors.errors if "400" not in e] == []


async def test_another_tabs_refresh_leaves_an_actions_note_to_its_page(
    tmp_path: Path, sandbox_url: str, clock: ManualClock, browser
) -> None:
    """A retry's note ("queued again") was taken by whichever page of the session was
    drawn next: the same message open in another tab refreshed itself between the
    retry and the browser's arrival, drew the note into nothing (a refresh replaces only
    the live part), and the operator never saw it. A refresh takes no note."""
    errors = ConsoleErrors()
    config = bridge_config(tmp_path, sandbox_url, CLOCKED_TOKENS)
    async with running_bridge(config, clock) as (bridge, url):
        failed = NewMessage("+12025550144", "disk full", "http", "SMS", 1, 1, state=State.FAILED)
        [message_id] = await seed(bridge.store, [failed], clock.now())
        context = await browser.new_context()
        acting, other_tab = await context.new_page(), await context.new_page()
        errors.watch(acting)
        errors.watch(other_tab)
        await other_tab.clock.install()
        await sign_in(acting, url, ADMIN)
        page_url = f"{url}/ui/messages/{message_id}"
        await other_tab.goto(page_url)
        await acting.goto(page_url)
        csrf = await acting.locator("input[name=csrf]").first.get_attribute("value")
        # The retry's POST, then the other tab's refresh, then the redirect followed.
        retried = await acting.request.post(
            f"{page_url}/retry", form={"csrf": csrf or ""}, max_redirects=0
        )
        assert retried.status == 303
        async with other_tab.expect_response(page_url) as refreshed:
            await other_tab.clock.run_for(6_000)  # past the message page's 5 s refresh
        assert (await refreshed.value).ok
        await acting.goto(page_url)
        note = acting.get_by_role("status")
        assert f"Message {message_id} queued again." in await note.inner_text()
        await context.close()
    assert errors.errors == []


async def test_on_a_phone_a_failed_message_reads_whole_and_its_retry_is_on_the_first_screen(
    tmp_path: Path, sandbox_url: str, clock: ManualClock, browser
) -> None:
    """At night, on a phone: the list of failed messages was a table whose Text and Why
    columns sat past the screen's right edge, a long reason wrapped a letter a line (a
    row a screen tall); a message's Retry came after its text and details, two screens
    down. Each listed message now reads whole on the screen, and Retry is on the first."""
    errors = ConsoleErrors()
    config = bridge_config(tmp_path, sandbox_url, CLOCKED_TOKENS)
    async with running_bridge(config, clock) as (bridge, url):
        failed = NewMessage(
            "+12025550144", "disk 97% full on db-1", "http", "SMS", 1, 1, state=State.FAILED
        )
        reason = "provider refused: the number is on the operator's do-not-text list (code 21610)"
        [message_id] = await seed(bridge.store, [failed._replace(reason=reason)], clock.now())
        context = await browser.new_context(
            viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True
        )
        page = await context.new_page()
        errors.watch(page)
        await sign_in(page, url, ADMIN)
        await page.goto(f"{url}/ui/messages?state=failed")
        row = page.locator("table.messages tbody tr").first
        for shown in (row.locator("td.text"), row.locator("td.reason")):
            box = await shown.bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390, box
        row_box = await row.bounding_box()
        assert row_box is not None and row_box["height"] < 250, row_box

        await row.get_by_role("link", name=f"Message {message_id}").click()
        await page.wait_for_url(f"{url}/ui/messages/{message_id}")
        retry = await page.get_by_role("button", name="Retry").bounding_box()
        assert retry is not None and retry["y"] + retry["height"] <= 844, retry
        await context.close()
    assert errors.errors == []


async def cancel_all_from_a_phones_overview(
    browser, errors: ConsoleErrors, url: str, button: str, done: str
) -> tuple[Any, Any]:
    """An admin on a phone's screen: the overview does not scroll sideways, `button` is
    on its first screen (not below the chart) and within its edges; clicked and
    confirmed, the `done` note shows. The browser context and its page, still open."""
    context = await browser.new_context(
        viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True
    )
    page = await context.new_page()
    errors.watch(page)
    await sign_in(page, url, ADMIN)
    overflow = await page.evaluate(
        "document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    assert overflow <= 0, f"the overview scrolls sideways on a phone by {overflow}px"
    cancel_all = page.get_by_role("button", name=button)
    box = await cancel_all.bounding_box()
    assert box is not None and box["y"] + box["height"] <= 844, box
    assert box["x"] >= 0 and box["x"] + box["width"] <= 390, box
    page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
    await cancel_all.click()
    await page.get_by_role("status").filter(has_text=done).wait_for()
    return context, page


async def test_on_a_phone_a_flood_held_for_one_phone_is_cancelled_in_one_go(
    tmp_path: Path, sandbox_url: str, clock: ManualClock, browser
) -> None:
    """A flood to one phone, held by storm control: the console could cancel it only a
    message at a time (a page, a button and a confirmation each: forty for forty). The
    overview's storms card (on its first screen now, above the figures and the chart)
    and the phone's held list cancel them all, once confirmed."""
    errors = ConsoleErrors()
    extra = f"{CLOCKED_TOKENS}\n[limits]\nper_recipient = 1\n"
    config = bridge_config(tmp_path, sandbox_url, extra)
    async with running_bridge(config, clock) as (bridge, url):
        flood = NewMessage("+12025550144", "disk full", "http", "SMS", 1, 1, state=State.HELD)
        other = NewMessage("+12025550145", "disk full", "http", "SMS", 1, 1, state=State.HELD)
        held = await seed(bridge.store, [flood] * 40, clock.now())
        [kept] = await seed(bridge.store, [other], clock.now())
        context, page = await cancel_all_from_a_phones_overview(
            browser,
            errors,
            url,
            "Cancel the 40 held for +12025550144",
            "Cancelled 40 held messages",
        )
        assert "recipient=%2B12025550144" in page.url
        for message_id in held:
            message = await bridge.store.get(message_id)
            assert message is not None and message.state == State.FAILED
            assert message.reason == "cancelled by root"
        assert (await bridge.store.get(kept)).state == State.HELD  # another phone's

        # The phone's held list and each of its held messages offer the same; dismissed,
        # nothing is cancelled.
        for path in ("/ui/messages?state=held&recipient=%2B12025550145", f"/ui/messages/{kept}"):
            await page.goto(url + path)
            page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.dismiss()))
            name = "Cancel every message held for +12025550145"
            await page.get_by_role("button", name=name).click()
            assert (await bridge.store.get(kept)).state == State.HELD
        await context.close()
    assert errors.errors == []


async def test_on_a_phone_a_pile_of_queued_texts_is_cancelled_from_the_overview(
    tmp_path: Path, sandbox_url: str, clock: ManualClock, browser
) -> None:
    """Texts piling up queued for one phone (no storm control) were not on the overview:
    its storms card lists them under "Queued to one phone", on a phone's first screen and
    within its edges, next to a held storm; "Cancel all", confirmed, cancels that phone's
    queued texts only."""
    errors = ConsoleErrors()
    config = bridge_config(tmp_path, sandbox_url, CLOCKED_TOKENS)
    async with running_bridge(config, clock) as (bridge, url):
        pile = NewMessage("+12025550144", "disk full", "http", "SMS", 1, 1)
        later = clock.now() + 3600  # not due yet: the running dispatcher leaves them queued
        queued = await seed(bridge.store, [pile] * 40, later)
        [other] = await seed(bridge.store, [pile._replace(recipient="+12025550145")], later)
        [held] = await seed(bridge.store, [pile._replace(state=State.HELD)], later)
        context, _ = await cancel_all_from_a_phones_overview(
            browser,
            errors,
            url,
            "Cancel every queued message to +12025550144",
            "Cancelled 40 queued messages",
        )
        assert {(await bridge.store.get(i)).state for i in queued} == {State.FAILED}
        assert (await bridge.store.get(other)).state == State.QUEUED
        assert (await bridge.store.get(held)).state == State.HELD
        await context.close()
    assert errors.errors == []


async def test_on_a_phone_the_filter_form_is_folded_and_the_list_is_on_the_first_screen(
    tmp_path: Path, sandbox_url: str, clock: ManualClock, browser
) -> None:
    """On a phone the filter form (five fields, one under another) filled the message
    list's first screen: the newest message, what the page is opened for, was below it.
    There it is folded under a "Filter" line that says what is filtered; a tap opens it.
    On a wide screen it is open, as before."""
    errors = ConsoleErrors()
    config = bridge_config(tmp_path, sandbox_url, CLOCKED_TOKENS)
    async with running_bridge(config, clock) as (bridge, url):
        queued = NewMessage("+12025550144", "disk 97% full on db-1", "http", "SMS", 1, 1)
        await seed(bridge.store, [queued] * 3, clock.now())
        context = await browser.new_context(
            viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True
        )
        page = await context.new_page()
        errors.watch(page)
        await sign_in(page, url, ADMIN)
        await page.goto(f"{url}/ui/messages?state=queued")
        rows = page.locator("table.messages tbody tr")
        first = await rows.first.bounding_box()
        assert first is not None and first["y"] + first["height"] <= 844 * 0.6, first
        text = page.get_by_label("Text contains")
        assert not await text.is_visible()
        fold = page.locator("summary", has_text="Filter")
        assert "queued" in await fold.inner_text()  # what is filtered, said folded
        await fold.click()
        await text.fill("db-1")
        await page.get_by_role("button", name="Filter", exact=True).click()
        await page.wait_for_url(re.compile(r".*q=db-1.*"))
        assert await rows.count() == 3
        await context.close()

        wide = await browser.new_context(viewport={"width": 1280, "height": 900})
        page = await wide.new_page()
        errors.watch(page)
        await sign_in(page, url, ADMIN)
        await page.goto(f"{url}/ui/messages")
        assert await page.get_by_label("Text contains").is_visible()
        await wide.close()
    assert errors.errors == []


async def test_an_open_consoles_cancel_all_says_where_it_came_from_and_what_was_too_late(
    tmp_path: Path, sandbox_url: str, clock: ManualClock, browser
) -> None:
    """On a bridge with no tokens, a phone's "Cancel all" read "cancelled by anonymous"
    in each message's timeline: the operator could not tell who, or from where. The
    timeline says the console, with no tokens configured, and the browser's address;
    the note says how many the dispatcher had already taken (too late to cancel)."""
    errors = ConsoleErrors()
    config = bridge_config(tmp_path, sandbox_url)  # no [tokens.*]: the open console
    async with running_bridge(config, clock) as (bridge, url):
        pile = NewMessage("+12025550144", "disk full", "http", "SMS", 1, 1)
        later = clock.now() + 3600  # not due yet: the running dispatcher leaves them queued
        queued = await seed(bridge.store, [pile] * 3, later)
        await seed(bridge.store, [pile._replace(state=State.SENDING)], later)
        page = await browser.new_page()
        errors.watch(page)
        await page.goto(f"{url}/ui/messages/{queued[0]}")
        page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
        await page.get_by_role("button", name="Cancel every queued message to").click()
        note = page.get_by_role("status").filter(has_text="Cancelled 3 queued messages")
        await note.wait_for()
        assert "1 being handed to the provider now: too late to cancel." in (
            await note.inner_text()
        )
        await page.goto(f"{url}/ui/messages/{queued[0]}")
        timeline = await page.locator("main").inner_text()
        assert "cancelled by the console (no tokens configured), from 127.0.0.1" in timeline
        assert "anonymous" not in timeline
        await page.close()
    assert errors.errors == []
