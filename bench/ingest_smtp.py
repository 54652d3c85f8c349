"""Durable SMTP accepts per second: the bridge's listener vs a bare aiosmtpd handler.

Run by hand:

    python bench/ingest_smtp.py [--duration 5] [--rounds 3] [--connections 16]
        [--workload distinct duplicate] [--mode reused one-per-connection] [--mailrise PATH] [--recipients 10000]

Three servers (four with `--mailrise`) run side by side, each in its own process on the
same event loop type (uvloop where installed; mailrise as it ships), loaded in turn, round after round, by an asyncio SMTP client in
this process: once with many messages per connection, once with one message per
connection (connect, EHLO, MAIL, RCPT, DATA, QUIT). The bare handler answers 250 to DATA
without doing anything; "bare+memo" is the same on the bridge's SMTP class, which
remembers parsed MAIL/RCPT addresses (aiosmtpd reparses each one, at a third of a bare
server's time); the bridge parses the mail, resolves the recipient and commits before its
250; its provider is the sandbox in a process of its own, as a remote provider would be
(in-process, its work would land on the bridge's event loop). The figures that matter are
the median ratios: against bare aiosmtpd (the target), against bare+memo (the bridge's
own cost per mail) and against mailrise 1.4 (an aiosmtpd relay that notifies through
Apprise from inside handle_DATA; installed in a venv of its own, never in this project's:
`python3 -m venv /tmp/mailrise-venv && /tmp/mailrise-venv/bin/pip install mailrise==1.4.0`,
then `--mailrise /tmp/mailrise-venv/bin/mailrise`). Each server's CPU time per mail is
read from /proc: a busy machine disturbs it less than the rates.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sqlite3
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from common import cpu_seconds, free_port, load_average, sandbox_provider, server

# Two workloads (`--workload`, both by default, distinct first):
# - distinct: what alerts look like in the field: every mail its own recipient
#   (--recipients numbers in turn, 10,000 by default), Message-ID and text, so every 250
#   is a queued message the dispatcher must send, one provider request each (distinct
#   texts cannot share a bulk call): the rate budget is spent in the first second and
#   the queue grows.
# - duplicate: one recipient, Message-ID and body again and again: every mail after the
#   first is stored as a suppressed duplicate (the dedupe lookup finds its original).
MESSAGE = (
    b"From: ups@example.org\r\nTo: {to}@sms.localhost\r\n"
    b"Subject: UPS on battery\r\nMessage-ID: <{n}@bench>\r\n\r\n"
    b"Power failure detected on UPS-01. Event {n}, runtime 12 min.\r\n.\r\n"
)
WORKLOADS = ("distinct", "duplicate")


RECIPIENTS = [10_000]  # distinct numbers in turn (--recipients)


def recipient(workload: str, n: int) -> bytes:
    return b"+12025550143" if workload == "duplicate" else b"+1202555%04d" % (n % RECIPIENTS[0])


def mail(workload: str, n: int) -> bytes:
    if workload == "duplicate":
        n = 0
    return MESSAGE.replace(b"{to}", recipient(workload, n)).replace(b"{n}", str(n).encode())


BARE_SERVER = textwrap.dedent("""
    import asyncio, socket, sys, types
    from aiosmtpd.smtp import SMTP
    if sys.argv[2:] == ["memo"]:
        from bridge.ingress.smtp import BridgeSMTP as SMTP

    class Bare:
        async def handle_DATA(self, server, session, envelope):
            return "250 2.0.0 OK"

        def login_refusal(self, session):  # BridgeSMTP asks its handler at each command
            return None

        # and its AUTH settings at each EHLO and AUTH: no users, no AUTH offered
        smtp = types.SimpleNamespace(auth_allow_plaintext=False, users={})

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


async def one_mail(client: Client, workload: str, n: int) -> bool:
    await client.command(b"MAIL FROM:<ups@example.org>\r\n")
    await client.command(b"RCPT TO:<%s@sms.localhost>\r\n" % recipient(workload, n))
    await client.command(b"DATA\r\n")
    return (await client.command(mail(workload, n))).startswith(b"250")


async def load(
    port: int, connections: int, duration: float, reuse: bool, workload: str, start: int
) -> tuple[float, int]:
    """Mails per second that got a 250, and how many mails were numbered."""
    done = 0
    counter = iter(range(start, 10**12))
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
            if await one_mail(client, workload, next(counter)):
                done += 1
            if not reuse:
                await client.command(b"QUIT\r\n")
                client.writer.close()
        if reuse and client is not None:
            await client.command(b"QUIT\r\n")
            client.writer.close()

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(connections)))
    return done / (time.monotonic() - started), next(counter) - start


