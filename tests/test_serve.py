"""`sms-bridge serve` as a real process: defaults, signals, SIGKILL and restart."""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.processes import ANY_PORT, clean_env, free_port, process, run_command, wait_for

pytestmark = pytest.mark.slow
KEY = "crash-test-key"
UNIT = (Path(__file__).parent.parent / "systemd" / "sms-bridge.service").read_text()


def unit_lines(key: str) -> list[str]:
    """Every value the unit gives `key` (`ExecReload=` may come more than once)."""
    return re.findall(rf"^{key}=(.*)$", UNIT, re.MULTILINE)


def restarted_by_systemd(status: int) -> bool:
    """Whether `Restart=on-failure` starts the unit again after `serve` exits `status`."""
    assert unit_lines("Restart") == ["on-failure"]
    prevented = {int(s) for line in unit_lines("RestartPreventExitStatus") for s in line.split()}
    return status != 0 and status not in prevented


def test_serve_with_no_config_runs_on_the_sandbox_and_stops_on_sigterm(tmp_path) -> None:
    # The built-in defaults, as `check-config` reads them with no config anywhere ...
    checked = run_command(["check-config"], tmp_path, clean_env())
    assert checked.returncode == 0 and "built-in defaults: OK" in checked.stdout
    defaults = json.loads(checked.stdout[checked.stdout.index("{") :])
    assert defaults["http"]["listen"] == "127.0.0.1:8080"
    assert defaults["smtp"]["listen"] == "127.0.0.1:2525"
    assert defaults["provider"]["base_url"] == "" and defaults["store"]["path"] == "sms-bridge.db"
    # ... and `serve` on them, only the ports moved to free ones: other tests on this
    # machine may hold 8080 and 2525.
    log = tmp_path / "serve.log"
    env = clean_env(SMS_BRIDGE_HTTP_LISTEN=ANY_PORT, SMS_BRIDGE_SMTP_LISTEN=ANY_PORT)
    with process(["serve"], tmp_path, env, log) as proc:
        url = proc.url()
        assert proc.address("SMTP").startswith("127.0.0.1:")
        wait_for(lambda: httpx.get(f"{url}/healthz").status_code == 200, what="startup")
        response = httpx.post(
            f"{url}/api/v1/messages", json={"to": "+12025550143", "message": "first light"}
        )
        assert response.status_code == 202
        [mid] = response.json()["ids"]
        wait_for(
            lambda: httpx.get(f"{url}/api/v1/messages/{mid}").json()["state"] == "delivered",
            timeout=60,
            what="delivery",
        )
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert time.monotonic() - started < 10
    first_line = log.read_text().splitlines()[0]
    assert "sandbox" in first_line and "no SMS leaves this machine" in first_line
    assert (tmp_path / "sms-bridge.db").exists()


def test_bad_config_exits_78_before_opening_ports_and_systemd_leaves_it_stopped(
    tmp_path,
) -> None:
    """A refused config and a store out of reach both exited 1, so the unit's
    `Restart=on-failure` started a refused file again every 2.5 s for ever. A refused
    config is EX_CONFIG (78), which the unit does not restart; a store that is down at
    start is still 1, and restarted until it is back."""
    bad = tmp_path / "bad.toml"
    bad.write_text('[http]\nlisten = "127.0.0.1:notaport"\n[provider]\nrequests_per_minute = -1\n')
    result = run_command(["serve", "--config", str(bad)], tmp_path, clean_env())
    assert result.returncode == 78
    assert "http.listen" in result.stderr and "provider.requests_per_minute" in result.stderr
    assert not (tmp_path / "sms-bridge.db").exists()
    assert not restarted_by_systemd(result.returncode)
    down = f"postgresql://bridge:s3cret@127.0.0.1:{free_port()}/sms_bridge"  # nobody listens
    env = clean_env(
        SMS_BRIDGE_STORE_URL=down, SMS_BRIDGE_HTTP_LISTEN=ANY_PORT, SMS_BRIDGE_SMTP_LISTEN=""
    )
    unreachable = run_command(["serve"], tmp_path, env)
    assert unreachable.returncode == 1, unreachable.stderr
    assert "store postgresql://bridge:***@127.0.0.1" in unreachable.stderr
    assert "Traceback" not in unreachable.stderr and "s3cret" not in unreachable.stderr
    assert restarted_by_systemd(unreachable.returncode)


