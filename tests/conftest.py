from __future__ import annotations

import os
import shutil
import stat
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest
from phonenumbers import PhoneMetadata, PhoneNumberDesc

from bridge.clock import ManualClock
from bridge.provider.sandbox import SandboxState, create_sandbox_app
from bridge.store import Store
from tests import helpers
from tests.helpers import SetPattern, forget_the_metadata, served
from tests.stores import BACKENDS, FACTORIES

# A real PostgreSQL server and a fresh database per test (tests/postgres.py); Hypothesis
# imported by no process that has no property test (tests/hypothesis_summary.py).
pytest_plugins = ["tests.postgres", "tests.hypothesis_summary"]

# The default timeout of the tests' HTTP clients (those that set none): httpx's is 5 s,
# a network's. Every server here is on loopback, where the kernel makes a connection at
# once, so what such a timeout measured was the test process's share of the CPU: a
# connect takes a few turns of the event loop (anyio's task group, the socket, the
# transport), and a worker at nice 19 among busy processes, given the CPU a second or
# more apart, took longer than 5 s for them (an httpx ConnectTimeout in test_hooks'
# [github-status-success.json], a hook answered in a millisecond; test_suite.py
# reproduces it). A server that hangs still fails its test, a minute later. The bridge's
# own clients set theirs from the config, and no test waits for a client's default.
LOOPBACK_TIMEOUT = httpx.Timeout(60.0)
_API = ("request", "stream", "get", "options", "head", "post", "put", "patch", "delete")
for _call in (httpx.Client.__init__, httpx.AsyncClient.__init__, *map(httpx.__dict__.get, _API)):
    _call = getattr(_call, "__wrapped__", _call)  # httpx.stream is a contextmanager's
    _call.__kwdefaults__["timeout"] = LOOPBACK_TIMEOUT


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """An empty directory (0755) that every user can reach: each directory above it is
    `o+x`. For the "readable by every user" warnings, which look at a file's directories
    too: pytest's tmp_path is below /tmp/pytest-of-USER, 0700, where no file is readable
    by every user whatever its own mode. Tests build their own tree below this one and
    set its modes; removed afterwards."""
    for base in (tempfile.gettempdir(), "/tmp", "/var/tmp"):
        chain = [Path(base).resolve(), *Path(base).resolve().parents]
        if all(p.is_dir() and p.stat().st_mode & stat.S_IXOTH for p in chain):
            break
    else:
        pytest.skip("no temporary directory here that every user can traverse")
    top = Path(tempfile.mkdtemp(prefix="sms-bridge-open-", dir=base)).resolve()
    top.chmod(0o755)  # mkdtemp makes it 0700
    try:
        yield top
    finally:
        shutil.rmtree(top)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def sandbox_state(clock: ManualClock) -> SandboxState:
    return SandboxState(clock=clock, api_key="test-key")


@pytest.fixture
async def sandbox_url(sandbox_state: SandboxState) -> AsyncIterator[str]:
    """The sandbox provider served for real on a loopback port."""
    async with served(create_sandbox_app(sandbox_state)) as url:
        yield url


@pytest.fixture
def forgetful() -> Iterator[None]:
    forget_the_metadata()
    yield
    forget_the_metadata()  # before monkeypatch restores the metadata: nothing reads between


@pytest.fixture
def set_pattern(monkeypatch: pytest.MonkeyPatch, forgetful: None) -> SetPattern:
    """Change one pattern of one region's installed phone metadata for the test, as a
    phonenumbers release might ship it (the library reads its patterns at each call):
    `set_pattern("DE", "premium_rate", lambda old: new)` for a kind's national number
    pattern, or a pattern of the region itself (`national_prefix_for_parsing`,
    `leading_digits`). Returns the new pattern."""

    def change(region: str, name: str, new: Callable[[str], str]) -> str:
        owner = PhoneMetadata.metadata_for_region(region)
        attribute = getattr(owner, name)
        if isinstance(attribute, PhoneNumberDesc):
            owner, attribute = attribute, attribute.national_number_pattern
            name = "national_number_pattern"
        pattern = new(attribute)
        monkeypatch.setattr(owner, "_mutable", True)  # the library's objects refuse setattr
        monkeypatch.setattr(owner, name, pattern)
        return pattern

    return change


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    """A fresh store of each backend, opened, through the interface only."""
    async with FACTORIES[request.param](request) as fresh:
        await fresh.open()
        try:
            yield fresh
        finally:
            await fresh.close()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the test once per store backend: the configs `tests.helpers.bridge_config`
    writes name a PostgreSQL database of the test's own for "postgresql"."""
    if request.param == "postgresql":
        helpers.STORE_URL["url"] = request.getfixturevalue("postgres_url")
    try:
        yield request.param
    finally:
        helpers.STORE_URL["url"] = ""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Fail the collection of a property test decorated under a deadline shorter than
    the suite's: its module imported Hypothesis without tests.properties, which this
    file does not import for every process (its docstring says why)."""
    if "hypothesis" not in sys.modules:
        return
    from tests.properties import DEADLINE

    loose = []
    for item in items:
        # The settings `@given` took from the default profile when it decorated the test.
        chosen = getattr(getattr(item, "obj", None), "_hypothesis_internal_use_settings", None)
        if chosen is not None and chosen.deadline is not None and chosen.deadline < DEADLINE:
            loose.append(item.nodeid)
    if loose:
        raise pytest.UsageError(
            f"property tests under a deadline shorter than the suite's {DEADLINE}"
            f" (import tests.properties in their module): {', '.join(loose)}"
        )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Under CI (`SMS_BRIDGE_NO_SKIPS=1`, set by .ci/run), a skipped test fails the run.

    The tests that skip where a tool is missing (Postfix, Chromium, systemd-analyze, the
    shared corpus) are exactly the ones CI installs what they need for; a skip there means
    CI's setup broke, and a green run would hide it.

    Under pytest-xdist this hook runs in every worker and in the controller: only the
    controller decides, since only its exit status is the run's (a worker's is dropped)
    and its reporter holds every worker's reports, collection skips included.
    """
    if os.environ.get("SMS_BRIDGE_NO_SKIPS") != "1" or hasattr(session.config, "workerinput"):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped and exitstatus == 0:
        reporter.ensure_newline()
        for report in skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
            reporter.write_line(f"CI: {report.nodeid} was skipped ({reason})", red=True)
        reporter.write_line(f"CI: {len(skipped)} skipped test(s): failing the run", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
