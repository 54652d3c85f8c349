"""SMTP ingress through real smtplib sessions on loopback, out to the sandbox provider."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import re
import select
import smtplib
import socket
import sqlite3
import ssl
import threading
import time
import tomllib
import tracemalloc
from collections.abc import AsyncIterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import trustme
from aiosmtpd.smtp import SMTP
from hypothesis import given, settings
from hypothesis import strategies as st

import tests.properties  # noqa: F401  (the suite's Hypothesis profile)
from bridge.clock import ManualClock
from bridge.config import Config, SmtpConfig
from bridge.ingress import smtp as smtp_module
from bridge.ingress.smtp import (
    ADDRESS_CACHE_SIZE,
    PARSE_WORKERS,
    BridgeSMTP,
    start_smtp,
)
from bridge.ingress.smtplimits import Sessions
from bridge.models import State
from bridge.provider.sandbox import SandboxState
from bridge.service import Bridge
from bridge.sockets import bind_socket
from bridge.store import Store
from bridge.text import count_parts
from tests.helpers import bridge_config, pump, running_bridge
from tests.stores import FaultySqliteStore

MAIL_DIR = Path(__file__).parent / "data" / "mail"
EXPECTED = tomllib.loads((MAIL_DIR / "expected.toml").read_text(encoding="utf-8"))
DEFAULT_RCPT = "+12025550143@sms.localhost"
SMTP_BASE = """
[smtp]
domains = ["sms.localhost", "us.sms.localhost"]
regions = {"us.sms.localhost" = "US"}
hostname = "bridge.test"
[groups]
oncall = ["+12025550101", "+12025550102"]
"""


def with_smtp(lines: str) -> str:
    """SMTP_BASE with more keys in its [smtp] table."""
    return SMTP_BASE.replace("[groups]", lines.rstrip("\n") + "\n[groups]")


@contextlib.asynccontextmanager
async def smtp_listening(bridge: Bridge) -> AsyncIterator[int]:
    async with _listening(bridge, 1) as (port,):
        yield port


@contextlib.asynccontextmanager
async def implicit_tls_listening(bridge: Bridge) -> AsyncIterator[tuple[int, int]]:
    """The plain and the implicit-TLS listener, each on a port of its own binding (a port
    chosen, closed and bound again can be taken meanwhile by another test's process)."""
    async with _listening(bridge, 2) as (port, tls_port):
        yield port, tls_port


@contextlib.asynccontextmanager
async def _listening(bridge: Bridge, count: int) -> AsyncIterator[tuple[int, ...]]:
    socks = [bind_socket("127.0.0.1:0") for _ in range(count)]
    servers = await start_smtp(bridge.smtp_handler, socks)
    try:
        yield tuple(sock.getsockname()[1] for sock in socks)
    finally:
        for server in servers:
            server.close()
            await server.wait_closed()


def send(port: int, mail_from: str, rcpts: list[str], data: bytes | str) -> dict:
    """A real smtplib session (blocking: run it in a thread)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        return client.sendmail(mail_from, rcpts, data)


@contextlib.asynccontextmanager
async def smtp_bridge(
    tmp_path, clock, sandbox_url, extra: str = "", store: Store | None = None
) -> AsyncIterator[tuple[Bridge, int]]:
    config = bridge_config(tmp_path, sandbox_url, SMTP_BASE + extra)
    async with (
        running_bridge(config, clock, store) as (bridge, _url),
        smtp_listening(bridge) as port,
    ):
        yield bridge, port


async def settled(bridge: Bridge) -> bool:
    counts = await bridge.store.counts()
    return not counts.get("queued") and not counts.get("sending")


@pytest.mark.parametrize("name", sorted(EXPECTED))
async def test_corpus_mail_becomes_the_expected_sms(
    name: str, tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    expected = EXPECTED[name]
    raw = (MAIL_DIR / name).read_bytes()
    rcpt = expected.get("rcpt", DEFAULT_RCPT)
    config = expected.get("config", "")  # e.g. [[smtp.rules]] for this sender
    async with smtp_bridge(tmp_path, clock, sandbox_url, config) as (bridge, port):
        refused = await asyncio.to_thread(
            send, port, expected.get("mail_from", "monitor@example.org"), [rcpt], raw
        )
        assert refused == {}
        await pump(bridge, clock, lambda: settled(bridge), max_seconds=120)
        messages = await bridge.store.query()
    assert messages, "nothing stored"
    if expected.get("state") == "suppressed":
        assert {m.state for m in messages} == {State.SUPPRESSED}
        assert all(expected["reason"] in (m.reason or "") for m in messages)
        assert sandbox_state.entries == []
        return
    texts = {e.message for e in sandbox_state.entries}
    assert len(texts) == 1, texts
    [text] = texts
    if "text" in expected:
        assert text == expected["text"]
    else:
        assert text.startswith(expected["starts_with"]) and text.endswith(expected["ends_with"])
        assert count_parts(text) == expected["parts"]
    if rcpt.startswith("oncall@"):
        assert sorted(e.to for e in sandbox_state.entries) == ["+12025550101", "+12025550102"]
        assert [r.path for r in sandbox_state.requests if "send" in r.path] == ["/api/v1/send-bulk"]


def test_corpus_is_large_enough() -> None:
    assert len(list(MAIL_DIR.glob("*.eml"))) >= 20
    assert set(EXPECTED) == {p.name for p in MAIL_DIR.glob("*.eml")}


async def test_rcpt_refusals_and_accepted_forms(tmp_path, clock, sandbox_url) -> None:
    async with smtp_bridge(tmp_path, clock, sandbox_url) as (_bridge, port):

        def session() -> list[tuple[int, bytes]]:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.ehlo("tester")
                client.mail("nagios@example.org")
                return [
                    client.rcpt(r)
                    for r in (
                        "+12025550143@evil.example",
                        "123@sms.localhost",
                        "+1-202-555-0143@sms.localhost",
                        "ONCALL@sms.localhost",
                        "2025550144@us.sms.localhost",
                        "+12025550145@SMS.LOCALHOST",
                        "oncal@sms.localhost",
                    )
                ] + [  # a quoted local part, as a mail client writes one with spaces
                    client.docmd("RCPT", 'TO:<"+1 202 555 0146"@sms.localhost>'),
                    client.docmd("RCPT", 'TO:<"+1 202 \\"555 0146"@sms.localhost>'),
                ]

        replies = await asyncio.to_thread(session)
    codes = [(code, text.decode()) for code, text in replies]
    assert (
        codes[0][0] == 550 and codes[0][1].startswith("5.7.1") and "relaying denied" in codes[0][1]
    )
    assert codes[1][0] == 550 and codes[1][1].startswith("5.1.1") and "too short" in codes[1][1]
    assert [c for c, _ in codes[2:6]] == [250, 250, 250, 250]
    # a mistyped group name is called that, not "not a possible phone number"
    assert codes[6] == (550, "5.1.1 <oncal@sms.localhost>: no group named 'oncal' in [groups]")
    assert codes[7] == (250, "2.1.5 OK")
    assert codes[8][0] == 550 and "'+1 202 \"555 0146' is not a possible" in codes[8][1]


async def test_a_local_only_number_is_refused_with_why(
    tmp_path, clock, sandbox_state: SandboxState, sandbox_url
) -> None:
    """5550143 in region US: the library calls 7 digits "possible" as a local number (for
    a landline of the same area code), which no phone reaches by SMS: it was texted as
    +15550143. Now a 550 says why. A full-length national number the phone data does not
    know (1234567 in GB) is still taken, as the contract says of a possible number:
    metadata lags new ranges."""
    smtp = (
        '[phone]\ndefault_region = "US"\n'
        '[smtp]\ndomains = ["sms.localhost", "us.sms.localhost", "gb.sms.localhost"]\n'
        'regions = {"us.sms.localhost" = "US", "gb.sms.localhost" = "GB"}\n'
    )
    config = bridge_config(tmp_path, sandbox_url, smtp)
    async with running_bridge(config, clock) as (bridge, url), smtp_listening(bridge) as port:
        async with httpx.AsyncClient() as http:  # the API reads it in phone.default_region
            api = await http.post(
                f"{url}/api/v1/messages", json={"to": "5550143", "message": "UPS on battery"}
            )

        def session() -> list[tuple[int, str]]:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.ehlo("ups.example.org")
                client.mail("ups@example.org")
                return [
                    (code, text.decode())
                    for code, text in (
                        client.rcpt(r)
                        for r in (
                            "5550143@us.sms.localhost",
                            "1234567@gb.sms.localhost",
                            "2025550143@us.sms.localhost",
                            "02079460000@gb.sms.localhost",
                        )
                    )
                ]

        replies = await asyncio.to_thread(session)
    assert [code for code, _ in replies] == [550, 250, 250, 250], replies
    assert "a local number only (7 digits): write it with its area code" in replies[0][1]
    assert api.status_code == 400 and "a local number only" in api.json()["error"], api.text
    assert sandbox_state.entries == []


async def test_parentheses_in_a_recipient_are_the_numbers_separators(
    tmp_path, clock, sandbox_state: SandboxState, sandbox_url
) -> None:
    """The 550 lists ( ) as separators, but aiosmtpd's header parser read `(202)` as a
    comment and dropped it: RCPT TO:<001(202)555-0143@...> was accepted and texted to
    +1 555 0143. Now the digits in parentheses are the number's; `(0)` after the country
    code is the trunk prefix, dropped where the country has one (+44, +49) and kept
    where it is part of the number (+39). A sender whose mail library dropped `(202)`
    before the bridge saw it (smtplib: +1555-0143) is refused, told the area code is
    missing, and the refusals quote the address as it was sent."""
    config = bridge_config(tmp_path, sandbox_url, SMTP_BASE)
    forms = {
        "<001(202)555-0143@sms.localhost>": "+12025550143",
        "<+1(202)555-0144@sms.localhost>": "+12025550144",
        "<(202)555-0145@us.sms.localhost>": "+12025550145",
        "1(202)555-0146@sms.localhost": "+12025550146",
        "<+44(0)20-7946-0000@sms.localhost>": "+442079460000",
        "<+49(0)30-1234567@sms.localhost>": "+49301234567",
        "<+39(0)6-6982-0000@sms.localhost>": "+390669820000",
    }
    async with running_bridge(config, clock) as (bridge, url), smtp_listening(bridge) as port:
        async with httpx.AsyncClient() as http:
            api = await http.post(
                f"{url}/api/v1/messages", json={"to": "+1 555 0143", "message": "db-1 down"}
            )

        def session() -> tuple[list[tuple[int, str]], tuple[int, bytes]]:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.ehlo("monitor.example.org")
                client.mail("monitor@example.org")
                accepted = [client.docmd("RCPT", f"TO:{form}") for form in forms]
                refused = [
                    client.rcpt("+1(202)555-0143@sms.localhost"),  # smtplib drops (202)
                    client.docmd("RCPT", "TO:<(202)555-0143@sms.localhost>"),
                    client.docmd("RCPT", "TO:<+1#202#555#0143@sms.localhost>"),
                ]
                replies = [(code, text.decode()) for code, text in accepted + refused]
                return replies, client.data(b"Subject: db-1 down\r\n\r\nHost db-1 DOWN\r\n")

        replies, data = await asyncio.to_thread(session)
        await pump(bridge, clock, lambda: settled(bridge), max_seconds=120)
    assert [code for code, _ in replies] == [250] * len(forms) + [550] * 3, replies
    lost, unwritten, sign = (text for _, text in replies[len(forms) :])
    assert lost.startswith("5.1.1 <+1555-0143@sms.localhost>: '+1555-0143' is not a possible")
    assert "the area code is missing" in lost and "parentheses" in lost
    assert unwritten.startswith("5.1.1 <(202)555-0143@sms.localhost>: '(202)555-0143'")
    assert "separators - and ." in sign and "( )" not in sign
    assert data[0] == 250
    assert sorted(e.to for e in sandbox_state.entries) == sorted(forms.values())
    assert api.status_code == 400, api.text
    assert "the area code is missing" in api.json()["error"]


async def test_a_domain_written_with_its_root_dot_is_the_domain(
    tmp_path, clock, sandbox_state: SandboxState, sandbox_url
) -> None:
    """`sms.localhost.` (the root's dot, as DNS writes a name) is the bridge's domain:
    `resolve` dropped the dot, but aiosmtpd's parser refused the address first, 553."""
    async with smtp_bridge(tmp_path, clock, sandbox_url) as (bridge, port):

        def session() -> list[tuple[int, bytes]]:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.ehlo("monitor.example.org")
                client.mail("monitor@example.org")
                replies = [
                    client.docmd("RCPT", "TO:<+12025550143@sms.localhost.>"),
                    client.docmd("RCPT", "TO:<+12025550144@SMS.LOCALHOST.>"),
                    client.docmd("RCPT", "TO:<+12025550145@evil.example.>"),
                ]
                return [*replies, client.data(b"Subject: db-1 down\r\n\r\nDOWN\r\n")]

        replies = await asyncio.to_thread(session)
        await pump(bridge, clock, lambda: settled(bridge), max_seconds=120)
    assert [code for code, _ in replies] == [250, 250, 550, 250], replies
    assert b"relaying denied" in replies[2][1]
    assert sorted(e.to for e in sandbox_state.entries) == ["+12025550143", "+12025550144"]


async def test_a_group_name_is_case_blind_over_smtp_and_http_alike(
    tmp_path, clock, sandbox_state: SandboxState, sandbox_url
) -> None:
    extra = SMTP_BASE.split("[groups]")[0] + '[groups]\nOnCall = ["+12025550111"]\n'
    config = bridge_config(tmp_path, sandbox_url, extra)  # the name as an owner may write it
    async with (
        running_bridge(config, clock) as (bridge, url),
        smtp_listening(bridge) as port,
        httpx.AsyncClient() as http,
    ):
        mail = "Subject: disk full\r\n\r\ndb-2\r\n"
        assert (
            await asyncio.to_thread(send, port, "a@example.org", ["ONCALL@sms.localhost"], mail)
            == {}
        )
        answers = [
            await http.post(f"{url}/api/v1/messages", json={"to": name, "message": f"via api {n}"})
            for n, name in enumerate(("oncall", "ONCALL", "OnCall"))
        ]
        await pump(bridge, clock, lambda: settled(bridge), max_seconds=60)
    assert [a.status_code for a in answers] == [202, 202, 202], [a.text for a in answers]
    assert sorted((e.to, e.message) for e in sandbox_state.entries) == [
        ("+12025550111", "disk full\ndb-2"),
        ("+12025550111", "via api 0"),
        ("+12025550111", "via api 1"),
        ("+12025550111", "via api 2"),
    ]


async def test_a_recipient_a_reload_removed_after_rcpt_does_not_bounce_the_others(
    tmp_path, clock, sandbox_state: SandboxState, sandbox_url
) -> None:
    rcpts = ["oncall@sms.localhost", DEFAULT_RCPT]
    mail = "Subject: UPS on battery\r\n\r\nruntime 12 min\r\n"
    async with smtp_bridge(tmp_path, clock, sandbox_url) as (bridge, port):
        accepted, reload_done = threading.Event(), threading.Event()

        def session() -> tuple[int, bytes]:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.ehlo("tester")
                client.mail("ups@example.org")
                assert [client.rcpt(r)[0] for r in rcpts] == [250, 250]
                accepted.set()
                reload_done.wait(10)
                return client.data(mail)

        answer = asyncio.ensure_future(asyncio.to_thread(session))
        assert await asyncio.to_thread(accepted.wait, 10)
        without = SMTP_BASE.split("[groups]")[0]  # a SIGHUP drops [groups]
        (tmp_path / "new").mkdir()
        try:
            bridge.reload(bridge_config(tmp_path / "new", sandbox_url, without))
        finally:
            reload_done.set()
        code, text = await answer
        assert await bridge.store.counts() == {}
        # the client's retry: RCPT answers each recipient by the new config
        refused = await asyncio.to_thread(send, port, "ups@example.org", rcpts, mail)
        await pump(bridge, clock, lambda: settled(bridge), max_seconds=60)
    assert code == 451 and text.startswith(b"4.3.0 <oncall@sms.localhost>"), text
    assert list(refused) == ["oncall@sms.localhost"] and refused["oncall@sms.localhost"][0] == 550
    assert [e.to for e in sandbox_state.entries] == ["+12025550143"]


async def test_a_recipient_is_read_once_a_mail_when_no_reload_comes_between(
    tmp_path, clock, sandbox_state: SandboxState, sandbox_url, monkeypatch
) -> None:
    """DATA takes the numbers RCPT read (a new number's read is ~45 us of phonenumbers,
    on the event loop); after a reload it reads them again (the test above)."""
    rcpts = ["oncall@sms.localhost", DEFAULT_RCPT]
    mail = "Subject: UPS on battery\r\n\r\nruntime 12 min\r\n"
    async with smtp_bridge(tmp_path, clock, sandbox_url) as (bridge, port):
        handler = bridge.smtp_handler
        read: list[str] = []
        resolve = handler.resolve

        def counted(address: str) -> list[str]:
            read.append(address)
            return resolve(address)

        monkeypatch.setattr(handler, "resolve", counted)
        refused = await asyncio.to_thread(send, port, "ups@example.org", rcpts, mail)
        await pump(bridge, clock, lambda: settled(bridge), max_seconds=60)
    assert refused == {}
    assert read == rcpts
    assert sorted(e.to for e in sandbox_state.entries) == [
        "+12025550101",
        "+12025550102",
        "+12025550143",
    ]


async def test_too_many_recipients(tmp_path, clock, sandbox_url) -> None:
    config = bridge_config(tmp_path, sandbox_url, with_smtp("max_recipients = 2"))
    async with running_bridge(config, clock) as (bridge, _), smtp_listening(bridge) as port:

        def session() -> list[int]:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.ehlo("tester")
                client.mail("a@example.org")
                return [client.rcpt(f"+1202555010{i}@sms.localhost")[0] for i in range(4)]

        assert await asyncio.to_thread(session) == [250, 250, 452, 452]


async def test_several_rcpts_become_one_bulk_call(
    tmp_path, clock, sandbox_state: SandboxState, sandbox_url
) -> None:
    async with smtp_bridge(tmp_path, clock, sandbox_url) as (bridge, port):
        rcpts = ["+12025550143@sms.localhost", "+12025550144@sms.localhost", "oncall@sms.localhost"]
        await asyncio.to_thread(
            send,
            port,
            "ups@example.org",
            rcpts,
            "Subject: UPS on battery\r\n\r\nRuntime 12 min\r\n",
        )
        await pump(bridge, clock, lambda: settled(bridge), max_seconds=60)
    calls = [r.path for r in sandbox_state.requests if "send" in r.path]
    assert calls == ["/api/v1/send-bulk"]
    assert len(sandbox_state.entries) == 4


async def test_a_retried_mail_is_texted_once(
    tmp_path, clock, sandbox_state: SandboxState, sandbox_url
) -> None:
    raw = (MAIL_DIR / "nagios-service.eml").read_bytes()
    async with smtp_bridge(tmp_path, clock, sandbox_url) as (bridge, port):
        for _ in range(2):  # the client lost our 250 and sends the same Message-ID again
            await asyncio.to_thread(send, port, "nagios@example.org", [DEFAULT_RCPT], raw)
        await pump(bridge, clock, lambda: settled(bridge), max_seconds=60)
        states = sorted(m.state for m in await bridge.store.query())
    assert states == [State.SENT, State.SUPPRESSED] or states == [State.DELIVERED, State.SUPPRESSED]
    assert len(sandbox_state.entries) == 1


async def test_without_a_message_id_the_date_tells_a_new_mail_from_a_retry(
    tmp_path, clock, sandbox_state: SandboxState, sandbox_url
) -> None:
    # cron through a bare sendmail (or a NAS mailing the bridge directly) writes no
    # Message-ID: the same words an hour later are a new failure, an MTA retry is not.
    def cron(date: str) -> str:
        head = f"Date: {date}\r\n" if date else ""
        return (
            f"{head}From: root@backup-01.example.org\r\n"
            "Subject: Cron <root@backup-01> backup.sh\r\n\r\nbackup failed: disk full\r\n"
        )

    first, later = "Mon, 30 Nov 2026 02:00:01 +0000", "Mon, 30 Nov 2026 03:00:01 +0000"
    extra = '[dedupe]\nwindow = "2h"\n'
    async with smtp_bridge(tmp_path, clock, sandbox_url, extra) as (bridge, port):
        for date in (first, first, later, "", ""):  # each with its retry, no Date at last
            await asyncio.to_thread(
                send, port, "root@backup-01.example.org", [DEFAULT_RCPT], cron(date)
            )
            clock.advance(600)
        states = [m.state for m in sorted(await bridge.store.query(), key=lambda m: m.id)]
    queued, dup = State.QUEUED, State.SUPPRESSED
    # (without a Date the text is the key: the first such mail meets no dated one)
    assert states == [queued, dup, queued, queued, dup], states


async def test_a_devices_own_retry_built_anew_is_texted_once(
    tmp_path, clock, sandbox_state: SandboxState, sandbox_url, backend: str
) -> None:
    """A UPS or NAS that mails the bridge itself builds its mail anew when it retries (the
    bridge's 250 lost, its own timeout): a new Date and a new Message-ID, the same alert.
    Keyed on the Message-ID (or the exact Date), each retry was texted again. Dates of
    one content within minutes are one mail now, across a 5-minute slot's edge too; the
    same alert half an hour later is a new one, though the window is 2 hours."""

    def ups(date: str, message_id: str) -> str:
        return (
            f"Date: {date}\r\nMessage-ID: <{message_id}@ups-rack1.example.org>\r\n"
            "From: ups-rack1@example.org\r\nSubject: UPS ups-rack1: on battery\r\n\r\n"
            "Input power failure, runtime 14 min\r\n"
        )

    sends = [
        ("Tue, 01 Dec 2026 02:04:50 +0000", "1764554690.1"),  # the first
        ("Tue, 01 Dec 2026 02:05:40 +0000", "1764554740.2"),  # its retry, past a slot edge
        ("Tue, 01 Dec 2026 02:06:30 +0000", "1764554790.3"),  # and the next one
        ("Tue, 01 Dec 2026 02:40:12 +0000", "1764556812.4"),  # on battery again later
        ("Tue, 01 Dec 2026 02:40:12 +0000", "1764556812.4"),  # an MTA's retry of it
    ]
    extra = '[dedupe]\nwindow = "2h"\n'
    async with smtp_bridge(tmp_path, clock, sandbox_url, extra) as (bridge, port):
        for date, message_id in sends:
            raw = ups(date, message_id)
            await asyncio.to_thread(send, port, "ups-rack1@example.org", [DEFAULT_RCPT], raw)
            clock.advance(50)
        states = [m.state for m in sorted(await bridge.store.query(), key=lambda m: m.id)]
    queued, dup = State.QUEUED, State.SUPPRESSED
    assert states == [queued, dup, dup, queued, dup], states


async def test_a_devices_flap_back_within_minutes_is_texted(
    tmp_path, clock, sandbox_state: SandboxState, sandbox_url, backend: str
) -> None:
    """A mail's content within a Date slot's reach is its retry only while it is still
    the mail's last word to the phone: a UPS on battery, back on mains, on battery again
    within minutes texts all three (the second "on battery" was suppressed: the phone
    said "power restored" while the UPS ran down). Its retry is still one."""

    def ups(date: str, n: int, subject: str) -> str:
        return (
            f"Date: {date}\r\nMessage-ID: <{n}@ups-rack1.example.org>\r\n"
            f"From: ups-rack1@example.org\r\nSubject: UPS ups-rack1: {subject}\r\n\r\n"
            "See the UPS log\r\n"
        )

    sends = [
        ("Tue, 01 Dec 2026 02:04:50 +0000", "on battery"),
        ("Tue, 01 Dec 2026 02:05:10 +0000", "power restored"),
        ("Tue, 01 Dec 2026 02:05:40 +0000", "on battery"),  # a flap: news
        ("Tue, 01 Dec 2026 02:06:30 +0000", "on battery"),  # its retry, built anew
    ]
    async with smtp_bridge(tmp_path, clock, sandbox_url) as (bridge, port):
        for n, (date, subject) in enumerate(sends):
            raw = ups(date, n, subject)
            await asyncio.to_thread(send, port, "ups-rack1@example.org", [DEFAULT_RCPT], raw)
            clock.advance(30)
        await pump(bridge, clock, lambda: settled(bridge), max_seconds=600)
        states = [m.state for m in sorted(await bridge.store.query(), key=lambda m: m.id)]
    assert states[3] == State.SUPPRESSED and State.SUPPRESSED not in states[:3], states
    texted = [e.message.split("\n")[0].rsplit(": ", 1)[1] for e in sandbox_state.entries]
    assert texted == ["on battery", "power restored", "on battery"], texted


async def test_an_auto_reply_with_the_alerts_words_does_not_silence_the_alert(
    tmp_path, clock, sandbox_state: SandboxState, sandbox_url
) -> None:
    """Anyone who may mail the bridge could send a page's words (a UPS's are well
    known) marked as an auto-reply: stored suppressed, never texted, it still was the
    "original" of the genuine page that came after it, which was then suppressed as its
    duplicate. Nobody was texted at all."""
    alert = "Subject: UPS on battery\r\n\r\nRuntime 12 min\r\n"
    async with smtp_bridge(tmp_path, clock, sandbox_url) as (bridge, port):
        for mail in (f"Auto-Submitted: auto-replied\r\n{alert}", alert):
            await asyncio.to_thread(send, port, "ups@example.org", [DEFAULT_RCPT], mail)
            clock.advance(5)
        await pump(bridge, clock, lambda: settled(bridge), max_seconds=60)
        messages = sorted(await bridge.store.query(), key=lambda m: m.id)
    assert messages[0].state == State.SUPPRESSED
    assert "auto-submitted" in (messages[0].reason or "")
    assert messages[1].state in (State.SENT, State.DELIVERED), messages[1].reason
    assert [e.message for e in sandbox_state.entries] == ["UPS on battery\nRuntime 12 min"]


async def test_a_mail_that_shows_nothing_is_texted_as_an_empty_mail(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """A subject of a zero-width space and a body of a direction mark and white space
    (`str.strip()` keeps both) went out as an SMS a phone shows as empty: the API and
    hooks refuse or replace such a text (`is_blank`), SMTP now says whose mail it was."""
    mail = EmailMessage()
    mail["From"] = "ups@example.org"
    mail["To"] = DEFAULT_RCPT
    mail["Subject"] = "\u200b"
    mail.set_content("\u200b\u200e \n")
    # A cron job's mail of a terminal's colour codes only: its words, once they are out.
    coloured = EmailMessage()
    coloured["From"] = "cron@example.org"
    coloured["To"] = DEFAULT_RCPT
    coloured.set_content("\x1b[0m\x1b[2J\n")
    async with smtp_bridge(tmp_path, clock, sandbox_url) as (bridge, port):
        await asyncio.to_thread(send, port, "ups@example.org", [DEFAULT_RCPT], mail.as_bytes())
        await asyncio.to_thread(send, port, "cron@example.org", [DEFAULT_RCPT], coloured.as_bytes())
        await pump(bridge, clock, lambda: settled(bridge), max_seconds=120)
    assert sorted(e.message for e in sandbox_state.entries) == [
        "(empty mail from cron@example.org)",
        "(empty mail from ups@example.org)",
    ]


async def test_a_mails_colour_codes_are_taken_out_whole(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """A cron job's mail of a CI log, coloured (ESC [31m): the mail reader took out the
    ESC alone, as a control character, before the shaper (which takes a terminal's
    escape sequences out whole) saw it, and "Disk [31mfull[0m" went to the phone."""
    mail = EmailMessage()
    mail["From"] = "cron@example.org"
    mail["To"] = DEFAULT_RCPT
    mail["Subject"] = "\x1b[1mbackup\x1b[0m"
    # and the 8-bit CSI (U+009B): taken out alone, it left "1m" and "0m" in the text
    mail.set_content("Disk \x1b[31mfull\x1b[0m on db-1 \x9b1mnow\x9b0m\n")
    async with smtp_bridge(tmp_path, clock, sandbox_url) as (bridge, port):
        await asyncio.to_thread(send, port, "cron@example.org", [DEFAULT_RCPT], mail.as_bytes())
        await pump(bridge, clock, lambda: settled(bridge), max_seconds=120)
    [entry] = sandbox_state.entries
    assert "[" not in entry.message and "\x1b" not in entry.message, entry.message
    assert "backup" in entry.message and "Disk full on db-1 now" in entry.message, entry.message


async def test_a_message_id_folded_over_many_lines_is_stored_and_deduplicated(
    tmp_path, clock, sandbox_state: SandboxState, sandbox_url, backend: str
) -> None:
    """A Message-ID folded over many lines has no length limit: its dedupe key was too
    long for PostgreSQL's index, so such a mail got `451 Internal error` for ever (and a
    traceback in the log). Its key now holds the Message-ID's hash; a resend still meets
    its first."""
    long_id = "".join(hashlib.sha256(b"%d" % n).hexdigest() for n in range(150))  # 9,600
    folded = "\r\n ".join(long_id[i : i + 900] for i in range(0, len(long_id), 900))
    mail = f"Message-ID: <{folded}@ups.example>\r\nSubject: UPS on battery\r\n\r\nx\r\n"
    async with smtp_bridge(tmp_path, clock, sandbox_url) as (bridge, port):
        replies = [await asyncio.to_thread(data_reply, port, mail.encode()) for _ in range(2)]
        await pump(bridge, clock, lambda: settled(bridge), max_seconds=60)
        states = [m.state for m in sorted(await bridge.store.query(), key=lambda m: m.id)]
    assert [code for code, _ in replies] == [250, 250], replies
    assert states[1] == State.SUPPRESSED and states[0] in (State.SENT, State.DELIVERED)
    assert len(sandbox_state.entries) == 1


async def test_store_unwritable_answers_451_and_acknowledges_nothing(
    tmp_path, clock, sandbox_url
) -> None:
    store = FaultySqliteStore(tmp_path / "bridge.db")  # where bridge_config puts it
    async with smtp_bridge(tmp_path, clock, sandbox_url, store=store) as (bridge, port):

        def disk_io_error() -> None:
            raise sqlite3.OperationalError("disk I/O error")

        store.fail_commits(disk_io_error)
        with pytest.raises(smtplib.SMTPDataError) as caught:
            await asyncio.to_thread(
                send, port, "a@example.org", [DEFAULT_RCPT], "Subject: x\r\n\r\ny\r\n"
            )
        assert caught.value.smtp_code == 451
        assert caught.value.smtp_error.startswith(b"4.3.0")
        store.fail_commits(None)
        assert await bridge.store.counts() == {}
        await asyncio.to_thread(
            send, port, "a@example.org", [DEFAULT_RCPT], "Subject: x\r\n\r\ny\r\n"
        )
        assert await bridge.store.counts() == {"queued": 1}


def _raw_session(port: int, steps: list[bytes]) -> list[bytes]:
    """Send each step over a raw socket and read the reply to it (no line-end fixing)."""
    replies = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        reader = sock.makefile("rb")

        def reply() -> bytes:
            lines = [reader.readline()]
            while lines[-1][3:4] == b"-":
                lines.append(reader.readline())
            return b"".join(lines)

        reply()  # banner
        for step in steps:
            sock.sendall(step)
            replies.append(reply())
    return replies


async def test_an_address_of_bytes_that_are_not_utf8_is_refused_for_good(
    tmp_path, clock, sandbox_url, caplog
) -> None:
    """aiosmtpd decodes a command's bytes with surrogateescape and encodes its replies as
    strict UTF-8: a RCPT refusal quoting such an address (and, with `allowed_senders`
    set, the MAIL refusal) raised in push(), a `451 4.3.0 Internal error` with a
    traceback at ERROR, and a relay retried an address that can never be valid until
    its queue lifetime ran out. Such an address is a 553 now (5.1.3 at RCPT, 5.1.7 at
    MAIL), its bytes quoted as `\\xNN`, and nothing is logged at ERROR."""
    extra = 'allowed_senders = ["*@example.org"]\n'
    config = bridge_config(tmp_path, sandbox_url, with_smtp(extra))
    async with running_bridge(config, clock) as (bridge, _), smtp_listening(bridge) as port:
        steps = [
            b"EHLO probe\r\n",
            b"MAIL FROM:<\xe9t\xe9@evil.example>\r\n",  # refused by allowed_senders, too
            b"MAIL FROM:<a@example.org>\r\n",
            b"RCPT TO:<\xff\xfe@sms.localhost>\r\n",
            b"RCPT TO:<+12025550143@\xff.example>\r\n",  # a relay attempt: the 550 quotes it
        ]
        # At ERROR: aiosmtpd's own INFO lines quote the address as it came (surrogates).
        with caplog.at_level(logging.ERROR):
            replies = await asyncio.to_thread(_raw_session, port, steps)
        assert await bridge.store.counts() == {}
    assert replies[1:] == [
        b"553 5.1.7 Sender <\\xe9t\\xe9@evil.example>: not a valid address (not UTF-8)\r\n",
        b"250 2.1.0 OK\r\n",
        b"553 5.1.3 <\\xff\\xfe@sms.localhost>: not a valid address (not UTF-8)\r\n",
        b"553 5.1.3 <+12025550143@\\xff.example>: not a valid address (not UTF-8)\r\n",
    ]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_an_address_is_quoted_in_a_reply_whatever_it_holds() -> None:
    """The one way an address goes into a reply: any string, none raises (compared as
    the UTF-8 aiosmtpd's push() writes, which is what raised)."""
    quoted = [
        smtp_module.shown(address).encode("utf-8")
        for address in ("a@example.org", "\udcff@x", "\ud800@x", "été@x")
    ]
    assert quoted == [
        b"<a@example.org>",
        b"<\\xff@x>",  # a byte as aiosmtpd decodes it (surrogateescape)
        b"<\\ud800@x>",  # a lone surrogate no byte decodes to
        "<été@x>".encode(),  # SMTPUTF8: as it is
    ]


async def test_bare_lf_dot_cannot_smuggle_a_second_message(tmp_path, clock, sandbox_url) -> None:
    steps = [
        b"EHLO smuggler\r\n",
        b"MAIL FROM:<a@example.org>\r\n",
        b"RCPT TO:<+12025550143@sms.localhost>\r\n",
        b"DATA\r\n",
        # A bare-LF "end of data" followed by a second transaction, then the real end.
        b"Subject: first\r\n\r\nhello\n.\nMAIL FROM:<b@example.org>\n"
        b"RCPT TO:<+12025550199@sms.localhost>\nDATA\nSubject: smuggled\n\nsecond\n"
        b"\r\n.\r\n",
        b"QUIT\r\n",
    ]
    async with smtp_bridge(tmp_path, clock, sandbox_url) as (bridge, port):
        replies = await asyncio.to_thread(_raw_session, port, steps)
        messages = await bridge.store.query()
    assert replies[4].startswith(b"250 2.0.0"), replies
    # One message, to the one recipient; the "second transaction" is just body text of it.
    assert [m.recipient for m in messages] == ["+12025550143"]
    assert "RCPT TO:<+12025550199" in messages[0].text


async def test_help_lists_every_command_the_bridge_answers(tmp_path, clock, sandbox_url) -> None:
    """HELP names DATA too (the bridge's own DATA, with its line cap, once lost aiosmtpd's
    syntax: `HELP DATA` answered 501 and HELP left DATA out)."""
    steps = [b"EHLO x\r\n", b"HELP\r\n", b"HELP DATA\r\n", b"QUIT\r\n"]
    async with smtp_bridge(tmp_path, clock, sandbox_url) as (_, port):
        replies = await asyncio.to_thread(_raw_session, port, steps)
    assert replies[1].startswith(b"250") and b" DATA" in replies[1], replies[1]
    assert replies[2].startswith(b"250 Syntax: DATA"), replies[2]


async def test_overlong_lines_and_unknown_commands_get_errors(tmp_path, clock, sandbox_url) -> None:
    steps = [
        b"EHLO x\r\n",
        b"MAIL FROM:<" + b"a" * 5000 + b"@example.org>\r\n",
        b"FROB\r\n",
        b"RCPT TO:<+12025550143@sms.localhost>\r\n",
        b"QUIT\r\n",
    ]
    async with smtp_bridge(tmp_path, clock, sandbox_url) as (bridge, port):
        replies = await asyncio.to_thread(_raw_session, port, steps)
        assert await bridge.store.counts() == {}
    assert replies[1].startswith(b"500")
    assert replies[2].startswith(b"500")
    assert replies[3].startswith(b"503")  # no MAIL FROM accepted


async def test_data_lines_longer_than_1000_bytes_are_taken(
    tmp_path, clock, sandbox_state: SandboxState, sandbox_url
) -> None:
    """A NAS's one-line HTML, a script's JSON: aiosmtpd refused any DATA line over 1001
    bytes with a permanent `500 Line too long`. Up to the message size, they are taken;
    a command line stays bounded."""
    html = "<html><body><p>Volume 1 degraded</p>" + "<br>" * 2000 + "</body></html>"
    mail = f"Content-Type: text/html\r\nSubject: NAS alert\r\n\r\n{html}\r\n"
    async with smtp_bridge(tmp_path, clock, sandbox_url) as (bridge, port):
        code, text = await asyncio.to_thread(data_reply, port, mail.encode())
        steps = [b"EHLO x\r\n", b"MAIL FROM:<" + b"a" * 5000 + b"@example.org>\r\n"]
        replies = await asyncio.to_thread(_raw_session, port, steps)
        await pump(bridge, clock, lambda: settled(bridge), max_seconds=60)
    assert code == 250, text
    assert [e.message for e in sandbox_state.entries] == ["NAS alert\nVolume 1 degraded"]
    assert replies[1].startswith(b"500"), replies


async def test_a_mail_longer_than_max_lines_is_texted_from_its_first_lines(
    tmp_path, clock, sandbox_state: SandboxState, sandbox_url
) -> None:
    """A cron job's `rsync -v` log runs to tens of thousands of short lines: a 552 there
    bounced the failure for good. The lines past smtp.max_lines are read and dropped."""
    files = "".join(f"srv/www/site/img/{n}.png\r\n" for n in range(200))
    mail = (
        "From: root@backup-01.example.org\r\nSubject: Cron <root@backup-01> backup.sh\r\n\r\n"
        f"rsync error: some files could not be transferred (code 23)\r\n{files}"
    )
    config = bridge_config(tmp_path, sandbox_url, with_smtp("max_lines = 8"))
    async with running_bridge(config, clock) as (bridge, _), smtp_listening(bridge) as port:
        code, text = await asyncio.to_thread(data_reply, port, mail.encode())
        after = await asyncio.to_thread(data_reply, port, b"Subject: next\r\n\r\nx\r\n")
        await pump(bridge, clock, lambda: settled(bridge), max_seconds=60)
    assert code == 250 and text.endswith(b"(read in part: more than 8 lines (smtp.max_lines))")
    assert after[0] == 250 and b"read in part" not in after[1]  # the session goes on
    # 8 lines: From, Subject, the blank line, the error and 4 files
    files = "".join(f"\nsrv/www/site/img/{n}.png" for n in range(4))
    assert sorted(e.message for e in sandbox_state.entries) == [
        "Cron <root@backup-01> backup.sh\nrsync error: some files could not be transferred"
        f" (code 23){files}",
        "next\nx",
    ]


async def test_a_mail_of_exactly_max_lines_is_read_whole(
    tmp_path, clock, sandbox_state: SandboxState, sandbox_url
) -> None:
    """The end-of-data line after a mail of exactly smtp.max_lines lines was counted as one
    line too many: the whole mail was answered '(read in part: more than 8 lines)' and
    logged as cut (a 552 before mails past the cap were texted). One line more is."""
    body = "".join(f"line {n}\r\n" for n in range(5))
    mail = f"From: nas@example.org\r\nSubject: NAS\r\n\r\n{body}"  # 8 lines
    config = bridge_config(tmp_path, sandbox_url, with_smtp("max_lines = 8"))
    async with running_bridge(config, clock) as (bridge, _), smtp_listening(bridge) as port:
        whole = await asyncio.to_thread(data_reply, port, mail.encode())
        longer = await asyncio.to_thread(data_reply, port, f"{mail}line 5\r\n".encode())
        await pump(bridge, clock, lambda: settled(bridge), max_seconds=60)
    assert whole[0] == 250 and b"read in part" not in whole[1], whole
    assert longer[0] == 250 and longer[1].endswith(
        b"(read in part: more than 8 lines (smtp.max_lines))"
    )
    lines = "".join(f"\nline {n}" for n in range(5))
    assert [e.message for e in sandbox_state.entries] == [f"NAS{lines}"]  # the second: a dupe


async def test_an_html_mail_of_long_white_space_after_dashes_is_read_at_once(
    tmp_path, clock, sandbox_state: SandboxState, sandbox_url
) -> None:
    """A `--` then 300,000 spaces in an HTML body (no signature: no tag after them): the
    search for the HTML signature delimiter took n * n steps (minutes, past
    smtp.parse_timeout: a 451 on every try). It reads in one pass."""
    html = "<html><body><p>disk full on db-2</p><pre>--" + " " * 300_000 + "x</pre></body></html>"
    mail = (
        "From: nas@example.org\r\nSubject: NAS\r\nMIME-Version: 1.0\r\n"
        f"Content-Type: text/html; charset=UTF-8\r\n\r\n{html}\r\n"
    )
    config = bridge_config(tmp_path, sandbox_url, SMTP_BASE)
    async with running_bridge(config, clock) as (bridge, _), smtp_listening(bridge) as port:
        code, reply = await asyncio.to_thread(data_reply, port, mail.encode())
        await pump(bridge, clock, lambda: settled(bridge), max_seconds=60)
    assert code == 250, reply
    # the body is read to MAX_BODY_CHARS: the x lies past them
    assert [e.message for e in sandbox_state.entries] == ["NAS\ndisk full on db-2\n--"]


# Bodies built to make the line checks slow (each a line the cleaning looks at further,
# or looks ahead from), and one long line: each cleaned in linear time.
PATHOLOGICAL_BODIES = {
    "plain": "x\r\n" * 50_000,  # the yardstick: as many lines, none looked at further
    "dashes": "-\r\n" * 50_000,
    "rules": "----\r\n" * 50_000,
    "quotes": ">\r\n" * 50_000,
    "from-words": "de\r\n" * 50_000,  # French for From: each line looked at further
    "underscores": ("_" * 32 + "\r\nFrom: a\r\n") * 25_000,
    "from-sent": "From: a\r\nSent: b\r\n" * 25_000,
    "forwards": "Begin forwarded message:\r\n\r\n" * 25_000,
    "one-line": "-" * 20_000 + "\r\n",
    "one-line-from-sent": "From: a" + " Sent: b" * 5_000 + "\r\n",
}


async def test_pathological_bodies_are_cleaned_in_bounded_time(
    tmp_path, clock, sandbox_state: SandboxState, sandbox_url
) -> None:
    """Each line of a body gets a few checks, some looking a line or two ahead; a check
    that looked further (or cleaned the lines it looked at again) made the 10,000 lines
    read of a body cost n * n. Timed against a plain body of as many lines (the transfer
    is most of either), the best of three tries each: a load slows both, and one hiccup
    is not a failure. A parse past smtp.parse_timeout is a 451, failing too."""
    async with smtp_bridge(tmp_path, clock, sandbox_url) as (bridge, port):
        took = {}
        for name, body in PATHOLOGICAL_BODIES.items():
            mail = f"From: nas@example.org\r\nSubject: {name}\r\n\r\nnews\r\n{body}"
            tries = []
            for _ in range(3):  # the second and third: duplicates, parsed all the same
                started = time.monotonic()
                code, reply = await asyncio.to_thread(data_reply, port, mail.encode())
                tries.append(time.monotonic() - started)
                assert code == 250, (name, reply)
            took[name] = min(tries)
        await pump(bridge, clock, lambda: settled(bridge), max_seconds=60)
    # Linear: within ~1.5x the plain body's time, measured; n * n: 10x and more.
    assert all(seconds < 0.3 + 3 * took["plain"] for seconds in took.values()), took
    texts = {e.message.partition("\n")[0] for e in sandbox_state.entries}
    assert texts == set(PATHOLOGICAL_BODIES)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> tuple[trustme.CA, str, str]:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    folder = tmp_path_factory.mktemp("tls")
    cert.cert_chain_pems[0].write_to_path(folder / "cert.pem")
    cert.private_key_pem.write_to_path(folder / "key.pem")
    return ca, str(folder / "cert.pem"), str(folder / "key.pem")


def _client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def test_auth_compares_a_password_for_an_unknown_login_too(
    tmp_path, clock, sandbox_url, monkeypatch
) -> None:
    """An unknown login costs the same comparison as a known one (against a password no
    one has), so the answer time does not tell which logins exist. Checked on the code
    path through a real AUTH session, not on a stopwatch. Compared as SHA-256 digests
    (bridge.ingress.credentials), so the time tells no password's length either."""
    compared: list[tuple[bytes, bytes]] = []
    compare = hmac.compare_digest

    def spy(given: bytes, expected: bytes) -> bool:
        compared.append((expected, given))
        return compare(given, expected)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    extra = 'auth_allow_plaintext = true\nusers = {ups = "ups-pass-0123456789"}\n'
    config = bridge_config(tmp_path, sandbox_url, with_smtp(extra))
    async with running_bridge(config, clock) as (bridge, _), smtp_listening(bridge) as port:

        def login(user: str, password: str) -> int:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.ehlo("tester")
                plain = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
                return client.docmd("AUTH", f"PLAIN {plain}")[0]

        codes = [
            await asyncio.to_thread(login, "nobody", "guess-one"),
            await asyncio.to_thread(login, "ups", "guess-two"),
            await asyncio.to_thread(login, "ups", "ups-pass-0123456789"),
        ]
    assert codes == [535, 535, 235]
    sent = [b"guess-one", b"guess-two", b"ups-pass-0123456789"]
    assert [given for _, given in compared] == [hashlib.sha256(p).digest() for p in sent]
    assert all(len(expected) == 32 for expected, _ in compared)
    nobody = compared[0][0]
    assert nobody not in (hashlib.sha256(p).digest() for p in sent)


def ehlo_features(port: int) -> dict[str, str]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("tester")
        return dict(client.esmtp_features)


async def test_the_auth_mail_parameter_of_a_logged_in_relay_is_taken(
    tmp_path, clock, sandbox_state: SandboxState, sandbox_url
) -> None:
    """Exim and sendmail, logged in to a smarthost that offers AUTH, add RFC 4954's
    `AUTH=<mailbox>` (or `AUTH=<>`) to MAIL FROM: once a permanent 555, a bounce."""
    extra = 'auth_allow_plaintext = true\nusers = {exim = "exim-pass-0123456789"}\n'
    config = bridge_config(tmp_path, sandbox_url, with_smtp(extra))
    async with running_bridge(config, clock) as (bridge, _), smtp_listening(bridge) as port:

        def relay(auth: str) -> dict:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.login("exim", "exim-pass-0123456789")
                mail = f"Subject: RAID degraded ({auth})\r\n\r\n/dev/md0\r\n"
                return client.sendmail(
                    "root@nas.example.org", [DEFAULT_RCPT], mail, mail_options=["SIZE=60", auth]
                )

        assert await asyncio.to_thread(relay, "AUTH=<>") == {}
        offered = await asyncio.to_thread(ehlo_features, port)
        assert offered["auth"].split() == ["LOGIN", "PLAIN"]  # not "throttle", an attribute
        assert await asyncio.to_thread(relay, "AUTH=root@nas.example.org") == {}
        await pump(bridge, clock, lambda: settled(bridge), max_seconds=60)
    assert sorted(e.message for e in sandbox_state.entries) == [
        "RAID degraded (AUTH=<>)\n/dev/md0",
        "RAID degraded (AUTH=root@nas.example.org)\n/dev/md0",
    ]


async def test_auth_offers_login_and_plain_only(tmp_path, clock, sandbox_url) -> None:
    """aiosmtpd takes every `auth_*` attribute of the handler for a mechanism: the
    handler's failed-login throttle was offered as `AUTH LOGIN PLAIN throttle`, and
    `AUTH throttle` called it (a 451 "internal error" and a traceback in the log, not
    counted as a failed login). Mechanisms are the two the bridge checks."""
    extra = 'auth_allow_plaintext = true\nusers = {ups = "ups-pass-0123456789"}\n'
    config = bridge_config(tmp_path, sandbox_url, with_smtp(extra))
    async with running_bridge(config, clock) as (bridge, _), smtp_listening(bridge) as port:

        def session() -> tuple[str, list[int]]:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.ehlo("tester")
                offered = client.esmtp_features["auth"]
                tried = [client.docmd("AUTH", m)[0] for m in ("throttle x", "THROTTLE x")]
                return offered, tried

        offered, tried = await asyncio.to_thread(session)
        assert offered.split() == ["LOGIN", "PLAIN"]
        assert tried == [504, 504]

    # No [smtp.users]: no mechanism, and AUTH not offered at all (not "250-AUTH " empty).
    (tmp_path / "none").mkdir()
    config = bridge_config(tmp_path / "none", sandbox_url, with_smtp("auth_allow_plaintext = true"))
    async with running_bridge(config, clock) as (bridge, _), smtp_listening(bridge) as port:

        def anonymous() -> tuple[bool, dict]:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.ehlo("tester")
                return client.has_extn("auth"), client.sendmail(
                    "a@example.org", [DEFAULT_RCPT], "Subject: x\r\n\r\ny\r\n"
                )

        assert await asyncio.to_thread(anonymous) == (False, {})


async def test_a_login_that_succeeded_before_passes_a_lockout_of_its_address(
    tmp_path, clock, sandbox_url
) -> None:
    """A guesser at the UPS's address (the same NAT; 127.0.0.1 for every local sender on
    a loopback install) locked the UPS out with it: its AUTH got 454 for five minutes,
    and again after each ten guesses, so with `require_auth` its alerts were never
    taken. A login and password that succeeded from that client before pass now; a
    guess, or a right password never used from there, still waits unchecked."""
    extra = (
        "require_auth = true\nauth_allow_plaintext = true\n"
        'users = {ups = "ups-pass-0123456789", nas = "nas-pass-0123456789"}\n'
    )
    config = bridge_config(tmp_path, sandbox_url, with_smtp(extra))
    with pytest.warns(UserWarning, match="Requiring AUTH while not requiring TLS"):
        async with running_bridge(config, clock) as (bridge, _), smtp_listening(bridge) as port:

            def login(user: str, password: str, subject: str = "") -> int:
                with smtplib.SMTP("127.0.0.1", port, 10, source_address=("127.0.0.5", 0)) as c:
                    c.ehlo("ups")
                    plain = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
                    code = c.docmd("AUTH", f"PLAIN {plain}")[0]
                    if subject and code == 235:
                        c.sendmail(
                            "ups@example.org", [DEFAULT_RCPT], f"Subject: {subject}\r\n\r\nx"
                        )
                    return code

            assert await asyncio.to_thread(login, "ups", "ups-pass-0123456789", "on mains") == 235
            guesses = [await asyncio.to_thread(login, "ups", f"guess-{n}") for n in range(10)]
            after = [
                await asyncio.to_thread(login, "ups", "ups-pass-0123456789", "on battery"),
                await asyncio.to_thread(login, "ups", "guess-10"),
                await asyncio.to_thread(login, "nas", "nas-pass-0123456789"),
            ]
            assert await bridge.store.counts() == {"queued": 2}
    assert guesses == [535] * 10
    assert after == [235, 454, 454]


async def test_auth_over_starttls_required_and_refused_in_plaintext(
    tmp_path, clock, sandbox_url, tls_files
) -> None:
    ca, cert, key = tls_files
    (tmp_path / "nagios.pw").write_text("s3cret-0123456789\n")
    extra = (
        f'tls_cert = "{cert}"\ntls_key = "{key}"\nrequire_auth = true\n'
        f'users = {{ups = "ups-pass-0123456789", nagios_file = "{tmp_path / "nagios.pw"}"}}\n'
    )
    config = bridge_config(tmp_path, sandbox_url, with_smtp(extra))
    async with running_bridge(config, clock) as (bridge, _), smtp_listening(bridge) as port:

        def plaintext() -> tuple[int, bytes]:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.ehlo("tester")
                assert not client.has_extn("auth")  # not offered before TLS
                code, _text = client.docmd("AUTH", "PLAIN AHVwcwB1cHMtcGFzcw==")
                assert code == 538
                return client.mail("ups@example.org")

        code, _text = await asyncio.to_thread(plaintext)
        assert code == 530  # require_auth

        def over_tls(user: str, password: str) -> dict:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.starttls(context=_client_context(ca))
                client.login(user, password)
                return client.sendmail(
                    "nagios@example.org",
                    [DEFAULT_RCPT],
                    f"Subject: over TLS from {user}\r\n\r\nhello\r\n",
                )

        assert await asyncio.to_thread(over_tls, "nagios", "s3cret-0123456789") == {}
        assert await asyncio.to_thread(over_tls, "ups", "ups-pass-0123456789") == {}
        with pytest.raises(smtplib.SMTPAuthenticationError) as bad:
            await asyncio.to_thread(over_tls, "ups", "wrong")
        assert bad.value.smtp_code == 535
        assert await bridge.store.counts() == {"queued": 2}


def implicit_tls_config(
    tmp_path: Path, sandbox_url: str, tls_files: tuple[trustme.CA, str, str], settings: str
) -> Config:
    """A bridge with an implicit-TLS SMTP listener (and `settings` for [smtp]); its port is
    bound by `implicit_tls_listening`."""
    _, cert, key = tls_files
    listener = f'tls_cert = "{cert}"\ntls_key = "{key}"\ntls_listen = "127.0.0.1:0"\n'
    return bridge_config(tmp_path, sandbox_url, with_smtp(listener + settings))


async def test_implicit_tls_listener(tmp_path, clock, sandbox_url, tls_files) -> None:
    ca = tls_files[0]
    config = implicit_tls_config(
        tmp_path,
        sandbox_url,
        tls_files,
        'require_auth = true\nusers = { ups = "ups-pass-0123456789" }\n',
    )
    async with (
        running_bridge(config, clock) as (bridge, _),
        implicit_tls_listening(bridge) as (_, tls_port),
    ):

        def implicit(login: bool) -> tuple[str, dict]:
            with smtplib.SMTP_SSL(
                "127.0.0.1", tls_port, timeout=10, context=_client_context(ca)
            ) as client:
                client.ehlo()
                offered = str(client.esmtp_features)
                if login:  # AUTH on a connection that is encrypted from its first byte
                    client.login("ups", "ups-pass-0123456789")
                sent = client.sendmail("a@example.org", [DEFAULT_RCPT], "Subject: 465\r\n\r\nx")
                return offered, sent

        offered, sent = await asyncio.to_thread(implicit, True)
        assert sent == {} and "auth" in offered and "starttls" not in offered
        with pytest.raises(smtplib.SMTPSenderRefused) as anonymous:
            await asyncio.to_thread(implicit, False)
        assert anonymous.value.smtp_code == 530  # require_auth holds there too
        assert await bridge.store.counts() == {"queued": 1}


async def test_connections_to_the_implicit_tls_listener_count_before_their_handshake(
    tmp_path, clock, sandbox_url, tls_files
) -> None:
    """A connection that never began its TLS handshake was not counted at all (asyncio's
    TLS made the session only once the handshake was done) and was held for asyncio's
    60 s handshake timeout: anyone could hold every file descriptor of the bridge while
    `smtp.max_sessions` read 0. It counts from the moment it is accepted now."""
    ca = tls_files[0]
    config = implicit_tls_config(
        tmp_path, sandbox_url, tls_files, "max_sessions = 3\nmax_sessions_per_client = 2\n"
    )
    async with (
        running_bridge(config, clock) as (bridge, _),
        implicit_tls_listening(bridge) as (port, tls_port),
    ):

        def silent(source: str) -> socket.socket:  # connects, and says nothing
            return socket.create_connection(("127.0.0.1", tls_port), 10, (source, 0))

        def scenario() -> tuple[bytes, bytes, bytes, dict]:
            held = [silent("127.0.0.1"), silent("127.0.0.1")]
            third = silent("127.0.0.1")
            third.settimeout(5)
            cut = third.recv(100)  # closed at once: no 421 can be told before TLS
            third.close()
            plain = socket.create_connection(("127.0.0.1", port), 10, ("127.0.0.2", 0))
            room = _banner(plain)  # the third session in all
            over = socket.create_connection(("127.0.0.1", port), 10, ("127.0.0.3", 0))
            full = _banner(over)
            for sock in (*held, plain, over):
                sock.close()
            time.sleep(0.2)
            with smtplib.SMTP_SSL(
                "127.0.0.1", tls_port, timeout=10, context=_client_context(ca)
            ) as client:
                sent = client.sendmail("a@example.org", [DEFAULT_RCPT], "Subject: 465\r\n\r\nx")
            return cut, room, full, sent

        cut, room, full, sent = await asyncio.to_thread(scenario)
        for _ in range(200):  # the closed connections are counted out
            if not bridge.smtp_handler.sessions.total:
                break
            await asyncio.sleep(0.01)
    assert cut == b""
    assert room.startswith(b"220") and full.startswith(b"421"), (room, full)
    assert b"too many SMTP sessions (at most 3)" in full
    assert sent == {}
    assert bridge.smtp_handler.sessions.total == 0


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_client_hello_waiting_at_accept_reaches_the_tls_handshake(
    tmp_path, sandbox_url, tls_files, loop_kind: str
) -> None:
    """A client whose ClientHello is already in the socket when the bridge accepts it (a
    busy loop, a burst of connections). uvloop starts reading a connection right after
    the protocol's `connection_made`, whatever it asked there: a TLS layered from a task
    (`loop.start_tls`) came a turn later, the ClientHello had gone to the gate, and the
    handshake hung until the client gave up. `serve` runs on uvloop where installed."""
    import uvloop

    ca = tls_files[0]
    config = implicit_tls_config(tmp_path, sandbox_url, tls_files, "")
    answers: list[Any] = []

    def client(port: int) -> None:
        try:
            with smtplib.SMTP_SSL(
                "127.0.0.1", port, timeout=10, context=_client_context(ca)
            ) as session:
                answers.append(
                    session.sendmail("a@example.org", [DEFAULT_RCPT], "Subject: x\r\n\r\nx")
                )
        except Exception as exc:  # said below, with the loop's name
            answers.append(exc)

    async def scenario() -> None:
        async with (
            running_bridge(config, ManualClock()) as (bridge, _),
            implicit_tls_listening(bridge) as (_, tls_port),
        ):
            for _ in range(3):
                sender = threading.Thread(target=client, args=(tls_port,))
                sender.start()
                time.sleep(0.3)  # noqa: ASYNC251 - a busy loop: connect and ClientHello wait
                await asyncio.to_thread(sender.join)

    run = uvloop.run if loop_kind == "uvloop" else asyncio.run
    worker = threading.Thread(target=run, args=(scenario(),))
    worker.start()
    worker.join(60)
    assert answers == [{}, {}, {}], (loop_kind, answers)


async def test_client_network_and_sender_allowlists(tmp_path, clock, sandbox_url) -> None:
    config = bridge_config(tmp_path, sandbox_url, with_smtp('allowed_networks = ["::1/128"]'))
    async with running_bridge(config, clock) as (bridge, _), smtp_listening(bridge) as port:
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            await asyncio.to_thread(send, port, "ups@example.org", [DEFAULT_RCPT], "x")
        assert refused.value.smtp_code == 550 and b"127.0.0.1" in refused.value.smtp_error
    (tmp_path / "b").mkdir()
    config = bridge_config(
        tmp_path / "b",
        sandbox_url,
        with_smtp('allowed_networks = ["127.0.0.0/8", "::1"]\nallowed_senders = ["*@example.org"]'),
    )
    async with running_bridge(config, clock) as (bridge, _), smtp_listening(bridge) as port:
        with pytest.raises(smtplib.SMTPSenderRefused):
            await asyncio.to_thread(send, port, "intruder@example.net", [DEFAULT_RCPT], "x")
        assert (
            await asyncio.to_thread(
                send, port, "UPS@Example.org", [DEFAULT_RCPT], "Subject: ok\r\n\r\nx\r\n"
            )
            == {}
        )
        assert await bridge.store.counts() == {"queued": 1}


def mail_from_reply(port: int, mail_from: str) -> tuple[int, bytes]:
    """The reply to `MAIL FROM:<mail_from>` ("" is the null sender `<>`)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("tester")
        return client.mail(mail_from)


@pytest.mark.parametrize(
    ("senders", "null_code"),
    [
        ('["*@example.org"]', 550),
        ('["*"]', 550),  # a glob admitted the null sender: the bounce was stored
        ('["*@example.org", "<>"]', 250),  # listed on purpose
        ("[]", 250),  # no allowlist: accepted, stored as suppressed (below)
    ],
)
async def test_the_null_sender_is_no_allowed_sender(
    tmp_path, clock, sandbox_state, sandbox_url, senders: str, null_code: int
) -> None:
    config = bridge_config(tmp_path, sandbox_url, with_smtp(f"allowed_senders = {senders}"))
    async with running_bridge(config, clock) as (bridge, _), smtp_listening(bridge) as port:
        code, text = await asyncio.to_thread(mail_from_reply, port, "")
        if null_code == 250:
            assert code == 250, text
            bounce = "From: MAILER-DAEMON@example.org\r\nSubject: x\r\n\r\ny\r\n"
            assert await asyncio.to_thread(send, port, "", [DEFAULT_RCPT], bounce) == {}
            [stored] = await bridge.store.query()
            assert stored.state == State.SUPPRESSED and "null sender" in (stored.reason or "")
        else:
            assert (code, text) == (
                550,
                b"5.7.1 Null sender <> (a bounce or auto-reply) is not allowed to send here: "
                b"smtp.allowed_senders is set",
            )
            with pytest.raises(smtplib.SMTPSenderRefused):
                await asyncio.to_thread(send, port, "", [DEFAULT_RCPT], "Subject: x\r\n\r\ny\r\n")
            assert await bridge.store.counts() == {}
        assert (await asyncio.to_thread(mail_from_reply, port, "ups@example.org"))[0] == 250
    assert sandbox_state.entries == []


async def test_a_sender_rule_matches_crons_from_with_its_comment(
    tmp_path, clock, sandbox_state: SandboxState, sandbox_url
) -> None:
    """cron writes `From: root@host (Cron Daemon)`; relayed through a provider that sets
    its own envelope sender (VERP), the From is all a rule's glob can match."""
    rule = '[[smtp.rules]]\nsender = ["*@backup-01.example.org"]\nkeep = ["FAILED"]\n'
    config = bridge_config(tmp_path, sandbox_url, SMTP_BASE.replace("[groups]", rule + "[groups]"))
    mail = (
        "From: root@backup-01.example.org (Cron Daemon)\r\nSubject: Cron <root@backup-01> backup.sh\r\n"
        "\r\nstarting rsync\r\n12 files\r\nbackup FAILED after 00:00:07\r\n"
    )
    async with running_bridge(config, clock) as (bridge, _), smtp_listening(bridge) as port:
        envelope = "bounce-7f3a@relay.example.net"
        assert await asyncio.to_thread(send, port, envelope, [DEFAULT_RCPT], mail) == {}
        await pump(bridge, clock, lambda: settled(bridge), max_seconds=60)
    assert [e.message for e in sandbox_state.entries] == [
        "Cron <root@backup-01> backup.sh\nbackup FAILED after 00:00:07"
    ]


async def test_template_compose(tmp_path, clock, sandbox_state, sandbox_url) -> None:
    config = bridge_config(
        tmp_path,
        sandbox_url,
        with_smtp('compose = "template"\ntemplate = "{{ sender }}: {{ subject | upper }}"'),
    )
    async with running_bridge(config, clock) as (bridge, _), smtp_listening(bridge) as port:
        message = EmailMessage()
        message["From"] = "ups@example.org"
        message["Subject"] = "on battery"
        message.set_content("runtime 12 min")
        await asyncio.to_thread(send, port, "ups@example.org", [DEFAULT_RCPT], message.as_bytes())
        await pump(bridge, clock, lambda: settled(bridge), max_seconds=60)
    assert [e.message for e in sandbox_state.entries] == ["ups@example.org: ON BATTERY"]


async def test_a_mail_template_reports_what_it_missed_as_a_route_does(
    tmp_path, clock, sandbox_state, sandbox_url, caplog
) -> None:
    """A route's template that printed a field the payload lacks as empty, or failed, put
    a note on the message (its events: the console's page, the API) and a line in the
    log; a mail's (`compose = "template"`) said nothing, or only "failed" in the log,
    and the text went out with its gap. Now the same report: which fields the mail
    lacked, or why subject and body went out, our secrets masked in both. A mail's
    subject, its topic, is stored without bidi controls, as its text is."""
    reader = "read-token-0123456789abcdef"
    smtp = with_smtp(
        'compose = "template"\ntemplate = "{{ subject }}: {{ headers.x_team }}{{ headers[body] }}"'
    ).replace(
        "[groups]",
        '[[smtp.rules]]\nsubject = "^broken"\ncompose = "template"\n'
        'template = "{{ subject + 1 }}"\n[groups]',
    )
    config = bridge_config(
        tmp_path, sandbox_url, smtp + f'[tokens.ops]\ntoken = "{reader}"\nscopes = ["read"]\n'
    )
    mails = []
    for subject, body in (("\u202eBackup\u202c failed", "n" * 90 + reader), ("broken", "x")):
        mail = EmailMessage()
        mail["From"] = "nas@example.org"
        mail["Subject"] = subject
        mail.set_content(body)
        mails.append(mail.as_bytes())
    async with running_bridge(config, clock) as (bridge, url), smtp_listening(bridge) as port:
        for mail in mails:
            assert (
                await asyncio.to_thread(send, port, "nas@example.org", [DEFAULT_RCPT], mail) == {}
            )
        await pump(bridge, clock, lambda: settled(bridge), max_seconds=60)
        stored = sorted(await bridge.store.query(limit=2), key=lambda m: m.id)
        notes, topics = [], []
        async with httpx.AsyncClient() as http:
            for message in stored:
                got = await http.get(
                    f"{url}/api/v1/messages/{message.id}",
                    headers={"authorization": f"Bearer {reader}"},
                )
                notes.append([e["detail"] for e in got.json()["events"] if e["detail"]])
                topics.append(got.json()["topic"])
    assert sorted(e.message for e in sandbox_state.entries) == ["Backup failed:", "broken\nx"]
    assert notes == [
        ["the template printed as empty what the mail lacks: x_team, " + "n" * 90 + "***"],
        [
            "subject and body went out: the template failed (TypeError: can only concatenate"
            ' str (not "int") to str)'
        ],
    ]
    assert topics == ["Backup failed", "broken"]
    assert "smtp.template: the mail lacks x_team, " + "n" * 90 + "*** (printed as empty)" in (
        caplog.text
    )
    assert "smtp.rules[0].template: the template failed (TypeError" in caplog.text
    assert reader[:10] not in caplog.text


@pytest.mark.parametrize(
    ("smtp", "expected"),
    [
        # The subject is the text's first line: its echo in the body is dropped.
        ('compose = "subject_body"', "Backup failed on nas-3\nexit code 2\nat 03:12"),
        # ... before a rule counts the body's lines: the line kept is the one after it.
        (
            'compose = "subject_body"\n[[smtp.rules]]\nsender = ["*"]\nmax_lines = 1',
            "Backup failed on nas-3\nexit code 2",
        ),
        # No subject shown: the echoed line is what says what failed, so it stays.
        ('compose = "body"', "Subject: Backup failed on nas-3\nexit code 2\nat 03:12"),
        (
            'compose = "template"\ntemplate = "NAS: {{ body }}"',
            "NAS: Subject: Backup failed on nas-3\nexit code 2\nat 03:12",
        ),
        (
            'compose = "template"\ntemplate = "{{ subject }} / {{ body }}"',
            "Backup failed on nas-3 / exit code 2\nat 03:12",
        ),
        # A template that shows nothing (a field the mail lacks, a zero-width space) gives
        # way to subject and body, as a route's does to its default text: it was texted as
        # "(empty mail from ...)", a mail with a subject and a body.
        (
            'compose = "template"\ntemplate = "{{ headers.missing }}\\u200b"',
            "Backup failed on nas-3\nexit code 2\nat 03:12",
        ),
    ],
)
async def test_a_subject_echoed_in_the_body_is_dropped_only_where_the_subject_is_shown(
    smtp: str, expected: str, tmp_path, clock, sandbox_url
) -> None:
    config = bridge_config(tmp_path, sandbox_url, with_smtp(smtp))
    raw = (
        "From: backup@nas-3.example.org\r\nSubject: Backup failed on nas-3\r\n\r\n"
        "Subject: Backup failed on nas-3\r\nexit code 2\r\nat 03:12\r\n"
    )
    async with running_bridge(config, clock) as (bridge, _), smtp_listening(bridge) as port:
        await asyncio.to_thread(send, port, "backup@example.org", [DEFAULT_RCPT], raw)
        [stored] = await bridge.store.query(limit=1)
    assert stored.text == expected


_ATEXT = "abcXYZ019!#$%&'*+/=?^_`{|}~-"
address_args = st.one_of(
    st.text(max_size=40),
    # The plain form the fast path reads without the header parser, and its near misses.
    st.builds(
        lambda local, domain, params: f"<{local}@{domain}>{params}",
        st.text(alphabet=_ATEXT + ".", min_size=1, max_size=70),
        st.text(alphabet=_ATEXT + ".[]", min_size=1, max_size=20),
        st.text(alphabet=" \t()=ABSIZE8x<>@", max_size=12),
    ),
    st.builds(
        lambda local, domain, params: f"<{local}@{domain}>{params}",
        st.text(alphabet='+0123456789abc.-_"\\ ', max_size=70),
        st.sampled_from(["sms.localhost", "example.org", "", "[127.0.0.1]", "a..b"]),
        st.sampled_from(["", " SIZE=100", " BODY=8BITMIME", "  SMTPUTF8"]),
    ),
    # A number's characters with parentheses, which the header parser misreads.
    st.builds(
        lambda open_, local, domain, close, params: f"{open_}{local}@{domain}{close}{params}",
        st.sampled_from(["<", ""]),
        st.text(alphabet="+0123456789().- a", max_size=20),
        st.sampled_from(["sms.localhost", "sms.localhost.", "", "a..b", "a.."]),
        st.sampled_from([">", ""]),
        st.sampled_from(["", " SIZE=100", "  SIZE=1", " (x)"]),
    ),
)
# Where ours reads the address as written, unlike aiosmtpd's header parser (a comment
# there): the local part of a number's characters holding a parenthesis, and a domain
# ending in a dot (malformed there).
_DOT_ATOM = rf"[{re.escape(_ATEXT)}A-Za-z0-9]+(?:\.[{re.escape(_ATEXT)}A-Za-z0-9]+)*"  # RFC 5321
AS_WRITTEN = re.compile(
    rf"(<)?([0-9+.-]*[()][0-9+().-]*|{_DOT_ATOM})@({_DOT_ATOM}\.?)(?(1)>)(?: ([^\s(].*))?",
    re.DOTALL,
)


@settings(max_examples=400)
@given(address_args, st.sampled_from([0, 12]))
def test_memoised_address_parsing_answers_as_aiosmtpd_does(arg: str, limit: int) -> None:
    loop = asyncio.new_event_loop()
    try:
        ours, theirs = BridgeSMTP(object(), loop=loop), SMTP(object(), loop=loop)
        ours.local_part_limit = theirs.local_part_limit = limit
        try:
            expected = theirs._getaddr(arg)
        except Exception:  # aiosmtpd crashes on some junk ("0@"); ours calls it malformed
            expected = (None, None)
        written = AS_WRITTEN.fullmatch(arg)
        if written is not None and (set(written[2]) & set("()") or written[3].endswith(".")):
            _, local, domain, rest = written.groups()
            expected = (
                (None, None) if limit and len(local) > limit else (f"{local}@{domain}", rest or "")
            )
        assert ours._getaddr(arg) == expected  # parsed
        assert ours._getaddr(arg) == expected  # remembered
    finally:
        loop.close()


def test_address_memo_is_bounded() -> None:
    loop = asyncio.new_event_loop()
    try:
        server = BridgeSMTP(object(), loop=loop)
        for n in range(ADDRESS_CACHE_SIZE * 3):
            server._getaddr(f"<+1202555{n:04d}@sms.localhost>")
        assert len(BridgeSMTP._addresses) <= ADDRESS_CACHE_SIZE
    finally:
        loop.close()


def nested_mail(depth: int) -> bytes:
    """One text part inside `depth` nested multiparts (the 68 KB mail of issue #11)."""
    out = b"From: deep@example.org\r\nSubject: deep alert\r\nMIME-Version: 1.0\r\n"
    for level in range(depth):
        out += b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (level, level)
    out += b"Content-Type: text/plain\r\n\r\nthe innermost text\r\n"
    for level in reversed(range(depth)):
        out += b"--b%d--\r\n" % level
    return out


def flat_mail(parts: int) -> bytes:
    out = (
        b"From: wide@example.org\r\nSubject: wide alert\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
    )
    for n in range(parts):
        out += b"--b\r\nContent-Type: text/plain\r\n\r\npart %d\r\n" % n
    return out + b"--b--\r\n"


def data_reply(port: int, raw: bytes) -> tuple[int, bytes]:
    """The reply to DATA (smtplib raises on 5xx; this hands back any code)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("tester")
        client.mail("monitor@example.org")
        client.rcpt(DEFAULT_RCPT)
        return client.data(raw)


@pytest.mark.slow  # parses a 1000-deep mail again and again: ~10 s
async def test_healthz_stays_fast_while_a_1000_deep_mail_is_parsed(
    tmp_path, clock, sandbox_url, monkeypatch
) -> None:
    # Bounds far above the mail: it is parsed to the interpreter's recursion limit, all
    # of it in a parse thread. On a fast machine one parse takes ~0.3 s, too short for a
    # probe count to mean anything, so the parse thread parses it again and again until
    # the probes are done: every probe meets the real parse holding the GIL in turns.
    parsing, probed = threading.Event(), threading.Event()
    real_parse = smtp_module.parse_mail

    def parse_until_probed(raw: bytes, **kwargs: Any) -> Any:
        parsed = real_parse(raw, **kwargs)
        on_the_loop = threading.current_thread() is threading.main_thread()
        if b"deep alert" in raw and not on_the_loop:  # on the loop: the probes wait anyway
            parsing.set()
            deadline = time.monotonic() + 30
            while not probed.is_set() and time.monotonic() < deadline:
                parsed = real_parse(raw, **kwargs)
        return parsed

    monkeypatch.setattr(smtp_module, "parse_mail", parse_until_probed)
    extra = with_smtp('max_mime_depth = 5000\nmax_mime_parts = 5000\nparse_timeout = "60s"')
    config = bridge_config(tmp_path, sandbox_url, extra)
    async with (
        running_bridge(config, clock) as (bridge, url),
        smtp_listening(bridge) as port,
        httpx.AsyncClient() as http,
    ):
        sending = asyncio.create_task(asyncio.to_thread(data_reply, port, nested_mail(1000)))
        try:
            watching = asyncio.ensure_future(asyncio.to_thread(parsing.wait, 30))
            await asyncio.wait({watching, sending}, return_when=asyncio.FIRST_COMPLETED)
            assert parsing.is_set(), "the mail was not parsed in a parse thread"
            slowest = 0.0
            for _ in range(10):
                started = time.perf_counter()
                assert (await http.get(f"{url}/healthz")).status_code == 200
                slowest = max(slowest, time.perf_counter() - started)
                await asyncio.sleep(0.02)
            still_parsing = not sending.done()
        finally:
            probed.set()
            parsing.set()  # the watcher's thread, if the mail never reached a parse thread
        code, text = await sending
    # Parsed on the loop, this mail holds it for 0.3-2.6 s; off the loop a probe waits only
    # for GIL turns (5 ms each), which a loaded 2-core machine stretches: 0.6 s tells both.
    assert still_parsing, "the mail was answered before the probes were done"
    assert slowest < 0.6, f"/healthz took {slowest:.2f}s while the mail was parsed"
    assert code == 250 and b"read in part" in text, text


@pytest.mark.slow  # parses a costly mail per worker: ~9 s
async def test_a_small_alert_is_read_at_once_while_costly_mails_hold_every_parser(
    tmp_path, clock, sandbox_url, monkeypatch
) -> None:
    """Small plain mails are parsed on the loop (bridge.ingress.mail.parses_quickly): one
    costly mail per parse worker, each held in its worker until the alert is answered,
    and the alert still gets its 250 while they are all being parsed.

    The hold is a gate in front of the real parser: a costly mail's own parse time
    (0.3 s for this one on a fast machine) is no bound a test can lean on."""
    held = threading.Event()
    in_workers = threading.Semaphore(0)
    real_parse = smtp_module.parse_mail

    def gated_parse(raw: bytes, **kwargs: Any) -> Any:
        if b"deep alert" in raw:
            in_workers.release()
            held.wait(30)
        return real_parse(raw, **kwargs)

    monkeypatch.setattr(smtp_module, "parse_mail", gated_parse)
    extra = with_smtp('max_mime_depth = 5000\nmax_mime_parts = 5000\nparse_timeout = "60s"')
    config = bridge_config(tmp_path, sandbox_url, extra)
    async with running_bridge(config, clock) as (bridge, _), smtp_listening(bridge) as port:
        costly = [
            asyncio.create_task(asyncio.to_thread(data_reply, port, nested_mail(1000)))
            for _ in range(PARSE_WORKERS)
        ]
        for _ in range(PARSE_WORKERS):  # every worker holds a costly mail
            assert await asyncio.to_thread(in_workers.acquire, True, 30)
        alert = b"From: ups@example.org\r\nSubject: UPS on battery\r\n\r\nruntime 12 min\r\n"
        try:
            code, text = await asyncio.to_thread(data_reply, port, alert)
            still_parsing = not any(task.done() for task in costly)
        finally:
            held.set()
        answers = await asyncio.gather(*costly)

    def stored_id(reply: bytes) -> int:
        return int(re.search(rb"stored as message (\d+)", reply).group(1))  # type: ignore[union-attr]

    assert code == 250 and still_parsing, text
    assert [c for c, _ in answers] == [250] * PARSE_WORKERS, answers
    # Ids follow the order of storing: the alert was stored before any costly mail.
    assert stored_id(text) < min(stored_id(t) for _, t in answers), (text, answers)


async def test_mime_bounds_text_what_was_read(
    tmp_path, clock, sandbox_state: SandboxState, sandbox_url
) -> None:
    async with smtp_bridge(tmp_path, clock, sandbox_url) as (bridge, port):
        deep = await asyncio.to_thread(data_reply, port, nested_mail(1000))
        wide = await asyncio.to_thread(data_reply, port, flat_mail(4_000))
        await pump(bridge, clock, lambda: settled(bridge), max_seconds=60)
    assert deep[0] == 250 and b"nested deeper than 20" in deep[1], deep
    assert wide[0] == 250 and b"more than 100 MIME parts" in wide[1], wide
    assert sorted(e.message for e in sandbox_state.entries) == [
        "deep alert",
        "wide alert\npart 0",
    ]


async def test_a_mail_not_parsed_in_time_gets_a_451_so_the_client_retries(
    tmp_path, clock, sandbox_url
) -> None:
    # The parse time is the bridge's load as much as the mail: a 5xx bounced real alerts.
    extra = with_smtp('max_mime_parts = 50000\nparse_timeout = "50ms"')
    config = bridge_config(tmp_path, sandbox_url, extra)
    async with running_bridge(config, clock) as (bridge, _), smtp_listening(bridge) as port:
        code, text = await asyncio.to_thread(data_reply, port, flat_mail(4_000))
        assert await bridge.store.counts() == {}
        # The worker stopped itself: the next mail is parsed at once.
        ok = await asyncio.to_thread(data_reply, port, b"Subject: next\r\n\r\nx\r\n")
    assert code == 451 and text.startswith(b"4.3.0") and b"within 0.05s" in text, text
    assert ok[0] == 250


def _banner(sock: socket.socket) -> bytes:
    return sock.makefile("rb").readline()


async def test_sessions_in_all_and_per_client_are_limited(tmp_path, clock, sandbox_url) -> None:
    extra = with_smtp("max_sessions = 3\nmax_sessions_per_client = 2")
    config = bridge_config(tmp_path, sandbox_url, extra)
    async with running_bridge(config, clock) as (bridge, _), smtp_listening(bridge) as port:

        def connect(source: str) -> tuple[socket.socket, bytes]:
            sock = socket.create_connection(("127.0.0.1", port), 10, (source, 0))
            return sock, _banner(sock)

        def scenario() -> list[bytes]:
            opened = [connect("127.0.0.1"), connect("127.0.0.1")]
            banners = [b for _, b in opened]
            third, banner = connect("127.0.0.1")  # a third from the same client
            banners.append(banner)
            third.close()
            other, banner = connect("127.0.0.2")  # another client: room in all
            banners.append(banner)
            fourth, banner = connect("127.0.0.3")  # over the total
            banners.append(banner)
            fourth.close()
            for sock, _ in [*opened, (other, b"")]:
                sock.sendall(b"QUIT\r\n")
                sock.recv(100)
                sock.close()
            time.sleep(0.2)
            again, banner = connect("127.0.0.1")  # closed sessions are counted out
            banners.append(banner)
            again.close()
            return banners

        banners = await asyncio.to_thread(scenario)
    assert [b[:3] for b in banners] == [b"220", b"220", b"421", b"220", b"421", b"220"]
    assert b"too many sessions from 127.0.0.1 (at most 2)" in banners[2]
    assert b"too many SMTP sessions (at most 3)" in banners[4]
    assert bridge.smtp_handler.sessions.total == 0


async def test_a_few_clients_cannot_hold_every_session(tmp_path, clock, sandbox_url) -> None:
    """Four clients at `max_sessions_per_client` (25 of 100 by default; 5 of 20 here) held
    every session, and every other sender got 421. The last quarter goes one session to a
    client now: the fourth client gets one, and each new client one more, while a client
    alone (a relay) still gets its whole `max_sessions_per_client`."""
    extra = with_smtp("max_sessions = 20\nmax_sessions_per_client = 5")
    config = bridge_config(tmp_path, sandbox_url, extra)
    async with running_bridge(config, clock) as (bridge, _), smtp_listening(bridge) as port:

        def scenario() -> dict[str, list[bytes]]:
            held: list[socket.socket] = []
            banners: dict[str, list[bytes]] = {}
            for client in ("127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"):
                for _ in range(6):
                    sock = socket.create_connection(("127.0.0.1", port), 10, (client, 0))
                    banner = _banner(sock)
                    banners.setdefault(client, []).append(banner)
                    if banner.startswith(b"220"):
                        held.append(sock)
                    else:
                        sock.close()
            for sock in held:
                sock.close()
            return banners

        banners = await asyncio.to_thread(scenario)
    codes = {client: [b[:3] for b in got] for client, got in banners.items()}
    assert codes["127.0.0.1"] == [b"220"] * 5 + [b"421"]  # a relay alone: all it may
    assert codes["127.0.0.2"] == codes["127.0.0.3"] == codes["127.0.0.1"]
    assert codes["127.0.0.4"] == [b"220"] + [b"421"] * 5
    assert codes["127.0.0.5"] == [b"220"] + [b"421"] * 5
    assert b"the last 5 of 20 are kept for clients that hold none" in banners["127.0.0.4"][1]


def test_sessions_of_one_ipv6_64_count_as_one_client() -> None:
    """One host holds a whole IPv6 /64: counted by single address, it opened every one
    of `smtp.max_sessions` alone, a new address each time, and genuine senders got 421.
    Asked as `connection_made` asks it: loopback has no second IPv6 address to connect
    from, so the addresses are given (IPv4 and IPv4-mapped ones come through the real
    sessions of the test above)."""
    smtp = SmtpConfig(max_sessions=10, max_sessions_per_client=2)
    sessions = Sessions(lambda: smtp)
    one, two, three, other = (cast(Any, object()) for _ in range(4))
    assert sessions.admit(one, "2001:db8:1:2::1") is None
    assert sessions.admit(two, "2001:db8:1:2::2") is None
    assert sessions.admit(three, "2001:db8:1:2:ffff::3") == (
        "too many sessions from 2001:db8:1:2::/64 (at most 2)"
    )
    assert sessions.admit(other, "2001:db8:1:3::1") is None  # the next /64: another client
    sessions.release(one, "2001:db8:1:2::1")
    assert sessions.admit(three, "2001:db8:1:2:ffff::3") is None
    assert sessions.admit(cast(Any, object()), "::ffff:192.0.2.7") is None
    assert sessions.admit(cast(Any, object()), "192.0.2.7") is None
    assert sessions.admit(cast(Any, object()), "192.0.2.7") == (
        "too many sessions from 192.0.2.7 (at most 2)"
    )


@pytest.mark.slow  # over ~2 s
async def test_noop_does_not_keep_an_idle_session_and_commands_are_budgeted(
    tmp_path, clock, sandbox_url
) -> None:
    extra = with_smtp('idle_timeout = "1s"\nmax_commands = 3')
    config = bridge_config(tmp_path, sandbox_url, extra)
    async with running_bridge(config, clock) as (bridge, _), smtp_listening(bridge) as port:

        def noops_until_closed() -> float:
            started = time.monotonic()
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                reader = sock.makefile("rb")
                reader.readline()
                sock.sendall(b"EHLO x\r\n")
                while reader.readline()[3:4] == b"-":
                    pass
                for _ in range(2):  # within the budget, but no progress
                    time.sleep(0.4)
                    sock.sendall(b"NOOP\r\n")
                    assert reader.readline().startswith(b"250")
                assert reader.readline() == b""  # closed by the idle timer
            return time.monotonic() - started

        def over_budget() -> list[bytes]:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                reader = sock.makefile("rb")
                reader.readline()
                replies = []
                for _ in range(4):
                    sock.sendall(b"NOOP\r\n")
                    replies.append(reader.readline())
                replies.append(reader.readline())
                return replies

        def progress_keeps_it() -> list[bytes]:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                reader = sock.makefile("rb")
                reader.readline()
                replies = []
                for command in (
                    b"HELO x",
                    b"MAIL FROM:<a@example.org>",
                    b"RCPT TO:<" + DEFAULT_RCPT.encode() + b">",
                    b"RSET",
                ):
                    time.sleep(0.7)  # 2.8 s in all, each step within the 1 s timer
                    sock.sendall(command + b"\r\n")
                    replies.append(reader.readline())
                return replies

        lived = await asyncio.to_thread(noops_until_closed)
        replies = await asyncio.to_thread(over_budget)
        progressed = await asyncio.to_thread(progress_keeps_it)
    assert [r[:3] for r in progressed] == [b"250"] * 4
    assert 0.9 < lived < 1.6, lived  # 1 s after EHLO, though NOOPs came at 0.4 and 0.8 s
    assert [r[:3] for r in replies[:3]] == [b"250"] * 3
    assert replies[3].startswith(b"421 4.7.0 NOOP sent too many times")
    assert replies[4] == b""  # and closed


@pytest.mark.slow  # over ~2 s
async def test_a_session_kept_busy_ends_at_its_time_limit_after_the_mail_in_hand(
    tmp_path, clock, sandbox_url
) -> None:
    """Progress restarts the idle timer, but not `smtp.max_session_time`, which runs from
    connect: past it, 421 4.4.2 and closed. A mail still in transfer then is read,
    stored and answered first (cut, the client would send it again)."""
    extra = with_smtp('idle_timeout = "3s"\nmax_session_time = "1s"\nmax_commands = 100')
    config = bridge_config(tmp_path, sandbox_url, extra)
    async with running_bridge(config, clock) as (bridge, _), smtp_listening(bridge) as port:

        def session(sock: socket.socket) -> tuple[Any, Any]:
            reader = sock.makefile("rb")
            assert reader.readline().startswith(b"220")

            def send(command: bytes) -> bytes:
                sock.sendall(command + b"\r\n")
                line = reader.readline()
                while line[3:4] == b"-":
                    line = reader.readline()
                return line

            return reader, send

        def busy_until_closed() -> tuple[float, list[bytes]]:
            started = time.monotonic()
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                reader, send = session(sock)
                last = send(b"EHLO x")
                while last.startswith(b"250") and time.monotonic() - started < 5:
                    # Progress every 0.2 s, well within the 3 s idle timer, unless the
                    # server speaks first (a command sent after its close would be reset).
                    if select.select([sock], [], [], 0.2)[0]:
                        last = reader.readline()
                    else:
                        last = send(b"EHLO x")
                lived = time.monotonic() - started
                return lived, [last, b"(open)" if last.startswith(b"250") else reader.readline()]

        def mail_across_the_limit() -> list[bytes]:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                reader, send = session(sock)
                for command in (b"EHLO x", b"MAIL FROM:<a@example.org>"):
                    assert send(command).startswith(b"250")
                assert send(b"RCPT TO:<" + DEFAULT_RCPT.encode() + b">").startswith(b"250")
                assert send(b"DATA").startswith(b"354")
                sock.sendall(b"Subject: disk full\r\n\r\n")
                time.sleep(1.3)  # the limit passes mid-mail
                sock.sendall(b"on db-2\r\n.\r\n")
                return [reader.readline(), reader.readline(), reader.readline()]

        lived, closing = await asyncio.to_thread(busy_until_closed)
        answered = await asyncio.to_thread(mail_across_the_limit)
        assert bridge.smtp_handler.sessions.total == 0
        [stored] = await bridge.store.query(limit=10)
    assert 0.9 < lived < 2.5, lived
    limit = b"421 4.4.2 bridge.test Session time limit reached (1s, smtp.max_session_time)"
    assert closing[0].startswith(limit), closing
    assert closing[1] == b""  # and closed
    assert answered[0].startswith(f"250 2.0.0 OK: stored as message {stored.id}".encode())
    assert answered[1].startswith(limit) and answered[2] == b""
    assert stored.text == "disk full\non db-2"


async def test_a_bug_in_a_hook_is_a_451_without_its_words(
    tmp_path, clock, sandbox_url, caplog
) -> None:
    """aiosmtpd answers a hook's exception with `500 Error: (Type) text`: a permanent code
    (the relay bounces the alert) quoting the exception. The bridge answers 451, logs the
    traceback, and the session goes on."""
    async with smtp_bridge(tmp_path, clock, sandbox_url) as (bridge, port):
        real_submit = bridge.ingestor.submit

        async def broken(*args: object, **kwargs: object) -> object:
            raise RuntimeError("store said: secret-ish text from the mail")

        bridge.ingestor.submit = broken  # type: ignore[method-assign]
        alert = b"From: ups@example.org\r\nSubject: UPS on battery\r\n\r\nruntime 12 min\r\n"

        def session() -> tuple[tuple[int, bytes], tuple[int, bytes]]:
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                client.ehlo("tester")
                client.mail("monitor@example.org")
                client.rcpt(DEFAULT_RCPT)
                failed = client.data(alert)
                bridge.ingestor.submit = real_submit  # type: ignore[method-assign]
                client.mail("monitor@example.org")  # the same session goes on
                client.rcpt(DEFAULT_RCPT)
                return failed, client.data(alert)

        failed, ok = await asyncio.to_thread(session)
    assert failed[0] == 451 and failed[1].startswith(b"4.3.0"), failed
    assert b"secret-ish" not in failed[1] and b"RuntimeError" not in failed[1]
    assert ok[0] == 250, ok
    assert "secret-ish text from the mail" in caplog.text  # the log keeps the traceback


async def test_a_mail_scheduled_later_does_not_suppress_the_same_mail_now(
    tmp_path, clock, sandbox_url
) -> None:
    """The dedupe key (Message-ID and content) ignored X-SMS-Schedule: whoever knew a
    device's Message-ID (often predictable) could mail its words scheduled a year ahead,
    and the real alert, now, was suppressed as its duplicate. A scheduled mail's key now
    holds its time; an MTA's retry of either mail still meets its first."""
    alert = "Message-ID: <ups-42@ups.example>\r\nSubject: UPS on battery\r\n\r\nrun\r\n"
    ahead = f"X-SMS-Schedule: 2099-01-01 08:00:00\r\n{alert}"
    async with smtp_bridge(tmp_path, clock, sandbox_url) as (bridge, port):
        for raw in (ahead, alert, ahead, alert):  # each mail, then the MTA's retry of each
            code, _ = await asyncio.to_thread(data_reply, port, raw.encode())
            assert code == 250
        stored = sorted(await bridge.store.query(), key=lambda m: m.id)
    assert [(m.state, m.schedule_time) for m in stored] == [
        (State.QUEUED, "2099-01-01 08:00:00"),
        (State.QUEUED, None),
        (State.SUPPRESSED, "2099-01-01 08:00:00"),
        (State.SUPPRESSED, None),
    ]
    assert f"duplicate of message {stored[0].id}" in (stored[2].reason or "")
    assert f"duplicate of message {stored[1].id}" in (stored[3].reason or "")


USERS = (
    "auth_allow_plaintext = true\n"
    'users = {ups = "ups-pass-0123456789", nas = "nas-pass-0123456789",'
    ' ops = "ops-pass-0123456789"}\n'
    'user_recipients = {ups = ["oncall"], nas = ["+12025550143"]}\n'
)


def rcpt_codes(port: int, login: tuple[str, str] | None, rcpts: list[str]) -> list[int]:
    """RCPT's answer to each of `rcpts`, after logging in as `login` (or not)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("tester")
        if login:
            client.login(*login)
        client.mail("alerts@example.org")
        return [client.rcpt(r)[0] for r in rcpts]


def send_as(port: int, login: tuple[str, str] | None, rcpts: list[str], mail: str) -> dict:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        if login:
            client.login(*login)
        return client.sendmail("alerts@example.org", rcpts, mail)


async def test_an_smtp_user_texts_only_its_recipients_and_is_named_on_its_messages(
    tmp_path, clock, sandbox_state: SandboxState, sandbox_url
) -> None:
    """`smtp.user_recipients` lists what a logged-in user may text (numbers and groups,
    as a route's `to`): other recipients get 550 at RCPT; a user not listed, and a
    session that does not log in, text anyone as before. Each user's mail is deduplicated
    among its own (two devices' identical alerts both go), and stored as sent by
    `smtp:LOGIN`, shown as `token` by the API as an API token's name is."""
    ups, nas, ops = (
        ("ups", "ups-pass-0123456789"),
        ("nas", "nas-pass-0123456789"),
        ("ops", "ops-pass-0123456789"),
    )
    member, other = "+12025550101@sms.localhost", DEFAULT_RCPT
    config = bridge_config(tmp_path, sandbox_url, with_smtp(USERS))
    async with running_bridge(config, clock) as (bridge, url), smtp_listening(bridge) as port:
        codes = {
            who: await asyncio.to_thread(
                rcpt_codes, port, login, ["oncall@sms.localhost", member, other]
            )
            for who, login in (("ups", ups), ("nas", nas), ("ops", ops), ("anonymous", None))
        }

        def refused() -> tuple[int, bytes]:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.login(*ups)
                client.mail("ups@example.org")
                return client.rcpt(other)

        refusal = await asyncio.to_thread(refused)
        # The same alert (Message-ID and all) from two users, and from no user.
        mail = "Message-ID: <same@example.org>\r\nSubject: on battery\r\n\r\n12 min left\r\n"
        for login in (ups, ops, None, ups):
            assert await asyncio.to_thread(send_as, port, login, [member], mail) == {}
        async with httpx.AsyncClient(base_url=url) as http:
            listed = (await http.get("/api/v1/messages")).json()["messages"]
        await pump(bridge, clock, lambda: settled(bridge), max_seconds=60)
    assert codes == {
        "ups": [250, 250, 550],
        "nas": [550, 550, 250],
        "ops": [250, 250, 250],
        "anonymous": [250, 250, 250],
    }
    assert refusal == (
        550,
        b"5.7.1 <+12025550143@sms.localhost>: smtp user 'ups' may not "
        b"text it (smtp.user_recipients.ups)",
    )
    by_sender = sorted((m["token"] or "", m["state"], m["reason_kind"] or "") for m in listed)
    assert by_sender == [
        ("", "queued", ""),
        ("smtp:ops", "queued", ""),
        ("smtp:ups", "queued", ""),
        ("smtp:ups", "suppressed", "duplicate"),  # its own retry, and only that
    ]
    assert len(sandbox_state.entries) == 3


def _mail_in_data(port: int, mail: bytes, sent: threading.Event, end: threading.Event) -> bytes:
    """A session that sends all of `mail` but its end-of-data line, sets `sent`, and
    ends the mail once `end` is set; DATA's answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        reader = sock.makefile("rb")
        reader.readline()
        for command in (b"EHLO x\r\n", b"MAIL FROM:<a@example.org>\r\n"):
            sock.sendall(command)
            while reader.readline()[3:4] == b"-":
                pass
        sock.sendall(f"RCPT TO:<{DEFAULT_RCPT}>\r\nDATA\r\n".encode())
        reader.readline(), reader.readline()
        sock.sendall(memoryview(mail))
        sent.set()
        end.wait(60)
        sock.sendall(b".\r\n")
        return reader.readline()


@pytest.mark.slow  # measures memory of 2 MiB mails under tracemalloc: ~9 s
async def test_a_session_in_data_holds_about_its_mail_once(tmp_path, clock, sandbox_url) -> None:
    """What the mails of sessions in DATA hold in memory, measured: each about its own
    size once. Read through aiosmtpd's DATA loop, a mail's lines sat in the socket's
    reader (whose limit, raised to the message size for long lines, let it take twice
    that before pausing) and again in a list of lines, each line object ~60 bytes on top
    (~2.7x its size); a hundred sessions of 1 MiB mails (the defaults) ~300 MB."""
    size = 2 << 20
    long_line = b"Subject: one line\r\n\r\n" + b"x" * (size - 100) + b"\r\n"
    short_lines = b"Subject: lines\r\n\r\n" + (b"y" * 76 + b"\r\n") * ((size - 100) // 78)
    mails = [long_line, short_lines, short_lines.replace(b"y", b"z"), long_line[:-2] + b"!\r\n"]
    config = bridge_config(
        tmp_path, sandbox_url, with_smtp(f"max_message_bytes = {size}\nmax_lines = 100000")
    )
    async with running_bridge(config, clock) as (bridge, _), smtp_listening(bridge) as port:
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            sent, end = [threading.Event() for _ in mails], threading.Event()
            answers = [
                asyncio.ensure_future(asyncio.to_thread(_mail_in_data, port, mail, s, end))
                for mail, s in zip(mails, sent, strict=True)
            ]
            for s in sent:
                assert await asyncio.to_thread(s.wait, 30)
            held, steady = 0, 0
            while steady < 5:  # until the bridge has read all they sent
                await asyncio.sleep(0.05)
                now = tracemalloc.get_traced_memory()[0] - before
                steady = steady + 1 if abs(now - held) < 64 << 10 else 0
                held = now
            end.set()
            replies = await asyncio.gather(*answers)
            peak = tracemalloc.get_traced_memory()[1] - before
        finally:
            tracemalloc.stop()
    assert all(r.startswith(b"250") for r in replies), replies
    mailed = sum(len(m) for m in mails)
    print(f"held {held / mailed:.2f}x of {mailed} bytes in DATA, peak {peak / mailed:.2f}x")
    assert held < 1.3 * mailed, f"{held / mailed:.2f}x"


async def test_auth_inside_a_mail_transaction_is_refused(tmp_path, clock, sandbox_url) -> None:
    """RFC 4954: AUTH after MAIL gets 503. aiosmtpd took it: RCPTs accepted for an
    anonymous session went out as the user who logged in after them (never checked
    against its `smtp.user_recipients`), and DATA then answered a 451 blaming a reload.
    After RSET the same AUTH is taken, and RCPT is judged for that user."""
    config = bridge_config(tmp_path, sandbox_url, with_smtp(USERS))
    plain = "PLAIN " + base64.b64encode(b"\0ups\0ups-pass-0123456789").decode()
    async with running_bridge(config, clock) as (bridge, _), smtp_listening(bridge) as port:

        def session() -> list[int]:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.ehlo("tester")
                client.mail("a@example.org")
                codes = [client.rcpt(DEFAULT_RCPT)[0], client.docmd("AUTH", plain)[0]]
                codes.append(client.rset()[0])
                codes.append(client.docmd("AUTH", plain)[0])
                client.mail("a@example.org")
                return [*codes, client.rcpt(DEFAULT_RCPT)[0]]

        codes = await asyncio.to_thread(session)
        assert await bridge.store.counts() == {}
    assert codes == [250, 503, 250, 235, 550]


async def test_an_overlong_auth_answer_is_refused_without_a_traceback(
    tmp_path, clock, sandbox_url, caplog
) -> None:
    """An answer to AUTH's 334 challenge longer than a command line: aiosmtpd let the
    reader's error escape, a 451 "internal error" and an ERROR traceback in the log for
    each, from any client without a password. RFC 4954's 500 5.5.6 now; the session goes on."""
    config = bridge_config(tmp_path, sandbox_url, with_smtp(USERS))
    async with running_bridge(config, clock) as (bridge, _), smtp_listening(bridge) as port:
        steps = [b"EHLO x\r\n", b"AUTH LOGIN\r\n", b"A" * 5000 + b"\r\n", b"NOOP\r\n"]
        steps += [b"AUTH PLAIN\r\n", b"A" * 5000 + b"\r\n"]
        replies = await asyncio.to_thread(_raw_session, port, steps)
    too_long = b"500 5.5.6 Authentication exchange line is too long\r\n"
    assert replies[1:] == [
        b"334 VXNlciBOYW1lAA==\r\n",
        too_long,
        b"250 OK\r\n",
        b"334 \r\n",
        too_long,
    ]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_auth_mechanism_names_are_case_blind(
    tmp_path, clock, sandbox_state: SandboxState, sandbox_url
) -> None:
    """RFC 4954 section 4: SASL mechanism names are case-insensitive. aiosmtpd looked
    `plain` up as written and answered 504 "Unrecognized authentication type", so a
    device that sends `auth plain ...` could not log in (and, with `require_auth`, not
    send). Only the name is folded: the base64 answer after it is taken as sent."""
    config = bridge_config(tmp_path, sandbox_url, with_smtp(USERS))
    plain = base64.b64encode(b"\0ups\0ups-pass-0123456789").decode()
    user, password = (base64.b64encode(s).decode() for s in (b"nas", b"nas-pass-0123456789"))
    async with running_bridge(config, clock) as (bridge, _), smtp_listening(bridge) as port:

        def login(*commands: tuple[str, str]) -> list[int]:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.ehlo("tester")
                codes = [client.docmd(*command)[0] for command in commands]
                client.mail("ups@example.org")
                return [*codes, client.rcpt(DEFAULT_RCPT)[0]]  # 550 for ups, 250 for nas

        codes = [
            await asyncio.to_thread(login, ("auth", f"plain {plain}")),
            await asyncio.to_thread(login, ("Auth", f"Plain {plain}")),
            await asyncio.to_thread(login, ("auth", "login"), (user, ""), (password, "")),
            await asyncio.to_thread(login, ("AUTH", "lOgIn"), (user, ""), (password, "")),
            await asyncio.to_thread(login, ("auth", f"  plain\t{plain}")),
        ]
    assert codes == [[235, 550], [235, 550], [334, 334, 235, 250], [334, 334, 235, 250], [235, 550]]


async def test_a_user_a_reload_removes_texts_no_one_from_its_open_session(
    tmp_path, clock, sandbox_url
) -> None:
    """A session logged in as a user whom a reload then removes (a device's password
    leaked): its `smtp.user_recipients` entry went with it, and the session could text
    anyone. The session is refused at its next command and closed (421: temporary, so an
    MTA reconnects and logs in with what it has now, where a 530 bounced the mail); a new
    session's AUTH fails."""
    config = bridge_config(tmp_path, sandbox_url, with_smtp(USERS))
    async with running_bridge(config, clock) as (bridge, _), smtp_listening(bridge) as port:
        taken, reloaded = threading.Event(), threading.Event()

        def session() -> list[int]:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.login("ups", "ups-pass-0123456789")
                client.mail("ups@example.org")
                codes = [client.rcpt("oncall@sms.localhost")[0]]
                taken.set()
                reloaded.wait(10)
                codes.append(client.rcpt(DEFAULT_RCPT)[0])
                try:
                    client.docmd("DATA")
                except smtplib.SMTPServerDisconnected:
                    return [*codes, "closed"]
                return codes

        codes = asyncio.ensure_future(asyncio.to_thread(session))
        assert await asyncio.to_thread(taken.wait, 10)
        (tmp_path / "new").mkdir()
        without_ups = USERS.replace('ups = "ups-pass-0123456789", ', "").replace(
            'ups = ["oncall"], ', ""
        )
        try:
            bridge.reload(bridge_config(tmp_path / "new", sandbox_url, with_smtp(without_ups)))
        finally:
            reloaded.set()
        assert await codes == [250, 421, "closed"]
        assert await bridge.store.counts() == {}


async def test_require_auth_by_reload_reaches_an_open_anonymous_session(
    tmp_path, clock, sandbox_url
) -> None:
    """A reload that turned on `smtp.require_auth` reached new sessions only: aiosmtpd
    keeps the `auth_required` it was given at connect, and an anonymous session opened
    before went on texting any number for `smtp.max_session_time`. MAIL and DATA ask the
    settings in force now: 530 for each mail after the reload, nothing stored."""
    async with smtp_bridge(tmp_path, clock, sandbox_url) as (bridge, port):
        connected, reloaded = threading.Event(), threading.Event()

        def session() -> list[int]:
            codes = []
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.ehlo("intruder")
                codes.append(client.mail("x@example.org")[0])  # before: accepted
                codes.append(client.rcpt(DEFAULT_RCPT)[0])
                connected.set()
                reloaded.wait(10)
                codes.append(client.docmd("DATA")[0])  # its RCPT came before the reload
                client.rset()
                for _ in range(2):  # each mail after the reload
                    codes.append(client.mail("x@example.org")[0])
            return codes

        answer = asyncio.ensure_future(asyncio.to_thread(session))
        assert await asyncio.to_thread(connected.wait, 10)
        (tmp_path / "new").mkdir()
        locked = with_smtp(
            'require_auth = true\nauth_allow_plaintext = true\nusers = {ups = "ups-pass-0123456789"}\n'
        )
        try:
            bridge.reload(bridge_config(tmp_path / "new", sandbox_url, locked))
        finally:
            reloaded.set()
        assert await answer == [250, 250, 530, 530, 530]
        assert await bridge.store.counts() == {}


@pytest.mark.parametrize(
    ("before", "after", "answers"),
    [
        (USERS, USERS.replace("plaintext = true", "plaintext = false"), (True, False, 538)),
        ("", USERS, (False, True, 235)),  # the first [smtp.users]: AUTH offered and taken
    ],
    ids=["plaintext-forbidden", "users-added"],
)
async def test_what_auth_a_reload_allows_reaches_an_open_session(
    tmp_path, clock, sandbox_url, before: str, after: str, answers: tuple[bool, bool, int]
) -> None:
    """aiosmtpd reads `auth_require_tls` and the AUTH mechanisms once, at connect: a
    reload that turned `smtp.auth_allow_plaintext` off reached new sessions only, and a
    session opened before still offered AUTH in clear text and took a password over it
    (235). EHLO and AUTH ask the settings in force now: no AUTH offered, and AUTH 538
    5.7.11 "Encryption required" (RFC 4954). So do the first users a reload adds."""
    config = bridge_config(tmp_path, sandbox_url, with_smtp(before))
    async with running_bridge(config, clock) as (bridge, _), smtp_listening(bridge) as port:
        connected, reloaded = threading.Event(), threading.Event()

        def session() -> tuple[bool, bool, int]:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.ehlo("device")
                offered = client.has_extn("auth")
                connected.set()
                reloaded.wait(10)
                client.ehlo("device")
                login = client.docmd("AUTH", plain_auth("ups", "ups-pass-0123456789"))
                return offered, client.has_extn("auth"), login[0]

        answer = asyncio.ensure_future(asyncio.to_thread(session))
        assert await asyncio.to_thread(connected.wait, 10)
        (tmp_path / "new").mkdir()
        try:
            bridge.reload(bridge_config(tmp_path / "new", sandbox_url, with_smtp(after)))
        finally:
            reloaded.set()
        assert await answer == answers


async def test_a_password_a_reload_replaced_no_longer_logs_in_or_sends(
    tmp_path, clock, sandbox_url
) -> None:
    """The leaked password is rotated by SIGHUP. aiosmtpd keeps the authenticator it was
    handed at connect, so on a session opened before, AUTH with the old password answered
    235 and the mail was texted; and a session that had logged in with it went on. Both
    meet the `[smtp.users]` in force now: AUTH 535, and MAIL 421 for the session that
    logged in before (its login's fingerprint no longer matches; no password is kept),
    which is closed: a temporary refusal, so the MTA reconnects with what it has now."""
    old = with_smtp('auth_allow_plaintext = true\nusers = {ups = "old-pass-0123456789"}\n')
    new = with_smtp('auth_allow_plaintext = true\nusers = {ups = "new-pass-0123456789"}\n')
    config = bridge_config(tmp_path, sandbox_url, old)
    async with running_bridge(config, clock) as (bridge, _), smtp_listening(bridge) as port:
        connected, reloaded = threading.Event(), threading.Event()

        def sessions() -> list[int]:
            with (
                smtplib.SMTP("127.0.0.1", port, timeout=10) as fresh,
                smtplib.SMTP("127.0.0.1", port, timeout=10) as logged_in,
            ):
                fresh.ehlo("intruder")
                codes = [logged_in.login("ups", "old-pass-0123456789")[0]]
                connected.set()
                reloaded.wait(10)
                codes.append(fresh.docmd("AUTH", plain_auth("ups", "old-pass-0123456789"))[0])
                codes.append(logged_in.mail("x@example.org")[0])
                return codes

        answer = asyncio.ensure_future(asyncio.to_thread(sessions))
        assert await asyncio.to_thread(connected.wait, 10)
        (tmp_path / "new").mkdir()
        try:
            bridge.reload(bridge_config(tmp_path / "new", sandbox_url, new))
        finally:
            reloaded.set()
        assert await answer == [235, 535, 421]
        assert await bridge.store.counts() == {}
        # The new password logs in and sends.
        login = await asyncio.to_thread(_login_and_send, port, "new-pass-0123456789")
        assert login == {}
        assert await bridge.store.counts() == {"queued": 1}


def plain_auth(login: str, password: str) -> str:
    """An `AUTH PLAIN` argument (RFC 4616: authzid, login, password)."""
    return "PLAIN " + base64.b64encode(f"\0{login}\0{password}".encode()).decode()


def _login_and_send(port: int, password: str) -> dict:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.login("ups", password)
        return client.sendmail("ups@example.org", [DEFAULT_RCPT], "Subject: x\r\n\r\nx\r\n")
