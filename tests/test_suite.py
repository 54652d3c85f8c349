"""The suite's own plumbing (tests/conftest.py): what every test process pays for, and
the defaults that keep a loaded machine from failing tests that are right."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).parent.parent


def test_the_conftest_does_not_import_hypothesis() -> None:
    """Importing Hypothesis costs each pytest process ~1 s of CPU: only the modules of
    property tests do (through tests.properties), not conftest.py, which every process
    imports whether or not it collects a property test."""
    code = (
        "import sys, tests.conftest, tests.postgres;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'hypothesis'))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.slow
async def test_a_starved_test_process_does_not_time_out_a_loopback_request(
    sandbox_url: str,
) -> None:
    """A worker at nice 19 among busy processes gets the CPU in slices a second apart:
    here a task of the client's event loop takes it for 1.5 s at each turn. A request on
    loopback takes a few turns to connect, and more for the server (in the same loop) to
    answer: under httpx's default timeout, 5 s, it failed (httpx.ConnectTimeout)
    though nothing but the CPU was missing; under the suite's default
    (conftest.LOOPBACK_TIMEOUT) it is answered."""

    async def starve() -> None:
        while True:
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
