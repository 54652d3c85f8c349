"""The suite's own plumbing (tests/conftest.py): what every test process pays for, and
the defaults that keep a loaded machine from failing tests that are right."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import httpx
import pytest

from tests.processes import clean_env

ROOT = Path(__file__).parent.parent


def test_a_run_without_property_tests_does_not_import_hypothesis() -> None:
    """Importing Hypothesis costs a pytest process ~0.45 s of CPU: only the modules of
    property tests do (through tests.properties), not conftest.py, which every process
    imports, nor Hypothesis' plugin at the end of the run (tests.hypothesis_summary)."""
    run = ["-q", "-n0", "-p", "no:cacheprovider", "tests/test_hooks.py", "-k", "githubs_published"]
    code = (
        f"import sys, pytest; code = pytest.main({run!r});"
        " print('hypothesis imported:', 'hypothesis' in sys.modules); sys.exit(code)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=clean_env(PYTHONPATH=str(ROOT)),
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout
    assert "hypothesis imported: False" in done.stdout


@pytest.mark.slow
async def test_a_starved_test_process_does_not_time_out_a_loopback_request(
    sandbox_url: str,
) -> None:
    """A worker at nice 19 among busy processes gets the CPU in slices a second apart:
    here a task of the client's event loop takes it for 1.5 s at five turns. A request on
    loopback takes a few turns to connect, and more for the server (in the same loop) to
    answer: under httpx's default timeout, 5 s, it failed (httpx.ConnectTimeout)
    though nothing but the CPU was missing; under the suite's default
    (conftest.LOOPBACK_TIMEOUT) it is answered."""

    async def starve() -> None:
        for _ in range(5):  # past the connect's turns and 5 s: the rest goes at full speed
            time.sleep(1.5)  # noqa: ASYNC251 (the starvation: nothing else runs meanwhile)
            await asyncio.sleep(0)

    async with httpx.AsyncClient() as http:
        hog = asyncio.create_task(starve())
        try:
            started = time.monotonic()
            response = await http.get(f"{sandbox_url}/_sandbox/requests")
        finally:
            hog.cancel()
    assert response.status_code == 200
    assert time.monotonic() - started > 5  # the test meant what it says


PROBE = """
import os


def test_where(postgres_server, worker_id, tmp_path_factory):
    with open(os.environ["PROBE_OUT"], "a") as out:
        out.write(f"{worker_id} {postgres_server}\\n")
"""


@pytest.mark.slow
def test_the_workers_of_a_run_share_one_postgresql_and_the_last_stops_it(tmp_path) -> None:
    """Each xdist worker started a PostgreSQL of its own (an initdb and a start, ~1.3 s
    of CPU each): now the workers of a run share one (tests.postgres.shared_server), a
    database each, and it is gone when the run ends."""
    (tmp_path / "test_probe.py").write_text(PROBE)
    out = tmp_path / "where.txt"
    env = clean_env(PROBE_OUT=str(out), PYTHONPATH=str(ROOT))
    env.pop("SMS_BRIDGE_TEST_POSTGRES", None)
    run = ["-p", "tests.postgres", "-n", "2", "--dist", "each", "-p", "no:cacheprovider"]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", *run, "--rootdir", str(tmp_path), "."],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    seen = dict(line.split() for line in out.read_text().splitlines())
    assert sorted(seen) == ["gw0", "gw1"] and len(set(seen.values())) == 1, seen
    port = urllib.parse.urlsplit(seen["gw0"]).port
    with pytest.raises(OSError):  # stopped at the end of the run
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
