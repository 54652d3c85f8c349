"""Each part a reload re-configures, checked through the real Bridge: a new config file
is loaded as SIGHUP loads it (`load_config`) and handed to `Bridge.reload`, then the
setting is shown to hold on the next message, mail or request.

One test per reloadable part (shaper, ingest rules, digests, budget, SMTP handler, the
live view), so dropping one part's `reload` call from `Bridge.reload` fails the test
named for it. SIGHUP through a real `serve` process is driven in test_operations.py
(routes, SMTP auth, sizes, limits, TLS, restart warnings).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import smtplib
import threading
from collections.abc import AsyncIterator
from email.message import EmailMessage
from pathlib import Path

import httpx
import pytest

from bridge.clock import ManualClock
from bridge.config import BudgetConfig, Config, load_config
from bridge.errors import ConfigError
from bridge.provider.sandbox import SandboxState
from bridge.service import Bridge
from tests.helpers import bridge_config, running_bridge, write_config
from tests.test_firewall import rcpt
from tests.test_smtp import DEFAULT_RCPT, send, smtp_listening, with_smtp

PHONE = "+12025550143"


def reloaded(bridge: Bridge, tmp_path: Path, sandbox_url: str, extra: str) -> list[str]:
    """The running store and provider with `extra`, written to a file, loaded and applied
    as SIGHUP does; the reload's warnings."""
    text = (
        f'[store]\npath = "{bridge.config.store.path}"\n'
        f'[provider]\nbase_url = "{sandbox_url}/api/v1"\napi_key = "test-key"\n{extra}'
    )
    return bridge.reload(load_config(write_config(tmp_path, text, "reloaded.toml"), env={}))


@contextlib.asynccontextmanager
async def reloading(
    bridge: Bridge, held: threading.Event
) -> AsyncIterator[tuple[asyncio.Queue[str | None], asyncio.Task[None]]]:
    """The bridge's reloader (the queue SIGHUP fills, its task) for the test; at its end
    the read the test `held` is let go and the bridge stopped."""
    reloads: asyncio.Queue[str | None] = asyncio.Queue()
    reloader = asyncio.create_task(bridge._reloader(reloads))
    try:
        yield reloads, reloader
    finally:
        held.set()
        bridge.stop.set()
        await reloader