def test_a_listen_name_the_resolver_cannot_answer_for_yet_is_restarted(tmp_path) -> None:
    """`http.listen = "bridge.lan:8080"` on a boot where the DNS server does not answer
    yet ("Temporary failure in name resolution"): `serve` exited 78, which the unit does
    not restart, and the bridge stayed down after the reboot though its file was fine. It
    may resolve a moment later, as an address not on the host yet may be there: 1, and
    restarted. The resolver is made to fail in a mount namespace of the child's own (its
    /etc/resolv.conf names a loopback port where no server listens)."""
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    config = tmp_path / "config.toml"
    config.write_text('[http]\nlisten = "bridge.lan:8080"\n[smtp]\nlisten = ""\n')
    bind = f"mount --bind {shlex.quote(str(resolv))} /etc/resolv.conf"
    serve = [sys.executable, "-m", "bridge", "serve", "--config", str(config)]
    words = ["unshare", "-m", "sh", "-c", f'{bind} && exec "$@"', "sh", *serve]
    try:
        result = subprocess.run(
            words, capture_output=True, text=True, timeout=60, cwd=tmp_path, env=clean_env()
        )
    except FileNotFoundError:
        pytest.skip("no unshare(1) to give the child a resolver of its own")
    if "mount" in result.stderr and "Temporary failure" not in result.stderr:
        pytest.skip(f"no mount namespace here: {result.stderr.strip()}")
    assert "http.listen" in result.stderr and "Temporary failure" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert result.returncode == 1, result.stderr
    assert restarted_by_systemd(result.returncode)


def _states(db: Path) -> list[str]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [r[0] for r in conn.execute("SELECT state FROM messages ORDER BY id")]
    except sqlite3.Error:
        return []
    finally:
        conn.close()


def test_sigkill_with_messages_queued_and_in_flight_sends_each_once(tmp_path) -> None:
    db = tmp_path / "bridge.db"
    config = tmp_path / "bridge.toml"
    env = clean_env()
    log = tmp_path / "run.log"
    sandbox_args = ["sandbox", "--listen", ANY_PORT, "--api-key", KEY]
    with process(sandbox_args, tmp_path, env, log) as sandbox_child:
        sandbox = sandbox_child.url("sandbox")
        config.write_text(f"""
[http]
listen = "{ANY_PORT}"
[smtp]
listen = ""
[store]
path = "{db}"
[provider]
base_url = "{sandbox}/api/v1"
api_key = "{KEY}"
timeout = "600s"
[status]
poll_interval = "1s"
""")
        wait_for(
            lambda: httpx.get(f"{sandbox}/_sandbox/requests").status_code == 200, what="sandbox"
        )
        # The first /send is taken and logged, then its answer stalls past the kill (and
        # the bridge's read timeout is longer still), so the kill finds it in flight and
        # the others queued behind it (the dispatcher sends one call at a time), however
        # long the posts below take. Four stalls of a second each closed that window
        # four seconds after the first post: on a starved machine the twelve posts took
        # longer, every text was sent before the wait below began, and it timed out.
        httpx.post(
            f"{sandbox}/_sandbox/faults",
            json={"status": 0, "delay": 600, "path": "/send", "times": 1},
        )
        recipients = [f"+1202555{i:04d}" for i in range(100, 112)]
        with process(["serve", "--config", str(config)], tmp_path, env, log) as first:
            bridge = first.url()
            wait_for(lambda: httpx.get(f"{bridge}/healthz").status_code == 200, what="bridge")
            for i, number in enumerate(recipients):
                r = httpx.post(
                    f"{bridge}/api/v1/messages", json={"to": number, "message": f"alert number {i}"}
                )
                assert r.status_code == 202
            wait_for(
                lambda: "sending" in _states(db) and "queued" in _states(db),
                what="a message in flight",
            )
            first.kill()
            first.wait(timeout=10)
        at_kill = _states(db)
        assert at_kill == ["sending"] + ["queued"] * 11  # the first one, held
        # The restart's read timeout as a deployment's: the text the kill left mid-call
        # is looked up in /logs once a call of the restart's could have ended (its
        # claim + 5 s + 10 s + 5 s), not 600 s on.
        config.write_text(config.read_text().replace('timeout = "600s"', 'timeout = "10s"'))
        with process(["serve", "--config", str(config)], tmp_path, env, log) as second:
            bridge = second.url()  # a new port: nothing here needs the old one
            wait_for(lambda: httpx.get(f"{bridge}/healthz").status_code == 200, what="restart")
            wait_for(
                lambda: set(_states(db)) <= {"sent", "delivered"},
                timeout=90,
                what="every message sent after the restart",
            )
            second.send_signal(signal.SIGTERM)
            assert second.wait(timeout=15) == 0
        entries = httpx.get(f"{sandbox}/_sandbox/entries").json()
    sent_to = sorted(e["to"] for e in entries)
    duplicates = len(sent_to) - len(set(sent_to))
    print(
        json.dumps(
            {
                "messages": len(recipients),
                "reached_provider": len(sent_to),
                "duplicates": duplicates,
                "states_at_kill": at_kill,
            }
        )
    )
    assert sorted(set(sent_to)) == sorted(recipients)  # nothing lost
    assert duplicates == 0  # the in-flight one was found in /logs, not resent