MODES = ("reused", "one-per-connection")
SERVERS = ("bare", "bare+memo", "bridge", "mailrise")
# mailrise (an aiosmtpd relay to Apprise) texts from inside handle_DATA: its 250 waits
# for the notification. Here it posts to a sink that answers 200 at once, in a process
# of its own, as the bridge's sandbox provider is.
MAILRISE_CONFIG = """
listen:
  host: 127.0.0.1
  port: {port}
configs:
  "*@sms.localhost":
    urls:
      - json://127.0.0.1:{sink}/
"""
SINK = textwrap.dedent("""
    import socket, sys, uvicorn

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", int(sys.argv[1])))
    uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False)).run(sockets=[sock])
""")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--workload", choices=WORKLOADS, nargs="+", default=list(WORKLOADS))
    parser.add_argument("--mode", choices=MODES, nargs="+", default=list(MODES))
    parser.add_argument(
        "--mailrise",
        metavar="PATH",
        help="the `mailrise` command of a separate venv (pip install mailrise==1.4.0):"
        " loaded beside the others",
    )
    parser.add_argument(
        "--recipients",
        type=int,
        default=10_000,
        help="distinct numbers the distinct workload mails in turn (10,000: past every"
        " per-number cache; an on-call team is a handful)",
    )
    args = parser.parse_args()
    RECIPIENTS[0] = args.recipients
    tmp = tempfile.mkdtemp(prefix="bench-smtp-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMS_BRIDGE_")}
    servers = [s for s in SERVERS if s != "mailrise" or args.mailrise]
    cases = [(w, m) for w in args.workload for m in args.mode]
    runs: dict[str, dict[tuple[str, str], list[tuple[float, float]]]] = {
        s: {case: [] for case in cases} for s in servers
    }
    (Path(tmp) / "bare.py").write_text(BARE_SERVER)
    (Path(tmp) / "sink.py").write_text(SINK)
    ports = {name: free_port() for name in (*servers, "sink")}
    (Path(tmp) / "mailrise.yaml").write_text(
        MAILRISE_CONFIG.format(port=ports.get("mailrise", 0), sink=ports["sink"])
    )
    bare = [sys.executable, str(Path(tmp) / "bare.py")]
    bridge_env = dict(
        env,
        SMS_BRIDGE_SMTP_LISTEN=f"127.0.0.1:{ports['bridge']}",
        SMS_BRIDGE_HTTP_LISTEN="",
        SMS_BRIDGE_STORE_PATH=f"{tmp}/bench.db",
        # The bare servers keep one session for a whole round; the bridge's own cap (1,000
        # mails, then 421: a relay reconnects) ended the client's session mid-round once
        # a quiet machine passed 16,000 mails in 5 s, and the client died on the reset.
        SMS_BRIDGE_SMTP_MAX_MAILS_PER_SESSION="1000000",
    )
    load_before = os.getloadavg()
    numbered = 0  # mails numbered so far: distinct rounds never repeat an earlier mail
    with contextlib.ExitStack() as stack:
        provider = stack.enter_context(sandbox_provider(env, tmp))
        pids = {
            "bare": stack.enter_context(
                server([*bare, str(ports["bare"])], ports["bare"], env, tmp)
            ),
            "bare+memo": stack.enter_context(
                server([*bare, str(ports["bare+memo"]), "memo"], ports["bare+memo"], env, tmp)
            ),
            "bridge": stack.enter_context(
                server(
                    [sys.executable, "-m", "bridge", "serve"],
                    ports["bridge"],
                    bridge_env | provider,
                    tmp,
                )
            ),
        }
        if args.mailrise:
            sink = [sys.executable, str(Path(tmp) / "sink.py"), str(ports["sink"])]
            stack.enter_context(server(sink, ports["sink"], env, tmp))
            pids["mailrise"] = stack.enter_context(
                server(
                    [args.mailrise, str(Path(tmp) / "mailrise.yaml")], ports["mailrise"], env, tmp
                )
            )
        for _ in range(args.rounds):
            for workload, mode in cases:
                for name in servers:
                    cpu = cpu_seconds(pids[name])
                    rate, count = asyncio.run(
                        load(
                            ports[name],
                            args.connections,
                            args.duration,
                            mode == "reused",
                            workload,
                            numbered,
                        )
                    )
                    used = cpu_seconds(pids[name]) - cpu
                    numbered += count
                    runs[name][(workload, mode)].append((rate, used * 1e6 / max(1, count)))
    load_after = os.getloadavg()
    with sqlite3.connect(f"{tmp}/bench.db") as db:
        stored = dict(db.execute("SELECT state, count(*) FROM messages GROUP BY state").fetchall())
    print(
        f"SMTP ingest, {args.rounds} rounds of {args.duration:.0f}s per server and case, "
        f"{args.connections} connections, {os.cpu_count()} cores; load average before "
        f"{load_average(load_before)}, after {load_average(load_after)}"
    )
    others = [s for s in servers if s != "bridge"]
    print(
        f"{'workload':>9} {'mode':>18} {'round':>5}"
        + "".join(f" {name + ' msg/s':>14}" for name in servers)
        + "".join(f" {'vs ' + name:>12}" for name in others)
        + "  CPU us/msg "
        + " ".join(servers)
    )
    for workload, mode in cases:
        ratios: dict[str, list[float]] = {name: [] for name in others}
        for n in range(args.rounds):
            rates = {name: runs[name][(workload, mode)][n][0] for name in servers}
            cpus = {name: runs[name][(workload, mode)][n][1] for name in servers}
            for name in others:
                ratios[name].append(rates["bridge"] / rates[name])
            print(
                f"{workload:>9} {mode:>18} {n + 1:>5}"
                + "".join(f" {rates[name]:>14.0f}" for name in servers)
                + "".join(f" {ratios[name][-1]:>12.2f}" for name in others)
                + "  "
                + " ".join(f"{cpus[name]:.0f}" for name in servers)
            )
        print(
            f"{workload:>9} {mode:>18} median ratio of the bridge: "
            + ", ".join(f"{statistics.median(ratios[name]):.2f}x {name}" for name in others)
        )
    print(f"rows stored by the bridge, by state: {stored}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
