"""Configuration: TOML, environment overrides, secret files, durations, every problem named."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import httpx
import pytest

from bridge.clock import ManualClock
from bridge.config import load_config, parse_duration, parse_listen
from bridge.errors import ConfigError
from bridge.models import State
from tests.helpers import bridge_config, pump_until_state, running_bridge, write_config
from tests.processes import run_command
from tests.test_faults import FaultyTransport
from tests.test_hooks import HOOKS


def test_no_file_means_built_in_defaults_with_the_sandbox() -> None:
    config = load_config(None, env={})
    assert config.uses_sandbox
    assert config.http.listen == "127.0.0.1:8080"
    assert config.smtp.domains == ("sms.localhost",)
    assert config.provider.requests_per_minute == 100
    assert config.dedupe.window == 600


def test_file_values_and_environment_overrides(tmp_path) -> None:
    path = write_config(
        tmp_path,
        """
        [provider]
        base_url = "https://sms.example.net/api/v1"
        api_key = "from-file"
        requests_per_minute = 60
        timeout = "30s"
        [dedupe]
        window = "15m"
        [groups]
        oncall = ["+12025550101", "+1 202 555 0102"]
        [routes.am]
        format = "alertmanager"
        to = ["oncall"]
        public = true
    """,
    )
    env = {
        "SMS_BRIDGE_PROVIDER_API_KEY": "from-env",
        "SMS_BRIDGE_HTTP_LISTEN": "[::1]:9000",
        "SMS_BRIDGE_SMTP_DOMAINS": "a.example, b.example",
        "SMS_BRIDGE_PROVIDER_BULK_MESSAGE_TYPE": "true",
    }
    config = load_config(path, env=env)
    assert config.provider.api_key == "from-env"
    assert config.provider.requests_per_minute == 60
    assert config.provider.timeout == 30.0
    assert config.provider.bulk_message_type is True
    assert config.dedupe.window == 900.0
    assert config.http.listen == "[::1]:9000"
    assert config.smtp.domains == ("a.example", "b.example")
    assert config.groups["oncall"] == ("+12025550101", "+1 202 555 0102")
    assert config.routes["am"].to == ("oncall",)
    with pytest.raises(AttributeError):
        config.provider.api_key = "x"  # type: ignore[misc]


def test_secrets_from_files(tmp_path) -> None:
    (tmp_path / "key").write_text("s3cret-key\n")
    path = write_config(
        tmp_path,
        f"""
        [provider]
        base_url = "https://sms.example.net/api/v1"
        api_key_file = "{tmp_path / "key"}"
    """,
    )
    assert load_config(path, env={}).provider.api_key == "s3cret-key"
    (tmp_path / "key2").write_text("env-file-key")
    env = {"SMS_BRIDGE_PROVIDER_API_KEY_FILE": str(tmp_path / "key2")}
    assert load_config(path, env=env).provider.api_key == "env-file-key"


def test_every_problem_is_reported_with_its_key(tmp_path) -> None:
    path = write_config(
        tmp_path,
        """
        [http]
        listen = "nowhere"
        max_json_items = -1
        [provider]
        base_url = "ftp://x"
        requests_per_minute = "lots"
        sender_id = "THIS-IS-TOO-LONG"
        timeout = "soon"
        colour = "blue"
        [groups]
        oncall = ["+1555"]
        [routes.x]
        format = "carrier-pigeon"
        to = ["nobody"]
        [mystery]
    """,
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={"SMS_BRIDGE_STORE_PATH": "ok.db"})
    keys = [key for key, _ in caught.value.problems]
    for expected in (
        "http.listen",
        "http.max_json_items",
        "provider.base_url",
        "provider.requests_per_minute",
        "provider.sender_id",
        "provider.timeout",
        "provider.colour",
        "groups.oncall[0]",
        "routes.x.format",
        "routes.x.to[0]",
        "mystery",
        "provider.api_key",
    ):
        assert expected in keys, (expected, keys)


def test_bad_toml_and_missing_file(tmp_path) -> None:
    bad = write_config(tmp_path, "[provider\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad, env={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml", env={})


SECRET_FILES = {  # file name -> its text: each one is 16 characters or more
    "api-key": "provider-key-beside-config",
    "route.token": "route-token-beside-config",
    "ops.token": "api-token-beside-the-config",
    "alice.password": "alice-password-beside-config",
}


def _two_directories(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """`etc` holds the config and its files; the current directory `run` holds files of
    the same names with other texts, so a value says which directory it was read from."""
    etc, run = tmp_path / "etc", tmp_path / "run"
    for directory, tag in ((etc, ""), (run, "-from-the-cwd")):
        (directory / "tls").mkdir(parents=True)
        for name, text in SECRET_FILES.items():
            (directory / name).write_text(text + tag + "\n")
        for name in ("cert.pem", "key.pem"):
            (directory / "tls" / name).write_text("PEM")
    monkeypatch.chdir(run)
    return etc, run


def test_a_store_left_in_the_current_directory_by_an_upgrade_is_named_not_replaced(
    tmp_path, monkeypatch
) -> None:
    """Earlier versions read a relative store.path from the current directory: where
    the config's directory has no store but the current one does, starting would open an
    empty store and leave the queue behind. Refused, naming both; once moved, it loads."""
    etc, run = _two_directories(tmp_path, monkeypatch)
    (run / "bridge.db").write_bytes(b"")  # the store an earlier version used
    path = write_config(etc, '[store]\npath = "bridge.db"\n')
    with pytest.raises(ConfigError) as refused:
        load_config(path, env={})
    [(key, why)] = refused.value.problems
    assert key == "store.path"
    assert str(etc / "bridge.db") in why and str(run / "bridge.db") in why
    (run / "bridge.db").rename(etc / "bridge.db")
    assert load_config(path, env={}).store.path == str(etc / "bridge.db")
    assert load_config(None, env={"SMS_BRIDGE_STORE_PATH": "bridge.db"}).store.path == (
        "bridge.db"  # the environment's, read from the current directory as before
    )


def test_relative_paths_in_a_config_file_are_relative_to_its_directory(
    tmp_path, monkeypatch
) -> None:
    """/etc/sms-bridge/config.toml naming "api-key" means /etc/sms-bridge/api-key, not a
    file in the unit's WorkingDirectory (a first operator's surprise): every file name
    the file writes, secret or not. Absolute names stay."""
    etc, _ = _two_directories(tmp_path, monkeypatch)
    path = write_config(
        etc,
        f"""
        [provider]
        api_key_file = "api-key"
        [store]
        path = "state/bridge.db"
        [http]
        tls_cert = "tls/cert.pem"
        tls_key = "{etc / "tls" / "key.pem"}"
        [smtp]
        tls_cert = "./tls/cert.pem"
        tls_key = "tls/../tls/key.pem"
        users = {{ alice_file = "alice.password" }}
        [routes.am]
        format = "alertmanager"
        to = ["+12025550143"]
        token_file = "route.token"
        [tokens.ops]
        token_file = "ops.token"
        scopes = ["send"]
        """,
    )
    config = load_config(path, env={})
    assert config.provider.api_key == SECRET_FILES["api-key"]
    assert config.routes["am"].token == SECRET_FILES["route.token"]
    assert config.tokens["ops"].token == SECRET_FILES["ops.token"]
    assert config.smtp.users == {"alice": SECRET_FILES["alice.password"]}
    assert config.store.path == str(etc / "state" / "bridge.db")
    assert config.http.tls_cert == str(etc / "tls" / "cert.pem")
    assert config.http.tls_key == str(etc / "tls" / "key.pem")  # absolute: as written
    assert config.smtp.tls_cert == f"{etc}/./tls/cert.pem"  # joined, not normalised
    assert config.smtp.tls_key == str(etc / "tls/../tls/key.pem")
    # Named from another directory by a relative path: still the file's own directory.
    monkeypatch.chdir(tmp_path)
    assert load_config("etc/bridge.toml", env={}).store.path == str(etc / "state" / "bridge.db")


def test_paths_from_the_environment_and_the_defaults_stay_relative_to_the_cwd(
    tmp_path, monkeypatch
) -> None:
    """No file wrote them: an override is read from where the process runs, and the
    default store is the README's ./sms-bridge.db, with a config file or without."""
    etc, run = _two_directories(tmp_path, monkeypatch)
    path = write_config(
        etc,
        """
        [routes.am]
        format = "alertmanager"
        to = ["+12025550143"]
        token_file = "route.token"
        [tokens.ops]
        token_file = "ops.token"
        scopes = ["send"]
        """,
    )
    assert load_config(path, env={}).store.path == "sms-bridge.db"
    assert load_config(None, env={}).store.path == "sms-bridge.db"
    env = {
        "SMS_BRIDGE_PROVIDER_API_KEY_FILE": "api-key",
        "SMS_BRIDGE_ROUTES_AM_TOKEN_FILE": "route.token",
        "SMS_BRIDGE_TOKENS_OPS_TOKEN_FILE": "ops.token",
        "SMS_BRIDGE_SMTP_USERS": "alice_file=alice.password",
        "SMS_BRIDGE_STORE_PATH": "state/env.db",
        "SMS_BRIDGE_HTTP_TLS_CERT": "tls/cert.pem",
        "SMS_BRIDGE_HTTP_TLS_KEY": "tls/key.pem",
    }
    config = load_config(path, env=env)
    cwd = "-from-the-cwd"
    assert config.provider.api_key == SECRET_FILES["api-key"] + cwd
    assert config.routes["am"].token == SECRET_FILES["route.token"] + cwd
    assert config.tokens["ops"].token == SECRET_FILES["ops.token"] + cwd
    assert config.smtp.users == {"alice": SECRET_FILES["alice.password"] + cwd}
    assert (config.store.path, config.http.tls_cert) == ("state/env.db", "tls/cert.pem")
    # A token the environment adds whole, with no table in the file, reads the same way.
    added_env = {
        "SMS_BRIDGE_TOKENS_NEW_TOKEN_FILE": "ops.token",
        "SMS_BRIDGE_TOKENS_NEW_SCOPES": "send",
    }
    added = load_config(None, env=added_env)
    assert added.tokens["new"].token == SECRET_FILES["ops.token"] + cwd
    assert run == Path.cwd()


