"""Operations: SIGHUP reload, retry and purge, metrics, masked logs, the service unit."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import smtplib
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

from bridge.clock import ManualClock
from bridge.config import StoreConfig
from bridge.models import NewMessage, State
from bridge.ops.probe import WRITE_PROOF_AGE
from bridge.provider.sandbox import SandboxState
from bridge.store import open_store
from tests.helpers import bridge_config, pump, running_bridge
from tests.processes import ANY_PORT, clean_env, process, run_command, wait_for
from tests.stores import faulty_store, seed

pytestmark = pytest.mark.slow
HOOK = "route-token-0123456789abcdef"


def _config(db: str, routes: str, smtp_listen: str = ANY_PORT) -> str:
    """Listeners on port 0: each test reads the ports the process announces."""
    return textwrap.dedent(f"""
        [http]
        listen = "{ANY_PORT}"
        [smtp]
        listen = "{smtp_listen}"
        [store]
        path = "{db}"
        [groups]
        oncall = ["+12025550101"]
    """) + textwrap.dedent(routes)


def test_sighup_reloads_routes_without_dropping_connections(tmp_path) -> None:
    path = tmp_path / "bridge.toml"
    db = str(tmp_path / "bridge.db")
    path.write_text(
        _config(
            db,
            """
        [routes.first]
        format = "generic"
        to = ["oncall"]
    """,
        )
    )
    with process(
        ["serve", "--config", str(path)], tmp_path, clean_env(), tmp_path / "serve.log"
    ) as proc:
        url, smtp_port = proc.url(), proc.port("SMTP")
        wait_for(lambda: httpx.get(f"{url}/healthz").status_code == 200)
        smtp = smtplib.SMTP("127.0.0.1", smtp_port, timeout=10)
        smtp.ehlo("before-reload")
        assert httpx.post(f"{url}/hooks/second", json={"message": "x"}).status_code == 404
        path.write_text(
            _config(
                db,
                """
            [routes.second]
            format = "generic"
            to = ["oncall"]
        """,
            )
        )
        proc.send_signal(signal.SIGHUP)
        wait_for(
            lambda: httpx.post(f"{url}/hooks/second", json={"message": "y"}).status_code == 202,
            what="the new route",
        )
        assert httpx.post(f"{url}/hooks/first", json={"message": "z"}).status_code == 404
        # The SMTP session opened before the reload carries on.
        assert (
            smtp.sendmail(
                "a@example.org", ["oncall@sms.localhost"], "Subject: still here\r\n\r\nx\r\n"
            )
            == {}
        )
        smtp.quit()
        path.write_text("[provider\n")  # a broken file: the running config stays
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload refused" in (tmp_path / "serve.log").read_text())
        assert httpx.post(f"{url}/hooks/second", json={"message": "w"}).status_code == 202
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0


def test_a_file_nested_too_deeply_is_refused_not_the_end_of_the_bridge(tmp_path) -> None:
    """Arrays nested a few hundred deep made tomllib overflow Python's stack: a traceback
    from check-config, and a SIGHUP on such a file ended the running bridge (its
    reloader's error took the whole task group down). A config problem now, like any."""
    path = tmp_path / "bridge.toml"
    db = str(tmp_path / "bridge.db")
    path.write_text(_config(db, '[routes.am]\nformat = "generic"\nto = ["oncall"]\n'))
    deep = _config(db, "") + "[routes.am]\nto = " + "[" * 1000 + "]" * 1000 + "\n"
    with process(
        ["serve", "--config", str(path)], tmp_path, clean_env(), tmp_path / "serve.log"
    ) as proc:
        url = proc.url()
        path.write_text(deep)
        checked = run_command(["check-config", str(path)], tmp_path, clean_env())
        assert checked.returncode == 78 and "Traceback" not in checked.stderr, checked.stderr
        assert "nested too deeply" in checked.stderr
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload refused" in proc.output(), what="the refusal")
        assert "nested too deeply" in proc.output() and "Traceback" not in proc.output()
        assert httpx.post(f"{url}/hooks/am", json={"message": "x"}).status_code == 202
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0


def _reload_gauges(url: str) -> dict[str, float]:
    """`sms_bridge_config_last_reload_*` as /metrics says them now, by the name's end."""
    text = httpx.get(f"{url}/metrics").text
    found = re.findall(r"^sms_bridge_config_last_reload_(\w+) (\S+)$", text, re.MULTILINE)
    return {name: float(value) for name, value in found}


def test_metrics_say_whether_the_last_sighup_was_refused(tmp_path) -> None:
    """SIGHUP has no answer (`systemctl reload` exits 0 whatever the bridge made of the
    file): a refused config showed only as a log line, so nothing could alert on it."""
    path = tmp_path / "bridge.toml"
    good = _config(str(tmp_path / "bridge.db"), "")
    path.write_text(good)
    log = tmp_path / "serve.log"

    def gauges() -> dict[str, float]:
        return _reload_gauges(url)

    with process(["serve", "--config", str(path)], tmp_path, clean_env(), log) as proc:
        url = proc.url()
        wait_for(lambda: httpx.get(f"{url}/healthz").status_code == 200)
        started = gauges()
        assert started["successful"] == 1 and started["success_timestamp_seconds"] > 0
        path.write_text("[provider\n")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload refused" in log.read_text(), what="the refusal")
        assert gauges() == {**started, "successful": 0}
        _reloaded(proc, log, path, good)
        after = gauges()
        assert after["successful"] == 1
        assert after["success_timestamp_seconds"] > started["success_timestamp_seconds"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0


def _run(tmp_path, *args: str) -> subprocess.CompletedProcess[str]:
    env = clean_env(SMS_BRIDGE_STORE_PATH=str(tmp_path / "ops.db"))
    return run_command([*args], tmp_path, env)


def _seed(tmp_path, rows: list[tuple[State, float]]) -> list[int]:
    async def seeded() -> list[int]:
        store = open_store(StoreConfig(path=str(tmp_path / "ops.db")))
        await store.open()
        ids = []
        for state, created in rows:
            message = NewMessage(
                "+12025550143", f"m{len(ids)}", "http", "SMS", 1, 1, state=state, reason="seeded"
            )
            ids += await seed(store, [message], created)
        await store.close()
        return ids

    return asyncio.run(seeded())


def test_retry_and_purge_commands(tmp_path) -> None:
    import time

    now = time.time()
    old = now - 40 * 86400
    ids = _seed(
        tmp_path,
        [
            (State.FAILED, now),
            (State.FAILED, now),
            (State.QUEUED, now),
            (State.SUPPRESSED, old),
            (State.FAILED, old),
            (State.QUEUED, old),
        ],
    )
    one = _run(tmp_path, "retry", str(ids[0]), str(ids[2]), "999")
    assert one.returncode == 1  # ids[2] was not failed, 999 is no message
    assert f"queued again: {ids[0]}" in one.stdout
    assert f"not failed (left alone): {ids[2]} (queued)\nno such message: 999\n" in one.stderr
    rest = _run(tmp_path, "retry", "--failed")
    assert rest.returncode == 0 and f"{ids[1]}" in rest.stdout
    purge = _run(tmp_path, "purge", "--older-than", "30d")
    assert purge.returncode == 0 and "purged 1 messages" in purge.stdout  # the old suppressed
    listed = _run(tmp_path, "messages", "--json", "--limit", "100")
    states = sorted(re.findall(r'"state": "(\w+)"', listed.stdout))
    # retried: ids 0, 1 and the old failed one (4); queued 2 and 5 untouched; 3 purged
    assert states == ["queued"] * 5
    assert _run(tmp_path, "purge", "--older-than", "soon").returncode == 2
    assert "m0" in _run(tmp_path, "messages", "--status", "queued", "--json").stdout
    assert _run(tmp_path, "messages", "--reason", "storm", "--json").stdout.strip() == "[]"


@pytest.mark.usefixtures("backend")
async def test_metrics_after_a_known_sequence(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """/metrics, /api/v1/stats and the routes page after a known sequence, on each store
    backend: the figures come from running totals kept by the store, the routes' last
    messages from a lookup per configured route."""
    route = f'[routes.am]\nformat = "generic"\nto = ["+12025550144"]\ntoken = "{HOOK}"\n'
    config = bridge_config(tmp_path, sandbox_url, route)
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        # The second "one" is a duplicate (after "two" it would be news: a flap back).
        for text in ("one", "one", "two"):
            await http.post(f"{url}/api/v1/messages", json={"to": "+12025550143", "message": text})
        hooked = await http.post(
            f"{url}/hooks/am", json={"message": "hook"}, headers={"Authorization": f"Bearer {HOOK}"}
        )
        assert hooked.status_code == 202, hooked.text
        before = (await http.get(f"{url}/metrics")).text
        assert 'sms_bridge_messages{source="http",state="queued"} 2.0' in before
        assert 'sms_bridge_messages{source="hook",state="queued"} 1.0' in before
        assert "sms_bridge_queue_depth 3.0" in before
        [last] = (await http.get(f"{url}/ui/routes.json")).json()["routes"]
        assert last["last_message"]["id"] == hooked.json()["ids"][0]
        assert last["last_message"]["state"] == "queued"

        async def sent() -> bool:
            return (await bridge.store.counts()).get("queued", 0) == 0

        await pump(bridge, clock, sent, max_seconds=60)
        after = (await http.get(f"{url}/metrics")).text
        stats = (await http.get(f"{url}/api/v1/stats")).json()
        # Retention takes the finished messages out of the counts, not out of "sent". A
        # later message stays (SQLite keeps its newest row anyway: ids never go back).
        before_purge = clock.now() + 1
        clock.advance(60)
        await http.post(f"{url}/api/v1/messages", json={"to": "+12025550145", "message": "later"})
        assert await bridge.store.purge(before_purge) == 4
        purged = (await http.get(f"{url}/metrics")).text
        purged_stats = (await http.get(f"{url}/api/v1/stats")).json()
        gone = (await http.get(f"{url}/ui/routes/am.json")).json()["last_message"]
    assert 'sms_bridge_messages_by_reason{reason="duplicate",state="suppressed"} 1.0' in after
    assert 'sms_bridge_provider_requests_total{endpoint="send",outcome="success"} 3.0' in after
    assert 'sms_bridge_provider_request_seconds_count{endpoint="send"} 3.0' in after
    assert "sms_bridge_sms_parts_sent 3.0" in after
    assert "sms_bridge_cost_sent 1.5" in after
    assert "sms_bridge_provider_ready 1.0" in after
    assert re.search(r"sms_bridge_rate_budget_left \d+", after)
    # Counts since start, typed so: rate() reads them across a restart.
    assert "# TYPE sms_bridge_store_commits_total counter" in after
    commits = float(re.search(r"^sms_bridge_store_commits_total (\S+)", after, re.M).group(1))
    written = re.search(r"^sms_bridge_store_writes_committed_total (\S+)", after, re.M)
    writes = float(written.group(1))
    assert 3 <= commits <= writes  # three ingests at least, each written and committed
    assert stats["states"] == {"sent": 3, "suppressed": 1} or stats["states"] == {
        "delivered": 3,
        "suppressed": 1,
    }
    assert stats["reasons"] == {"suppressed": {"duplicate": 1}}
    assert "sms_bridge_sms_parts_sent 3.0" in purged and "sms_bridge_cost_sent 1.5" in purged
    assert 'sms_bridge_messages{source="http",state="queued"} 1.0' in purged
    assert purged.count("sms_bridge_messages{") == 1
    assert "sms_bridge_messages_by_reason{" not in purged
    assert purged_stats == {"states": {"queued": 1}, "reasons": {}} and gone is None


def committed(scraped: str) -> float:
    found = re.search(r"^sms_bridge_store_commits_total (\S+)$", scraped, re.MULTILINE)
    assert found is not None, scraped
    return float(found.group(1))


@pytest.mark.usefixtures("backend")
async def test_scrapes_write_to_the_store_once_a_minute_at_most(
    tmp_path, sandbox_url: str, clock: ManualClock
) -> None:
    """Each scrape of /metrics rewrote the heartbeat row (and each /readyz): every 15 s
    from each Prometheus server, a commit and a WAL record (on PostgreSQL, one row every
    instance of a cluster rewrote). A scrape now takes a write that went through in the
    last minute as its proof, /readyz's too; /readyz still writes every time."""
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (_, url), httpx.AsyncClient() as http:
        first = committed((await http.get(f"{url}/metrics")).text)  # none yet: it writes
        for _ in range(5):
            clock.advance(WRITE_PROOF_AGE / 6)
            again = (await http.get(f"{url}/metrics")).text
            assert "\nsms_bridge_store_up 1.0\n" in again
            assert committed(again) == first, "a scrape wrote"
        clock.advance(WRITE_PROOF_AGE / 6)  # a minute since the write: the next one writes
        assert committed((await http.get(f"{url}/metrics")).text) == first + 1
        clock.advance(WRITE_PROOF_AGE - 1)
        assert (await http.get(f"{url}/readyz")).status_code == 200  # a write of its own
        assert (await http.get(f"{url}/readyz")).status_code == 200  # and another
        clock.advance(WRITE_PROOF_AGE - 1)  # two minutes since the scrape's write
        assert committed((await http.get(f"{url}/metrics")).text) == first + 3


@pytest.mark.usefixtures("backend")
async def test_readyz_asked_by_many_at_once_writes_once_at_a_time(
    tmp_path, sandbox_url: str, clock: ManualClock
) -> None:
    """Anyone may ask /readyz, and each call was a transaction of its own: on PostgreSQL
    a flood of them queued on the heartbeat row's lock (every instance's) and took the
    pool's connections from the ingests. Callers that ask while a write is under way now
    share it, each still answered by a write. (SQLite's writer already commits the
    writes queued together as one transaction.)"""
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        await http.get(f"{url}/readyz")  # every connection of the client open
        before = bridge.store.stats().transactions
        answers = await asyncio.gather(*(http.get(f"{url}/readyz") for _ in range(20)))
        assert [a.status_code for a in answers] == [200] * 20
        assert bridge.store.stats().transactions - before <= 10  # 20 before


async def test_metrics_answer_with_the_store_down_and_say_so(
    tmp_path, sandbox_url: str, clock: ManualClock
) -> None:
    """A store that refuses writes (a full disk; PostgreSQL gone: tests/test_pg_pool.py)
    made /metrics either a 503, which Prometheus reads as the bridge down and which hid
    provider_ready and the rest, or (reads still working) figures with nothing wrong.
    Now the scrape answers `sms_bridge_store_up 0` and the process's own figures, once
    the last write that went through is a minute old (a scrape writes once a minute)."""
    config = bridge_config(tmp_path, sandbox_url)
    store = faulty_store(config)
    async with running_bridge(config, clock, store) as (_, url), httpx.AsyncClient() as http:
        up = await http.get(f"{url}/metrics")
        assert up.status_code == 200
        assert "\nsms_bridge_store_up 1.0\n" in up.text and "sms_bridge_queue_depth" in up.text
        store.disk_full()
        clock.advance(WRITE_PROOF_AGE)  # the scrape's write above proves nothing any more
        down = await http.get(f"{url}/metrics")
        assert down.status_code == 200, down.text
        assert "\nsms_bridge_store_up 0.0\n" in down.text
        assert "sms_bridge_provider_ready 1.0" in down.text  # what still holds, still said
        assert "sms_bridge_queue_depth" not in down.text  # no figure the store did not give
        store.fail_commits(None)
        assert "\nsms_bridge_store_up 1.0\n" in (await http.get(f"{url}/metrics")).text


def test_secrets_from_the_config_are_masked_in_serves_log(tmp_path) -> None:
    """The secrets come from the config, as an operator writes them, and reach the log
    through lines `serve` writes anyway: the SMTP password doubles as the mail domain,
    the route token as the store's file name. Nothing here hands the logger a list."""
    password, token = "smtp-password-for-ups.example.org", "route-token-0123456789abcdef"
    path, log = tmp_path / "bridge.toml", tmp_path / "serve.log"
    path.write_text(
        textwrap.dedent(f"""
        [http]
        listen = "{ANY_PORT}"
        [smtp]
        listen = "{ANY_PORT}"
        domains = ["{password}"]
        users = {{ups = "{password}"}}
        [store]
        path = "{tmp_path / token}.db"
        [log]
        format = "json"
        [routes.am]
        format = "generic"
        to = ["+12025550143"]
        token = "{token}"
    """)
    )
    path.chmod(0o600)
    with process(["serve", "--config", str(path)], tmp_path, clean_env(), log) as proc:
        proc.address("SMTP")
        wait_for(lambda: "requests/minute" in log.read_text(), what="the store line")
        proc.terminate()
        assert proc.wait(timeout=15) == 0
    text = log.read_text()
    assert password not in text and token not in text
    assert "for ***" in text and "***.db" in text  # the lines were written, masked


def test_a_password_in_the_providers_url_is_masked_by_check_config_and_serve(
    tmp_path,
) -> None:
    """`provider.base_url = "https://user:PASSWORD@proxy/api/v1"` (a proxy that asks for
    basic auth; httpx sends it) was printed whole by `check-config` and logged whole by
    `serve` ("provider https://user:PASSWORD@..."), where store.url's is masked. Now the
    same: the address shown, its password as ***."""
    password = "provider-proxy-password-0123"
    with socket.socket() as closed:  # a provider that is not there: serve starts anyway
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    env = clean_env(
        SMS_BRIDGE_PROVIDER_BASE_URL=f"http://ops:{password}@127.0.0.1:{port}/api/v1",
        SMS_BRIDGE_PROVIDER_API_KEY="provider-api-key-0123456789",
        SMS_BRIDGE_HTTP_LISTEN=ANY_PORT,
        SMS_BRIDGE_SMTP_LISTEN="",
        SMS_BRIDGE_STORE_PATH=str(tmp_path / "bridge.db"),
    )
    checked = run_command(["check-config"], tmp_path, env)
    assert checked.returncode == 0, checked.stderr
    assert password not in checked.stdout + checked.stderr
    assert f'"base_url": "http://ops:***@127.0.0.1:{port}/api/v1"' in checked.stdout
    log = tmp_path / "serve.log"
    with process(["serve"], tmp_path, env, log) as proc:
        proc.address("HTTP")
        wait_for(lambda: "requests/minute" in log.read_text(), what="the store line")
        proc.terminate()
        assert proc.wait(timeout=15) == 0
    text = log.read_text()
    assert password not in text and f"provider http://ops:***@127.0.0.1:{port}" in text


def _reloaded(proc, log: Path, path: Path, text: str) -> str:
    """Write `text` as the config, SIGHUP, wait for the reload; the log lines it wrote."""
    before = log.read_text()
    path.write_text(text)
    proc.send_signal(signal.SIGHUP)
    wait_for(
        lambda: (
            log.read_text().count("configuration reloaded") > before.count("configuration reloaded")
        ),
        what="the reload",
    )
    return log.read_text()[len(before) :]


def _smtp_config(db: str, smtp: str, http: str = "", smtp_listen: str = ANY_PORT) -> str:
    return (
        _config(db, "", smtp_listen)
        .replace("[smtp]\n", "[smtp]\n" + textwrap.dedent(smtp))
        .replace("[http]\n", "[http]\n" + textwrap.dedent(http))
    )


def _mail(size: int = 0) -> str:
    return "Subject: reload\r\n\r\n" + ("x" * 58 + "\r\n") * (size // 60) + "body\r\n"


def test_sighup_names_a_secret_file_the_new_config_reads_if_anyone_may_read_it(
    open_tmp,
) -> None:
    """A reload is a start for the files it reads: a route token moved to a file every
    user may read is named as at start ("reload: ..."), before the line that ends it."""
    tree = open_tmp / "etc"
    tree.mkdir()
    tree.chmod(0o755)
    path, log, db = tree / "bridge.toml", tree / "serve.log", str(tree / "bridge.db")
    token = tree / "am.token"
    token.write_text("route-token-from-a-file-0123")
    token.chmod(0o644)
    route = '[routes.am]\nformat = "generic"\nto = ["oncall"]\n'
    path.write_text(_config(db, route + 'token = "route-token-inline-0123456"\n'))
    path.chmod(0o600)
    with process(["serve", "--config", str(path)], tree, clean_env(), log) as proc:
        url = proc.url()
        wait_for(lambda: httpx.get(f"{url}/healthz").status_code == 200)
        assert "readable by every user" not in log.read_text()
        reloaded = _reloaded(proc, log, path, _config(db, route + f'token_file = "{token}"\n'))
        named = f"reload: routes.am.token_file: {token} is readable by every user"
        assert named in reloaded, reloaded
        token.chmod(0o600)
        again = _reloaded(proc, log, path, _config(db, route + f'token_file = "{token}"\n'))
        assert "readable by every user" not in again, again


def test_sighup_applies_smtp_auth_users_networks_sizes_and_limits(tmp_path) -> None:
    path, log = tmp_path / "bridge.toml", tmp_path / "serve.log"
    db = str(tmp_path / "bridge.db")
    path.write_text(_smtp_config(db, ""))
    rcpt = ["oncall@sms.localhost"]
    with process(["serve", "--config", str(path)], tmp_path, clean_env(), log) as proc:
        url, smtp_port = proc.url(), proc.port("SMTP")
        wait_for(lambda: httpx.get(f"{url}/healthz").status_code == 200)
        earlier = smtplib.SMTP("127.0.0.1", smtp_port, timeout=10)
        earlier.ehlo("before-reload")
        assert httpx.get(f"{url}/healthz", headers={"X-Pad": "a" * 3000}).status_code == 200
        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=10) as client:
            assert client.sendmail("a@example.org", rcpt, _mail(3000)) == {}

        _reloaded(
            proc,
            log,
            path,
            _smtp_config(
                db,
                """
                require_auth = true
                auth_allow_plaintext = true
                users = {ups = "first-password-0123"}
                max_message_bytes = 2000
                max_sessions_per_client = 3
                """,
                "max_header_bytes = 2048\n",
            ),
        )
        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=10) as client:
            client.ehlo("after")
            assert client.mail("a@example.org")[0] == 530  # require_auth, for new sessions
            client.login("ups", "first-password-0123")
            assert client.mail("a@example.org")[0] == 250
            client.rcpt(rcpt[0])
            assert client.data(_mail(3000))[0] == 552  # max_message_bytes
            client.rset()
            assert client.sendmail("a@example.org", rcpt, _mail()) == {}
        # require_auth reaches the session opened before the reload too, at its next MAIL
        # (it carried on texting anonymously); its sizes and limits stay those it began with.
        assert earlier.mail("a@example.org")[0] == 530
        # max_sessions_per_client: `earlier` and two more, then 421.
        more = [smtplib.SMTP("127.0.0.1", smtp_port, timeout=10) for _ in range(2)]
        with socket.create_connection(("127.0.0.1", smtp_port), timeout=10) as refused:
            assert refused.makefile("rb").readline().startswith(b"421 4.7.0 too many sessions")
        for client in [*more, earlier]:
            client.quit()
        response = httpx.get(f"{url}/healthz", headers={"X-Pad": "a" * 3000})
        assert response.status_code == 431  # http.max_header_bytes, for new connections

        _reloaded(
            proc,
            log,
            path,
            _smtp_config(
                db,
                """
                require_auth = true
                auth_allow_plaintext = true
                users = {ups = "second-password"}
                allowed_networks = ["192.0.2.0/24"]
                """,
            ),
        )
        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=10) as client:
            with pytest.raises(smtplib.SMTPAuthenticationError):
                client.login("ups", "first-password-0123")  # users replaced
            client.login("ups", "second-password")
            code, text = client.mail("a@example.org")
            assert code == 550 and b"127.0.0.1 is not allowed" in text  # allowed_networks

        moved = _reloaded(
            proc,
            log,
            path,
            _smtp_config(db, "", smtp_listen="127.0.0.1:1") + '[log]\nlevel = "debug"\n',
        )
        assert "reload: smtp.listen changed but needs a restart" in moved
        assert "reload: log changed but needs a restart" in moved
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    assert "Traceback" not in log.read_text()


def _issue_cert(ca, folder: Path) -> tuple[str, str]:
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(folder / "cert.pem")
    cert.private_key_pem.write_to_path(folder / "key.pem")
    return str(folder / "cert.pem"), str(folder / "key.pem")


def test_sighup_applies_tls_settings_and_keeps_a_certificate_that_loads(tmp_path) -> None:
    import ssl

    import trustme

    smtp_port = tls_port = 0  # known once the process announces them
    path, log = tmp_path / "bridge.toml", tmp_path / "serve.log"
    db = str(tmp_path / "bridge.db")
    path.write_text(_smtp_config(db, ""))
    first_ca, second_ca = trustme.CA(), trustme.CA()
    rcpt = ["oncall@sms.localhost"]

    def trusting(ca) -> ssl.SSLContext:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        return context

    def starttls(ca) -> dict:
        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=10) as client:
            client.starttls(context=trusting(ca))
            return client.sendmail("a@example.org", rcpt, _mail())

    def implicit(ca) -> dict:
        with smtplib.SMTP_SSL("127.0.0.1", tls_port, timeout=10, context=trusting(ca)) as client:
            return client.sendmail("a@example.org", rcpt, _mail())

    with process(["serve", "--config", str(path)], tmp_path, clean_env(), log) as proc:
        url, smtp_port = proc.url(), proc.port("SMTP")
        wait_for(lambda: httpx.get(f"{url}/healthz").status_code == 200)
        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=10) as client:
            client.ehlo("x")
            assert not client.has_extn("starttls")
        cert, key = _issue_cert(first_ca, tmp_path)
        tls = f'tls_cert = "{cert}"\ntls_key = "{key}"\n'
        _reloaded(proc, log, path, _smtp_config(db, tls))
        assert starttls(first_ca) == {}  # STARTTLS offered from the next session on
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0

    # Implicit TLS from the start, then the certificate renewed in place (same paths).
    tls += f'tls_listen = "{ANY_PORT}"\n'
    path.write_text(_smtp_config(db, tls))
    with process(["serve", "--config", str(path)], tmp_path, clean_env(), log) as proc:
        url, smtp_port, tls_port = proc.url(), proc.port("SMTP"), proc.port("SMTPS")
        wait_for(lambda: httpx.get(f"{url}/healthz").status_code == 200)
        assert implicit(first_ca) == {}
        _issue_cert(second_ca, tmp_path)
        _reloaded(proc, log, path, _smtp_config(db, tls))
        assert starttls(second_ca) == {} and implicit(second_ca) == {}
        with pytest.raises(ssl.SSLCertVerificationError):
            implicit(first_ca)
        assert _reload_gauges(url)["successful"] == 1
        Path(cert).write_text("not a certificate\n")
        lines = _reloaded(proc, log, path, _smtp_config(db, tls))
        assert "reload: smtp.tls_cert: cannot load, the previous certificate stays" in lines
        assert starttls(second_ca) == {} and implicit(second_ca) == {}
        # Kept, as it should be, but a failed part of the reload: it counted as a success,
        # and nothing could alert on a renewal that never took.
        assert _reload_gauges(url)["successful"] == 0
        assert "reload failed in part: 1 certificate(s) did not load" in lines
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    assert "Traceback" not in log.read_text()


