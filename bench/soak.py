"""Soak: a steady message rate over HTTP and SMTP for minutes, sampling RSS and open files.

Run by hand:

    python bench/soak.py --minutes 10 --rate 50

Starts `sms-bridge sandbox` and `sms-bridge serve` in processes of their own, feeds `rate`
messages a second (half HTTP, half SMTP, distinct texts), samples the server's RSS and
open file descriptors every second, and prints the first, last and largest samples. Growth
from the first minute to the last is what the soak is for.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from common import free_port


def sample(pid: int) -> tuple[float, int]:
    rss = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


async def smtp_send(port: int, phone: str, text: str) -> bool:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def reply() -> bytes:
        line = await reader.readline()
        while line[3:4] == b"-":
            line = await reader.readline()
        return line

    try:
        await reply()
        for command in (
            b"EHLO soak\r\n",
            b"MAIL FROM:<soak@example.org>\r\n",
            f"RCPT TO:<{phone}@sms.localhost>\r\n".encode(),
            b"DATA\r\n",
        ):
            writer.write(command)
            await reply()
        writer.write(f"Subject: {text}\r\n\r\n.\r\n".encode())
        ok = (await reply()).startswith(b"250")
        writer.write(b"QUIT\r\n")
        await reply()
        return ok
    finally:
        writer.close()


async def feed(
    http_port: int,
    smtp_port: int,
    rate: float,
    seconds: float,
    pid: int,
    samples: list[tuple[float, float, int]],
    shared: bool,
) -> tuple[int, int]:
    acked = failed = 0
    start = time.monotonic()
    n = 0
    async with httpx.AsyncClient() as http:

        async def one(k: int) -> None:
            nonlocal acked, failed
            # --shared-text: one text per second to distinct phones, so the dispatcher
            # coalesces a second's messages into one bulk call and the queue stays flat.
            text = f"soak second {int(k // rate)}" if shared else f"soak {k}"
            phone = f"+1202555{k % 10000:04d}" if shared else f"+120255501{43 + k % 2}"
            try:
                if k % 2:
                    r = await http.post(
                        f"http://127.0.0.1:{http_port}/api/v1/messages",
                        json={"to": phone, "message": text},
                    )
                    ok = r.status_code == 202
                else:
                    ok = await smtp_send(smtp_port, phone, text)
            except (OSError, httpx.HTTPError):
                ok = False
            acked, failed = acked + ok, failed + (not ok)

        tasks: set[asyncio.Task[None]] = set()
        next_sample = start
        while (elapsed := time.monotonic() - start) < seconds:
            while n < elapsed * rate:
                task = asyncio.create_task(one(n))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                n += 1
            if time.monotonic() >= next_sample:
                rss, fds = sample(pid)
                samples.append((elapsed, rss, fds))
                next_sample += 1.0
            await asyncio.sleep(0.005)
        await asyncio.gather(*tasks)
    return acked, failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--rate", type=float, default=50)
    parser.add_argument(
        "--shared-text",
        action="store_true",
        help="one text per second to distinct phones: bulk calls, a flat queue",
    )
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="soak-")
    http_port, smtp_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMS_BRIDGE_")}
    env.update(
        SMS_BRIDGE_HTTP_LISTEN=f"127.0.0.1:{http_port}",
        SMS_BRIDGE_SMTP_LISTEN=f"127.0.0.1:{smtp_port}",
        SMS_BRIDGE_STORE_PATH=f"{tmp}/soak.db",
        SMS_BRIDGE_LOG_LEVEL="warning",
    )
    # The provider runs as its own process, so the bridge's RSS is the bridge's alone
    # (the in-process sandbox would keep every SMS it was sent in the same process).
    sandbox_port = free_port()
    sandbox = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bridge",
            "sandbox",
            "--listen",
            f"127.0.0.1:{sandbox_port}",
            "--api-key",
            "soak-key",
        ],
        env=env,
        cwd=tmp,
        stderr=subprocess.DEVNULL,
    )
    env.update(
        SMS_BRIDGE_PROVIDER_BASE_URL=f"http://127.0.0.1:{sandbox_port}/api/v1",
        SMS_BRIDGE_PROVIDER_API_KEY="soak-key",
    )
    time.sleep(1.0)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge", "serve"], env=env, cwd=tmp, stderr=subprocess.DEVNULL
    )
    samples: list[tuple[float, float, int]] = []
    try:
        for _ in range(100):
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{http_port}/healthz").status_code == 200:
                    break
            time.sleep(0.1)
        acked, failed = asyncio.run(
            feed(
                http_port,
                smtp_port,
                args.rate,
                args.minutes * 60,
                proc.pid,
                samples,
                args.shared_text,
            )
        )
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        sandbox.terminate()
        sandbox.wait(timeout=20)
    counts = dict(
        sqlite3.connect(f"{tmp}/soak.db")
        .execute("SELECT state, count(*) FROM messages GROUP BY state")
        .fetchall()
    )
    first = [s for s in samples if s[0] < 60]
    last = [s for s in samples if s[0] >= samples[-1][0] - 60]
    print(
        f"soak: {args.minutes:g} min at {args.rate:g} msg/s, {acked} acknowledged, "
        f"{failed} refused or failed"
    )
    print(f"stored by state: {counts}")
    print(
        f"RSS MiB  first minute max {max(s[1] for s in first):.1f}, "
        f"last minute max {max(s[1] for s in last):.1f}, overall max {max(s[1] for s in samples):.1f}"
    )
    print(
        f"open fds first minute max {max(s[2] for s in first)}, "
        f"last minute max {max(s[2] for s in last)}, overall max {max(s[2] for s in samples)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
