"""Protected mode, https to the provider, file modes: what `check-config` and `serve` refuse.

With a real provider (`provider.base_url` set), nothing that other machines can reach
may be open: `serve` and `check-config` exit 1 naming the key. The sandbox stays open so
the README's two-command start keeps working. Refused configs are never served, so no
test here binds a non-loopback address.
"""

from __future__ import annotations

import logging
import os
import stat
import subprocess
from pathlib import Path

import httpx
import pytest

from bridge.clock import ManualClock
from bridge.config import StoreConfig, inline_secrets, load_config, secret_values
from bridge.errors import ConfigError
from bridge.store import open_store
from tests.helpers import bridge_config, running_bridge, write_config
from tests.processes import clean_env, run_command

TOKEN = "deploy-token-0123456789abcdef"
REAL = '[provider]\nbase_url = "https://sms.example.net/api/v1"\napi_key = "live-key-123"\n'
LOOPBACK = '[http]\nlisten = "127.0.0.1:8080"\n[smtp]\nlisten = "127.0.0.1:2525"\n'
TOKENS = f'[tokens.deploy]\ntoken = "{TOKEN}"\nscopes = ["send"]\n'


def problems(tmp_path: Path, body: str) -> list[str]:
    """The keys `load_config` names for `body` ([] when it loads)."""
    try:
        load_config(write_config(tmp_path, body), env={})
    except ConfigError as exc:
        return [key for key, _ in exc.problems]
    return []


def test_an_smtp_user_with_an_empty_password_is_refused(tmp_path: Path) -> None:
    """A password file that is empty (a secret not mounted, `echo > file`) reads as "":
    the user then passed AUTH with its login and nothing else, so with `require_auth`
    anyone who named it could text. Refused like a short API token, naming the user."""
    (tmp_path / "ups.pw").write_text("\n")
    (tmp_path / "nas.pw").write_text("nas-password-0123\n")
    body = (
        "[smtp]\nrequire_auth = true\nauth_allow_plaintext = true\n"
        f'users = {{ups_file = "{tmp_path / "ups.pw"}", nas_file = "{tmp_path / "nas.pw"}",'
        ' pdu = ""}\n'
    )
    assert sorted(problems(tmp_path, body)) == ["smtp.users.pdu", "smtp.users.ups"]
    fine = "[smtp]\nrequire_auth = true\nauth_allow_plaintext = true\n"
    assert problems(tmp_path, fine + f'users = {{nas_file = "{tmp_path / "nas.pw"}"}}\n') == []