@pytest.mark.slow  # runs serve as a process
def test_smtp_over_implicit_tls_alone_is_served(tmp_path) -> None:
    """`smtp.listen = ""` with `smtp.tls_listen` set (only implicit TLS offered, a setup
    that keeps every mail encrypted) passed check-config, and serve bound no SMTP at
    all: the TLS port was bound only beside the plain one. It is served alone now, and
    a mail sent over it is stored."""
    import ssl

    import trustme

    path, log = tmp_path / "bridge.toml", tmp_path / "serve.log"
    ca = trustme.CA()
    cert, key = _issue_cert(ca, tmp_path)
    tls = f'tls_listen = "{ANY_PORT}"\ntls_cert = "{cert}"\ntls_key = "{key}"\n'
    path.write_text(_smtp_config(str(tmp_path / "bridge.db"), tls, smtp_listen=""))
    assert run_command(["check-config", str(path)], tmp_path, clean_env()).returncode == 0
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with process(["serve", "--config", str(path)], tmp_path, clean_env(), log) as proc:
        url, tls_port = proc.url(), proc.port("SMTPS")
        with smtplib.SMTP_SSL("127.0.0.1", tls_port, timeout=10, context=context) as client:
            assert client.sendmail("a@example.org", ["oncall@sms.localhost"], _mail()) == {}
        messages = httpx.get(f"{url}/api/v1/messages").json()["messages"]
        assert [(m["recipient"], m["source"]) for m in messages] == [("+12025550101", "smtp")]
        assert "SMTP listening" not in log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0


