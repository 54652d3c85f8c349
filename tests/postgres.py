"""A real PostgreSQL for the tests (#13 item 6), and a fresh database for each test.

Where the server comes from, in order:
1. `SMS_BRIDGE_TEST_POSTGRES`: a URL of a database on a server where the tests may
   CREATE DATABASE (e.g. `postgresql://postgres@127.0.0.1:5432/postgres`). Databases
   are named `sms_test_<pid>_<n>`, so that several runs can share one server.
2. A private server from the installed binaries (`initdb`, `pg_ctl` under
   /usr/lib/postgresql/*/bin or on PATH) in a temporary directory, on a free port,
   for the session. `initdb` refuses root, so as root it runs as the `postgres` user.
3. Neither: the tests that need one are skipped with the reason (and CI, with
   SMS_BRIDGE_NO_SKIPS=1, fails on that skip).

A test's database is a copy of a template migrated once per session (CREATE DATABASE
... TEMPLATE takes milliseconds), or an empty one for the migration tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import asyncpg
import pytest

ENV = "SMS_BRIDGE_TEST_POSTGRES"
_names = itertools.count()
T = TypeVar("T")


def find_binaries() -> Path | None:
    """The directory holding initdb and pg_ctl: the newest Debian version, else PATH."""
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: (
            int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0
        ),
    )
    if versions:
        return Path(versions[-1]).parent
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(initdb).resolve().parent
    return None


def _free_port() -> int:
    # PostgreSQL cannot bind port 0 and say where; start() retries if this one is taken.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PrivateServer:
    """A PostgreSQL cluster of our own: initdb'd in `root`, started and stopped by pg_ctl."""

    bin: Path
    root: Path
    port: int = 0
    _user: tuple[int, int] | None = field(default=None, repr=False)

    @classmethod
    def create(cls, bin_dir: Path) -> PrivateServer:
        root = Path(tempfile.mkdtemp(prefix="sms-bridge-pg-"))
        server = cls(bin_dir, root)
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            try:
                entry = pwd.getpwnam("postgres")
            except KeyError as exc:
                shutil.rmtree(root, ignore_errors=True)
                raise RuntimeError("running as root and there is no `postgres` user") from exc
            server._user = (entry.pw_uid, entry.pw_gid)
            os.chown(root, entry.pw_uid, entry.pw_gid)
        server._run(
            "initdb",
            "-D",
            str(server.data),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        )
        return server

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        user = {} if self._user is None else {"user": self._user[0], "group": self._user[1]}
        return subprocess.run(
            [str(self.bin / tool), *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=check,
            cwd=self.root,
            **user,  # type: ignore[arg-type]
        )

    def start(self) -> None:
        """Start on a free port (another, if a neighbour takes it first)."""
        for _ in range(5):
            self.port = self.port or _free_port()
            options = (
                f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
                " -c fsync=off -c full_page_writes=off -c max_connections=200"
            )
            done = self._run(
                "pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "log"),
                "-w", "-t", "60", "start", check=False,
            )  # fmt: skip
            if done.returncode == 0:
                return
            self.port = 0
        raise RuntimeError(f"pg_ctl start failed: {done.stdout}{done.stderr}{self.log()}")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop", check=False)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.root / "log").read_text(errors="replace")[-2000:]
        return ""

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def private_server() -> Iterator[PrivateServer]:
    """A started private server for the block; RuntimeError if it cannot be had."""
    bin_dir = find_binaries()
    if bin_dir is None:
        raise RuntimeError("no PostgreSQL binaries (initdb, pg_ctl) installed")
    server = PrivateServer.create(bin_dir)
    try:
        server.start()
        yield server
    finally:
        server.destroy()


def with_database(url: str, name: str) -> str:
    """`url` pointing at database `name` on the same server."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + name))


def new_database_name() -> str:
    return f"sms_test_{os.getpid()}_{next(_names)}"


def wait_until_up(url: str, timeout: float = 30.0) -> None:
    """Block until the server accepts connections (after a restart)."""
    host = urllib.parse.urlsplit(url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with (
            contextlib.suppress(OSError),
            socket.create_connection((host.hostname or "127.0.0.1", host.port or 5432), 1),
        ):
            return
        time.sleep(0.05)
    raise TimeoutError(f"PostgreSQL at {url} did not come up")


# -- fixtures (loaded by conftest.py through pytest_plugins) ------------------------------
def run_async(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to its end on a thread of its own with its own event loop, so
    that any fixture, sync or async, can call it."""
    result: list[T] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(make()))  # type: ignore[arg-type]
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def admin(url: str, *statements: str) -> None:
    """Run statements outside any transaction (CREATE/DROP DATABASE)."""

    async def run() -> None:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()

    run_async(run)


def migrate_sync(url: str, target: int | None = None) -> None:
    from bridge.store.postgres.migrate import migrate
    from bridge.store.postgres.pool import Database
    from bridge.store.postgres.schema import LATEST

    async def run() -> None:
        db = Database(url, min_size=1, max_size=1)
        await db.open()
        try:
            await migrate(db, target=LATEST if target is None else target)
        finally:
            await db.close()

    run_async(run)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """The URL of a PostgreSQL server's maintenance database; skips if none can be had."""
    given = os.environ.get(ENV)
    if given:
        yield given
        return
    try:
        with private_server() as server:
            yield server.url
    except RuntimeError as exc:
        pytest.skip(f"no PostgreSQL: set {ENV} or install postgresql ({exc})")


@pytest.fixture(scope="session")
def postgres_template(postgres_server: str) -> Iterator[str]:
    """A database migrated to the latest schema once, copied for each test."""
    name = new_database_name() + "_template"
    admin(postgres_server, f"CREATE DATABASE {name}")
    migrate_sync(with_database(postgres_server, name))
    yield name
    admin(postgres_server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@contextlib.contextmanager
def fresh_database(server: str, template: str | None = None) -> Iterator[str]:
    name = new_database_name()
    copy = f" TEMPLATE {template}" if template else ""
    admin(server, f"CREATE DATABASE {name}{copy}")
    try:
        yield with_database(server, name)
    finally:
        admin(server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def postgres_url(postgres_server: str, postgres_template: str) -> Iterator[str]:
    """A database of this test's own with the latest schema."""
    with fresh_database(postgres_server, postgres_template) as url:
        yield url


@pytest.fixture
def postgres_empty_url(postgres_server: str) -> Iterator[str]:
    """A database of this test's own with no schema at all."""
    with fresh_database(postgres_server) as url:
        yield url