@pytest.mark.parametrize(
    ("body", "keys"),
    [
        # HTTP on every address with no token: refused; a token or loopback makes it fine.
        (REAL + '[http]\nlisten = "0.0.0.0:8080"\n', ["http.listen"]),
        (REAL + '[http]\nlisten = "[::]:8080"\n' + TOKENS, []),
        (REAL + '[http]\nlisten = "192.0.2.10:8080"\n', ["http.listen"]),
        (REAL + '[http]\nlisten = "localhost:8080"\n', []),
        (REAL + '[http]\nlisten = "[::ffff:127.0.0.1]:8080"\n', []),  # IPv4 loopback
        (REAL + '[http]\nlisten = "bridge.localhost:8080"\n', ["http.listen"]),  # DNS decides
        # Behind a proxy a loopback listener is reachable from the network all the same.
        (REAL + '[http]\ntrusted_proxies = ["127.0.0.1/32"]\n', ["http.trusted_proxies"]),
        (REAL + '[http]\nallowed_hosts = ["sms.example.org"]\n', ["http.allowed_hosts"]),
        (REAL + '[http]\nallowed_hosts = ["localhost", "[::1]"]\n', []),
        (REAL + '[http]\ntrusted_proxies = ["127.0.0.1/32"]\n' + TOKENS, []),
        # SMTP beyond loopback needs AUTH or a client allowlist; tls_listen counts too.
        (REAL + '[smtp]\nlisten = "0.0.0.0:2525"\n', ["smtp.listen"]),
        (REAL + '[smtp]\nlisten = "0.0.0.0:2525"\nallowed_networks = ["192.0.2.0/24"]\n', []),
        # An allowlist of everyone is no allowlist.
        (
            REAL + '[smtp]\nlisten = "0.0.0.0:2525"\nallowed_networks = ["10.0.0.0/8", "::/0"]\n',
            ["smtp.listen"],
        ),
        (
            REAL
            + '[routes.n]\nformat = "generic"\nto = ["+12025550143"]\nallowed_networks = ["0.0.0.0/0"]\n',
            ["routes.n"],
        ),
        # The IPv4 Internet written as IPv4-mapped IPv6 is the IPv4 Internet.
        (
            REAL + '[smtp]\nlisten = "0.0.0.0:2525"\nallowed_networks = ["::ffff:0:0/96"]\n',
            ["smtp.listen"],
        ),
        # ... and so is any IPv6 network holding it: IPv4 clients match their mapped form.
        (
            REAL + '[smtp]\nlisten = "0.0.0.0:2525"\nallowed_networks = ["::/64"]\n',
            ["smtp.listen"],
        ),
        (
            REAL
            + '[routes.n]\nformat = "generic"\nto = ["+12025550143"]\n'
            + 'allowed_networks = ["::fffe:0:0/95"]\n',
            ["routes.n"],
        ),
        (REAL + '[smtp]\nlisten = "0.0.0.0:2525"\nallowed_networks = ["fd00::/64"]\n', []),
        # Judged on the union: two halves are everyone; so is any public space past a /8.
        (
            REAL + '[smtp]\nlisten = "0.0.0.0:2525"\n'
            'allowed_networks = ["0.0.0.0/1", "128.0.0.0/1"]\n',
            ["smtp.listen"],
        ),
        (
            REAL + '[smtp]\nlisten = "0.0.0.0:2525"\nallowed_networks = ["2000::/3"]\n',
            ["smtp.listen"],
        ),
        (
            REAL + '[smtp]\nlisten = "0.0.0.0:2525"\n'
            'allowed_networks = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"]\n',
            [],
        ),
        # AUTH without TLS beyond loopback: refused, unless the loud override says it.
        (
            REAL + '[smtp]\nlisten = "0.0.0.0:2525"\nrequire_auth = true\n'
            'auth_allow_plaintext = true\nusers = { ups = "ups-password-0123" }\n',
            ["smtp.auth_allow_plaintext"],
        ),
        (
            REAL + '[smtp]\nlisten = "0.0.0.0:2525"\nrequire_auth = true\n'
            'auth_allow_plaintext = true\nusers = { ups = "ups-password-0123" }\n'
            "dangerously_allow_plaintext_auth_beyond_loopback = true\n",
            [],
        ),
        (
            REAL + '[smtp]\nlisten = "[::1]:2525"\nrequire_auth = true\n'
            'auth_allow_plaintext = true\nusers = { ups = "ups-password-0123" }\n',
            [],
        ),
        # Routes: any authentication, or public = true said out loud.
        (REAL + '[routes.open]\nformat = "generic"\nto = ["+12025550143"]\n', ["routes.open"]),
        (REAL + '[routes.open]\nformat = "generic"\nto = ["+12025550143"]\npublic = true\n', []),
        (
            REAL
            + '[routes.t]\nformat = "generic"\nto = ["+12025550143"]\ntoken = "route-token-0123456789"\n',
            [],
        ),
        (
            REAL
            + '[routes.g]\nformat = "grafana"\nto = ["+12025550143"]\nsecret = "grafana-key-0123456789"\n',
            [],
        ),
        # A generic route never checks a secret: it protects nothing there.
        (
            REAL
            + '[routes.s]\nformat = "generic"\nto = ["+12025550143"]\nsecret = "ignored-0123456789ab"\n',
            ["routes.s"],
        ),
        (
            REAL
            + '[routes.b]\nformat = "generic"\nto = ["+12025550143"]\nusername = "u"\npassword = "pw-0123456789abcdef"\n',
            [],
        ),
        (
            REAL
            + '[routes.n]\nformat = "generic"\nto = ["+12025550143"]\nallowed_networks = ["10.1.0.0/16"]\n',
            [],
        ),
        # Behind a local proxy (allowed_hosts names its host) every caller is loopback:
        # an allowlist of loopback alone admits the Internet unless trusted_proxies
        # makes the bridge judge the forwarded client.
        (
            REAL
            + '[http]\nallowed_hosts = ["sms.example.org"]\n'
            + TOKENS
            + '[routes.n]\nformat = "generic"\nto = ["+12025550143"]\n'
            + 'allowed_networks = ["127.0.0.0/8", "::1/128"]\n',
            ["routes.n"],
        ),
        (
            REAL
            + '[http]\nallowed_hosts = ["*"]\n'
            + TOKENS
            + '[routes.n]\nformat = "generic"\nto = ["+12025550143"]\n'
            + 'allowed_networks = ["::ffff:127.0.0.1/128"]\n',
            ["routes.n"],
        ),
        (
            REAL
            + '[http]\nallowed_hosts = ["sms.example.org"]\ntrusted_proxies = ["127.0.0.1/32"]\n'
            + TOKENS
            + '[routes.n]\nformat = "generic"\nto = ["+12025550143"]\n'
            + 'allowed_networks = ["127.0.0.0/8", "::1/128"]\n',
            [],
        ),
        (
            REAL
            + '[http]\nallowed_hosts = ["sms.example.org"]\n'
            + TOKENS
            + '[routes.n]\nformat = "generic"\nto = ["+12025550143"]\n'
            + 'allowed_networks = ["127.0.0.0/8"]\ntoken = "route-token-0123456789"\n',
            [],
        ),
        (  # no name but loopback's: no proxy in front, the address is the caller's
            REAL
            + '[http]\nallowed_hosts = ["localhost"]\n'
            + '[routes.n]\nformat = "generic"\nto = ["+12025550143"]\n'
            + 'allowed_networks = ["127.0.0.0/8", "::1/128"]\n',
            [],
        ),
        (  # not loopback alone: behind the proxy it admits no one, which is no hole
            REAL
            + '[http]\nallowed_hosts = ["sms.example.org"]\n'
            + TOKENS
            + '[routes.n]\nformat = "generic"\nto = ["+12025550143"]\n'
            + 'allowed_networks = ["127.0.0.0/8", "10.1.0.0/16"]\n',
            [],
        ),
        # A route on a bridge without an HTTP listener cannot be reached.
        (
            REAL
            + '[http]\nlisten = ""\n[routes.open]\nformat = "generic"\nto = ["+12025550143"]\n',
            [],
        ),
        # The sandbox (no base_url) stays open on every address: nothing is sent.
        (
            '[http]\nlisten = "0.0.0.0:8080"\n[smtp]\nlisten = "0.0.0.0:2525"\n'
            '[routes.open]\nformat = "generic"\nto = ["+12025550143"]\n',
            [],
        ),
        # All three at once: each is named.
        (
            REAL + '[http]\nlisten = "0.0.0.0:8080"\n[smtp]\nlisten = "127.0.0.1:2525"\n'
            'tls_listen = "0.0.0.0:4650"\ntls_cert = "/nonexistent"\ntls_key = "/nonexistent"\n'
            '[routes.open]\nformat = "generic"\nto = ["+12025550143"]\n',
            ["http.listen", "smtp.tls_listen", "routes.open"],
        ),
    ],
)
def test_protected_mode(tmp_path, body: str, keys: list[str]) -> None:
    named = problems(tmp_path, body)
    named = [k for k in named if not k.startswith(("smtp.tls_cert", "smtp.tls_key"))]
    assert named == keys