def test_a_line_break_sent_in_a_mail_header_cannot_forge_a_log_line(tmp_path) -> None:
    """An encoded word decodes to any character, CR and LF included, and the header's
    value reaches the log (`mail stored as suppressed (...)`): in the human format the
    line break is escaped, so the sender's text stays inside the bridge's line."""
    forged = "2026-01-01 00:00:00,000 WARNING bridge: forged"
    text = _log_of_a_mail_auto_submitted(tmp_path, f"auto-replied=0D=0A{forged.replace(' ', '_')}")
    [line] = [line for line in text.splitlines() if "stored as suppressed" in line]
    assert line.endswith(f"auto-replied\\r\\n{forged.lower()})): 1")
    assert not any(line.startswith(forged.split(",")[0]) for line in text.splitlines())


def _log_of_a_mail_auto_submitted(tmp_path: Path, encoded: str, fmt: str = "human") -> str:
    """serve's log (`fmt`) once a mail whose Auto-Submitted header is the encoded word
    `encoded` (q-encoding, utf-8) was stored: suppressed, the header's value in the log
    line."""
    header = f"Auto-Submitted: =?utf-8?q?{encoded}?="
    return _log_of_a_mail(tmp_path, header, f'[log]\nformat = "{fmt}"\n', "stored as suppressed")


