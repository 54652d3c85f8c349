"""`sms-bridge migrate` and `serve` on a PostgreSQL store, run as processes: migrate
creates and upgrades the schema, serve refuses one it cannot run on and says what to
run, and no password reaches the terminal."""

from __future__ import annotations

import urllib.parse

import pytest

from bridge.store.postgres.schema import LATEST, MIGRATIONS
from tests.postgres import admin, fresh_database, migrate_sync, new_database_name, run_async
from tests.processes import ANY_PORT, clean_env, process, wait_for
from tests.test_cli import run

pytestmark = pytest.mark.slow  # every test here runs the CLI as a process


def env_for(url: str) -> dict[str, str]:
    return {
        "SMS_BRIDGE_STORE_URL": url,
        "SMS_BRIDGE_SMTP_LISTEN": "",
        "SMS_BRIDGE_HTTP_LISTEN": ANY_PORT,
    }


async def _version(url: str) -> int:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SELECT max(version) FROM schema_version"))
    finally:
        await conn.close()


def test_serve_refuses_an_empty_database_and_migrate_creates_the_schema(
    tmp_path, postgres_empty_url: str
) -> None:
    env = env_for(postgres_empty_url)
    refused = run("serve", cwd=tmp_path, env=env)
    assert refused.returncode == 1
    assert "has no sms-bridge schema: run `sms-bridge migrate`" in refused.stderr
    assert "Traceback" not in refused.stderr

    created = run("migrate", cwd=tmp_path, env=env)
    assert created.returncode == 0, created.stderr
    assert created.stdout.splitlines() == [
        *(f"applied {m.version:04d}_{m.name}" for m in MIGRATIONS),
        f"store {postgres_empty_url}: schema up to date",
    ]
    again = run("migrate", cwd=tmp_path, env=env)
    assert again.stdout.splitlines() == [f"store {postgres_empty_url}: schema up to date"]
    assert run_async(lambda: _version(postgres_empty_url)) == LATEST


def test_migrate_names_the_store_without_a_password_given_in_the_query(
    tmp_path, postgres_empty_url: str
) -> None:
    """libpq and asyncpg take `?password=` as well as `user:password@`: `migrate` printed
    the query's password to the terminal (the server here trusts loopback and ignores it)."""
    url = f"{postgres_empty_url}?sslmode=disable&password=s3cret-in-the-query"
    migrated = run("migrate", cwd=tmp_path, env=env_for(url))
    assert migrated.returncode == 0, migrated.stderr
    assert "s3cret-in-the-query" not in migrated.stdout + migrated.stderr
    shown = f"store {postgres_empty_url}?sslmode=disable&password=***: schema up to date"
    assert migrated.stdout.splitlines()[-1] == shown


def test_migrate_upgrades_an_older_schema_that_serve_refused(
    tmp_path, postgres_empty_url: str
) -> None:
    migrate_sync(postgres_empty_url, target=1)
    env = env_for(postgres_empty_url)
    refused = run("serve", cwd=tmp_path, env=env)
    assert refused.returncode == 1
    assert f"schema version 1, this sms-bridge needs {LATEST}" in refused.stderr
    upgraded = run("migrate", cwd=tmp_path, env=env)
    assert upgraded.returncode == 0
    assert (
        upgraded.stdout.splitlines()[0]
        == f"applied {MIGRATIONS[1].version:04d}_{MIGRATIONS[1].name}"
    )


def test_serve_and_migrate_refuse_a_newer_schema(tmp_path, postgres_url: str) -> None:
    from tests.postgres import admin

    admin(postgres_url, f"INSERT INTO schema_version (version, name) VALUES ({LATEST + 1}, 'x')")
    for command in ("serve", "migrate"):
        result = run(command, cwd=tmp_path, env=env_for(postgres_url))
        assert result.returncode == 1, command
        assert f"schema version {LATEST + 1}, newer than this sms-bridge knows" in result.stderr


def test_a_server_that_is_down_is_named_without_its_password(tmp_path) -> None:
    url = "postgresql://bridge:hunter2@127.0.0.1:1/bridge"
    for command in ("serve", "migrate", "messages"):
        result = run(command, cwd=tmp_path, env=env_for(url))
        assert result.returncode == 1, command
        assert "store postgresql://bridge:***@127.0.0.1:1/bridge: cannot connect" in result.stderr
        assert "hunter2" not in result.stderr + result.stdout
        assert "Traceback" not in result.stderr