def test_an_open_smtp_listener_is_told_what_to_set(tmp_path) -> None:
    """The refusal says what to do, and an allowlist judged too wide is called that, not
    "neither ... nor smtp.allowed_networks" to someone who wrote one."""
    smtp = REAL + '[smtp]\nlisten = "0.0.0.0:2525"\n'
    wide = '\nallowed_networks = ["0.0.0.0/0"]\n'
    route = '[routes.n]\nformat = "generic"\nto = ["+12025550143"]'
    real = "while provider.base_url is set (a real provider: every SMS costs money)"
    todo = (
        'list your senders in smtp.allowed_networks (e.g. ["192.0.2.0/24"]), set '
        "smtp.require_auth with [smtp.users], or listen on 127.0.0.1"
    )
    said = {}
    for name, body in (("none", smtp), ("wide", smtp + wide), ("route", REAL + route + wide)):
        with pytest.raises(ConfigError) as caught:
            load_config(write_config(tmp_path, body, f"{name}.toml"), env={})
        said[name] = dict(caught.value.problems)
    assert said["none"]["smtp.listen"] == (
        "0.0.0.0:2525 is reachable from the network with neither smtp.require_auth nor "
        f"smtp.allowed_networks {real}: {todo}"
    )
    admits = "admits the Internet (more than an IPv4 /8 or an IPv6 /32 of public space)"
    assert said["wide"]["smtp.listen"] == (
        f"0.0.0.0:2525 is reachable from the network and smtp.allowed_networks {admits} "
        f"{real}: {todo}"
    )
    assert said["route"]["routes.n"].startswith(
        f"no authentication {real}; its allowed_networks {admits}: set token"
    )


@pytest.mark.parametrize(
    ("url", "refused"),
    [
        ("http://sms.example.net/api/v1", True),
        ("http://192.0.2.10:8000/api/v1", True),
        ("https://sms.example.net/api/v1", False),
        ("http://127.0.0.1:8099/api/v1", False),
        ("http://[::1]:8099/api/v1", False),
        ("http://localhost:8099/api/v1", False),
    ],
)
def test_the_api_key_crosses_the_network_only_over_https(tmp_path, url: str, refused: bool) -> None:
    body = f'{LOOPBACK}[provider]\nbase_url = "{url}"\napi_key = "live-key-123"\n'
    assert ("provider.base_url" in problems(tmp_path, body)) is refused