def _log_of_a_mail(tmp_path: Path, header: str, config: str, until: str) -> str:
    """serve's log (`config` added to its own) once a mail with `header` was sent and a
    line holding `until` written."""
    path, log = tmp_path / "bridge.toml", tmp_path / "serve.log"
    path.write_text(_config(str(tmp_path / "bridge.db"), config))
    mail = f"From: ups@example.org\r\nSubject: on battery\r\n{header}\r\n\r\nbody\r\n"
    with process(["serve", "--config", str(path)], tmp_path, clean_env(), log) as proc:
        with smtplib.SMTP("127.0.0.1", proc.port("SMTP"), timeout=10) as smtp:
            smtp.sendmail("ups@example.org", ["+12025550101@sms.localhost"], mail)
        wait_for(lambda: until in log.read_text(), what="the log line")
        proc.terminate()
        assert proc.wait(timeout=15) == 0
    return log.read_text()


def test_an_escape_sequence_sent_in_a_mail_header_is_not_written_to_the_log_raw(
    tmp_path,
) -> None:
    """The same header, carrying ESC [2J and the 8-bit CSI (U+009B) instead of a line
    break: written raw, `tail -f` or `docker logs` ran them in the reader's terminal
    (cleared the screen, recoloured or hid what came before)."""
    text = _log_of_a_mail_auto_submitted(tmp_path, "auto-replied=1B[2J=C2=9B8m")
    assert "\x1b" not in text and "\x9b" not in text
    [line] = [line for line in text.splitlines() if "stored as suppressed" in line]
    # ESC [2J and the 8-bit CSI's [8m taken out whole by the mail's decoding
    assert "(Auto-Submitted: auto-replied)" in line, line


