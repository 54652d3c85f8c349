"""Crash suite: `sms-bridge serve` SIGKILLed at random moments while HTTP and SMTP clients
feed it and the dispatcher sends; restarted each time. Every acknowledged message must
reach the sandbox provider, and none twice (the provider's /logs tells the restarted
bridge what it had already taken).
"""

from __future__ import annotations

import json
import random
import smtplib
import threading
import time
from collections import Counter
from functools import partial
from pathlib import Path

import httpx
import pytest

from tests import helpers
from tests.processes import ANY_PORT, clean_env, process, wait_for

pytestmark = pytest.mark.slow
KEY = "crash-test-key"
KILLS = 4
ACKS_PER_LIFE = 6  # KILLS lives of at least this many acks: the count asserted below
PER_FEEDER = 150  # bounded: every message must then be delivered within the test
RATE = 600  # requests a minute, sandbox and bridge alike: the crash, not the limit, is tested


def _feed(kind: str, port: int, start: int, acked: list[str], stop: threading.Event) -> None:
    """Send distinct texts until stopped; remember those acknowledged (202 / 250)."""
    n = start
    while not stop.is_set() and n < start + PER_FEEDER:
        text = f"{kind} message {n}"
        recipient = f"+1202555{n % 10000:04d}"
        try:
            if kind == "http":
                r = httpx.post(
                    f"http://127.0.0.1:{port}/api/v1/messages",
                    json={"to": recipient, "message": text},
                    timeout=5,
                )
                if r.status_code == 202:
                    acked.append(text)
            else:
                with smtplib.SMTP("127.0.0.1", port, timeout=5) as client:
                    client.sendmail(
                        "feeder@example.org",
                        [f"{recipient}@sms.localhost"],
                        f"Subject: {text}\r\n\r\n",
                    )
                acked.append(text)
        except (OSError, httpx.HTTPError, smtplib.SMTPException):
            time.sleep(0.05)  # the bridge is down: keep trying, as real senders do
        n += 1
        time.sleep(0.02)


def _fed(acked: list[str], floor: int, feeders: list[threading.Thread]) -> bool:
    """Enough acks for this life, or nothing more to feed (every feeder done)."""
    return len(acked) >= floor or not any(feeder.is_alive() for feeder in feeders)


def _shared_store() -> str:
    """On PostgreSQL (the `backend` fixture), the restarted bridge is the same instance
    by name: it settles its own claims at once instead of waiting for their lease."""
    url = helpers.STORE_URL["url"]
    return f'url = "{url}"\n[cluster]\ninstance = "crash-test"' if url else ""


def _config(db: Path, sandbox: str, http: str, smtp: str) -> str:
    return f"""
[http]
listen = "{http}"
[smtp]
listen = "{smtp}"
[store]
path = "{db}"
{_shared_store()}
[provider]
base_url = "{sandbox}/api/v1"
api_key = "{KEY}"
requests_per_minute = {RATE}
[status]
poll_interval = "1s"
"""


@pytest.mark.usefixtures("backend")
def test_sigkill_at_random_moments_loses_nothing(tmp_path) -> None:
    rng = random.Random(20261125)
    db = tmp_path / "bridge.db"
    config = tmp_path / "bridge.toml"
    env = clean_env()
    log = tmp_path / "run.log"
    acked: list[str] = []
    with process(
        ["sandbox", "--listen", ANY_PORT, "--api-key", KEY, "--requests-per-minute", str(RATE)],
        tmp_path,
        env,
        log,
    ) as sandbox_process:
        sandbox = sandbox_process.url("sandbox")
        wait_for(lambda: httpx.get(f"{sandbox}/_sandbox/requests").status_code == 200)
        # Stalled sends widen the moment between the provider's answer and our record.
        httpx.post(
            f"{sandbox}/_sandbox/faults",
            json={"status": 0, "delay": 0.3, "path": "/send", "times": 30},
        )
        config.write_text(_config(db, sandbox, ANY_PORT, ANY_PORT))
        stop = threading.Event()
        feeders: list[threading.Thread] = []
        http_port = 0
        try:
            for _ in range(KILLS):
                with process(["serve", "--config", str(config)], tmp_path, env, log) as bridge:
                    if not feeders:
                        # The first start picks free ports; restarts keep them, as a real
                        # bridge keeps its address while its senders retry.
                        http_port, smtp_port = bridge.port("HTTP"), bridge.port("SMTP")
                        config.write_text(
                            _config(db, sandbox, f"127.0.0.1:{http_port}", f"127.0.0.1:{smtp_port}")
                        )
                        feeders = [
                            threading.Thread(target=_feed, args=(kind, port, base, acked, stop))
                            for kind, port, base in (
                                ("http", http_port, 0),
                                ("smtp", smtp_port, 5000),
                            )
                        ]
                        for feeder in feeders:
                            feeder.start()
                    health = f"http://127.0.0.1:{http_port}/healthz"
                    wait_for(lambda: httpx.get(health).status_code == 200, what="start")  # noqa: B023
                    # Each life takes some traffic before its kill, however slow a loaded
                    # machine feeds it (the count below, not a clock, proves the test ran).
                    floor = len(acked) + ACKS_PER_LIFE
                    wait_for(partial(_fed, acked, floor, feeders), timeout=60, what="acks")
                    time.sleep(rng.uniform(0.5, 2.5))
                    bridge.kill()  # SIGKILL: no drain, no goodbye
                    bridge.wait(timeout=10)
        finally:
            stop.set()
            for feeder in feeders:
                feeder.join(timeout=30)
        with process(["serve", "--config", str(config)], tmp_path, env, log) as bridge:
            wanted = set(acked)

            def all_reached() -> bool:
                entries = httpx.get(f"{sandbox}/_sandbox/entries").json()
                return wanted <= {e["message"] for e in entries}

            wait_for(all_reached, timeout=120, what="every acknowledged message at the provider")
            bridge.terminate()
            assert bridge.wait(timeout=15) == 0
        entries = httpx.get(f"{sandbox}/_sandbox/entries").json()
    reached = Counter(e["message"] for e in entries)
    duplicates = {text: n for text, n in reached.items() if n > 1}
    print(
        json.dumps(
            {
                "acknowledged": len(wanted),
                "reached": len(reached),
                "duplicates": len(duplicates),
                "kills": KILLS,
            }
        )
    )
    assert len(wanted) >= KILLS * ACKS_PER_LIFE
    assert not wanted - set(reached)  # nothing acknowledged was lost
    assert not duplicates, duplicates
