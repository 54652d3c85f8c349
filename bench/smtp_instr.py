"""Instructions per mail of the bridge's SMTP listener against a bare aiosmtpd handler, for
callgrind: the SMTP figure of issue #16 that does not move with the machine's load
(BENCHMARKS.md; the HTTP one is `bench/app_instr.py`).

    PYTHONPATH=SOURCE_TREE valgrind --tool=callgrind --separate-threads=yes \
        --dump-before=getppid --callgrind-out-file=/tmp/cg/NAME python bench/smtp_instr.py \
        [--mails 2000] [--connections 16] [--bare]
    python bench/smtp_instr.py --report /tmp/cg/NAME MAILS
    PYTHONPATH=SOURCE_TREE python bench/smtp_instr.py --profile [--mails 20000]
    PYTHONPATH=SOURCE_TREE python bench/smtp_instr.py --counts [--mails 6000] [--bare]

The server runs in this process as `sms-bridge serve` runs it (`Bridge.run` with its
dispatcher, poller and work watch; `gc.freeze` after start-up; its provider the sandbox in
a process of its own, as `bench/ingest_smtp.py` has it, but one request a minute: see
below), or with `--bare` the bare
aiosmtpd handler of `ingest_smtp.py` (`--memo`: on the bridge's SMTP class). The client is
`ingest_smtp.py`'s own, in a child process: `--connections` reused sessions, distinct
mails (every mail its own recipient of 10,000 in turn, Message-ID and text). After a
warm-up of 2,000 mails `os.getppid()` marks the start and the end of the measured mails:
callgrind's `--dump-before=getppid` writes what the calling thread, the event loop's,
executed up to each mark as a dump of its own, and the second (`NAME.2-01`) is the
measured mails. The store's writer thread is not in it (callgrind dumps only the thread
that calls the mark; its file at the end, `NAME-0N`, holds its whole life). `--profile`:
no valgrind, cProfile of the loop over the measured mails. `--counts`: no valgrind, each
thread's CPU and context switches a mail over the measured mails (the CPU moves with the
machine's load; the switches much less).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import os
import pstats
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

WARM = 2000


# --- the client (a child process) -------------------------------------------------------


async def client(port: int, warm: int, mails: int, connections: int) -> None:
    from ingest_smtp import Client, one_mail

    counter = iter(range(10**12))

    async def connect() -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        c = Client(reader, writer)
        await c.reply()
        await c.command(b"EHLO bench\r\n")
        return c

    clients = [await connect() for _ in range(connections)]

    async def run(total: int) -> None:
        left = [total]

        async def worker(c: Client) -> None:
            while left[0] > 0:
                left[0] -= 1
                assert await one_mail(c, "distinct", next(counter)), "not accepted"

        await asyncio.gather(*(worker(c) for c in clients))

    await run(warm)
    print("warm", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await run(mails)
    for c in clients:
        await c.command(b"QUIT\r\n")
        c.writer.close()
    print("done", flush=True)


# --- the server (this process) -----------------------------------------------------------


class Bare:
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 2.0.0 OK"


async def drive(port: int, args: argparse.Namespace) -> None:
    """The client's warm-up, then the measured mails between two marks."""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--client",
        str(port),
        str(WARM),
        str(args.mails),
        str(args.connections),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=Path(__file__).parent,
    )
    assert child.stdin is not None and child.stdout is not None
    assert await child.stdout.readline() == b"warm\n"
    profile = cProfile.Profile() if args.profile else None
    await mark(args)  # the measured part starts
    if profile is not None:
        profile.enable()
    child.stdin.write(b"go\n")
    line = await child.stdout.readline()
    if profile is not None:
        profile.disable()
    await mark(args)  # and ends
    assert line == b"done\n", line
    assert await child.wait() == 0
    if args.counts:
        before, after = COUNTS
        tick = 1e6 / os.sysconf("SC_CLK_TCK") / args.mails
        print("thread: user us, system us, voluntary, involuntary switches a mail")
        for name, end in sorted(after.items()):
            start = before.get(name, [0, 0, 0, 0])
            user, system, vol, invol = (b - a for a, b in zip(start, end, strict=True))
            if user or system or vol:
                print(
                    f"{name:>24}: {user * tick:7.1f} {system * tick:7.1f}"
                    f" {vol / args.mails:6.2f} {invol / args.mails:6.2f}"
                )
    if profile is not None:
        stats = pstats.Stats(profile).sort_stats(args.sort)
        stats.print_stats(args.lines)
        if args.dump:
            stats.dump_stats(args.dump)
        if args.callers:
            stats.print_callers(args.callers)