def test_a_taken_port_is_a_clear_error(tmp_path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = run_command(
            ["serve"],
            tmp_path,
            clean_env(SMS_BRIDGE_HTTP_LISTEN=f"127.0.0.1:{port}", SMS_BRIDGE_SMTP_LISTEN=""),
        )
    assert result.returncode == 1  # the port may be free a moment later: restarted
    assert restarted_by_systemd(result.returncode)
    assert f"http.listen: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_two_listeners_of_one_config_on_one_port_are_a_config_problem(tmp_path) -> None:
    """`http.listen` and `smtp.listen` on one port (a copy-paste) passed check-config, then
    serve could not bind the second: "Address already in use", exit 1, which systemd
    restarts as a port another process may free. Both refuse it now (78), naming both;
    the same port on addresses that do not overlap is fine. `127.0.0.1` and `localhost`
    (or `::1` written in full) are one address: compared as written, they passed."""
    port = free_port()
    for http, smtp, refused in (
        (f"127.0.0.1:{port}", f"127.0.0.1:{port}", True),
        (f"0.0.0.0:{port}", f"127.0.0.1:{port}", True),
        (f"[::]:{port}", f"127.0.0.1:{port}", True),  # dual-stack: IPv4 too
        (f"127.0.0.1:{port}", f"[::1]:{port}", False),
        # One address written two ways: compared as bound, not as written.
        (f"127.0.0.1:{port}", f"localhost:{port}", True),
        (f"localhost:{port}", f"LOCALHOST:{port}", True),
        (f"[::1]:{port}", f"[0:0:0:0:0:0:0:1]:{port}", True),
        (f"0.0.0.0:{port}", f"localhost:{port}", True),
    ):
        (tmp_path / "bridge.toml").write_text(
            f'[http]\nlisten = "{http}"\n[smtp]\nlisten = "{smtp}"\n'
        )
        checked = run_command(["check-config", "bridge.toml"], tmp_path, clean_env())
        assert checked.returncode == (78 if refused else 0), (http, smtp, checked.stderr)
        if refused:
            assert f"  smtp.listen: {smtp} is where http.listen ({http}) listens" in checked.stderr
    (tmp_path / "bridge.toml").write_text(
        f'[http]\nlisten = "127.0.0.1:{port}"\n[smtp]\nlisten = "127.0.0.1:{port}"\n'
    )
    served = run_command(["serve", "--config", "bridge.toml"], tmp_path, clean_env())
    assert served.returncode == 78 and "is where http.listen" in served.stderr, served.stderr
    assert not restarted_by_systemd(served.returncode)


@pytest.mark.parametrize(
    ("key", "said"),
    [("another", "key values mismatch"), ("encrypted", "is encrypted, and the bridge has no")],
)
def test_a_key_of_another_certificate_is_a_config_problem_not_a_traceback(
    tmp_path, key: str, said: str
) -> None:
    """A `tls_key` of another certificate (a renewal half done) passed check-config, then
    ended serve with uvicorn's traceback (HTTP) or the SMTP listener's, exit 1: restarted
    by systemd every 2.5 s for ever. Both refuse it now, naming the key, exit 78. So is
    an encrypted key, saying so (OpenSSL asked serve for its passphrase on the terminal)."""
    import trustme
    from cryptography.hazmat.primitives import serialization

    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    issued.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    if key == "another":
        ca.issue_cert("127.0.0.1").private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    else:
        plain = serialization.load_pem_private_key(issued.private_key_pem.bytes(), None)
        (tmp_path / "key.pem").write_bytes(
            plain.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"a passphrase"),
            )
        )
    pair = 'tls_cert = "cert.pem"\ntls_key = "key.pem"\n'
    for section, config in (
        ("http", f'[http]\nlisten = "{ANY_PORT}"\n{pair}[smtp]\nlisten = ""\n'),
        ("smtp", f'[http]\nlisten = ""\n[smtp]\nlisten = "{ANY_PORT}"\n{pair}'),
    ):
        (tmp_path / "bridge.toml").write_text(config)
        for command in ("check-config", "serve"):
            result = run_command([command, "--config", "bridge.toml"], tmp_path, clean_env())
            assert result.returncode == 78, (section, command, result.stderr)
            assert f"  {section}.tls_cert: {tmp_path / 'cert.pem'} with" in result.stderr
            assert said in result.stderr and "Traceback" not in result.stderr


