"""Instructions per request of the bridge's ASGI app in-process, for callgrind: a figure
that does not move with the machine's load (BENCHMARKS.md, issue #16).

    PYTHONPATH=SOURCE_TREE valgrind --tool=callgrind --separate-threads=yes \
        --dump-before=getppid --callgrind-out-file=/tmp/cg/NAME python bench/app_instr.py \
        [--requests 2000] [--concurrency 32] [--bare | --hook]
    python bench/app_instr.py --report /tmp/cg/NAME REQUESTS

Wall-clock figures on a shared machine move with whatever else runs; instructions do
not (two runs of one tree differed by 0.8 %). The app is built and warmed (2,000
distinct alerts) as `bench/app_cost.py` does; then `os.getppid()` marks the start and
the end of the measured requests: callgrind's `--dump-before=getppid` writes what the
calling thread, the event loop's, executed up to each mark as a dump of its own, and
the second (`NAME.2-01`) is the measured requests. `--report` prints it per request.
The store's writer thread is not in it: its work moves with how the group commits fall.
A run takes ~80 s of CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
from pathlib import Path

from app_cost import BARE, Poster
from common import report_instructions

from bridge.app import build
from bridge.config import load_config


async def main(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-app-instr-"))
    config_file = tmp / "bridge.toml"
    # `--hook`: the same alerts to a generic webhook route that takes the payload's `to`
    route = '[routes.bench]\nformat = "generic"\nallow_payload_to = true\n' if args.hook else ""
    config_file.write_text(f'[store]\npath = "{tmp / "bench.db"}"\n{route}')
    poster = Poster("/hooks/bench" if args.hook else "/api/v1/messages")
    async with build(load_config(config_file, env={})) as bridge:
        app = BARE if args.bare else bridge.app
        await poster.run(app, 2000, args.concurrency)
        os.getppid()  # the measured part starts (callgrind dumps before it)
        await poster.run(app, args.requests, args.concurrency)
        os.getppid()  # and ends


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--bare", action="store_true")
    parser.add_argument("--hook", action="store_true", help="POST /hooks/bench (generic)")
    parser.add_argument("--report", nargs=2, metavar=("OUT", "REQUESTS"))
    args = parser.parse_args()
    if args.report:
        report_instructions(args.report[0], int(args.report[1]), "request")
    else:
        try:
            import uvloop
        except ImportError:
            asyncio.run(main(args))
        else:
            uvloop.run(main(args))