def test_an_unreadable_file_is_named_where_it_was_looked_for(tmp_path, monkeypatch) -> None:
    """The file's relative name, joined to its directory; the environment's relative
    one, with the current directory it was read from; an absolute one as it is."""
    etc, run = _two_directories(tmp_path, monkeypatch)
    path = write_config(
        etc,
        """
        [provider]
        base_url = "https://sms.example.net/api/v1"
        api_key_file = "absent-key"
        [http]
        tls_cert = "tls/absent.pem"
        tls_key = "tls/key.pem"
        """,
    )
    env = {
        "SMS_BRIDGE_SANDBOX_API_KEY_FILE": str(tmp_path / "nope"),
        "SMS_BRIDGE_ROUTES_AM_TOKEN_FILE": "absent.token",
    }
    with pytest.raises(ConfigError) as caught:
        load_config(path, env=env)
    problems = dict(caught.value.problems)
    assert problems["provider.api_key_file"] == (
        f"cannot read secret file '{etc / 'absent-key'}': No such file or directory"
    )
    assert problems["http.tls_cert"] == f"{etc / 'tls' / 'absent.pem'}: no such file"
    assert problems["SMS_BRIDGE_SANDBOX_API_KEY_FILE"] == (
        f"cannot read secret file '{tmp_path / 'nope'}': No such file or directory"
    )
    env = {"SMS_BRIDGE_PROVIDER_API_KEY_FILE": "absent-key"}
    with pytest.raises(ConfigError) as caught:
        load_config(None, env=env)
    assert dict(caught.value.problems)["SMS_BRIDGE_PROVIDER_API_KEY_FILE"] == (
        f"cannot read secret file 'absent-key' (relative to the current directory {run}):"
        " No such file or directory"
    )