def run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return run_command([*args], cwd=cwd, env=clean_env(**(env or {})))


@pytest.mark.slow
def test_check_config_and_serve_refuse_an_open_bridge_with_a_real_provider(tmp_path) -> None:
    config = write_config(
        tmp_path,
        f'[store]\npath = "{tmp_path / "b.db"}"\n' + REAL + '[http]\nlisten = "0.0.0.0:8080"\n'
        '[smtp]\nlisten = "0.0.0.0:2525"\n[routes.open]\nformat = "generic"\nto = ["+12025550143"]\n',
    )
    os.chmod(config, 0o600)
    for command in ("check-config", "serve"):
        result = run(command, "--config", str(config), cwd=tmp_path)
        assert result.returncode == 78, (command, result.stderr)
        for key in ("http.listen", "smtp.listen", "routes.open"):
            assert f"  {key}: " in result.stderr, (command, key)
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "b.db").exists()  # refused before anything opened

    # The Docker way: the same listeners, with the environment adding what protects them.
    token = tmp_path / "deploy.token"
    token.write_text(TOKEN + "\n")
    fixed = write_config(
        tmp_path,
        config.read_text().replace(
            'format = "generic"\nto = ["+12025550143"]\n',
            'format = "generic"\nto = ["+12025550143"]\npublic = true\n',
        )
        + f'[tokens.deploy]\ntoken_file = "{token}"\nscopes = ["send"]\n',
        name="fixed.toml",
    )
    os.chmod(fixed, 0o600)
    ok = run(
        "check-config",
        str(fixed),
        cwd=tmp_path,
        env={"SMS_BRIDGE_SMTP_ALLOWED_NETWORKS": "192.0.2.0/24"},
    )
    assert ok.returncode == 0, ok.stderr
    assert TOKEN not in ok.stdout + ok.stderr

    # With no provider the same open listeners are the sandbox: accepted as they are.
    sandbox = run(
        "check-config",
        cwd=tmp_path,
        env={"SMS_BRIDGE_HTTP_LISTEN": "0.0.0.0:8080", "SMS_BRIDGE_SMTP_LISTEN": "0.0.0.0:2525"},
    )
    assert sandbox.returncode == 0, sandbox.stderr


@pytest.mark.slow
def test_check_config_warns_when_a_world_readable_file_holds_secrets(open_tmp) -> None:
    # Below open_tmp every directory above the files is open: their own modes decide.
    secret = open_tmp / "am.token"
    secret.write_text("route-token-from-file")
    inline = write_config(
        open_tmp,
        '[routes.am]\nformat = "generic"\nto = ["+12025550143"]\ntoken = "route-token-inline"\n'
        '[smtp.users]\nups = "ups-password-0123"\n',
        name="inline.toml",
    )
    from_files = write_config(
        open_tmp,
        f'[routes.am]\nformat = "generic"\nto = ["+12025550143"]\ntoken_file = "{secret}"\n',
        name="files.toml",
    )
    os.chmod(inline, 0o644)
    os.chmod(from_files, 0o644)
    loud = run("check-config", str(inline), cwd=open_tmp)
    assert loud.returncode == 0, loud.stderr  # a warning, not a refusal
    assert "warning:" in loud.stderr and "readable by every user" in loud.stderr
    assert "routes.am.token" in loud.stderr and "smtp.users.ups" in loud.stderr
    assert "route-token-inline" not in loud.stderr + loud.stdout
    os.chmod(secret, 0o600)
    assert "warning:" not in run("check-config", str(from_files), cwd=open_tmp).stderr
    # A secret file anyone may read exposes its secret as much as an inline one.
    os.chmod(secret, 0o644)
    exposed = run("check-config", str(from_files), cwd=open_tmp)
    assert exposed.returncode == 0, exposed.stderr
    assert f"warning: routes.am.token_file: {secret} is readable by every user" in exposed.stderr
    os.chmod(inline, 0o600)
    assert "warning:" not in run("check-config", str(inline), cwd=open_tmp).stderr


def _tree(top: Path, *modes: int) -> Path:
    """Directories top/d1/d2/... with the given modes (whatever the umask); the last one."""
    directory = top
    for depth, mode in enumerate(modes, 1):
        directory = directory / f"d{depth}"
        directory.mkdir()
        directory.chmod(mode)
    return directory


def _warnings(config: Path, cwd: Path) -> list[str]:
    checked = run("check-config", str(config), cwd=cwd)
    assert checked.returncode == 0, checked.stderr  # a warning, not a refusal
    return [line for line in checked.stderr.splitlines() if line.startswith("warning:")]