def hung_config_reads(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """SIGHUP's read of the config hangs (a file on an NFS mount that does not answer)
    for 8 s, or until the event returned is set."""
    from bridge import service

    mount_back = threading.Event()
    real_load = service.load_config

    def hung(path: str | None) -> Config:
        mount_back.wait(8)
        return real_load(path)

    monkeypatch.setattr(service, "load_config", hung)
    return mount_back


async def post(http: httpx.AsyncClient, url: str, to: str, message: str) -> dict:
    response = await http.post(f"{url}/api/v1/messages", json={"to": to, "message": message})
    assert response.status_code == 202, response.text
    return response.json()["messages"][0]


async def test_limits_max_parts_reaches_the_shaper(
    tmp_path, clock: ManualClock, sandbox_url: str
) -> None:
    config = bridge_config(tmp_path, sandbox_url)
    long_text = "word " * 100  # 500 GSM characters: 4 parts, cut to limits.max_parts
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        before = await post(http, url, PHONE, long_text)
        assert reloaded(bridge, tmp_path, sandbox_url, "[limits]\nmax_parts = 1\n") == []
        after = await post(http, url, "+12025550144", long_text)
        stored = [await bridge.store.get(m["id"]) for m in (before, after)]
    assert [m.parts for m in stored] == [3, 1]
    assert len(stored[1].text) <= 160


async def test_dedupe_window_reaches_the_ingest_rules(
    tmp_path, clock: ManualClock, sandbox_url: str
) -> None:
    config = bridge_config(tmp_path, sandbox_url)  # dedupe.window = 10m
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        states = [(await post(http, url, PHONE, "disk full"))["state"] for _ in range(2)]
        reloaded(bridge, tmp_path, sandbox_url, "[dedupe]\nwindow = 0\n")  # off
        states += [(await post(http, url, PHONE, "cpu hot"))["state"] for _ in range(2)]
    assert states == ["queued", "suppressed", "queued", "queued"]


async def test_per_recipient_window_reaches_the_digest_worker(
    tmp_path, clock: ManualClock, sandbox_url: str
) -> None:
    storm = '[limits]\nper_recipient = 1\nper_recipient_window = "{}"\n'
    config = bridge_config(tmp_path, sandbox_url, storm.format("30m"))
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        reloaded(bridge, tmp_path, sandbox_url, storm.format("2m"))
        states = [(await post(http, url, PHONE, f"alert {i}"))["state"] for i in range(2)]
        held_at = clock.now()
        while not (digests := await bridge.store.query(source="digest")):
            assert clock.now() - held_at <= 120, "no digest 2m after the hold"
            clock.advance(await bridge.digests.run_once())
    assert states == ["queued", "held"]
    assert len(digests) == 1 and digests[0].recipient == PHONE


async def test_budget_caps_admins_and_low_balance_reach_the_budget_and_dispatcher(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """No budget at start; the reload adds a daily cap, a national admin number read in
    the new phone.default_region (the GB case, now on reload) and a low-balance mark,
    which the dispatcher reads through the budget."""
    sandbox_state.balance = 10.0
    config = bridge_config(tmp_path, sandbox_url)
    budget = (
        '[phone]\ndefault_region = "GB"\n'
        '[budget]\ntexts_per_day = 1\nlow_balance = 100\nadmin = ["07400 123456"]\n'
    )
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        assert reloaded(bridge, tmp_path, sandbox_url, budget) == []
        for i in range(2):
            await post(http, url, f"+1202555014{i}", f"alert {i}")
        for _ in range(6):
            clock.advance(min(await bridge.dispatcher.run_once(), 5))
        waiting = await bridge.store.query(reason_kind="budget")
    admin = [e.message for e in sandbox_state.entries if e.to == "+447400123456"]
    assert len([e for e in sandbox_state.entries if e.to.startswith("+1202")]) == 1
    assert len(waiting) == 1
    assert any("texts_per_day=1" in text for text in admin)
    assert any("is below 100" in text for text in admin)


async def test_groups_and_regions_reach_smtp_and_the_api(
    tmp_path, clock: ManualClock, sandbox_url: str
) -> None:
    config = bridge_config(tmp_path, sandbox_url, '[smtp]\ndomains = ["sms.localhost"]\n')
    after = (
        '[smtp]\ndomains = ["sms.localhost", "uk.localhost"]\n'
        '[smtp.regions]\n"uk.localhost" = "GB"\n'
        '[groups]\nops = ["+12025550150"]\n'
    )
    async with (
        running_bridge(config, clock) as (bridge, url),
        smtp_listening(bridge) as port,
        httpx.AsyncClient() as http,
    ):
        before = [
            (await asyncio.to_thread(rcpt, port, address))[0]
            for address in ("ops@sms.localhost", "07400123456@uk.localhost")
        ]
        api_before = await http.post(f"{url}/api/v1/messages", json={"to": "ops", "message": "x"})
        assert reloaded(bridge, tmp_path, sandbox_url, after) == []
        codes = [
            (await asyncio.to_thread(rcpt, port, address))[0]
            for address in ("OPS@sms.localhost", "07400123456@uk.localhost")
        ]
        api_after = await http.post(f"{url}/api/v1/messages", json={"to": "ops", "message": "x"})
    assert before == [550, 550] and api_before.status_code == 400
    assert codes == [250, 250]
    assert api_after.status_code == 202
    assert api_after.json()["messages"][0]["to"] == "+12025550150"


async def test_a_reload_the_budget_cannot_resolve_applies_nothing(
    tmp_path, clock: ManualClock, sandbox_url: str
) -> None:
    """A config built without `load_config`'s checks (an admin no resolver reads) is
    refused by `Bridge.reload` before any part changed: no half-applied reload."""
    config = bridge_config(tmp_path, sandbox_url)
    bad: Config = dataclasses.replace(
        config,
        budget=BudgetConfig(texts_per_day=1, admin=("07400 123456",)),  # no default region
        limits=dataclasses.replace(config.limits, max_parts=1),
    )
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        with pytest.raises(ConfigError) as refused:
            bridge.reload(bad)
        message = await post(http, url, PHONE, "word " * 100)
        stored = await bridge.store.get(message["id"])
    assert "budget.admin[0]" in str(refused.value)
    assert bridge.config is config and bridge.live.current is config
    assert stored.parts == 3 and not bridge.budget.active


async def test_restart_only_sections_are_named_and_keep_running(
    tmp_path, clock: ManualClock, sandbox_url: str
) -> None:
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (bridge, _):
        warnings = reloaded(
            bridge,
            tmp_path,
            sandbox_url,
            '[status]\npoll_interval = "1m"\n[http]\nlisten = "127.0.0.1:0"\n',
        )
    assert warnings == [
        "http.listen changed but needs a restart",
        "status changed but needs a restart",
    ]
    assert bridge.config.status.poll_interval == config.status.poll_interval
    assert bridge.poller.config.poll_interval == config.status.poll_interval


async def test_a_reload_whose_file_hangs_leaves_the_bridge_answering(
    tmp_path, clock: ManualClock, sandbox_url: str, monkeypatch
) -> None:
    """A SIGHUP whose config read hangs (a file on an NFS mount that does not answer):
    read on the event loop, it stopped the bridge, no request answered until the mount
    came back. Read in a thread, waited for RELOAD_READ_TIMEOUT: the bridge answers
    meanwhile, and past the bound the reload is refused and the running config kept."""
    import time

    from bridge import service

    config = bridge_config(tmp_path, sandbox_url)
    path = write_config(tmp_path, f'[store]\npath = "{config.store.path}"\n', "reloaded.toml")
    mount_back = hung_config_reads(monkeypatch)
    monkeypatch.setattr(service, "RELOAD_READ_TIMEOUT", 1.0)
    async with (
        running_bridge(config, clock) as (bridge, url),
        httpx.AsyncClient() as http,
        reloading(bridge, mount_back) as (reloads, _),
    ):
        reloads.put_nowait(str(path))
        started = time.monotonic()
        await asyncio.sleep(0.05)  # the reloader takes the SIGHUP and starts reading
        answer = await http.get(f"{url}/healthz", timeout=30)
        # On the loop, the read held everything for its 8 s; 4 s leaves a loaded
        # machine its slowness.
        assert answer.status_code == 200 and time.monotonic() - started < 4
        for _ in range(100):
            if not bridge.last_reload_ok:
                break
            await asyncio.sleep(0.05)
        assert not bridge.last_reload_ok  # refused past the bound: the bridge runs on
        assert bridge.config.store.path == config.store.path


async def test_a_reload_reads_its_certificate_off_the_loop_and_serves_it(
    tmp_path, clock: ManualClock, sandbox_url: str, monkeypatch
) -> None:
    """A SIGHUP with `smtp.tls_cert` loaded the certificate on the event loop (and looked
    at every secret file's mode there): a slow disk held every mail and request until
    it answered. Read in a thread now: /healthz answers while the read hangs, and once
    it is done both STARTTLS and the implicit-TLS listener serve the new certificate."""
    import ssl
    import time

    import trustme

    from bridge.ingress import smtp as smtp_module
    from tests.test_smtp import DEFAULT_RCPT, implicit_tls_config, implicit_tls_listening

    first, second = trustme.CA(), trustme.CA()
    files = []
    for name, ca in (("first", first), ("second", second)):
        issued = ca.issue_cert("127.0.0.1")
        issued.cert_chain_pems[0].write_to_path(str(tmp_path / f"{name}.pem"))
        issued.private_key_pem.write_to_path(str(tmp_path / f"{name}.key"))
        files.append((str(tmp_path / f"{name}.pem"), str(tmp_path / f"{name}.key")))
    config = implicit_tls_config(tmp_path, sandbox_url, (first, *files[0]), "")
    text = Path(config.source).read_text()  # noqa: ASYNC240 - the test's own small file
    assert text and files[0][0] in text
    renewed = write_config(
        tmp_path,
        text.replace(files[0][0], files[1][0]).replace(files[0][1], files[1][1]),
        "new.toml",
    )
    disk_back = threading.Event()
    real = smtp_module.tls_context

    def slow(cert: str, key: str) -> ssl.SSLContext:
        disk_back.wait(8)  # the disk answers 8 s later (or when the test lets it)
        return real(cert, key)

    def greeting(port: int, ca: trustme.CA) -> dict:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        with smtplib.SMTP_SSL("127.0.0.1", port, timeout=10, context=context) as client:
            return client.sendmail("a@example.org", [DEFAULT_RCPT], "Subject: 465\r\n\r\nx")

    async with (
        running_bridge(config, clock) as (bridge, url),
        implicit_tls_listening(bridge) as (_, tls_port),
        httpx.AsyncClient() as http,
    ):
        assert await asyncio.to_thread(greeting, tls_port, first) == {}
        monkeypatch.setattr(smtp_module, "tls_context", slow)
        async with reloading(bridge, disk_back) as (reloads, _):
            reloads.put_nowait(str(renewed))
            started = time.monotonic()
            await asyncio.sleep(0.3)  # the reloader has read the file, is on the certificate
            answer = await http.get(f"{url}/healthz", timeout=30)
            # On the loop, the read held everything for its 8 s; 4 s leaves a loaded
            # machine its slowness.
            assert answer.status_code == 200 and time.monotonic() - started < 4
            assert bridge.smtp_handler.smtp.tls_cert == files[0][0]  # not applied yet
            disk_back.set()
            for _ in range(200):
                if bridge.smtp_handler.smtp.tls_cert == files[1][0]:
                    break
                await asyncio.sleep(0.05)
            assert bridge.smtp_handler.smtp.tls_cert == files[1][0] and bridge.last_reload_ok
            assert await asyncio.to_thread(greeting, tls_port, second) == {}
            with pytest.raises(ssl.SSLCertVerificationError):
                await asyncio.to_thread(greeting, tls_port, first)


async def test_a_stop_does_not_wait_for_a_reload_whose_file_hangs(
    tmp_path, clock: ManualClock, sandbox_url: str, monkeypatch
) -> None:
    """SIGTERM while a SIGHUP's read hangs: the stop waited for the read's bound (10 s,
    Docker's whole grace), then applied the file on its way out. It ends at once now,
    the running config untouched."""
    config = bridge_config(tmp_path, sandbox_url)
    path = write_config(tmp_path, f'[store]\npath = "{config.store.path}"\n', "reloaded.toml")
    mount_back = hung_config_reads(monkeypatch)
    async with running_bridge(config, clock) as (bridge, _):
        running = bridge.config
        async with reloading(bridge, mount_back) as (reloads, reloader):
            reloads.put_nowait(str(path))
            await asyncio.sleep(0.1)  # the reloader takes the SIGHUP and starts reading
            bridge.stop.set()
            await asyncio.wait_for(asyncio.shield(reloader), timeout=3)
            assert bridge.config is running  # nothing applied


async def test_a_sighup_brings_its_secrets_to_a_mail_templates_note(
    tmp_path, clock: ManualClock, sandbox_url: str, caplog
) -> None:
    """A mail template's note quotes the mail (the field it lacked, here the body) masked
    with the config's secrets. A SIGHUP that adds a token masks it there too: the SMTP
    handler takes the reload's secrets beside its certificate read off the loop (two
    branches' arguments to one call), not only the secrets it started with."""
    smtp = with_smtp('compose = "template"\ntemplate = "{{ subject }}: {{ headers[body] }}"')
    added = "rotated-token-0123456789abcdef"
    config = bridge_config(tmp_path, sandbox_url, smtp)
    path = write_config(
        tmp_path,
        f'[store]\npath = "{config.store.path}"\n[provider]\nbase_url = "{sandbox_url}/api/v1"'
        f'\napi_key = "test-key"\n{smtp}[tokens.ops]\ntoken = "{added}"\nscopes = ["read"]\n',
        "reloaded.toml",
    )
    mail = EmailMessage()
    mail["From"] = "nas@example.org"
    mail["Subject"] = "Backup failed"
    mail.set_content(f"key {added}")
    async with running_bridge(config, clock) as (bridge, _), smtp_listening(bridge) as port:
        async with reloading(bridge, threading.Event()) as (reloads, _):
            reloads.put_nowait(str(path))
            for _ in range(200):  # the reloader reads the file off the loop
                if bridge.config.tokens:
                    break
                await asyncio.sleep(0.05)
            assert bridge.config.tokens and bridge.last_reload_ok
            sent = await asyncio.to_thread(
                send, port, "nas@example.org", [DEFAULT_RCPT], mail.as_bytes()
            )
            assert sent == {}
        [stored] = await bridge.store.query(limit=1)
        notes = [e["detail"] for e in await bridge.store.events(stored.id) if e["detail"]]
    assert notes == ["the template printed as empty what the mail lacks: key ***"]
    assert added not in caplog.text
