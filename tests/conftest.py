from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import settings
from phonenumbers import PhoneMetadata, PhoneNumberDesc

from bridge.clock import ManualClock
from bridge.provider.sandbox import SandboxState, create_sandbox_app
from bridge.store import Store
from tests import helpers
from tests.helpers import SetPattern, forget_the_metadata, served
from tests.stores import BACKENDS, FACTORIES

# A real PostgreSQL server and a fresh database per test (tests/postgres.py).
pytest_plugins = ["tests.postgres"]

# Hypothesis fails an example slower than its deadline, 200 ms by default: wall time, so
# a test process starved of the CPU for a moment (2 cores shared by a busy suite, or a
# loaded CI runner) failed examples that take a millisecond (Flaky / DeadlineExceeded
# in test_smtp's address memo and test_mail's parsers). 2 s still fails an example that
# is really slow (a parser gone quadratic), not one that waited for its turn.
settings.register_profile("sms-bridge", deadline=timedelta(seconds=2))
settings.load_profile("sms-bridge")


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