@pytest.mark.parametrize("fmt", ["human", "json"])
def test_a_bidi_override_sent_in_a_mail_header_is_escaped_in_the_log(tmp_path, fmt) -> None:
    """The same header, carrying RLO (U+202E) and RLI (U+2067): written raw, a terminal
    drew the rest of the line reversed, and `tail -f` showed another reason than the
    bridge wrote ("Trojan Source"). Escaped as the C0 and C1 controls are, in both
    formats; an RLM (U+200F), which reorders no letter, stays as written."""
    text = _log_of_a_mail_auto_submitted(
        tmp_path, f"auto-replied=E2=80=AEx=E2=81=A7y=E2=80=8F{fmt}", fmt
    )
    assert "\u202e" not in text and "\u2067" not in text, ascii(text)
    [line] = [line for line in text.splitlines() if "stored as suppressed" in line]
    if fmt == "json":  # escaped in the JSON: read back, the message is as the sender wrote it
        assert "auto-replied\\u202ex\\u2067y\u200fjson" in line, ascii(line)
        assert "auto-replied\u202ex\u2067y\u200fjson" in json.loads(line)["message"]
    else:
        assert "(Auto-Submitted: auto-replied\\u202ex\\u2067y\u200fhuman)" in line, ascii(line)


def test_a_secret_across_the_cut_of_a_past_schedule_is_masked_whole_in_the_log(tmp_path) -> None:
    """A mail whose X-SMS-Schedule has passed is sent now, its header quoted in the log
    cut to 40 characters. Fraction digits are any number, so the header can carry a
    secret of digits (here a token): cut first, the log's mask met only its first part,
    and wrote it. Masked before the cut, the token is `***` whole."""
    token = "90817263544536271809"  # a configured secret of digits alone
    tokens = f'[tokens.ops]\ntoken = "{token}"\nscopes = ["read"]\n'
    header = "2020-01-01T00:00:00." + "1" * 15 + token  # the token spans characters 36-55
    text = _log_of_a_mail(tmp_path, f"X-SMS-Schedule: {header}", tokens, "has passed")
    [line] = [line for line in text.splitlines() if "has passed" in line]
    assert f"X-SMS-Schedule '{header.replace(token, '***')[:40]}' has passed" in line, line
    assert token[:4] not in line, line


