"""Abuse a running bridge could once be stalled or guessed by: mails of tiny lines holding
the event loop, online guessing of SMTP passwords and bearer tokens."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bridge.ingress.smtplimits import YIELD_EVERY, DataLines
from tests.processes import ANY_PORT, clean_env, process, wait_for

pytestmark = pytest.mark.slow

SMTP_PASSWORD = "ups-password-0123456789"
SEND_TOKEN = "send-token-0123456789abcdef"
ROUTE_TOKEN = "route-token-0123456789abcdef"
CONFIG = f"""
[smtp]
listen = "{{smtp}}"
auth_allow_plaintext = true
[smtp.users]
ups = "{SMTP_PASSWORD}"
[http]
listen = "{{http}}"
[store]
path = "{{db}}"
[tokens.sender]
token = "{SEND_TOKEN}"
scopes = ["send"]
[routes.am]
format = "alertmanager"
to = ["+12025550101"]
token = "{ROUTE_TOKEN}"
"""


@pytest.fixture(scope="module")
def bridge(tmp_path_factory) -> Iterator[tuple[str, int, Path]]:
    tmp = tmp_path_factory.mktemp("abuse")
    path = tmp / "bridge.toml"
    path.write_text(CONFIG.format(smtp=ANY_PORT, http=ANY_PORT, db=tmp / "bridge.db"))
    log = tmp / "serve.log"
    with process(["serve", "--config", str(path)], tmp, clean_env(), log) as proc:
        url, smtp_port = proc.url(), proc.port("SMTP")
        wait_for(lambda: httpx.get(f"{url}/healthz").status_code == 200)
        yield url, smtp_port, log
        assert proc.poll() is None, "the bridge died"
    assert "Traceback" not in log.read_text()


def _send_raw_mail(port: int, body: bytes, replies: list[tuple[bytes, bytes]]) -> None:
    """One mail over a raw socket (smtplib would re-encode 1 MB of lines in Python)."""
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        reader = sock.makefile("rb")

        def reply() -> bytes:
            while (line := reader.readline())[3:4] == b"-":
                pass
            return line

        reply()
        for command in (
            b"EHLO x",
            b"MAIL FROM:<a@example.org>",
            b"RCPT TO:<+12025550143@sms.localhost>",
            b"DATA",
        ):
            sock.sendall(command + b"\r\n")
            reply()
        sock.sendall(b"Subject: lines\r\n\r\n" + body + b".\r\nQUIT\r\n")
        replies.append((reply(), reply()))  # QUIT after the dot is a command, not mail


def test_mails_of_tiny_lines_never_stall_the_loop(bridge) -> None:
    """20 mails of 1 MB in 3-byte lines at once: /healthz stays answered (it once took
    6.5 s), and each mail gets a 552 naming smtp.max_lines."""
    url, port, _ = bridge
    body = b"x\r\n" * 333_000
    replies: list[tuple[bytes, bytes]] = []
    senders = [
        threading.Thread(target=_send_raw_mail, args=(port, body, replies)) for _ in range(20)
    ]
    latencies: list[float] = []
    with httpx.Client(timeout=30) as client:
        for sender in senders:
            sender.start()
        while any(sender.is_alive() for sender in senders):
            started = time.monotonic()
            assert client.get(f"{url}/healthz").status_code == 200
            latencies.append(time.monotonic() - started)
            time.sleep(0.02)
    for sender in senders:
        sender.join()
    print(f"/healthz: {len(latencies)} probes, slowest {max(latencies):.3f}s")
    assert max(latencies) < 1.5, sorted(latencies)[-5:]  # loose: the machine is shared
    assert len(replies) == 20
    assert all(r.startswith(b"552 5.3.4 Too many lines") for r, _ in replies), replies[:2]
    assert b"smtp.max_lines" in replies[0][0]
    assert all(quit.startswith(b"221") for _, quit in replies), replies


def test_data_lines_give_the_loop_a_turn_and_skip_past_the_cap() -> None:
    """In process, without timing: reading DATA through DataLines lets another task run
    every YIELD_EVERY lines (before and past the cap), keeps `most` lines, and leaves
    what follows the end-of-data line for the next command."""

    async def scenario() -> tuple[list[bytes], int, bytes]:
        reader = asyncio.StreamReader()
        reader.feed_data(b"x\r\n" * 5000 + b".\r\nQUIT\r\n")
        reader.feed_eof()
        lines = DataLines(reader, most=1000)
        turns = 0
        done = False

        async def ticker() -> None:
            nonlocal turns
            while not done:
                turns += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        got = []
        while (line := await lines.readuntil(b"\r\n")) != DataLines.END:
            got.append(line)
        done = True
        await task
        assert lines.over
        return got, turns, await reader.readuntil(b"\r\n")

    got, turns, after = asyncio.run(scenario())
    assert len(got) == 1000
    assert turns >= 5000 // YIELD_EVERY  # a turn per YIELD_EVERY lines, cap or not
    assert after == b"QUIT\r\n"
