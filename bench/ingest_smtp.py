"""Durable SMTP accepts per second: the bridge's listener vs a bare aiosmtpd handler.

Run by hand:

    python bench/ingest_smtp.py [--duration 8] [--connections 16]

Both servers run in the same run, each in its own process on the same event loop type
(uvloop where installed), loaded in turn by an asyncio SMTP client in this process: once
with many messages per connection, once with one message per connection (connect, EHLO,
MAIL, RCPT, DATA, QUIT). The bare handler answers 250 to DATA without doing anything; the
bridge parses the mail, resolves the recipient and commits before its 250. The figure
that matters is the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from common import free_port, server

MESSAGE = (
    b"From: ups@example.org\r\nTo: +12025550143@sms.localhost\r\n"
    b"Subject: UPS on battery\r\nMessage-ID: <{n}@bench>\r\n\r\n"
    b"Power failure detected on UPS-01. Runtime 12 min.\r\n.\r\n"
)
BARE_SERVER = textwrap.dedent("""
    import asyncio, socket, sys
    from aiosmtpd.smtp import SMTP

    class Bare:
        async def handle_DATA(self, server, session, envelope):
            return "250 2.0.0 OK"

    async def main(port):
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(("127.0.0.1", port))
        server = await loop.create_server(
            lambda: SMTP(Bare(), hostname="bare", loop=loop), sock=sock)
        await server.serve_forever()

    try:
        import uvloop
        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main(int(sys.argv[1])))
""")


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def reply(self) -> bytes:
        line = await self.reader.readline()
        while line[3:4] == b"-":
            line = await self.reader.readline()
        return line

    async def command(self, data: bytes) -> bytes:
        self.writer.write(data)
        return await self.reply()


async def one_mail(client: Client, n: int) -> bool:
    await client.command(b"MAIL FROM:<ups@example.org>\r\n")
    await client.command(b"RCPT TO:<+12025550143@sms.localhost>\r\n")
    await client.command(b"DATA\r\n")
    return (await client.command(MESSAGE.replace(b"{n}", str(n).encode()))).startswith(b"250")


async def load(port: int, connections: int, duration: float, reuse: bool) -> float:
    done = 0
    counter = iter(range(10**9))
    stop_at = time.monotonic() + duration

    async def connect() -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = Client(reader, writer)
        await client.reply()
        await client.command(b"EHLO bench\r\n")
        return client

    async def worker() -> None:
        nonlocal done
        client = await connect() if reuse else None
        while time.monotonic() < stop_at:
            if not reuse:
                client = await connect()
            assert client is not None
            if await one_mail(client, next(counter)):
                done += 1
            if not reuse:
                await client.command(b"QUIT\r\n")
                client.writer.close()
        if reuse and client is not None:
            await client.command(b"QUIT\r\n")
            client.writer.close()

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(connections)))
    return done / (time.monotonic() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=8)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-smtp-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMS_BRIDGE_")}
    results: dict[str, dict[str, float]] = {}
    (Path(tmp) / "bare.py").write_text(BARE_SERVER)
    bare_port = free_port()
    with server([sys.executable, str(Path(tmp) / "bare.py"), str(bare_port)], bare_port, env, tmp):
        results["bare"] = {
            mode: asyncio.run(load(bare_port, args.connections, args.duration, mode == "reused"))
            for mode in ("reused", "one-per-connection")
        }
    smtp_port = free_port()
    bridge_env = dict(
        env,
        SMS_BRIDGE_SMTP_LISTEN=f"127.0.0.1:{smtp_port}",
        SMS_BRIDGE_HTTP_LISTEN="",
        SMS_BRIDGE_STORE_PATH=f"{tmp}/bench.db",
        SMS_BRIDGE_DEDUPE_WINDOW="0s",
    )
    with server([sys.executable, "-m", "bridge", "serve"], smtp_port, bridge_env, tmp):
        results["bridge"] = {
            mode: asyncio.run(load(smtp_port, args.connections, args.duration, mode == "reused"))
            for mode in ("reused", "one-per-connection")
        }
    stored = (
        sqlite3.connect(f"{tmp}/bench.db").execute("SELECT count(*) FROM messages").fetchone()[0]
    )
    print(
        f"SMTP ingest, {args.duration:.0f}s per run, {args.connections} connections, "
        f"{os.cpu_count()} cores"
    )
    print(f"{'mode':>20} {'bare msg/s':>11} {'bridge msg/s':>13} {'ratio':>6}")
    for mode in ("reused", "one-per-connection"):
        bare, bridge = results["bare"][mode], results["bridge"][mode]
        print(f"{mode:>20} {bare:>11.0f} {bridge:>13.0f} {bridge / bare:>6.2f}")
    print(f"rows stored by the bridge: {stored}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