def test_a_password_with_a_raw_slash_is_never_shown(tmp_path) -> None:
    """`bridge:hunter/2@...`: the "/" ends the user part for every URL reader, so no
    password can be told from the rest: the terminal showed it (':***@bridge:hunter',
    and the driver's "invalid literal for int(): 'hunter'", taking it for a port). The
    config is refused, saying how to write it, without quoting it."""
    url = "postgresql://bridge:hunter/2@127.0.0.1:1/bridge"
    for command in ("serve", "migrate", "check-config"):
        result = run(command, cwd=tmp_path, env=env_for(url))
        assert result.returncode != 0, command
        assert "hunter" not in result.stderr + result.stdout, command
        assert "store.url" in result.stderr and "%2F" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize("password", [False, True])
def test_serves_log_names_the_server_and_masks_only_its_password(
    tmp_path, postgres_url: str, password: bool
) -> None:
    """The whole URL was masked as a secret, so the log read `store ***` and a cluster's
    operator could not tell which server an instance used (or lost). Its passwords are
    the secret: in the user part and in the query (the server trusts loopback)."""
    url, shown = postgres_url, postgres_url
    if password:
        parts = urllib.parse.urlsplit(postgres_url)
        netloc = f"{parts.username}:pw-in-the-user-part@{parts.hostname}:{parts.port}"
        url = urllib.parse.urlunsplit(
            parts._replace(netloc=netloc, query="sslmode=disable&password=pw-in-the-query")
        )
        shown = urllib.parse.urlunsplit(
            parts._replace(
                netloc=f"{parts.username}:***@{parts.hostname}:{parts.port}",
                query="sslmode=disable&password=***",
            )
        )
    log = tmp_path / "serve.log"
    with process(["serve"], tmp_path, clean_env(**env_for(url)), log) as proc:
        proc.address("HTTP")
        wait_for(lambda: "requests/minute" in log.read_text(), what="the store line")
        proc.terminate()
        assert proc.wait(timeout=15) == 0
    text = log.read_text()
    assert "pw-in-the-user-part" not in text and "pw-in-the-query" not in text
    assert f"store {shown}; " in text


def test_a_url_of_several_hosts_is_named_not_a_traceback(tmp_path, postgres_empty_url: str) -> None:
    """asyncpg (as libpq) takes several hosts, tried in turn: `user:pw@h1:1,h2:5432`.
    Naming the store read `parts.port`, which raised ValueError on them: `migrate` and
    `serve` ended in a traceback before connecting. The hosts are named as written."""
    parts = urllib.parse.urlsplit(postgres_empty_url)
    hosts = f"127.0.0.1:1,{parts.hostname}:{parts.port}"  # the first one refuses
    url = urllib.parse.urlunsplit(
        parts._replace(netloc=f"{parts.username}:pw-of-two-hosts@{hosts}")
    )
    migrated = run("migrate", cwd=tmp_path, env=env_for(url))
    assert migrated.returncode == 0, migrated.stderr
    assert "Traceback" not in migrated.stderr
    assert "pw-of-two-hosts" not in migrated.stdout + migrated.stderr
    shown = urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username}:***@{hosts}"))
    assert migrated.stdout.splitlines()[-1] == f"store {shown}: schema up to date"


def test_migrate_as_a_role_that_does_not_own_the_database_says_how_to_fix_it(
    tmp_path, postgres_server: str
) -> None:
    """docs/cluster.md's set-up once ran `createdb` as postgres and `migrate` as bridge:
    on PostgreSQL 15 and later only the database's owner may create tables in schema
    public, and migrate ended in a traceback (InsufficientPrivilegeError). A database of
    the server's own user, a role of the test's own that does not own it."""
    role = new_database_name() + "_role"
    admin(postgres_server, f"CREATE ROLE {role} LOGIN")
    try:
        with fresh_database(postgres_server) as url:
            admin(url, f"REVOKE CREATE ON SCHEMA public FROM PUBLIC, {role}")  # as on 15+
            parts = urllib.parse.urlsplit(url)
            as_role = urllib.parse.urlunsplit(
                parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port}")
            )
            name = parts.path.lstrip("/")
            refused = run("migrate", cwd=tmp_path, env=env_for(as_role))
            assert refused.returncode == 1, refused.stderr
            assert "Traceback" not in refused.stderr
            [line] = refused.stderr.splitlines()
            assert line == (
                f"store {as_role}: permission denied for schema public: store.url's role"
                f" {role} may not create tables there (PostgreSQL 15 and later let only the"
                f" database's owner): make it the owner, with `createdb -O {role} {name}`"
                f" or `ALTER DATABASE {name} OWNER TO {role}`"
            )
            # The fix it names works; serve as the role then runs on the schema.
            admin(url, f"ALTER DATABASE {name} OWNER TO {role}")
            migrated = run("migrate", cwd=tmp_path, env=env_for(as_role))
            assert migrated.returncode == 0, migrated.stderr
    finally:
        admin(postgres_server, f"DROP ROLE IF EXISTS {role}")