def test_a_tls_file_that_is_there_but_no_file_is_named_for_what_it_is(tmp_path) -> None:
    """A certificate that is a FIFO, a key that is a directory: both said "no such file",
    and the operator looked for a file that was there."""
    import os

    fifo = tmp_path / "cert.pem"
    os.mkfifo(fifo)
    (tmp_path / "key.pem").mkdir()
    path = write_config(
        tmp_path,
        """
        [smtp]
        tls_cert = "cert.pem"
        tls_key = "key.pem"
        """,
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    problems = dict(caught.value.problems)
    assert problems["smtp.tls_cert"] == f"{fifo}: is a named pipe (FIFO), not a regular file"
    assert problems["smtp.tls_key"] == (
        f"{tmp_path / 'key.pem'}: is a directory, not a regular file"
    )


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("10m", 600), ("1.5h", 5400), ("2d", 172800), ("250ms", 0.25), (45, 45)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_listen_addresses() -> None:
    assert parse_listen("127.0.0.1:2525") == ("127.0.0.1", 2525)
    assert parse_listen("[::1]:8080") == ("::1", 8080)
    with pytest.raises(ValueError):
        parse_listen("8080")


@pytest.mark.slow  # runs a subprocess
def test_check_config_command_exits_78_naming_each_key(tmp_path) -> None:
    path = write_config(
        tmp_path,
        """
        [provider]
        requests_per_minute = 0
        [smtp]
        listen = "localhost"
    """,
    )
    result = run_command(["check-config", "--config", str(path)])
    assert result.returncode == 78
    assert "provider.requests_per_minute" in result.stderr
    assert "smtp.listen" in result.stderr
    good = write_config(
        tmp_path,
        '[provider]\nbase_url = "https://x.example/api/v1"\napi_key = "abcd-1234"\n',
        name="good.toml",
    )
    ok = run_command(["check-config", str(good)])
    assert ok.returncode == 0, ok.stderr
    assert "abcd-1234" not in ok.stdout  # secrets masked


@pytest.mark.slow  # runs a subprocess
def test_a_listen_host_ending_in_a_dot_is_refused(tmp_path) -> None:
    """`localhost.` and `127.0.0.1.` passed check-config, protected mode counting them as
    loopback, but a name ending in a dot is looked up in DNS when bound: no such name
    (serve exits 1, restarted for ever), or whatever address the DNS server answers.
    Refused, naming the key and the host to write."""
    path = write_config(
        tmp_path,
        """
        [provider]
        base_url = "https://sms.example.net/api/v1"
        api_key = "live-key-123"
        [http]
        listen = "localhost.:8080"
        [smtp]
        listen = "127.0.0.1.:2525"
    """,
    )
    result = run_command(["check-config", str(path)])
    assert result.returncode == 78, result.stdout
    assert "http.listen: 'localhost.:8080': write localhost, without the final '.'" in (
        result.stderr
    )
    assert "smtp.listen: '127.0.0.1.:2525': write 127.0.0.1" in result.stderr


def test_example_config_is_valid_and_documents_every_key() -> None:
    import dataclasses
    import tomllib
    from pathlib import Path

    from bridge.config import SECTIONS

    example = Path(__file__).parent.parent / "config.example.toml"
    load_config(example, env={})
    parsed = tomllib.loads(example.read_text())
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if (section, f.name) == ("smtp", "rules"):
                # Tables of their own after the [smtp] keys: a commented [[smtp.rules]]
                # (a `rules = []` too made uncommenting it invalid TOML; tests/test_docs.py)
                assert "\n# [[smtp.rules]]\n" in example.read_text()
                assert "rules" not in parsed[section]
                continue
            assert f.name in parsed[section], f"{section}.{f.name} missing from the example"
            shown = parsed[section][f.name]
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            if f.metadata.get("kind") == "duration":
                shown = parse_duration(shown)
            elif isinstance(f.default, tuple):
                shown = tuple(shown)
            assert shown == default, f"{section}.{f.name}: the example differs from the default"


def test_smtp_rules_are_read_in_order(tmp_path) -> None:
    path = write_config(
        tmp_path,
        """
        [smtp]
        compose = "subject_body"
        [[smtp.rules]]
        name = "proxmox"
        subject = "^vzdump backup status"
        keep = ["ERROR"]
        first_line_matching = "Backup of VM \\\\d+ failed"
        [[smtp.rules]]
        sender = "nagios@*"
        max_lines = 2
        compose = "body"
    """,
    )
    rules = load_config(path, env={}).smtp.rules
    assert [r.name for r in rules] == ["proxmox", ""]
    assert (
        rules[0].keep == ("ERROR",) and rules[0].first_line_matching == r"Backup of VM \d+ failed"
    )
    assert rules[1].sender == ("nagios@*",) and rules[1].max_lines == 2
    env = {"SMS_BRIDGE_SMTP_RULES": '[{subject = "UPS", keep = ["STATUS"]}]'}
    assert [r.keep for r in load_config(path, env=env).smtp.rules] == [("STATUS",)]


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("SMS_BRIDGE_SMTP_RULES", '[{subject = "UPS"}]\nhttp = 1'),
        ("SMS_BRIDGE_SMTP_RULES", '[]\n[http]\nlisten = "127.0.0.1:9"'),
        ("SMS_BRIDGE_HTTP_ALLOWED_HOSTS", '["localhost"]\nextra = "x"'),
    ],
)
def test_text_after_a_toml_value_in_the_environment_is_refused(name: str, text: str) -> None:
    """Read as the document `v = TEXT`, what followed the array on lines of its own was
    taken as more keys and dropped without a word (a rule meant, never in force)."""
    with pytest.raises(ConfigError) as caught:
        load_config(None, env={name: text})
    [why] = [w for k, w in caught.value.problems if k == name]
    assert "text after the value" in why and "one TOML value only" in why, why


