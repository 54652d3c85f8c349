"""The operator's commands, run as processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys

import httpx
import pytest

from bridge.config import StoreConfig
from bridge.models import NewMessage
from bridge.store import open_store
from tests.processes import ANY_PORT, clean_env, process, run_command, wait_for
from tests.stores import seed

pytestmark = pytest.mark.slow  # every test here runs the CLI as a process
KEY = "cli-test-key"


def run(*args: str, cwd, env=None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SMS_BRIDGE_")}
    return run_command([*args], cwd, {**base, **(env or {})})


def test_provider_commands_against_a_sandbox_on_loopback(tmp_path) -> None:
    with process(
        ["sandbox", "--listen", ANY_PORT, "--api-key", KEY],
        tmp_path,
        dict(os.environ),
        tmp_path / "sandbox.log",
    ) as sandbox:
        url = sandbox.url("sandbox")
        env = {
            "SMS_BRIDGE_PROVIDER_BASE_URL": f"{url}/api/v1",
            "SMS_BRIDGE_PROVIDER_API_KEY": KEY,
        }
        wait_for(lambda: httpx.get(f"{url}/_sandbox/requests").status_code == 200)
        httpx.post(
            f"{url}/api/v1/send",
            headers={"X-API-Key": KEY},
            json={"to": "+12025550143", "message": "hello"},
        )
        balance = run("provider", "balance", "--json", cwd=tmp_path, env=env)
        assert balance.returncode == 0, balance.stderr
        assert json.loads(balance.stdout)["balance"] == 999.5
        table = run("provider", "logs", cwd=tmp_path, env=env)
        assert "+12025550143" in table.stdout and "hello" in table.stdout
        calc = run(
            "provider",
            "calculate",
            "--to",
            "+447911123456",
            "--message",
            "x" * 170,
            "--json",
            cwd=tmp_path,
            env=env,
        )
        assert json.loads(calc.stdout)["cost"] == 1.6
        assert run("provider", "pricing", cwd=tmp_path, env=env).returncode == 0
        assert "Sandbox account" in run("provider", "account", cwd=tmp_path, env=env).stdout
        wrong = run(
            "provider",
            "balance",
            cwd=tmp_path,
            env={**env, "SMS_BRIDGE_PROVIDER_API_KEY": "wrong-key"},
        )
        assert wrong.returncode == 1 and "401" in wrong.stderr
        assert "wrong-key" not in wrong.stderr
    assert not (tmp_path / "sms-bridge.db").exists()  # account commands never touch the store


def test_messages_command_lists_the_store(tmp_path) -> None:
    env = {
        "SMS_BRIDGE_HTTP_LISTEN": ANY_PORT,
        "SMS_BRIDGE_SMTP_LISTEN": ANY_PORT,
        "SMS_BRIDGE_STORE_PATH": "m.db",
    }
    base = {k: v for k, v in os.environ.items() if not k.startswith("SMS_BRIDGE_")}
    with process(["serve"], tmp_path, {**base, **env}, tmp_path / "serve.log") as proc:
        url = proc.url()
        wait_for(lambda: httpx.get(f"{url}/healthz").status_code == 200)
        ids = httpx.post(
            f"{url}/api/v1/messages",
            json={"to": ["+12025550143", "+12025550144"], "message": "printer out of toner"},
        ).json()
        wait_for(
            lambda: all(
                httpx.get(f"{url}/api/v1/messages/{i}").json()["state"] == "delivered"
                for i in ids["ids"]
            ),
            timeout=60,
        )
        proc.terminate()
        assert proc.wait(timeout=15) == 0
    listed = run("messages", "--json", cwd=tmp_path, env=env)
    rows = json.loads(listed.stdout)
    assert {r["recipient"] for r in rows} == {"+12025550143", "+12025550144"}
    assert {r["state"] for r in rows} == {"delivered"}
    table = run("messages", "--status", "delivered", cwd=tmp_path, env=env)
    assert "printer out of toner" in table.stdout and table.stdout.count("delivered") == 2
    assert run("messages", "--status", "failed", cwd=tmp_path, env=env).stdout.count("\n") == 1


def test_messages_limit_is_a_count_the_store_can_take(tmp_path) -> None:
    """`--limit -5` listed every message (SQLite reads LIMIT -1 as none) and a limit past
    SQLite's integers ended in a traceback: both are now a usage error (exit 2)."""

    async def seeded() -> None:
        store = open_store(StoreConfig(path=str(tmp_path / "m.db")))
        await store.open()
        texts = ("first", "second")
        await seed(store, [NewMessage("+12025550143", t, "http", "SMS", 1, 1) for t in texts], 1.0)
        await store.close()

    asyncio.run(seeded())
    env = {"SMS_BRIDGE_STORE_PATH": "m.db"}
    assert (
        len(json.loads(run("messages", "--json", "--limit", "1", cwd=tmp_path, env=env).stdout))
        == 1
    )
    for wrong in ("-5", "0", "99999999999999999999", "ten"):
        listed = run("messages", "--limit", wrong, cwd=tmp_path, env=env)
        assert listed.returncode == 2, (wrong, listed.stdout, listed.stderr)
        assert "--limit" in listed.stderr and "Traceback" not in listed.stderr, listed.stderr