@pytest.mark.slow
def test_a_file_in_a_directory_others_cannot_enter_is_no_warning(open_tmp) -> None:
    """/etc/sms-bridge 0750 (or 0700) with files 0644 in it: no other user can reach them,
    so neither the config's inline secrets nor a secret file is "readable by every user".
    Any directory above the file counts, not just its own; open all the way down, both
    files warn."""
    inner = _tree(open_tmp, 0o700, 0o755)  # d1 (closed) / d2 (open) / the files
    token = inner / "am.token"
    token.write_text("route-token-from-file")
    config = write_config(
        inner,
        f'[routes.am]\nformat = "generic"\nto = ["+12025550143"]\ntoken_file = "{token}"\n'
        '[smtp.users]\nups = "ups-password-0123"\n',
    )
    for path in (token, config):
        path.chmod(0o644)
    for closed in (0o700, 0o750, 0o754):  # r without x for others opens nothing either
        (open_tmp / "d1").chmod(closed)
        assert _warnings(config, open_tmp) == [], oct(closed)
    (open_tmp / "d1").chmod(0o755)
    (open_tmp / "d1" / "d2").chmod(0o750)  # the file's own directory closed
    assert _warnings(config, open_tmp) == []
    (open_tmp / "d1" / "d2").chmod(0o755)
    assert _warnings(config, open_tmp) == [
        f"warning: {config} is readable by every user and holds secrets (smtp.users.ups):"
        f" chmod 600 {config}, or move them to *_file keys",
        f"warning: routes.am.token_file: {token} is readable by every user: chmod 600 {token}",
    ]


@pytest.mark.slow
def test_a_symlinked_secret_is_judged_by_the_real_files_directories(open_tmp) -> None:
    """A link is followed to the file it names: a link in an open directory to a key in
    a closed one exposes nothing; a link in a closed directory to a key in an open one
    is readable by every user (through the key's own path)."""
    closed, public = _tree(open_tmp, 0o700), open_tmp / "public"
    public.mkdir()
    public.chmod(0o755)
    hidden, shown = closed / "hidden.token", public / "shown.token"
    for key in (hidden, shown):
        key.write_text("route-token-from-file")
        key.chmod(0o644)
    (public / "link.token").symlink_to(hidden)
    (closed / "link.token").symlink_to(shown)
    for link in (public / "link.token", closed / "link.token"):
        config = write_config(
            open_tmp,
            f'[routes.am]\nformat = "generic"\nto = ["+12025550143"]\ntoken_file = "{link}"\n',
        )
        config.chmod(0o600)
        expected = (
            [f"warning: routes.am.token_file: {link} is readable by every user: chmod 600 {link}"]
            if link.parent == closed
            else []
        )
        assert _warnings(config, open_tmp) == expected, link


def test_inline_secrets_and_secret_values_come_from_the_secret_fields(tmp_path) -> None:
    password = tmp_path / "pw"
    password.write_text("basic-pass-from-file")
    path = write_config(
        tmp_path,
        f"""
        [sandbox]
        api_key = "sandbox-secret"
        [smtp.users]
        ups = "ups-password-0123"
        nas_file = "{password}"
        [routes.j]
        format = "generic"
        to = ["+12025550143"]
        username = "jenkins"
        password_file = "{password}"
        secret = "hmac-secret-0123456789"
        [tokens.deploy]
        token = "{TOKEN}"
        scopes = ["send"]
        """,
    )
    config = load_config(path, env={"SMS_BRIDGE_PROVIDER_API_KEY": "env-api-key"})
    assert sorted(secret_values(config)) == sorted(
        [
            "env-api-key",
            "sandbox-secret",
            "ups-password-0123",
            "basic-pass-from-file",
            "basic-pass-from-file",
            "hmac-secret-0123456789",
            TOKEN,
        ]
    )
    assert "jenkins" not in secret_values(config)  # a user name is not a secret
    assert inline_secrets(path) == [
        "smtp.users.ups",
        "routes.j.secret",
        "tokens.deploy.token",
    ]
    # The in-process sandbox's key guards nothing, so the example file, copied as it is
    # by the systemd recipe (0644, for the unit's DynamicUser), is no warning to chmod it.
    assert inline_secrets(Path(__file__).parents[1] / "config.example.toml") == []


async def test_the_store_and_its_journals_are_created_0600(tmp_path) -> None:
    old = os.umask(0o022)  # the usual umask, which would give 0644
    try:
        store = open_store(StoreConfig(path=str(tmp_path / "private" / "bridge.db")))
        await store.open()
        try:
            await store.heartbeat(1.0)
            files = sorted(p.name for p in (tmp_path / "private").iterdir())
            assert files == ["bridge.db", "bridge.db-shm", "bridge.db-wal"]
            for name in files:
                mode = stat.S_IMODE((tmp_path / "private" / name).stat().st_mode)
                assert mode == 0o600, f"{name}: {oct(mode)}"
        finally:
            await store.close()
    finally:
        os.umask(old)