@pytest.mark.parametrize(
    ("rule", "problem"),
    [
        ('subject = "("', "[0].subject: '(' is not a regular expression"),
        ('sender = "a@*"\nkeep = ["ok", "[z-a]"]', "[0].keep: '[z-a]' is not a regular expression"),
        ('sender = "a@*"\nkeeep = ["x"]', "[0].keeep: unknown key"),
        ('keep = ["x"]', "[0]: a rule needs sender or subject to match on"),
        ('sender = "a@*"\nmax_lines = -1', "[0].max_lines: expected an integer, 0 or more"),
        ('sender = "a@*"\ncompose = "all"', "[0].compose: must be subject, body"),
        ('sender = "a@*"\ncompose = "template"', "[0].template: required when compose"),
        ("sender = 5", "[0].sender: expected a list of strings"),
    ],
)
def test_smtp_rule_problems_name_the_rule_and_key(tmp_path, rule: str, problem: str) -> None:
    path = write_config(tmp_path, "[[smtp.rules]]\n" + rule + "\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert any(key == "smtp.rules" and problem in why for key, why in caught.value.problems)


@pytest.mark.slow  # runs a subprocess
def test_check_config_shows_smtp_rules(tmp_path) -> None:
    path = write_config(tmp_path, '[[smtp.rules]]\nsender = "ups@*"\nkeep = ["STATUS"]\n')
    result = run_command(["check-config", str(path)])
    assert result.returncode == 0, result.stderr
    assert '"keep": [' in result.stdout and '"STATUS"' in result.stdout


def test_listener_limits_must_be_positive(tmp_path) -> None:
    path = write_config(
        tmp_path,
        """
        [smtp]
        max_sessions = 0
        max_mime_parts = -1
        parse_timeout = "0s"
        [http]
        max_concurrency = 0
        max_header_bytes = 100
        header_timeout = 0
    """,
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    keys = {key for key, _ in caught.value.problems}
    assert keys == {
        "smtp.max_sessions",
        "smtp.max_mime_parts",
        "smtp.parse_timeout",
        "http.max_concurrency",
        "http.max_header_bytes",
        "http.header_timeout",
    }


@pytest.mark.slow  # runs a subprocess
@pytest.mark.parametrize(
    ("body", "key", "why"),
    [
        ('[status]\npoll_interval = "0s"\n', "status.poll_interval", "must be at least 1s"),
        (
            '[limits]\nper_recipient = 3\nper_recipient_window = "0s"\n',
            "limits.per_recipient_window",
            "must be at least 1s while limits.per_recipient is set",
        ),
    ],
)
def test_an_interval_of_zero_is_refused(tmp_path, body: str, key: str, why: str) -> None:
    """`status.poll_interval = "0s"` passed check-config and the poller went round with
    no pause (half a core on an idle bridge); `per_recipient_window = "0s"` with
    `per_recipient` set counted no texts: storm control silently off. Both refused by
    `check-config`, naming the key; storm control off by `per_recipient = 0` still loads."""
    result = run_command(["check-config", str(write_config(tmp_path, body))])
    assert result.returncode == 78, result.stdout
    assert f"{key}: {why}" in result.stderr
    off = write_config(tmp_path, '[limits]\nper_recipient = 0\nper_recipient_window = "0s"\n')
    load_config(off, env={})


BYTE_LIMITS = [
    ("http", "max_body_bytes", 0, "must be at least 4096"),
    ("http", "max_body_bytes", 100, "must be at least 4096"),
    ("http", "max_json_items", 10, "must be 0 (no cap) or at least 512"),
    ("smtp", "max_message_bytes", 100, "must be at least 1024"),
]


@pytest.mark.slow  # runs a subprocess
@pytest.mark.parametrize(("section", "key", "value", "why"), BYTE_LIMITS)
def test_a_size_limit_that_refuses_ordinary_requests_is_refused(
    tmp_path, section: str, key: str, value: int, why: str
) -> None:
    """`http.max_body_bytes = 0` passed check-config, then every API call and webhook
    was answered 413 (a 4xx Alertmanager never retries: every alert dropped); so did a
    body cap or a JSON item cap under the smallest real webhook, and a mail size under a
    mail's headers. `check-config` refuses each, naming the key and the least value."""
    path = write_config(tmp_path, f"[{section}]\n{key} = {value}\n")
    result = run_command(["check-config", str(path)])
    assert result.returncode == 78, result.stdout
    assert f"{section}.{key}: {why}" in result.stderr


async def test_the_least_body_size_takes_a_real_alert(
    tmp_path, clock: ManualClock, sandbox_url: str
) -> None:
    """At the least `http.max_body_bytes` and `max_json_items` a real Alertmanager
    group and an API call are taken."""
    extra = (
        "[http]\nmax_body_bytes = 4096\nmax_json_items = 512\n"
        '[routes.am]\nformat = "alertmanager"\nto = ["+12025550143"]\npublic = true\n'
    )
    config = bridge_config(tmp_path, sandbox_url, extra)
    firing = (HOOKS / "alertmanager-firing.json").read_bytes()
    async with running_bridge(config, clock) as (_, url), httpx.AsyncClient() as http:
        hook = await http.post(
            f"{url}/hooks/am", content=firing, headers={"content-type": "application/json"}
        )
        assert hook.status_code == 202, hook.text
        api = await http.post(
            f"{url}/api/v1/messages", json={"to": "+12025550143", "message": "disk full"}
        )
        assert api.status_code == 202, api.text


def test_route_keys_are_overridden_from_the_environment(tmp_path) -> None:
    secret = tmp_path / "grafana.hmac"
    secret.write_text("from-a-file-0123456789\n")
    path = write_config(
        tmp_path,
        """
        [routes.alertmanager]
        format = "alertmanager"
        to = ["+12025550143"]
        [routes.grafana-prod]
        format = "grafana"
        to = ["+12025550143"]
    """,
    )
    env = {
        "SMS_BRIDGE_ROUTES_ALERTMANAGER_TOKEN": "abc-0123456789abcdef",
        "SMS_BRIDGE_ROUTES_ALERTMANAGER_TO": "+12025550144,+12025550145",
        "SMS_BRIDGE_ROUTES_GRAFANA_PROD_SECRET_FILE": str(secret),
    }
    config = load_config(path, env=env)
    assert config.routes["alertmanager"].token == "abc-0123456789abcdef"
    assert config.routes["alertmanager"].to == ("+12025550144", "+12025550145")
    assert config.routes["grafana-prod"].secret == "from-a-file-0123456789"


def test_a_route_override_naming_nothing_is_a_problem_not_silence(tmp_path) -> None:
    path = write_config(
        tmp_path, '[routes.alertmanager]\nformat = "alertmanager"\nto = ["+12025550143"]\n'
    )
    with pytest.raises(ConfigError) as caught:
        load_config(
            path,
            env={
                "SMS_BRIDGE_ROUTES_ALERTMANGER_TOKEN": "typo-in-the-route",
                "SMS_BRIDGE_ROUTES_ALERTMANAGER_TOKNE": "typo-in-the-key",
            },
        )
    problems = dict(caught.value.problems)
    assert "names no route" in problems["SMS_BRIDGE_ROUTES_ALERTMANGER_TOKEN"]
    assert "alertmanager" in problems["SMS_BRIDGE_ROUTES_ALERTMANGER_TOKEN"]
    assert "no such route key" in problems["SMS_BRIDGE_ROUTES_ALERTMANAGER_TOKNE"]
    assert "typo" not in str(caught.value.problems)  # values (maybe secrets) never echoed


def test_a_section_override_naming_no_key_is_a_problem_not_silence() -> None:
    """`SMS_BRIDGE_HTTP_LISTN` once left the default listener in force without a word."""
    with pytest.raises(ConfigError) as caught:
        load_config(
            None,
            env={
                "SMS_BRIDGE_HTTP_LISTN": "0.0.0.0:8080",
                "SMS_BRIDGE_PROVIDER_APIKEY": "typo-in-the-key",
                "SMS_BRIDGE_PROVIDR_BASE_URL": "typo-in-the-section",
                "SMS_BRIDGE_TOKENS_CI_TOKN": "typo-in-a-token-key",
                "SMS_BRIDGE_ROUTE_AM_TOKEN": "a-collection-in-the-singular",
                "SMS_BRIDGE_TOKEN_CI_SCOPES_FILE": "/run/secrets/scopes",
            },
        )
    problems = dict(caught.value.problems)
    assert problems == {
        "SMS_BRIDGE_HTTP_LISTN": "no such [http] key (did you mean SMS_BRIDGE_HTTP_LISTEN?)",
        "SMS_BRIDGE_PROVIDER_APIKEY": (
            "no such [provider] key (did you mean SMS_BRIDGE_PROVIDER_API_KEY?)"
        ),
        "SMS_BRIDGE_PROVIDR_BASE_URL": (
            "no such section (did you mean SMS_BRIDGE_PROVIDER_BASE_URL?)"
        ),
        "SMS_BRIDGE_TOKENS_CI_TOKN": (
            "no such token key: SMS_BRIDGE_TOKENS_<NAME>_ then TOKEN, TOKEN_FILE, SCOPES or "
            "TEXTS_PER_DAY"
        ),
        "SMS_BRIDGE_ROUTE_AM_TOKEN": "no such section (did you mean SMS_BRIDGE_ROUTES_AM_TOKEN?)",
        "SMS_BRIDGE_TOKEN_CI_SCOPES_FILE": (
            "no such section (did you mean SMS_BRIDGE_TOKENS_CI_SCOPES_FILE?)"
        ),
    }
    # What is no section's (a sender's variable in the same shell, a test switch) and the
    # keys themselves, with or without _FILE, pass.
    config = load_config(
        None,
        env={
            "SMS_BRIDGE_TOKEN": "a-senders-own-variable",
            "SMS_BRIDGE_TOKEN_FILE": "/home/ops/.sms-token",
            "SMS_BRIDGE_API_TOKEN": "another-senders-variable",
            "SMS_BRIDGE_TEST_POSTGRES": "1",
            "SMS_BRIDGE_HTTP_LISTEN": "127.0.0.1:8081",
            "SMS_BRIDGE_SANDBOX_API_KEY": "another-sandbox-key",
        },
    )
    assert config.http.listen == "127.0.0.1:8081"


def test_a_misspelt_key_in_the_file_is_named_with_the_near_one(tmp_path) -> None:
    path = write_config(tmp_path, '[smtp]\nlistn = "127.0.0.1:2526"\n[provder]\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert dict(caught.value.problems) == {
        "smtp.listn": "unknown key (did you mean listen?)",
        "provder": "unknown section (did you mean provider?)",
    }


def test_store_url_is_a_postgresql_url_or_empty(tmp_path) -> None:
    bad = write_config(tmp_path, '[store]\nurl = "mysql://db.example/sms"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(bad)
    assert [key for key, _ in caught.value.problems] == ["store.url"]
    assert "postgresql://" in caught.value.problems[0][1]
    good = write_config(tmp_path, '[store]\nurl = "postgresql://sms:pw@db/sms"\n', "pg.toml")
    assert load_config(good).store.url == "postgresql://sms:pw@db/sms"
    assert load_config(write_config(tmp_path, "", "empty.toml")).store.url == ""


def test_cluster_section_names_the_instance_and_bounds_the_lease(tmp_path) -> None:
    from bridge.config import load_config

    config = load_config(
        None, env={"SMS_BRIDGE_CLUSTER_INSTANCE": "a", "SMS_BRIDGE_CLUSTER_LEASE": "45s"}
    )
    assert (config.cluster.instance, config.cluster.lease) == ("a", 45.0)
    assert load_config(None, env={}).cluster.lease == 30.0
    with pytest.raises(ConfigError) as caught:
        load_config(None, env={"SMS_BRIDGE_CLUSTER_LEASE": "1s"})
    assert ("cluster.lease", "must be between 5s and 1h") in caught.value.problems


def test_groups_that_differ_only_by_case_are_refused(tmp_path) -> None:
    """Group names are case-blind everywhere (as a mail's local part is): `ops` and `OPS`
    would be one group at SMTP and two over HTTP."""
    path = write_config(tmp_path, '[groups]\nops = ["+12025550101"]\nOPS = ["+12025550102"]\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert caught.value.problems == [
        (
            "groups.OPS",
            "the same name as groups.ops but for case: group names are case-blind (as the "
            "local part of a mail address is); merge or rename",
        )
    ]
    # an environment override names the file's group whatever case it is written in
    path = write_config(tmp_path, '[groups]\nOnCall = ["+12025550101"]\n')
    config = load_config(path, env={"SMS_BRIDGE_GROUPS_ONCALL": '["+12025550102"]'})
    assert dict(config.groups) == {"OnCall": ("+12025550102",)}


def test_a_groups_environment_override_names_the_files_group_as_spelt_there(tmp_path) -> None:
    """`SMS_BRIDGE_GROUPS_ON_CALL` (a variable cannot hold `-`) was read as a group
    `on_call`, added beside the file's `on-call`, whose members stayed the old ones: a
    rotation of the on-call phone that changed nothing. It names the file's group, as a
    route's and a token's variables do; and `on-call` beside `on_call`, which one
    variable cannot tell apart, is refused."""
    path = write_config(tmp_path, '[groups]\non-call = ["+12025550101"]\n')
    config = load_config(path, env={"SMS_BRIDGE_GROUPS_ON_CALL": "+12025550102"})
    assert dict(config.groups) == {"on-call": ("+12025550102",)}
    twins = '[groups]\non-call = ["+12025550101"]\non_call = ["+12025550102"]\n'
    with pytest.raises(ConfigError) as refused:
        load_config(write_config(tmp_path, twins), env={})
    [(key, why)] = refused.value.problems
    assert key == "groups.on_call" and "groups.on-call" in why, why
    assert "SMS_BRIDGE_GROUPS_ON_CALL cannot tell them apart" in why


def test_a_group_without_members_is_refused(tmp_path) -> None:
    """`ops = []` (or SMS_BRIDGE_GROUPS_OPS=""): ops@ was answered 250 "stored as message"
    over SMTP, and 202 over HTTP, with nothing stored and no one texted."""
    path = write_config(tmp_path, '[groups]\nops = []\noncall = ["+12025550101"]\n')
    for env in ({}, {"SMS_BRIDGE_GROUPS_ONCALL": ""}):
        with pytest.raises(ConfigError) as caught:
            load_config(path, env=env)
        assert (
            "groups.ops",
            "no members: a mail or request to it would be acknowledged and lost",
        ) in caught.value.problems
    assert [k for k, _ in caught.value.problems] == ["groups.ops", "groups.oncall"]


def test_smtp_user_recipients_name_users_and_what_a_route_may_text(tmp_path) -> None:
    """`smtp.user_recipients` is checked as a route's `to` is (each entry a group or an
    allowed number), keyed by a login of `[smtp.users]`, and never empty (an empty
    allow-list that let the user text anyone would say the opposite of what it does)."""
    users = '[smtp]\nusers = {ups = "ups-pass-0123456789"}\n'
    body = (
        users + 'user_recipients = {ups = ["oncall", "not-a-group", "+1"], nobody = ["oncall"]}\n'
        '[groups]\noncall = ["+12025550101"]\n'
    )
    with pytest.raises(ConfigError) as refused:
        load_config(write_config(tmp_path, body), env={})
    assert sorted(k for k, _ in refused.value.problems) == [
        "smtp.user_recipients.nobody",
        "smtp.user_recipients.ups[1]",
        "smtp.user_recipients.ups[2]",
    ]
    with pytest.raises(ConfigError) as refused:
        load_config(write_config(tmp_path, users + "user_recipients = {ups = []}\n"), env={})
    assert [k for k, _ in refused.value.problems] == ["smtp.user_recipients.ups"]
    env = {"SMS_BRIDGE_SMTP_USER_RECIPIENTS": '{ups = ["+12025550143"]}'}
    config = load_config(write_config(tmp_path, users), env=env)
    assert config.smtp.user_recipients == {"ups": ("+12025550143",)}


@pytest.mark.parametrize("key", ["max_message_bytes", "max_recipients"])
def test_smtp_size_and_recipient_limits_are_above_zero(tmp_path, key: str) -> None:
    """`smtp.max_message_bytes = 0` was no limit at all (aiosmtpd's reading of 0): one
    client's DATA could fill the bridge's memory; `max_recipients = 0` refused every
    RCPT. Both are refused by their key."""
    why = "must be at least 1024" if key == "max_message_bytes" else "must be above 0"
    for value in (0, -1):
        with pytest.raises(ConfigError) as refused:
            load_config(write_config(tmp_path, f"[smtp]\n{key} = {value}\n"), env={})
        assert dict(refused.value.problems) == {f"smtp.{key}": why}


def test_the_outcomes_a_ci_route_may_name_hold_its_formats_defaults() -> None:
    """check-config refuses a `conclusions` word outside ROUTE_OUTCOMES: every outcome a
    format texts by default must be one of them, or writing the default out is refused."""
    from bridge.config import sections
    from bridge.ingress.formats import github, gitlab

    defaults = {
        "github": (
            github.DEFAULT_CONCLUSIONS
            + github.DEFAULT_STATUS_STATES
            + github.DEFAULT_DEPLOYMENT_STATES
        ),
        "gitlab": gitlab.DEFAULT_STATUSES,
    }
    assert set(defaults) == set(sections.ROUTE_OUTCOMES)
    for form, outcomes in defaults.items():
        assert set(outcomes) <= set(sections.ROUTE_OUTCOMES[form]), form


# Each accepted before, and each broke the bridge quietly (the harm in the comment).
ZERO_REFUSALS = [
    # The poller asked about no text (each was past it when sent): all stayed `sent`.
    (
        "status",
        'give_up_after = "0s"',
        "status.give_up_after: must be at least 10m and status.poll_interval",
    ),
    # A text failed at its first 5xx, timeout or refused connection.
    (
        "provider",
        'retry_max_age = "0s"',
        "provider.retry_max_age: must be at least 30s and provider.backoff_initial",
    ),
    # Every genuine signed Grafana alert was answered 401 "replay?".
    (
        'routes.g]\nformat = "grafana"\nto = ["+12025550143"]\npublic = true\n'
        'secret = "graf-secret-0123456789"\ntimestamp_header = "X-Ts"\n#',
        'max_timestamp_skew = "0s"',
        "routes.g.max_timestamp_skew: must be at least 5s",
    ),
    # The strict sandbox refused every send; the others reported a debt.
    ("sandbox", "balance = -5.0", "sandbox.balance: must be 0 (an empty account) or more"),
    # A blank name in place of host name and pid, in the log and pg_stat_activity.
    ("cluster", 'instance = " "', 'cluster.instance: is blank: name the instance, or ""'),
    # aiosmtpd closed every SMTP session the moment it opened: no mail taken at all.
    ("smtp", 'idle_timeout = "0s"', "smtp.idle_timeout: must be above 0"),
]


@pytest.mark.slow  # runs a subprocess
def test_a_setting_that_breaks_the_bridge_is_refused_by_check_config_and_serve(
    tmp_path,
) -> None:
    """Each of ZERO_REFUSALS passed check-config and `serve` started on it, as did names
    one environment variable cannot tell apart. Both refuse them now (exit 78), naming
    the key and the least value (or the other name)."""
    body = "".join(f"[{section}]\n{line}\n" for section, line, _ in ZERO_REFUSALS)
    route = 'to = ["+12025550143"]\npublic = true\n'
    body += f"[routes.Ops]\n{route}[routes.ops]\n{route}"
    body += '[groups]\non-call = ["+12025550101"]\non_call = ["+12025550102"]\n'
    expected = [why for _, _, why in ZERO_REFUSALS] + [
        "routes.ops: the same name as routes.Ops but for case",
        "groups.on_call: the same name as groups.on-call but for case",
    ]
    path = write_config(tmp_path, body)
    for command in ("check-config", "serve"):
        result = run_command([command, "--config", str(path)], cwd=tmp_path)
        assert result.returncode == 78, result.stdout + result.stderr
        for why in expected:
            assert f"  {why}" in result.stderr, (command, why, result.stderr)


async def test_at_their_least_values_a_signed_alert_is_taken_retried_and_delivered(
    tmp_path, clock: ManualClock, sandbox_url: str
) -> None:
    """The paths the refused values broke, at the least values taken: a Grafana alert
    signed 4 s ago is taken under a 5 s skew (one 6 s old is not); its first send meets
    a refused connection and is retried within a 30 s `retry_max_age`, not failed; and
    the poller, giving up after 10 minutes, still reads it delivered."""
    secret = "graf-secret-0123456789"
    extra = (
        '[status]\ngive_up_after = "10m"\n'
        f'[routes.g]\nformat = "grafana"\nto = ["+12025550143"]\nsecret = "{secret}"\n'
        'timestamp_header = "X-Ts"\nmax_timestamp_skew = "5s"\ndedupe_window = "5s"\n'
    )
    config = bridge_config(tmp_path, sandbox_url, extra, retry_max_age="30s")
    body = (HOOKS / "grafana-single.json").read_bytes()

    def signed(age: int) -> dict[str, str]:
        stamp = str(int(clock.now()) - age)
        mac = hmac.new(secret.encode(), f"{stamp}:".encode() + body, hashlib.sha256)
        return {
            "content-type": "application/json",
            "X-Grafana-Alerting-Signature": mac.hexdigest(),
            "X-Ts": stamp,
        }

    transport = FaultyTransport(["connect-refused"])
    async with (
        running_bridge(config, clock, transport=transport) as (bridge, url),
        httpx.AsyncClient() as http,
    ):
        late = await http.post(f"{url}/hooks/g", content=body, headers=signed(6))
        assert late.status_code == 401, late.text
        taken = await http.post(f"{url}/hooks/g", content=body, headers=signed(4))
        assert taken.status_code == 202, taken.text
        [message_id] = taken.json()["ids"]
        await pump_until_state(bridge, clock, message_id, State.DELIVERED, max_seconds=600)
        message = await bridge.store.get(message_id)
    assert message is not None and message.attempts == 2  # the refused one, then sent


@pytest.mark.parametrize(("section", "line", "why"), ZERO_REFUSALS)
def test_each_breaking_setting_is_named_alone_and_its_least_value_loads(
    tmp_path, section: str, line: str, why: str
) -> None:
    """One at a time, each is the only problem; the least value it takes loads."""
    with pytest.raises(ConfigError) as refused:
        load_config(write_config(tmp_path, f"[{section}]\n{line}\n"), env={})
    [(key, reason)] = refused.value.problems
    assert f"{key}: {reason}".startswith(why), reason
    least = {
        "status": 'give_up_after = "10m"',
        "provider": 'retry_max_age = "30s"',
        "sandbox": "balance = 0.0",
        "cluster": 'instance = ""',
        "smtp": 'idle_timeout = "1s"',
    }.get(section, 'max_timestamp_skew = "5s"')
    load_config(write_config(tmp_path, f"[{section}]\n{least}\n"), env={})


def test_retry_max_age_is_at_least_backoff_initial_and_give_up_after_poll_interval(
    tmp_path,
) -> None:
    """Under `backoff_initial` the first retry's wait ran past `retry_max_age`: a text
    failed at its first transient error all the same; under `poll_interval` no round
    came before a text was given up."""
    body = (
        '[provider]\nbackoff_initial = "2m"\nbackoff_max = "2m"\nretry_max_age = "1m"\n'
        '[status]\npoll_interval = "20m"\ngive_up_after = "15m"\n'
    )
    with pytest.raises(ConfigError) as refused:
        load_config(write_config(tmp_path, body), env={})
    assert [key for key, _ in refused.value.problems] == [
        "provider.retry_max_age",
        "status.give_up_after",
    ]


def test_route_names_the_environment_cannot_tell_apart_are_refused(tmp_path) -> None:
    """`[routes.Ops]` and `[routes.ops]` (or `a-b` and `a_b`): one
    `SMS_BRIDGE_ROUTES_OPS_TOKEN` set both routes' tokens, a rotation meant for one
    changing the other's too. Refused, as tokens' names are."""
    route = 'to = ["+12025550143"]\ntoken = "route-token-0123456789"\n'
    for first, other in (("Ops", "ops"), ("Ops", "OPS"), ("a-b", "a_b"), ("a.b", "A-B")):
        body = f'[routes."{first}"]\n{route}[routes."{other}"]\n{route}'
        with pytest.raises(ConfigError) as refused:
            load_config(write_config(tmp_path, body), env={})
        [(key, why)] = refused.value.problems
        assert key == f"routes.{other}" and f"routes.{first}" in why, why
        assert "SMS_BRIDGE_ROUTES_" in why and "rename one" in why
    # one route, any case in the file: the environment names it
    path = write_config(tmp_path, f"[routes.Ops]\n{route}")
    config = load_config(path, env={"SMS_BRIDGE_ROUTES_OPS_TOKEN": "rotated-0123456789abc"})
    assert config.routes["Ops"].token == "rotated-0123456789abc"