def run_unit_reload(config_dir: Path, pid: int) -> subprocess.CompletedProcess[str]:
    """The unit's ExecReload= lines as systemd runs them: in order, each to its end, the
    first that fails fails the reload. The unit's paths made this test's: its venv's
    `sms-bridge` is this Python's `-m bridge`, `${CONFIGURATION_DIRECTORY}` the config's."""
    executable = "/opt/sms-bridge/venv/bin/sms-bridge"
    result = subprocess.CompletedProcess[str]([], 0, "", "")
    for line in unit_lines("ExecReload"):
        words = shlex.split(
            line.replace("${CONFIGURATION_DIRECTORY}", str(config_dir)).replace(
                "$MAINPID", str(pid)
            )
        )
        if words[0] == executable:
            words = [sys.executable, "-m", "bridge", *words[1:]]
        result = subprocess.run(
            words, capture_output=True, text=True, timeout=60, env=clean_env(), cwd=config_dir
        )
        if result.returncode != 0:
            break
    return result


def test_systemctl_reload_fails_and_says_why_on_a_file_the_bridge_refuses(tmp_path) -> None:
    """ExecReload was `kill -HUP` alone: `systemctl reload` exited 0 whatever the bridge
    made of the file, and a refused one showed only in the log. The unit checks the file
    first: a refused one fails the reload naming the key, and the bridge is not asked;
    a good one passes quietly and is applied."""
    config = tmp_path / "config.toml"
    head = f'[http]\nlisten = "{ANY_PORT}"\n[smtp]\nlisten = ""\n[store]\npath = "b.db"\n'
    route = '[routes.first]\nformat = "generic"\nto = ["+12025550143"]\n'
    config.write_text(head + route)
    with process(
        ["serve", "--config", str(config)], tmp_path, clean_env(), tmp_path / "log"
    ) as proc:
        url = proc.url()
        config.write_text(head + route + "[limits]\nmax_parts = 0\n")
        refused = run_unit_reload(tmp_path, proc.pid)
        assert refused.returncode == 78, refused.stderr
        assert "  limits.max_parts: " in refused.stderr
        # the running bridge was never asked
        assert "reload refused" not in proc.output() and "reloaded" not in proc.output()
        config.write_text(head + route.replace("first", "second"))
        applied = run_unit_reload(tmp_path, proc.pid)
        assert applied.returncode == 0, applied.stderr
        assert applied.stdout == ""  # the journal gets no copy of the config each reload
        wait_for(lambda: "configuration reloaded" in proc.output(), what="the reload")
        assert httpx.post(f"{url}/hooks/second", json={"message": "x"}).status_code == 202
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0