async def test_an_existing_store_is_named_when_every_user_may_read_it(
    open_tmp, caplog: pytest.LogCaptureFixture
) -> None:
    """A store kept 0644 (its owner's choice) is named in the log only when the way to it
    is open too: in a 0700 or 0750 directory no other user can read it."""
    data = _tree(open_tmp, 0o755)
    path = data / "bridge.db"
    store = open_store(StoreConfig(path=str(path)))
    await store.open()  # created 0600: no warning
    await store.close()
    path.chmod(0o644)
    seen = {}
    for mode in (0o700, 0o750, 0o755):
        data.chmod(mode)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="bridge"):
            store = open_store(StoreConfig(path=str(path)))
            await store.open()
            await store.close()
        seen[mode] = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    warning = f"store {path} is readable by every user: chmod 600 it"
    assert seen == {0o700: [], 0o750: [], 0o755: [warning]}


def test_tokens_from_the_environment(tmp_path) -> None:
    secret = tmp_path / "deploy.token"
    secret.write_text(TOKEN + "\n")
    path = write_config(
        tmp_path, '[tokens.ci]\ntoken = "in-the-file-0123456789"\nscopes = ["read"]\n'
    )
    config = load_config(
        path,
        env={
            "SMS_BRIDGE_TOKENS_DEPLOY_BOT_TOKEN_FILE": str(secret),
            "SMS_BRIDGE_TOKENS_DEPLOY_BOT_SCOPES": "send,read",
            "SMS_BRIDGE_TOKENS_CI_TOKEN": "from-the-env-0123456789",
        },
    )
    assert {name: (t.token, t.scopes) for name, t in config.tokens.items()} == {
        "ci": ("from-the-env-0123456789", ("read",)),
        "deploy_bot": (TOKEN, ("send", "read")),
    }
    # Both in the environment: the plain variable wins, as it does for every key (the
    # file won here, by the names' order; the secret-file warning assumed otherwise).
    both = load_config(
        None,
        env={
            "SMS_BRIDGE_TOKENS_CI_TOKEN": "from-the-env-0123456789",
            "SMS_BRIDGE_TOKENS_CI_TOKEN_FILE": str(secret),
            "SMS_BRIDGE_TOKENS_CI_SCOPES": "send",
        },
    )
    assert both.tokens["ci"].token == "from-the-env-0123456789"
    with pytest.raises(ConfigError) as caught:
        load_config(None, env={"SMS_BRIDGE_TOKENS_X_TOKEN": "short"})
    assert [k for k, _ in caught.value.problems] == ["tokens.x.token", "tokens.x.scopes"]


async def test_a_token_rotated_through_the_environment_retires_the_files_token(
    tmp_path, clock: ManualClock, sandbox_url: str
) -> None:
    """`[tokens.Deploy]` in the file and `SMS_BRIDGE_TOKENS_DEPLOY_TOKEN` (a rotation
    after a leak): the environment's name was lower-cased and looked up as written, so
    a second token `deploy` was added and the leaked one still sent texts. The name is
    matched case-blind (and `-` `.` as `_`, as the variable must spell them): one token,
    the environment's, and the leaked one answered 401."""
    leaked, rotated = "leaked-token-0123456789abcdef", "rotated-token-0123456789abcdef"
    path = write_config(
        tmp_path,
        f'[store]\npath = "{tmp_path / "bridge.db"}"\n'
        f'[provider]\nbase_url = "{sandbox_url}/api/v1"\napi_key = "test-key"\n'
        f'[tokens.Deploy]\ntoken = "{leaked}"\nscopes = ["send"]\n'
        f'[tokens."ci-bot.eu"]\ntoken = "{leaked}-ci"\nscopes = ["send"]\n',
    )
    env = {
        "SMS_BRIDGE_TOKENS_DEPLOY_TOKEN": rotated,
        "SMS_BRIDGE_TOKENS_DEPLOY_SCOPES": "send",
        "SMS_BRIDGE_TOKENS_CI_BOT_EU_TOKEN": f"{rotated}-ci",
    }
    config = load_config(path, env=env)
    assert sorted(config.tokens) == ["Deploy", "ci-bot.eu"]
    body = {"to": "+12025550143", "message": "deployed"}
    async with running_bridge(config, clock) as (_, url), httpx.AsyncClient() as http:
        for token, status in ((leaked, 401), (rotated, 202), (f"{leaked}-ci", 401)):
            headers = {"Authorization": f"Bearer {token}"}
            answer = await http.post(f"{url}/api/v1/messages", json=body, headers=headers)
            assert answer.status_code == status, (token, answer.text)