def test_messages_never_hand_a_senders_escape_sequences_to_the_terminal(tmp_path) -> None:
    """Whoever may send a text (a webhook, a mail) chose its characters, and the table
    printed them raw: ESC [2J cleared the operator's screen, OSC retitled the terminal,
    the 8-bit CSI (U+009B) passed JSON's escaping too. Shown now as \\xNN in the table,
    \\u00NN in JSON (the same string when parsed)."""
    text = "disk full\x1b[2J\x1b]0;owned\x07 on db-2\x9b31m"

    async def seeded() -> None:
        store = open_store(StoreConfig(path=str(tmp_path / "m.db")))
        await store.open()
        await seed(store, [NewMessage("+12025550143", text, "http", "SMS", 1, 1)], 1.0)
        await store.close()

    asyncio.run(seeded())
    env = {"SMS_BRIDGE_STORE_PATH": "m.db"}
    table = run("messages", cwd=tmp_path, env=env)
    assert table.returncode == 0, table.stderr
    assert not any(c in table.stdout for c in "\x1b\x07\x9b"), repr(table.stdout)
    assert "disk full\\x1b[2J\\x1b]0;owned\\x07 on db-2\\x9b31m" in table.stdout
    listed = run("messages", "--json", cwd=tmp_path, env=env)
    assert "\x9b" not in listed.stdout and "\x1b" not in listed.stdout
    assert json.loads(listed.stdout)[0]["text"] == text


def test_sandbox_refuses_a_rate_or_fail_share_it_cannot_serve(tmp_path) -> None:
    """`sandbox --requests-per-minute 0` started, then answered every call 500 (a
    traceback in its log); `--fail-share 7` was taken too. The same bounds as the
    config's provider.requests_per_minute and sandbox.fail_share, as usage errors."""
    for option, value in [
        ("--requests-per-minute", "0"),
        ("--requests-per-minute", "-3"),
        ("--fail-share", "7"),
        ("--fail-share", "nan"),
    ]:
        refused = run("sandbox", "--listen", "127.0.0.1:0", option, value, cwd=tmp_path)
        assert refused.returncode == 2, (option, value, refused.stderr)
        assert option in refused.stderr and "Traceback" not in refused.stderr


def test_check_config_refuses_a_star_listen_address_serve_cannot_bind(tmp_path) -> None:
    """`listen = "*:8080"` (nginx's way to say every address) passed check-config, then
    serve could not bind it ("Name or service not known"): check-config said OK to a
    file serve refuses. Now both name the key and the addresses that mean it."""
    (tmp_path / "bridge.toml").write_text('[http]\nlisten = "*:8080"\n')
    checked = run("check-config", "bridge.toml", cwd=tmp_path)
    assert checked.returncode == 78, checked.stdout
    assert "http.listen: '*:8080': '*' is no address" in checked.stderr
    assert "0.0.0.0" in checked.stderr and "[::]" in checked.stderr