# Fails on any alert (a label is text). A missing label's attribute no longer fails: it is
# missing too, as the label itself is.
BROKEN_TEMPLATE = "{{ alerts[0].labels.alertname + 1 }}"


def test_serve_and_sighup_refuse_a_template_check_config_refuses(tmp_path) -> None:
    """`check-config` renders each route's template against its format's sample and
    compiles every mail template; `serve` and a reload checked neither: they ran what
    check-config exits 1 on (each such alert then texted the format's default text), and
    a mail template that does not even compile passed all three."""
    path, log, db = tmp_path / "bridge.toml", tmp_path / "serve.log", str(tmp_path / "b.db")
    good = '[routes.am]\nformat = "alertmanager"\nto = ["oncall"]\n'
    bad_route = good + f'template = "{BROKEN_TEMPLATE}"\n'
    mail = '[smtp]\ncompose = "template"\ntemplate = "{{ subject "\n'
    bad_mail = _config(db, good).replace("[smtp]\n", mail)
    rule = '[[smtp.rules]]\nsender = ["ups@*"]\ncompose = "template"\ntemplate = "{% if %}"\n'
    for text, key in (
        (_config(db, bad_route), "routes.am.template"),
        (bad_mail, "smtp.template"),
        (_config(db, good + rule), "smtp.rules: [0].template"),  # as rules are named
    ):
        (tmp_path / "check.toml").write_text(text)
        checked = run_command(["check-config", str(tmp_path / "check.toml")], tmp_path, clean_env())
        assert checked.returncode == 78 and f"  {key}: " in checked.stderr, checked.stderr
    path.write_text(_config(db, bad_route))
    refused = subprocess.run(
        [sys.executable, "-m", "bridge", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=20,  # it ran on, until killed here
        env=clean_env(),
        cwd=tmp_path,
    )
    assert refused.returncode == 78, refused.stderr
    assert "  routes.am.template: fails on a sample alertmanager payload" in refused.stderr
    assert "HTTP listening" not in refused.stderr and "Traceback" not in refused.stderr

    path.write_text(_config(db, good))
    with process(["serve", "--config", str(path)], tmp_path, clean_env(), log) as proc:
        url = proc.url()
        wait_for(lambda: httpx.get(f"{url}/healthz").status_code == 200)
        for text in (_config(db, bad_route), bad_mail):
            before = log.read_text().count("reload refused")
            path.write_text(text)
            proc.send_signal(signal.SIGHUP)
            wait_for(lambda b=before: log.read_text().count("reload refused") > b)
        assert "configuration reloaded" not in log.read_text()
        assert "routes.am.template" in log.read_text() and "smtp.template" in log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0


async def test_a_stop_during_a_step_finishes_the_request_under_way_only(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str, monkeypatch
) -> None:
    """A step sends batch after batch (texts of several alerts), each a request of up to
    the provider's timeouts. A stop waited for them all, and outlasted Docker's 10 s
    grace and the unit's TimeoutStopSec: SIGKILL cut a send, and only the provider's
    /logs told later that it went. Only the request under way is finished; the rest stay
    queued for the next start."""
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        for text in ("disk full", "ups on battery", "backup failed"):  # three batches
            answer = await http.post(
                f"{url}/api/v1/messages", json={"to": "+12025550143", "message": text}
            )
            assert answer.status_code == 202, answer.text
        stop = asyncio.Event()
        send = bridge.dispatcher.client.send

        async def send_then_stop(*args, **kwargs):  # SIGTERM while the first is in flight
            stop.set()
            return await send(*args, **kwargs)

        monkeypatch.setattr(bridge.dispatcher.client, "send", send_then_stop)
        await asyncio.wait_for(bridge.dispatcher.run(stop), timeout=30)
        counts = await bridge.store.counts()
        assert counts.get("queued", 0) == 2, counts
        assert len([r for r in sandbox_state.requests if r.path.endswith("/send")]) == 1

    # The next start sends the two left queued, and the first not again: each alert
    # reached the phone once (a stop that left them claimed, or claimed and unsent,
    # held them until a lease or /logs told, or sent one twice).
    async with running_bridge(config, clock) as (bridge, url):

        async def settled() -> bool:
            counts = await bridge.store.counts()
            return not counts.get("queued", 0) and not counts.get("sending", 0)

        await pump(bridge, clock, settled, max_seconds=600)
    sent = sorted(e.message for e in sandbox_state.entries)
    assert sent == ["backup failed", "disk full", "ups on battery"], sent


@pytest.mark.parametrize("reader", ["status poller", "reconciler"])
async def test_a_stop_cuts_a_slow_logs_read_short_and_loses_nothing(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str, reader: str
) -> None:
    """A stop waited for the status poller's or the reconciler's /logs read under way: a
    slow provider held it for the whole request timeout (60 s here), past Docker's 10 s
    grace, for a read whose loss costs nothing. The read is cut short now; the message
    stays as it was (`sent` waiting for its status, `sending` for its reconciliation)
    and the next start reads /logs for it, texting nothing twice."""
    from bridge.provider.sandbox.faults import Fault

    config = bridge_config(tmp_path, sandbox_url, timeout=60.0)
    answer = asyncio.Event()  # the provider's /logs answers only when the test lets it
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        posted = await http.post(
            f"{url}/api/v1/messages", json={"to": "+12025550143", "message": "disk full"}
        )
        assert posted.status_code == 202, posted.text
        [message] = posted.json()["messages"]
        if reader == "status poller":  # sent, its delivery state to read from /logs
            await pump(bridge, clock, lambda: sandbox_state.entries, max_seconds=600)
            expected = State.SENT
        else:  # claimed before a crash: its outcome to read from /logs before any resend
            now = clock.now()
            owner = bridge.dispatcher.owner
            assert await bridge.store.claim([message["id"]], now, owner=owner, lease_until=now)
            clock.advance(75)  # past its look: the claim + its call's 5 s + 60 s + 5 s
            expected = State.SENDING

        def reads() -> int:
            return len([r for r in sandbox_state.requests if r.path.endswith("/logs")])

        before = reads()
        sandbox_state.faults.append(Fault(status=0, hold=answer, path="/logs"))
        runner = asyncio.create_task(bridge.run())
        try:
            for _ in range(400):  # the read reached the provider, which says nothing yet
                if reads() > before:
                    break
                await asyncio.sleep(0.02)
            assert reads() > before, reader
            bridge.stop.set()
            # Before, the read held the stop until the provider's 60 s timeout.
            await asyncio.wait_for(runner, timeout=5)
        finally:
            answer.set()
            bridge.stop.set()
            await asyncio.wait({runner})
        stored = await bridge.store.get(message["id"])
        assert stored is not None and stored.state == expected, stored
    async with running_bridge(config, clock) as (bridge, url):  # the next start

        async def settled() -> bool:
            counts = await bridge.store.counts()
            return not counts.get("queued", 0) and not counts.get("sending", 0)

        await pump(bridge, clock, settled, max_seconds=600)
    assert [e.message for e in sandbox_state.entries] == ["disk full"]  # once, not lost