def test_two_token_names_the_environment_cannot_tell_apart_are_refused(tmp_path) -> None:
    """`[tokens.Deploy]` and `[tokens.deploy]`: one `SMS_BRIDGE_TOKENS_DEPLOY_TOKEN`
    could rotate only one of them. Refused, as group names differing by case are."""
    for other in ("deploy", "DEPLOY"):
        body = (
            f'[tokens.Deploy]\ntoken = "{TOKEN}"\nscopes = ["send"]\n'
            f'[tokens.{other}]\ntoken = "{TOKEN}-2"\nscopes = ["send"]\n'
        )
        with pytest.raises(ConfigError) as refused:
            load_config(write_config(tmp_path, body), env={})
        [(key, why)] = refused.value.problems
        assert key == f"tokens.{other}" and "tokens.Deploy" in why


@pytest.mark.slow
async def test_a_reload_cannot_open_what_the_running_provider_would_send_through(
    tmp_path, sandbox_url: str, clock: ManualClock
) -> None:
    """Provider and listeners need a restart, so a reload is judged on what would run:
    the running provider with the new routes. Dropping `base_url` and a route's only
    credential in one edit must not open that route while real SMS still go out."""
    route = '[routes.net]\nformat = "generic"\nto = ["+12025550143"]\n'
    config = bridge_config(tmp_path, sandbox_url, route + 'allowed_networks = ["192.0.2.0/24"]\n')
    dropped = load_config(write_config(tmp_path, route, "dropped.toml"), env={})
    assert dropped.uses_sandbox  # on its own the edited file is fine: the sandbox is open
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        post = {"json": {"message": "reload bypass"}, "url": f"{url}/hooks/net"}
        assert (await http.post(**post)).status_code == 403
        with pytest.raises(ConfigError) as refused:
            bridge.reload(dropped)
        assert [key for key, _ in refused.value.problems] == ["routes.net"]
        assert (await http.post(**post)).status_code == 403  # nothing was applied
        assert bridge.config.routes["net"].allowed_networks == ("192.0.2.0/24",)
        # A reload that keeps the route protected applies, and says what waits.
        kept = load_config(
            write_config(tmp_path, route + 'token = "route-token-0123456789"\n', "kept.toml"),
            env={},
        )
        assert "provider changed but needs a restart" in bridge.reload(kept)
        assert not bridge.config.uses_sandbox  # still the running provider
        assert (await http.post(**post)).status_code == 401
        # Compared with what runs, not with the last file: the running provider and store
        # in the file again wait for nothing.
        restored = bridge_config(
            tmp_path, sandbox_url, route + 'token = "route-token-0123456789"\n'
        )
        assert bridge.reload(restored) == []


@pytest.mark.slow
def test_a_secret_file_the_environment_names_is_checked_too(open_tmp) -> None:
    """`SMS_BRIDGE_PROVIDER_API_KEY_FILE` (the Docker and systemd recipes' way) reads a
    secret as much as a `*_file` key does: a key anyone may read is named, one in a
    closed directory or 0600 is not. No config file at all: the environment alone. Any
    key may be read from a `_FILE` variable, a template too: only secrets' files count,
    and only those the loader reads (a plain variable wins over its `_FILE`)."""
    files = _tree(open_tmp, 0o755)
    key, token, template = files / "api.key", files / "deploy.token", files / "sms.j2"
    key.write_text("provider-key-from-env-file")
    token.write_text("deploy-token-from-env-file-0123456789")
    template.write_text("{{ subject }}")
    for path in (key, token, template):
        path.chmod(0o644)
    env = {
        "SMS_BRIDGE_PROVIDER_API_KEY_FILE": str(key),
        "SMS_BRIDGE_TOKENS_DEPLOY_TOKEN_FILE": str(token),
        "SMS_BRIDGE_TOKENS_DEPLOY_SCOPES": "send",
        "SMS_BRIDGE_SMTP_TEMPLATE_FILE": str(template),
    }
    exposed = run("check-config", cwd=open_tmp, env=env)
    assert exposed.returncode == 0, exposed.stderr
    assert [line for line in exposed.stderr.splitlines() if line.startswith("warning:")] == [
        f"warning: SMS_BRIDGE_PROVIDER_API_KEY_FILE: {key} is readable by every user:"
        f" chmod 600 {key}",
        f"warning: SMS_BRIDGE_TOKENS_DEPLOY_TOKEN_FILE: {token} is readable by every user:"
        f" chmod 600 {token}",
    ]
    assert "provider-key-from-env-file" not in exposed.stderr + exposed.stdout
    overridden = run("check-config", cwd=open_tmp, env=env | {"SMS_BRIDGE_PROVIDER_API_KEY": "k"})
    assert "SMS_BRIDGE_PROVIDER_API_KEY_FILE" not in overridden.stderr
    (open_tmp / "d1").chmod(0o700)
    assert "warning:" not in run("check-config", cwd=open_tmp, env=env).stderr
    (open_tmp / "d1").chmod(0o755)
    key.chmod(0o600)
    token.chmod(0o600)
    assert "warning:" not in run("check-config", cwd=open_tmp, env=env).stderr


