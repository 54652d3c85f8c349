"""A real PostgreSQL for the tests (#13 item 6), and a fresh database for each test.

Where the server comes from, in order:
1. `SMS_BRIDGE_TEST_POSTGRES`: a URL of a database on a server where the tests may
   CREATE DATABASE (e.g. `postgresql://postgres@127.0.0.1:5432/postgres`). Databases
   are named `sms_test_<pid>_<n>`, so that several runs can share one server.
2. A private server from the installed binaries (`initdb`, `pg_ctl` under
   /usr/lib/postgresql/*/bin or on PATH) in a temporary directory, on a free port,
   for the session. `initdb` refuses root, so as root it runs as the `postgres` user.
   The xdist workers of one run share one (`shared_server`): the first to need it
   starts it, the last to finish stops it (an initdb and a start cost ~1.3 s of CPU
   each, and a worker's databases are its own anyway). Tests that stop or restart
   PostgreSQL start a private server of their own (`private_server`), never this one.
3. Neither: the tests that need one are skipped with the reason (and CI, with
   SMS_BRIDGE_NO_SKIPS=1, fails on that skip).

A test's database is a copy of a template migrated once per session (CREATE DATABASE
... TEMPLATE takes milliseconds), or an empty one for the migration tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import glob
import itertools
import json
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
import uuid
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
                " -c fsync=off -c full_page_writes=off -c max_connections=300"
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


def start_private_server() -> PrivateServer:
    """A private server, started; RuntimeError if it cannot be had."""
    bin_dir = find_binaries()
    if bin_dir is None:
        raise RuntimeError("no PostgreSQL binaries (initdb, pg_ctl) installed")
    server = PrivateServer.create(bin_dir)
    try:
        server.start()
    except BaseException:
        server.destroy()
        raise
    return server


@contextlib.contextmanager
def private_server() -> Iterator[PrivateServer]:
    """A started private server for the block; RuntimeError if it cannot be had."""
    server = start_private_server()
    try:
        yield server
    finally:
        server.destroy()


@contextlib.contextmanager
def shared_server(run: str) -> Iterator[str]:
    """The URL of the private server the xdist workers of run `run` share, for the block.

    Under `lock`, the first worker to come starts it and writes where it is to
    `server.json`; each worker holds a shared lock on `users` while it may use it. On
    leaving, under `lock` again, a worker that can take `users` exclusively is the last
    one (a worker that died let go of its lock with it) and stops the server. A worker
    needing the server after that starts a new one. RuntimeError if it cannot be had."""
    home = _shared_home(run)
    home.mkdir(exist_ok=True)
    where = home / "server.json"
    with open(home / "lock", "a") as lock, open(home / "users", "a") as users:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            server = _started_at(where)
            fcntl.flock(users, fcntl.LOCK_SH)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
        try:
            yield server.url
        finally:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the last one out?
            except BlockingIOError:
                pass
            else:
                where.unlink(missing_ok=True)
                server.destroy()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _shared_home(run: str) -> Path:
    return Path(tempfile.gettempdir()) / f"sms-bridge-pg-run-{run}"


def pytest_configure(config: pytest.Config) -> None:
    """In xdist's controller: the run's id chosen here, so that it knows it too."""
    controller = not hasattr(config, "workerinput") and config.pluginmanager.hasplugin("xdist")
    if controller and config.getoption("testrunuid", None) is None:
        config.option.testrunuid = uuid.uuid4().hex  # what xdist would have chosen


def pytest_unconfigure(config: pytest.Config) -> None:
    """In xdist's controller, the workers gone: the shared server's directory removed,
    and the server stopped if a worker died before it could (its last user)."""
    run = config.getoption("testrunuid", None)
    if hasattr(config, "workerinput") or not run or not _shared_home(run).exists():
        return
    with contextlib.suppress(FileNotFoundError):
        _started_at(_shared_home(run) / "server.json", start=False).destroy()
    shutil.rmtree(_shared_home(run), ignore_errors=True)


def _started_at(where: Path, *, start: bool = True) -> PrivateServer:
    """The server `where` describes, or one started now and described there."""
    if where.exists():
        known = json.loads(where.read_text())
        user = tuple(known["user"]) if known["user"] else None
        return PrivateServer(Path(known["bin"]), Path(known["root"]), known["port"], user)
    if not start:
        raise FileNotFoundError(where)
    if not start:
        raise FileNotFoundError(where)
    server = start_private_server()
    fields = {"bin": str(server.bin), "root": str(server.root), "port": server.port}
    where.write_text(json.dumps({**fields, "user": server._user}))
    return server


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
def postgres_server(request: pytest.FixtureRequest) -> Iterator[str]:
    """The URL of a PostgreSQL server's maintenance database; skips if none can be had."""
    given = os.environ.get(ENV)
    if given:
        yield given
        return
    # pytest-xdist's id of the run, the same in each of its workers; none without xdist.
    run = getattr(request.config, "workerinput", {}).get("testrunuid")
    try:
        if run is None:
            with private_server() as server:
                yield server.url
        else:
            with shared_server(run) as url:
                yield url
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