def test_serve_as_a_role_that_cannot_read_the_schema_is_one_line(
    tmp_path, postgres_url: str, postgres_server: str
) -> None:
    """The schema created by another role (migrate run as the owner, serve as bridge):
    a line naming the table and what to change, not a traceback."""
    role = new_database_name() + "_role"
    admin(postgres_server, f"CREATE ROLE {role} LOGIN")
    try:
        parts = urllib.parse.urlsplit(postgres_url)
        as_role = urllib.parse.urlunsplit(
            parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port}")
        )
        refused = run("serve", cwd=tmp_path, env=env_for(as_role))
        assert refused.returncode == 1, refused.stderr
        assert "Traceback" not in refused.stderr
        assert refused.stderr.splitlines()[-1] == (
            f"store {as_role}: permission denied for table schema_version: store.url's"
            f" role {role} may not use sms-bridge's tables, another role created them:"
            f" give store.url the role `migrate` ran as, or make {role} the owner of the"
            " database and its tables"
        )
    finally:
        admin(postgres_server, f"DROP ROLE IF EXISTS {role}")


_WITHOUT_ASYNCPG = (
    "import sys; sys.modules['asyncpg'] = None; from bridge.cli import main;"
    " sys.exit(main(sys.argv[1:]))"
)


@pytest.mark.parametrize("command", [["migrate"], ["store", "copy", "--from", "none.db"]])
def test_a_missing_driver_names_the_pip_of_the_python_that_runs(
    tmp_path, command: list[str]
) -> None:
    """Without asyncpg, the error said "pip install -e '.[postgres]' in the checkout": on
    the systemd install (/opt/sms-bridge/venv, from `pip install .`) the shell's pip is
    another Python's, and "-e" a different install. It names this interpreter's pip."""
    import subprocess
    import sys

    (tmp_path / "none.db").touch()
    env = clean_env(**env_for("postgresql://bridge@127.0.0.1:1/bridge"))
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_ASYNCPG, *command],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 78, result.stderr
    assert "Traceback" not in result.stderr
    [line] = [ln for ln in result.stderr.splitlines() if "store.url" in ln]
    assert f"which {sys.executable} lacks: {sys.executable} -m pip install " in line
    assert "[postgres]" in line and "in the checkout" not in line


@pytest.mark.parametrize(
    ("origin", "install"),
    [
        (
            '{"url": "file:///src/sms-bridge", "dir_info": {"editable": true}}',
            "-e '/src/sms-bridge[postgres]'",
        ),
        ('{"url": "file:///src/sms%20bridge", "dir_info": {}}', "'/src/sms bridge[postgres]'"),
        (None, "'sms-bridge[postgres]'"),
    ],
)
def test_the_install_named_is_the_one_the_bridge_came_from(
    monkeypatch: pytest.MonkeyPatch, origin: str | None, install: str
) -> None:
    """A checkout installed editable (the README's `pip install -e .`), one installed
    from its directory (the systemd recipe's `pip install .`), one from an index."""
    import importlib.metadata
    import sys

    from bridge.store import postgres_extra

    class Installed:
        def read_text(self, name: str) -> str | None:
            return origin if name == "direct_url.json" else None

    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: Installed())
    said = postgres_extra(ImportError("No module named 'asyncpg'"))
    assert said == (
        f"its extra (asyncpg), which {sys.executable} lacks: {sys.executable} -m pip"
        f" install {install} (No module named 'asyncpg')"
    )