@pytest.mark.slow
def test_a_tls_private_key_anyone_may_read_is_named(open_tmp) -> None:
    """A listener's private key is the bridge's most lasting secret: whoever reads it can
    be the bridge to every client until the certificate expires."""
    import trustme

    keys = _tree(open_tmp, 0o755)
    for section in ("http", "smtp"):  # pairs that load: check-config loads them
        pair = trustme.CA().issue_cert("127.0.0.1")
        pair.cert_chain_pems[0].write_to_path(str(keys / f"{section}.pem"))
        pair.private_key_pem.write_to_path(str(keys / f"{section}.key"))
    for name in ("http.pem", "http.key", "smtp.pem", "smtp.key"):
        (keys / name).chmod(0o644)
    config = write_config(
        keys,
        f'[http]\ntls_cert = "{keys}/http.pem"\ntls_key = "{keys}/http.key"\n'
        f'[smtp]\ntls_cert = "{keys}/smtp.pem"\ntls_key = "{keys}/smtp.key"\n',
    )
    config.chmod(0o644)
    assert _warnings(config, open_tmp) == [
        f"warning: {section}.tls_key: {keys}/{section}.key is readable by every user:"
        f" chmod 600 {keys}/{section}.key"
        for section in ("http", "smtp")
    ]
    (keys / "http.key").chmod(0o600)
    (keys / "smtp.key").chmod(0o640)
    assert _warnings(config, open_tmp) == []  # certificates are public: never named


@pytest.mark.parametrize(
    ("url", "secrets"),
    [
        ("postgresql://bridge@db-1/bridge", []),
        ("postgresql://bridge:pw%2Fin-url@db-1/bridge", ["pw%2Fin-url", "pw/in-url"]),
        ("postgresql://bridge@db-1/bridge?password=in-query", ["in-query"]),
    ],
)
def test_a_store_url_is_secret_for_its_password(tmp_path, url: str, secrets: list[str]) -> None:
    """The log masks a store URL's passwords, not the server's name, and a readable
    config file is a warning only when its URL carries one."""
    path = write_config(tmp_path, f'[store]\nurl = "{url}"\n')
    assert secret_values(load_config(path, env={})) == [*secrets, "sandbox-key"]
    assert inline_secrets(path) == (["store.url"] if secrets else [])


@pytest.mark.slow
def test_plaintext_auth_beyond_loopback_is_refused_or_said_out_loud(tmp_path) -> None:
    """`smtp.auth_allow_plaintext` on a listener other machines reach sends every SMTP
    password in clear text across the network: with a real provider it is refused unless
    the loudly named override is set, and then (as with the sandbox) check-config and
    the service's log warn about it each time."""
    smtp = (
        '[smtp]\nlisten = "0.0.0.0:2525"\nrequire_auth = true\nauth_allow_plaintext = true\n'
        'users = { ups_file = "ups.pw" }\n'
    )
    (tmp_path / "ups.pw").write_text("ups-password-0123\n")
    store = f'[store]\npath = "{tmp_path / "b.db"}"\n'
    refused = write_config(tmp_path, store + REAL + smtp, "refused.toml")
    result = run("check-config", str(refused), cwd=tmp_path)
    assert result.returncode == 78, result.stderr
    assert "  smtp.auth_allow_plaintext: 0.0.0.0:2525 is reachable from the network" in (
        result.stderr
    )
    assert "smtp.dangerously_allow_plaintext_auth_beyond_loopback = true" in result.stderr
    overridden = write_config(
        tmp_path,
        store + REAL + smtp + "dangerously_allow_plaintext_auth_beyond_loopback = true\n",
        "overridden.toml",
    )
    sandbox = write_config(tmp_path, store + smtp, "sandbox.toml")
    for path in (overridden, sandbox):
        os.chmod(path, 0o600)
        result = run("check-config", str(path), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert (
            "warning: smtp.auth_allow_plaintext: SMTP passwords may be sent in clear text to "
            "0.0.0.0:2525, which is reachable from the network"
        ) in result.stderr
        assert "ups-password-0123" not in result.stdout + result.stderr
    loopback = write_config(
        tmp_path, store + REAL + smtp.replace("0.0.0.0", "127.0.0.1"), "loopback.toml"
    )
    os.chmod(loopback, 0o600)
    result = run("check-config", str(loopback), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "warning:" not in result.stderr