# Filters on a route of each format (TOML lines by format): ones each format reads, in its
# sender's words, and ones it cannot meet.
MEETABLE_FILTERS = {
    "gitlab": 'conclusions = ["failed", "canceled"]\nbranches = ["main"]',
    "github": 'conclusions = ["failure", "cancelled", "error"]',
    "grafana": 'match = {team = "web"}',
    "alertmanager": 'match = {severity = "critical"}',
}
UNMEETABLE_FILTERS = {
    "gitlab": 'conclusions = ["failed", "failure"]',
    "github": 'conclusions = ["failed"]\nmatch = {repo = "api"}',
    "alertmanager": 'conclusions = ["firing"]\nbranches = ["main"]',
    "generic": 'match = {severity = "critical"}',
}


def check_ci_routes(tmp_path, filters: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """check-config on a route of each format to one phone, with `filters` added."""
    (tmp_path / "routes.toml").write_text(
        "".join(
            f'[routes.{form}]\nformat = "{form}"\nto = ["+12025550143"]\n'
            f'secret = "route-secret-0123456789"\npublic = true\n{filters.get(form, "")}\n'
            for form in ("alertmanager", "grafana", "github", "gitlab", "generic")
        )
    )
    return run("check-config", "routes.toml", cwd=tmp_path)


def test_check_config_refuses_a_filter_its_routes_format_cannot_meet(tmp_path) -> None:
    """`conclusions = ["failure"]` on a GitLab route (GitHub's word; GitLab says "failed")
    passed check-config, and every failed pipeline was answered `200 ignored`: nothing
    texted, nothing said. An outcome the format's sender never writes, or a filter key
    the format does not read (`match` on GitHub, `conclusions` on Alertmanager), filters
    everything or nothing: refused, naming the key and the words that work."""
    checked = check_ci_routes(tmp_path, UNMEETABLE_FILTERS)
    assert checked.returncode == 78, checked.stdout
    problems = checked.stderr
    assert "routes.gitlab.conclusions[1]: 'failure' is not a gitlab outcome" in problems
    assert "routes.gitlab.conclusions[0]" not in problems
    assert "failed, manual" in problems  # the valid ones, named
    assert "routes.github.conclusions[0]: 'failed' is not a github outcome" in problems
    for key in ("github.match", "alertmanager.conclusions", "alertmanager.branches"):
        assert f"routes.{key}: " in problems
    assert "routes.generic.match: " in problems and "alertmanager, grafana" in problems
    right = check_ci_routes(tmp_path, MEETABLE_FILTERS)
    assert right.returncode == 0, right.stderr


def test_a_store_that_cannot_be_opened_is_a_clear_error(tmp_path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the store's directory should be")
    env = {"SMS_BRIDGE_STORE_PATH": str(blocker / "bridge.db"), "SMS_BRIDGE_SMTP_LISTEN": ""}
    for command in (["serve"], ["messages"], ["purge", "--older-than", "30d"]):
        env["SMS_BRIDGE_HTTP_LISTEN"] = ANY_PORT
        result = run(*command, cwd=tmp_path, env=env)
        assert result.returncode == 1, command
        # serve tries to create it; the reading commands refuse to create an empty store
        why = "cannot create" if command == ["serve"] else "no such file"
        assert f"store {blocker / 'bridge.db'}: {why}" in result.stderr
        assert "Traceback" not in result.stderr


def test_retry_and_purge_say_a_store_path_that_is_a_directory_is_one(tmp_path) -> None:
    """store.path naming a directory: retry and purge said "no such file", and sent the
    operator to look for the store elsewhere; they say it is a directory."""
    (tmp_path / "store.d").mkdir()
    env = {"SMS_BRIDGE_STORE_PATH": str(tmp_path / "store.d")}
    for command in (["retry", "--failed"], ["purge", "--older-than", "30d"]):
        result = run(*command, cwd=tmp_path, env=env)
        assert result.returncode == 1, command
        assert f"store {tmp_path / 'store.d'}: is a directory, not a regular file" in (
            result.stderr
        ), result.stderr
        assert "no such file" not in result.stderr and "Traceback" not in result.stderr


def test_healthcheck_says_a_port_0_listener_cannot_be_probed(tmp_path) -> None:
    """A listener on port 0 has the port the kernel gave serve, which only serve's log
    names: the check asked port 0 and said "Connection refused", a bridge down."""
    for env in (
        {"SMS_BRIDGE_HTTP_LISTEN": ANY_PORT},
        {"SMS_BRIDGE_HTTP_LISTEN": "", "SMS_BRIDGE_SMTP_LISTEN": "[::1]:0"},
    ):
        result = run("healthcheck", cwd=tmp_path, env=env)
        assert result.returncode == 1, result.stderr
        key = "http.listen" if env["SMS_BRIDGE_HTTP_LISTEN"] else "smtp.listen"
        assert f"healthcheck: {key} = " in result.stderr, result.stderr
        assert "is an ephemeral port (0)" in result.stderr and "cannot be probed" in (result.stderr)
        assert "refused" not in result.stderr.lower() and "Traceback" not in result.stderr


def test_reading_commands_say_which_store_and_never_create_an_empty_one(tmp_path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    missing = run("messages", cwd=elsewhere)
    assert missing.returncode == 1
    assert f"store {elsewhere / 'sms-bridge.db'}: no such file" in missing.stderr
    assert "where `sms-bridge serve` runs" in missing.stderr
    assert not (elsewhere / "sms-bridge.db").exists()
    assert run("retry", "--failed", cwd=elsewhere).returncode == 1
    assert not (elsewhere / "sms-bridge.db").exists()

    bad = run("messages", "--status", "bogus", cwd=elsewhere)
    assert bad.returncode == 2 and "invalid choice: 'bogus'" in bad.stderr
    for limit in ("0", "-1", "x"):  # -1 printed every message on SQLite
        bad = run("messages", "--limit", limit, cwd=elsewhere)
        assert bad.returncode == 2 and "must be a whole number from 1 up" in bad.stderr, limit


def test_provider_command_on_the_sandbox_says_it_is_a_sandbox_of_its_own(tmp_path) -> None:
    logs = run("provider", "logs", cwd=tmp_path)
    assert logs.returncode == 0, logs.stderr
    assert "fresh in-process sandbox of its own" in logs.stderr
    assert "sms-bridge sandbox" in logs.stderr


async def test_retry_says_when_the_running_serve_sends(tmp_path) -> None:
    from bridge.clock import SystemClock
    from bridge.config import StoreConfig
    from bridge.models import NewMessage, State
    from bridge.store import open_store
    from tests.stores import seed

    store = open_store(StoreConfig(path=str(tmp_path / "sms-bridge.db")))
    await store.open()
    now = SystemClock().now()
    message = NewMessage("+12025550143", "hi", "http", "SMS", 1, 1, state=State.FAILED)
    [mid] = await seed(store, [message], now)
    await store.close()
    result = await asyncio.to_thread(run, "retry", str(mid), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"queued again: {mid}" in result.stdout
    assert "a running `sms-bridge serve` sends them within 30 s" in result.stdout


def test_a_reader_that_leaves_early_gets_no_traceback(tmp_path) -> None:
    """`sms-bridge check-config | head -1`: the pipe closes before the output is
    written; the command ends quietly rather than with a BrokenPipeError traceback."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("SMS_BRIDGE_")}
    child = subprocess.Popen(
        [sys.executable, "-m", "bridge", "check-config"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=base,
    )
    assert child.stdout is not None
    child.stdout.close()  # long before the interpreter has started and printed
    _, err = child.communicate(timeout=60)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert child.returncode == 1


def test_check_config_reads_the_files_beside_the_config_from_any_directory(open_tmp) -> None:
    """The systemd layout: config and key in /etc/sms-bridge, the process elsewhere
    (WorkingDirectory=/var/lib/sms-bridge). A relative name in the file is read beside
    the file; check-config shows and warns about the file it really read (below
    open_tmp: every directory above the key open, so the key is readable by all)."""
    etc, cwd = open_tmp / "etc", open_tmp / "run"
    for directory in (etc, cwd):
        directory.mkdir()
        directory.chmod(0o755)  # whatever the umask
    (etc / "api-key").write_text("key-beside-the-config\n")
    (etc / "api-key").chmod(0o644)
    (etc / "config.toml").write_text(
        '[provider]\nbase_url = "https://sms.example.net/api/v1"\napi_key_file = "api-key"\n'
        '[store]\npath = "bridge.db"\n'
    )
    (etc / "config.toml").chmod(0o600)
    for named in (str(etc / "config.toml"), "../etc/config.toml"):
        checked = run("check-config", named, cwd=cwd)
        assert checked.returncode == 0, checked.stderr
        shown = json.loads(checked.stdout[checked.stdout.index("{") :])
        assert shown["store"]["path"] == str(etc / "bridge.db")
        assert shown["provider"]["api_key"] == "***"
        assert checked.stderr == (
            f"warning: provider.api_key_file: {etc / 'api-key'} is readable by every user:"
            f" chmod 600 {etc / 'api-key'}\n"
        )
    # The same name from the environment is the current directory's, and says so.
    env = {"SMS_BRIDGE_PROVIDER_API_KEY_FILE": "api-key"}
    overridden = run("check-config", str(etc / "config.toml"), cwd=cwd, env=env)
    assert overridden.returncode == 78
    assert (
        "SMS_BRIDGE_PROVIDER_API_KEY_FILE: cannot read secret file 'api-key' (relative to"
        f" the current directory {cwd}): No such file or directory"
    ) in overridden.stderr


def test_check_config_says_which_store_paces_the_key_and_shows_only_its_fingerprint(
    tmp_path,
) -> None:
    """The provider's 100 requests a minute are per key, and the bridge keeps the window
    in its store: a staging bridge on SQLite and the production one on PostgreSQL with
    one key shared no budget, with nothing to tell. check-config (and the start's log)
    now names the store the key is paced in and the key's fingerprint, the same for one
    key wherever it is used, never the key itself."""
    key = "k-0123456789abcdef"
    lines = []
    for name, store in (
        ("staging", 'path = "staging.db"'),
        ("prod", 'url = "postgresql://bridge:pw@db-1/sms"'),
        ("other", 'path = "other.db"'),
    ):
        used = key if name != "other" else key + "-2"
        (tmp_path / f"{name}.toml").write_text(
            f'[provider]\nbase_url = "https://sms.example.net/api/v1"\napi_key = "{used}"\n'
            f"[store]\n{store}\n"
        )
        (tmp_path / f"{name}.toml").chmod(0o600)
        checked = run("check-config", f"{name}.toml", cwd=tmp_path)
        assert checked.returncode == 0, checked.stderr
        assert key not in checked.stdout
        [line] = [x for x in checked.stdout.splitlines() if x.startswith("rate window:")]
        lines.append(line)
    fingerprints = [line.split("provider key ")[1].split(",")[0] for line in lines]
    assert fingerprints[0] == fingerprints[1] != fingerprints[2]
    assert "staging.db" in lines[0] and "postgresql://bridge:***@db-1/sms" in lines[1]
    assert "pw" not in lines[1]


def test_ctrl_c_while_a_command_waits_is_no_traceback(tmp_path) -> None:
    """Ctrl-C in a command waiting on the network (here `provider balance` on a provider
    that takes the connection and never answers; `serve` waiting for its store at start,
    before it handles SIGINT itself) printed a page of asyncio and httpx traceback."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        silent.settimeout(30)
        env = clean_env(
            SMS_BRIDGE_PROVIDER_BASE_URL=f"http://127.0.0.1:{silent.getsockname()[1]}/api/v1",
            SMS_BRIDGE_PROVIDER_API_KEY="live-key-0123456789",
            SMS_BRIDGE_PROVIDER_TIMEOUT="60s",
            SMS_BRIDGE_STORE_PATH=str(tmp_path / "none.db"),  # no store: nothing shared
        )
        # A shell's background job (`pytest &`) ignores SIGINT, and a child inherits that:
        # this one must start with SIGINT as a terminal's Ctrl-C finds it.
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            with process(["provider", "balance"], tmp_path, env, tmp_path / "cli.log") as proc:
                while True:  # the command's request read whole: it waits for its answer
                    conn, _ = silent.accept()
                    with conn, conn.makefile("rb") as request:
                        asked = request.readline()
                        while request.readline() not in (b"\r\n", b""):
                            pass
                        if asked.startswith(b"GET /api/v1/balance "):
                            proc.send_signal(signal.SIGINT)
                            assert proc.wait(timeout=30) == 130, proc.output()
                            break
        finally:
            signal.signal(signal.SIGINT, previous)
    assert "Traceback" not in proc.output() and "interrupted" in proc.output(), proc.output()