def thread_counts() -> dict[str, list[int]]:
    """Per thread of this process: CPU ticks in user and system mode, and voluntary and
    involuntary context switches (from /proc: the switches move little with load)."""
    out = {}
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            stat = (task / "stat").read_text().rsplit(")", 1)[1].split()
            name = (task / "comm").read_text().strip()
            status = dict(
                line.split(":\t", 1) for line in (task / "status").read_text().splitlines()
            )
            out[f"{name}/{task.name}"] = [
                int(stat[11]),
                int(stat[12]),
                int(status["voluntary_ctxt_switches"]),
                int(status["nonvoluntary_ctxt_switches"]),
            ]
    return out


COUNTS: list[dict[str, list[int]]] = []


async def mark(args: argparse.Namespace) -> None:
    """A callgrind dump of the event loop's thread (`--dump-before=getppid` dumps before
    `os.getppid()`). Not of the other threads: `callgrind_control --dump` at these marks
    was taken by valgrind late, at its next look, and the dumps missed most of the mails."""
    if args.counts:
        COUNTS.append(thread_counts())
    os.getppid()


def listener() -> tuple[socket.socket, int]:
    sock = socket.socket()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    return sock, int(sock.getsockname()[1])


async def bare(args: argparse.Namespace) -> None:
    from aiosmtpd.smtp import SMTP

    if args.memo:
        from bridge.ingress.smtp import BridgeSMTP as SMTP  # type: ignore[assignment]
    loop = asyncio.get_running_loop()
    sock, port = listener()
    server = await loop.create_server(lambda: SMTP(Bare(), hostname="bare", loop=loop), sock=sock)
    async with server:
        await drive(port, args)


async def serve_bridge(args: argparse.Namespace, env: dict[str, str], tmp: Path) -> None:
    from bridge.app import YOUNG_GC_THRESHOLD, build_serving
    from bridge.config import load_config

    config_file = tmp / "bridge.toml"
    config_file.write_text(
        f'[store]\npath = "{tmp / "bench.db"}"\n'
        # as ingest_smtp.py: the bare servers keep one session for the whole run
        "[smtp]\nmax_mails_per_session = 1000000\n"
        # The budget spent, as in ingest_smtp.py's rounds after their first second: every
        # mail wakes the dispatcher, which finds no budget. With ingest_smtp's 100 a
        # minute, the sends in a measured part slowed ~50x by valgrind were more than the
        # whole: their count moved with the wall-clock time, not with the bridge's work.
        "[provider]\nrequests_per_minute = 1\n"
    )
    sock, port = listener()
    async with build_serving(load_config(config_file, env=env)) as served:
        started = asyncio.Event()
        runner = asyncio.create_task(served.run(smtp_sockets=[sock], started=started))
        await started.wait()
        gc.freeze()  # as `serve` does once started
        gc.set_threshold(YOUNG_GC_THRESHOLD, *gc.get_threshold()[1:])
        try:
            await drive(port, args)
        finally:
            served.stop.set()
            await runner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mails", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--bare", action="store_true")
    parser.add_argument("--memo", action="store_true", help="--bare on the bridge's SMTP class")
    parser.add_argument(
        "--counts", action="store_true", help="per thread: CPU and context switches a mail"
    )
    parser.add_argument("--profile", action="store_true", help="cProfile, no valgrind")
    parser.add_argument("--sort", default="tottime", help="--profile: pstats order")
    parser.add_argument("--lines", type=int, default=45, help="--profile: lines printed")
    parser.add_argument("--dump", help="--profile: write the pstats here")
    parser.add_argument("--callers", help="--profile: print the callers of these functions")
    parser.add_argument("--report", nargs=2, metavar=("OUT", "MAILS"))
    parser.add_argument("--client", nargs=4, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.report:
        from common import report_instructions

        report_instructions(args.report[0], int(args.report[1]), "mail")
        return
    if args.client:
        asyncio.run(client(*args.client))
        return
    try:
        import uvloop

        run: Any = uvloop.run
    except ImportError:
        run = asyncio.run
    if args.bare or args.memo:
        run(bare(args))
        return
    from common import sandbox_provider

    tmp = Path(tempfile.mkdtemp(prefix="bench-smtp-instr-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMS_BRIDGE_")}
    with contextlib.ExitStack() as stack:
        provider = stack.enter_context(sandbox_provider(env, str(tmp)))
        run(serve_bridge(args, env | provider, tmp))


if __name__ == "__main__":
    main()