def test_serve_and_sighup_read_the_files_beside_the_config_not_the_cwd(tmp_path) -> None:
    """`serve --config /etc/sms-bridge/config.toml` run from elsewhere (the unit's
    WorkingDirectory): the token file and the store the config names relatively are
    beside it, at start and after a SIGHUP that rotates the token. The current
    directory holds a token file of the same name, which must stay unread."""
    etc, run = tmp_path / "etc", tmp_path / "run"
    etc.mkdir()
    run.mkdir()
    first, second, decoy = "first-token-beside-config", "second-token-beside-config", "x" * 24
    (etc / "ops.token").write_text(first + "\n")
    (run / "ops.token").write_text(decoy + "\n")
    config = etc / "config.toml"
    config.write_text(
        f'[http]\nlisten = "{ANY_PORT}"\n[smtp]\nlisten = "{ANY_PORT}"\n'
        '[store]\npath = "state/bridge.db"\n'
        '[tokens.ops]\ntoken_file = "ops.token"\nscopes = ["send"]\n'
    )
    log = tmp_path / "serve.log"

    def sent_with(token: str) -> int:
        return httpx.post(
            f"{url}/api/v1/messages",
            json={"to": "+12025550143", "message": "paths"},
            headers={"Authorization": f"Bearer {token}"},
        ).status_code

    with process(["serve", "--config", str(config)], run, clean_env(), log) as proc:
        url = proc.url()
        wait_for(lambda: httpx.get(f"{url}/healthz").status_code == 200, what="startup")
        assert (sent_with(first), sent_with(decoy)) == (202, 401)
        assert (etc / "state" / "bridge.db").is_file() and not (run / "state").exists()
        (etc / "ops.token").write_text(second + "\n")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: sent_with(second) == 202, what="the rotated token")
        assert (sent_with(first), sent_with(decoy)) == (401, 401)
        # the store's name is resolved as at start: no "store.path changed" on reload
        assert "configuration reloaded" in proc.output()
        assert "needs a restart" not in proc.output()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0


def _smtp_reply(stream) -> str:
    """One whole SMTP reply (its last line) read from a socket file; "" at EOF."""
    while True:
        line = stream.readline().decode()
        if line[3:4] != "-":
            return line.rstrip()


def test_sigterm_lets_a_mail_in_transfer_finish_and_tells_idle_sessions(tmp_path) -> None:
    """A SIGTERM while a mail is being sent: that mail is answered (250, stored) before
    the process ends, and a session between mails is told 421, not cut. Cut mid-DATA,
    the client got no answer at all (the listener's sessions were dropped when the
    process ended), so a device that does not retry lost the alert."""
    env = clean_env(SMS_BRIDGE_HTTP_LISTEN=ANY_PORT, SMS_BRIDGE_SMTP_LISTEN=ANY_PORT)
    with (
        process(["serve"], tmp_path, env, tmp_path / "serve.log") as proc,
        contextlib.ExitStack() as sockets,
    ):
        host, port = proc.address("SMTP").rsplit(":", 1)
        connect = (socket.create_connection((host, int(port)), timeout=10) for _ in range(2))
        busy, idle = (sockets.enter_context(s).makefile("rwb") for s in connect)
        for stream in (busy, idle):
            assert _smtp_reply(stream).startswith("220")
            stream.write(b"EHLO client.example\r\n")
            stream.flush()
            assert _smtp_reply(stream).startswith("250")
        for command in (b"MAIL FROM:<ups@example.org>", b"RCPT TO:<12025550143@sms.localhost>"):
            busy.write(command + b"\r\n")
            busy.flush()
            assert _smtp_reply(busy).startswith("250")
        busy.write(b"DATA\r\n")
        busy.flush()
        assert _smtp_reply(busy).startswith("354")
        busy.write(b"Subject: UPS on battery\r\n\r\nRuntime 12 min\r\n")
        busy.flush()
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        # The idle session hears why it ends (a 4xx: the client tries again later).
        assert _smtp_reply(idle).startswith("421 4.3.2")
        time.sleep(0.3)  # well within the grace, but after the signal took effect
        busy.write(b".\r\n")
        busy.flush()
        answer = _smtp_reply(busy)
        assert answer.startswith("250 2.0.0 OK: stored as message 1"), answer
        assert _smtp_reply(busy).startswith("421 4.3.2")  # then the session ends
        assert proc.wait(timeout=15) == 0
        assert time.monotonic() - signalled < 5  # nothing left to wait for: no grace
    with sqlite3.connect(tmp_path / "sms-bridge.db") as db:
        rows = db.execute("SELECT recipient, text FROM messages").fetchall()
    assert rows == [("+12025550143", "UPS on battery\nRuntime 12 min")]


