"""What the config reads from files and the environment, as a careless or hostile
operator hands it over: a FIFO or a device where a secret or the config should be, a
secret with spaces around it, recipients a client escapes by not logging in. Through the
CLI as a process, and `serve` with SIGHUP: a blocked read shows only there."""

from __future__ import annotations

import os
import signal
import textwrap
from pathlib import Path

import httpx
import pytest

from bridge.config import load_config
from bridge.config.parsing import CONFIG_FILE_MAX, SECRET_FILE_MAX
from bridge.errors import ConfigError
from tests.helpers import write_config
from tests.processes import ANY_PORT, clean_env, process, run_command, wait_for

EX_CONFIG = 78
PASSWORD = "a-long-smtp-password-0123"
# A read that blocks fails the test in this many seconds instead of hanging it.
PROMPTLY = 20


def _check(path: Path | None, cwd: Path, **env: str):
    args = ["check-config"] + ([str(path)] if path is not None else [])
    return run_command(args, cwd, clean_env(**env), timeout=PROMPTLY)


def _http_only(tmp_path: Path) -> str:
    """A config's start: HTTP on any port, no SMTP, the store in `tmp_path`."""
    return f'[http]\nlisten = "{ANY_PORT}"\n[smtp]\nlisten = ""\n[store]\npath = "{tmp_path / "bridge.db"}"\n'


def _refused(result, *expected: str) -> str:
    assert result.returncode == EX_CONFIG, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for text in expected:
        assert text in result.stderr, result.stderr
    return result.stderr


@pytest.fixture
def fifo(tmp_path) -> Path:
    path = tmp_path / "secret.fifo"
    os.mkfifo(path)
    return path


@pytest.mark.slow  # runs the CLI as a process
@pytest.mark.parametrize("special", ["fifo", "/dev/zero"])
def test_a_secret_file_that_is_no_regular_file_is_refused_not_read(tmp_path, fifo, special) -> None:
    """A FIFO blocked check-config and `serve` until a writer came; /dev/zero read until
    memory ran out. Each place a secret file is named: a `*_file` key, a table's
    `NAME_file` entry, `SMS_BRIDGE_..._FILE`."""
    name = str(fifo) if special == "fifo" else special
    kind = "named pipe" if special == "fifo" else "character device"
    keyed = write_config(tmp_path, f'[provider]\napi_key_file = "{name}"\n', "keyed.toml")
    _refused(_check(keyed, tmp_path), "provider.api_key", name, kind, "not a regular file")
    table = write_config(
        tmp_path, f'[smtp.users]\nups_file = "{name}"\n[smtp]\nrequire_auth = false\n', "t.toml"
    )
    _refused(_check(table, tmp_path), "smtp.users", name, kind)
    from_env = _check(None, tmp_path, SMS_BRIDGE_PROVIDER_API_KEY_FILE=name)
    _refused(from_env, "SMS_BRIDGE_PROVIDER_API_KEY_FILE", name, kind)


@pytest.mark.slow  # runs the CLI as a process
def test_a_config_path_that_is_a_fifo_or_a_device_is_refused(tmp_path, fifo) -> None:
    _refused(_check(fifo, tmp_path), str(fifo), "named pipe")
    _refused(_check(tmp_path, tmp_path), str(tmp_path), "a directory, not a regular file")
    _refused(_check(Path("/dev/zero"), tmp_path), "/dev/zero", "character device")


