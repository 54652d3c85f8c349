"""Durable SMTP accepts per second: the bridge's listener vs a bare aiosmtpd handler.

Run by hand:

    python bench/ingest_smtp.py [--duration 5] [--rounds 3] [--connections 16]

Three servers run side by side, each in its own process on the same event loop type
(uvloop where installed), loaded in turn, round after round, by an asyncio SMTP client in
this process: once with many messages per connection, once with one message per
connection (connect, EHLO, MAIL, RCPT, DATA, QUIT). The bare handler answers 250 to DATA
without doing anything; "bare+memo" is the same on the bridge's SMTP class, which
remembers parsed MAIL/RCPT addresses (aiosmtpd reparses each one, at a third of a bare
server's time); the bridge parses the mail, resolves the recipient and commits before its
250; its provider is the sandbox in a process of its own, as a remote provider would be
(in-process, its work would land on the bridge's event loop). The figures that matter are
the median ratios: against bare aiosmtpd (the target),
and against bare+memo (the bridge's own cost per mail).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from common import free_port, sandbox_provider, server

# Each mail's text differs, as real alerts do. With one text for all, the dispatcher
# would coalesce the stream into 1000-recipient bulk sends and spend the minute's request
# budget in a burst whenever the window reopens; that work (the dispatch path has its own
# benchmark) would land in some rounds and not others.
MESSAGE = (
    b"From: ups@example.org\r\nTo: +12025550143@sms.localhost\r\n"
    b"Subject: UPS on battery\r\nMessage-ID: <{n}@bench>\r\n\r\n"
    b"Power failure detected on UPS-01. Event {n}, runtime 12 min.\r\n.\r\n"
)
BARE_SERVER = textwrap.dedent("""
    import asyncio, socket, sys
    from aiosmtpd.smtp import SMTP
    if sys.argv[2:] == ["memo"]:
        from bridge.ingress.smtp import BridgeSMTP as SMTP

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


MODES = ("reused", "one-per-connection")
SERVERS = ("bare", "bare+memo", "bridge")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-smtp-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMS_BRIDGE_")}
    runs: dict[str, dict[str, list[float]]] = {s: {m: [] for m in MODES} for s in SERVERS}
    (Path(tmp) / "bare.py").write_text(BARE_SERVER)
    ports = {name: free_port() for name in SERVERS}
    bare = [sys.executable, str(Path(tmp) / "bare.py")]
    bridge_env = dict(
        env,
        SMS_BRIDGE_SMTP_LISTEN=f"127.0.0.1:{ports['bridge']}",
        SMS_BRIDGE_HTTP_LISTEN="",
        SMS_BRIDGE_STORE_PATH=f"{tmp}/bench.db",
        SMS_BRIDGE_DEDUPE_WINDOW="0s",
    )
    with (
        sandbox_provider(env, tmp) as provider,
        server([*bare, str(ports["bare"])], ports["bare"], env, tmp),
        server([*bare, str(ports["bare+memo"]), "memo"], ports["bare+memo"], env, tmp),
        server(
            [sys.executable, "-m", "bridge", "serve"], ports["bridge"], bridge_env | provider, tmp
        ),
    ):
        for _ in range(args.rounds):
            for mode in MODES:
                for name in SERVERS:
                    rate = asyncio.run(
                        load(ports[name], args.connections, args.duration, mode == "reused")
                    )
                    runs[name][mode].append(rate)
    stored = (
        sqlite3.connect(f"{tmp}/bench.db").execute("SELECT count(*) FROM messages").fetchone()[0]
    )
    print(
        f"SMTP ingest, {args.rounds} rounds of {args.duration:.0f}s per server and mode, "
        f"{args.connections} connections, {os.cpu_count()} cores"
    )
    print(
        f"{'mode':>20} {'round':>5} {'bare msg/s':>11} {'memo msg/s':>11} {'bridge msg/s':>13}"
        f" {'vs bare':>8} {'vs memo':>8}"
    )
    for mode in MODES:
        to_bare, to_memo = [], []
        for n in range(args.rounds):
            bare_rate, memo, bridge = (runs[name][mode][n] for name in SERVERS)
            to_bare.append(bridge / bare_rate)
            to_memo.append(bridge / memo)
            print(
                f"{mode:>20} {n + 1:>5} {bare_rate:>11.0f} {memo:>11.0f} {bridge:>13.0f}"
                f" {to_bare[-1]:>8.2f} {to_memo[-1]:>8.2f}"
            )
        print(
            f"{mode:>20} median ratio: {statistics.median(to_bare):.2f} of bare aiosmtpd, "
            f"{statistics.median(to_memo):.2f} of bare+memo"
        )
    print(f"rows stored by the bridge: {stored}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