def test_a_sighup_while_serve_starts_is_a_reload_not_the_end(tmp_path) -> None:
    """`systemctl enable --now sms-bridge && systemctl reload sms-bridge` (the recipe's
    lines, pasted together) sends SIGHUP while serve is still starting. Python's default
    action for it ended the process (status 129), and systemd does not restart a
    service a HUP ended: the bridge stayed down. The store is held locked here so that
    serve waits in its start-up for the signal (SQLite's busy wait), past the line it
    logs before building: the signal then lands before the event loop handles it."""
    db = tmp_path / "bridge.db"
    config = tmp_path / "bridge.toml"
    config.write_text(
        f'[http]\nlisten = "{ANY_PORT}"\n[smtp]\nlisten = ""\n[store]\npath = "{db}"\n'
    )
    lock = sqlite3.connect(db, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")  # serve's switch to WAL waits for it
    log = tmp_path / "serve.log"
    with process(["serve", "--config", str(config)], tmp_path, clean_env(), log) as proc:
        wait_for(lambda: "using the in-process sandbox" in proc.output(), what="start-up")
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert proc.poll() is None, f"ended by the SIGHUP:\n{proc.output()}"
        lock.rollback()
        lock.close()
        url = proc.url()
        wait_for(lambda: httpx.get(f"{url}/readyz").status_code == 200, what="ready")
        wait_for(lambda: "configuration reloaded" in proc.output(), what="the reload")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0


def test_serve_tells_systemd_it_is_ready_once_it_answers(tmp_path) -> None:
    """The unit is `Type=notify`: `systemctl start` waits for READY=1 (and a reload with
    it). With `Type=exec` systemd counted the bridge started the moment Python ran, so a
    refused config still "started" and a reload right after start raced its imports."""
    unit = (Path(__file__).parent.parent / "systemd" / "sms-bridge.service").read_text()
    assert "\nType=notify\n" in unit
    notify = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(str(notify))
        manager.settimeout(30)
        env = clean_env(
            SMS_BRIDGE_HTTP_LISTEN=ANY_PORT, SMS_BRIDGE_SMTP_LISTEN="", NOTIFY_SOCKET=str(notify)
        )
        with process(["serve"], tmp_path, env, tmp_path / "serve.log") as proc:
            assert manager.recv(4096) == b"READY=1"
            assert httpx.get(f"{proc.url()}/readyz").status_code == 200  # ready means ready
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0


def test_a_second_serve_on_one_sqlite_store_is_refused(tmp_path) -> None:
    """Two `serve` processes on one SQLite file (a unit started twice, a container
    scaled to two on one volume) both started: each led every singleton, and each took
    the other's sends in flight for leftovers of its own crash, to look for in /logs and
    send again. The second is now refused at start, saying why, and the first goes on;
    once the first has stopped, a serve starts again on the file."""
    env = clean_env(SMS_BRIDGE_HTTP_LISTEN=ANY_PORT, SMS_BRIDGE_SMTP_LISTEN="")
    with process(["serve"], tmp_path, env, tmp_path / "first.log") as first:
        url = first.url()
        wait_for(lambda: httpx.get(f"{url}/healthz").status_code == 200, what="startup")
        second = run_command(["serve"], tmp_path, env)
        assert second.returncode == 1
        assert "another `sms-bridge serve` is running on sms-bridge.db" in second.stderr
        assert "Traceback" not in second.stderr
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "elsewhere" / "link.db").symlink_to(tmp_path / "sms-bridge.db")
        linked = subprocess.run(  # the same file by another name is the same store
            [sys.executable, "-m", "bridge", "serve"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path / "elsewhere",
            env={**env, "SMS_BRIDGE_STORE_PATH": "link.db"},
        )
        assert linked.returncode == 1 and "another `sms-bridge serve`" in linked.stderr
        assert httpx.get(f"{url}/readyz").status_code == 200
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=15) == 0
    with process(["serve"], tmp_path, env, tmp_path / "again.log") as again:
        url = again.url()
        wait_for(lambda: httpx.get(f"{url}/healthz").status_code == 200, what="restart")
        again.send_signal(signal.SIGTERM)
        assert again.wait(timeout=15) == 0