@pytest.mark.slow  # runs the CLI as a process
def test_files_larger_than_a_secret_or_a_config_are_refused(tmp_path) -> None:
    huge = tmp_path / "huge.key"
    huge.write_bytes(b"k" * (SECRET_FILE_MAX + 1))
    config = write_config(tmp_path, f'[provider]\napi_key_file = "{huge}"\n')
    _refused(_check(config, tmp_path), "provider.api_key", str(huge), "larger than")
    config.write_text("# padding\n" * (CONFIG_FILE_MAX // 10 + 1))
    _refused(_check(config, tmp_path), str(config), "larger than")


@pytest.mark.slow  # runs the CLI as a process
def test_a_reload_onto_a_fifo_secret_is_refused_and_the_bridge_still_reloads(
    tmp_path, fifo
) -> None:
    """A reload read the FIFO inside the reloader: it waited for a writer forever, and
    every later SIGHUP queued behind it; the running bridge never took a config again."""
    path = tmp_path / "bridge.toml"
    good = _http_only(tmp_path) + '[groups]\noncall = ["+12025550101"]\n'
    path.write_text(good)
    log = tmp_path / "serve.log"
    with process(["serve", "--config", str(path)], tmp_path, clean_env(), log) as proc:
        url = proc.url()
        wait_for(lambda: httpx.get(f"{url}/healthz").status_code == 200)
        path.write_text(good + f'[provider]\napi_key_file = "{fifo}"\n')
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload refused" in proc.output(), PROMPTLY, "the refusal")
        assert "not a regular file" in proc.output() and str(fifo) in proc.output()
        path.write_text(good + '[routes.am]\nformat = "generic"\nto = ["oncall"]\n')
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "configuration reloaded" in proc.output(), PROMPTLY, "the reload")
        assert httpx.post(f"{url}/hooks/am", json={"message": "x"}).status_code == 202
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0


@pytest.mark.slow  # runs the CLI as a process
def test_a_secret_with_spaces_around_it_is_refused_not_trimmed(tmp_path) -> None:
    """`SMS_BRIDGE_SMTP_USERS=ups= pw ` was trimmed: the password in force was not the
    one given, and the sender's never matched. Refused, by the variable and the login,
    never quoting the secret; wherever a secret is given, file or environment."""
    base = "[smtp]\nauth_allow_plaintext = true\nrequire_auth = true\n"
    config = write_config(tmp_path, base)
    spaced = _check(config, tmp_path, SMS_BRIDGE_SMTP_USERS=f"ups= {PASSWORD} ")
    stderr = _refused(spaced, "SMS_BRIDGE_SMTP_USERS.ups", "white space")
    assert PASSWORD not in stderr
    assert _check(config, tmp_path, SMS_BRIDGE_SMTP_USERS=f"ups={PASSWORD}").returncode == 0
    key = tmp_path / "provider.key"
    key.write_text(f" {PASSWORD}\n")
    spaced_env = _check(None, tmp_path, SMS_BRIDGE_PROVIDER_API_KEY=f"{PASSWORD} ")
    _refused(spaced_env, "SMS_BRIDGE_PROVIDER_API_KEY", "white space")
    in_file = write_config(tmp_path, base + f'[smtp.users]\nups_file = "{key}"\n', "f.toml")
    _refused(_check(in_file, tmp_path), "smtp.users", "white space")
    key.write_text(f"{PASSWORD}\n{PASSWORD}\n")  # two lines: no header or AUTH carries it
    _refused(_check(in_file, tmp_path), "smtp.users", "control character")
    key.write_text(f"{PASSWORD}\n")  # a file's final line break is no part of the secret
    checked = _check(in_file, tmp_path)
    assert checked.returncode == 0, checked.stderr


@pytest.mark.slow  # runs the CLI as a process
def test_user_recipients_without_require_auth_are_named_as_escapable(tmp_path) -> None:
    """A client that does not log in is bound by no `smtp.user_recipients`: said by
    check-config and `serve` (a warning naming both keys), not refused: a bridge may
    mean it (local mail unrestricted, remote users listed)."""
    body = textwrap.dedent(f"""
        [smtp]
        listen = "{ANY_PORT}"
        auth_allow_plaintext = true
        require_auth = false
        [smtp.users]
        ups = "{PASSWORD}"
        [smtp.user_recipients]
        ups = ["+12025550101"]
        [http]
        listen = ""
        [store]
        path = "{tmp_path / "bridge.db"}"
    """)
    config = write_config(tmp_path, body)
    checked = _check(config, tmp_path)
    assert checked.returncode == 0, checked.stderr
    warned = [line for line in checked.stderr.splitlines() if "user_recipients" in line]
    assert warned and "smtp.require_auth" in warned[0], checked.stderr
    log = tmp_path / "serve.log"
    with process(["serve", "--config", str(config)], tmp_path, clean_env(), log) as proc:
        proc.address("SMTP")
        assert "smtp.require_auth" in proc.output()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    write_config(tmp_path, body.replace("require_auth = false", "require_auth = true"))
    checked = _check(config, tmp_path)
    assert checked.returncode == 0 and "user_recipients" not in checked.stderr, checked.stderr


@pytest.mark.slow  # runs the CLI as a process
def test_a_signed_grafana_route_without_a_timestamp_header_is_named_as_replayable(
    tmp_path,
) -> None:
    """Grafana signs the body alone unless its "Timestamp header" is set: a captured
    signed request passed again once the route's dedupe window was over, and its alert
    was texted again, as often as replayed. Said by check-config, `serve` and a reload
    (not refused: Grafana sends no timestamp by default, and a route that demands one
    refuses every such call); a route with `timestamp_header` is not named, unless its
    dedupe window is shorter than the signed time's skew."""
    body = _http_only(tmp_path) + textwrap.dedent(f"""
        [routes.graf]
        format = "grafana"
        to = ["+12025550101"]
        secret = "{PASSWORD}"
        [routes.stamped]
        format = "grafana"
        to = ["+12025550101"]
        secret = "{PASSWORD}"
        timestamp_header = "X-Grafana-Alerting-Timestamp"
        [routes.tokened]
        format = "grafana"
        to = ["+12025550101"]
        token = "{PASSWORD}"
        [routes.short]
        format = "grafana"
        to = ["+12025550101"]
        secret = "{PASSWORD}"
        timestamp_header = "X-Grafana-Alerting-Timestamp"
        dedupe_window = "1m"
    """)
    config = write_config(tmp_path, body)
    checked = _check(config, tmp_path)
    assert checked.returncode == 0, checked.stderr
    warned = [line for line in checked.stderr.splitlines() if "replay" in line]
    assert len(warned) == 2 and warned[0].startswith("warning: routes.graf: "), checked.stderr
    assert "routes.graf.timestamp_header" in warned[0], warned
    # a signed time older than the dedupe window, within the skew: replayed between
    assert warned[1].startswith("warning: routes.short: ") and "(300s)" in warned[1], warned
    log = tmp_path / "serve.log"
    with process(["serve", "--config", str(config)], tmp_path, clean_env(), log) as proc:
        proc.address("HTTP")
        assert "routes.graf: " in proc.output() and "routes.stamped" not in proc.output()
        write_config(tmp_path, body.replace("[routes.graf]", "[routes.graf2]"))
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload: routes.graf2: " in proc.output(), what="the reload's warning")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    closed = body.replace('secret = "', 'timestamp_header = "X-T"\nsecret = "', 1)
    write_config(tmp_path, closed.replace('dedupe_window = "1m"', 'dedupe_window = "5m"'))
    checked = _check(config, tmp_path)
    assert checked.returncode == 0 and "replay" not in checked.stderr, checked.stderr


DEEP = "[" * 2000
# (the config file, the environment, the key the refusal names): most passed check-config
# (nan is never reached, inf and 9999999999d overflow a thread's wait, 10**20 cannot be
# bound to SQLite) or gave it a traceback instead of a key; the two integer/duration
# texts from the environment were refused already and stay so.
HOSTILE = [
    ("[provider]\ntimeout = inf\n", {}, "provider.timeout"),
    ("[provider]\ntimeout = nan\n", {}, "provider.timeout"),
    ("[provider]\nconnect_timeout = 0\n", {}, "provider.connect_timeout"),
    # A refused key probed back to back: the minute's 100 requests went in 8 s.
    ("[provider]\nauth_probe_interval = 0\n", {}, "provider.auth_probe_interval"),
    ('[provider]\nauth_probe_interval = "4s"\n', {}, "provider.auth_probe_interval"),
    # A 429 without Retry-After paused 0 s: resent at once into the same full window.
    ("[provider]\nbackoff_initial = 0\n", {}, "provider.backoff_initial"),
    ('[provider]\nbackoff_initial = "500ms"\n', {}, "provider.backoff_initial"),
    ('[provider]\nbackoff_initial = "1s"\nbackoff_max = 0\n', {}, "provider.backoff_max"),
    ('[provider]\nbackoff_max = "2s"\n', {}, "provider.backoff_max"),  # under the 5s default
    # Both told at once, not the second after the first is fixed.
    ('[provider]\nbackoff_initial = 0\nbackoff_max = "500ms"\n', {}, "provider.backoff_max"),
    ("[provider]\ntimeout = 1" + "0" * 400 + "\n", {}, "provider.timeout"),
    ("[budget]\nlow_balance = 1" + "0" * 400 + "\n", {}, "budget.low_balance"),
    ('[store]\nretention = "9999999999d"\n', {}, "store.retention"),
    # An SQLite URI: SQLite opened its file, the bridge's own steps made a stray file
    # named after it (and left the store readable by all).
    ('[store]\npath = "file:/var/lib/sms-bridge/bridge.db?mode=rwc"\n', {}, "store.path"),
    ("", {"SMS_BRIDGE_STORE_PATH": "file:bridge.db"}, "SMS_BRIDGE_STORE_PATH"),
    # Every message lost at exit, and the readers saw empty databases of their own.
    ('[store]\npath = ":memory:"\n', {}, "store.path"),
    ('[store]\npath = ""\n', {}, "store.path"),  # SQLite's temporary database
    ("[budget]\ntexts_per_day = 100000000000000000000\n", {}, "budget.texts_per_day"),
    ("", {"SMS_BRIDGE_PROVIDER_TIMEOUT": "nan"}, "SMS_BRIDGE_PROVIDER_TIMEOUT"),
    # Both a value and its file: the inline one won, the file meant was never read.
    ('[provider]\napi_key = "k-0123456789abcdef"\napi_key_file = "k"\n', {}, "provider.api_key"),
    (f'[smtp.users]\nups = "{PASSWORD}"\nups_file = "bridge.toml"\n', {}, "smtp.users"),
    ("", {"SMS_BRIDGE_HTTP_MAX_RECIPIENTS": "1e3"}, "SMS_BRIDGE_HTTP_MAX_RECIPIENTS"),
    ("", {"SMS_BRIDGE_SMTP_ALLOWED_NETWORKS": DEEP}, "SMS_BRIDGE_SMTP_ALLOWED_NETWORKS"),
    ("", {"SMS_BRIDGE_GROUPS_OPS": "[+12025550101"}, "SMS_BRIDGE_GROUPS_OPS"),
    ("", {"SMS_BRIDGE_GROUPS_OPS": DEEP}, "SMS_BRIDGE_GROUPS_OPS"),
    ("", {"SMS_BRIDGE_TOKENS_CI_SCOPES": "[send"}, "SMS_BRIDGE_TOKENS_CI_SCOPES"),
    ("", {"SMS_BRIDGE_SMTP_USERS": f"={PASSWORD}"}, "smtp.users.''"),
    (f'[smtp.users]\n"ups\\u0000" = "{PASSWORD}"\n', {}, "smtp.users.'ups\\x00'"),
    ("", {"SMS_BRIDGE_TOKENS_CI_TEXTS_PER_DAY": "²"}, "tokens.ci.texts_per_day"),
]


@pytest.mark.parametrize(("body", "env", "key"), HOSTILE, ids=[h[2] for h in HOSTILE])
def test_values_no_bridge_can_run_on_are_refused_by_their_key(
    tmp_path, body: str, env: dict[str, str], key: str
) -> None:
    """Refused as a ConfigError naming the key (check-config prints each as `  KEY: why`,
    exit 78: `test_a_refusal_is_printed_by_its_key_with_exit_78`); any other exception
    is the traceback these gave. In-process: 18 runs of the CLI took 50 s of the fast
    target."""
    config = write_config(tmp_path, body)
    with pytest.raises(ConfigError) as caught:
        load_config(str(config), env=env)
    assert key in [k for k, _ in caught.value.problems], caught.value.problems


@pytest.mark.slow  # runs the CLI as a process
def test_a_refusal_is_printed_by_its_key_with_exit_78(tmp_path) -> None:
    """The CLI's side of the refusals above, for one of them."""
    body, env, key = HOSTILE[0]
    _refused(_check(write_config(tmp_path, body), tmp_path, **env), f"  {key}: ")


@pytest.mark.slow  # runs the CLI as a process
def test_durations_are_read_as_written(tmp_path) -> None:
    config = write_config(tmp_path, '[store]\nretention = "1.5h"\n[provider]\ntimeout = "250ms"\n')
    checked = _check(config, tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert '"retention": 5400.0' in checked.stdout and '"timeout": 0.25' in checked.stdout
    config.write_text('[store]\nretention = "-1s"\n')
    _refused(_check(config, tmp_path), "store.retention", "not a duration")


def _fingerprint(checked) -> str:
    assert checked.returncode == 0, checked.stderr
    [line] = [x for x in checked.stdout.splitlines() if x.startswith("rate window:")]
    return line.split("provider key ")[1].split(",")[0]


@pytest.mark.slow  # runs the CLI as a process
def test_a_windows_editors_files_read_as_written(tmp_path) -> None:
    """A byte order mark and CRLF line ends (Notepad): the config failed at line 1, column
    1, and a secret file's key carried the mark. The key's fingerprint is the same as
    the key's given in the environment."""
    key = "k-0123456789abcdef"
    base = '[provider]\nbase_url = "https://sms.example.net/api/v1"\n'
    (tmp_path / "provider.key").write_bytes(b"\xef\xbb\xbf" + key.encode() + b"\r\n")
    config = tmp_path / "bridge.toml"
    config.write_bytes(b"\xef\xbb\xbf" + (base + 'api_key_file = "provider.key"\n').encode())
    config.chmod(0o600)
    from_file = _fingerprint(_check(config, tmp_path))
    config.write_text(base)
    config.chmod(0o600)
    assert from_file == _fingerprint(_check(config, tmp_path, SMS_BRIDGE_PROVIDER_API_KEY=key))


@pytest.mark.slow  # runs the CLI as a process
def test_a_store_url_file_with_a_blank_line_after_it_is_refused_by_its_key(tmp_path) -> None:
    """A URL is a secret where it carries a password: read by the secrets' rule, the URL
    is one line, at most one line break after it."""
    (tmp_path / "store-url").write_text("postgresql://bridge:pw@db-1/sms\n\n")
    config = write_config(tmp_path, '[store]\nurl_file = "store-url"\n')
    _refused(_check(config, tmp_path), "store.url_file", "blank line")
