"""A flood of one text: how long after the last acknowledgement the last recipient
reaches the provider, and how many calls it took.

Run by hand:

    python bench/flood.py [--messages 3000] [--rounds 1] [--distinct] [--baseline DIR]

`sms-bridge serve` and `sms-bridge sandbox` run in processes of their own, the sandbox
holding the provider's limit (100 requests a minute, `--requests-per-minute`) and the
bridge configured to it. One client posts `--messages` requests to POST /api/v1/messages,
one after another on one connection (a mail or hook per phone, as a legacy sender or a
script does): the same text, a different recipient each. The sandbox's own record of the
requests it received (`/_sandbox/requests`, `/_sandbox/entries`) is the judge:

- last ack -> last recipient at the provider (target at most 10 s);
- first ack -> first request at the provider (the idle path: should stay instant);
- /send and /send-bulk calls, recipients per bulk call;
- the most requests (every endpoint, status polls included) in any 60 s window, and 429s.

`--baseline DIR` runs, before each round, the same flood against the bridge whose
source tree is DIR (e.g. `git archive main | tar -x -C DIR`), so that a before/after
comparison shares the machine's load, round by round.

`--distinct` gives every request its own text, where the limit is physical (100 texts a
minute): it reports the same figures and the bridge's `sms_bridge_oldest_queued_age_seconds`
while the queue drains (use it with a few hundred messages, not thousands).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import httpx
from common import bridge_env, free_port, sandbox_provider, server

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.helpers import max_in_window

TEXT = "db-2: disk full, writes failing (flood bench)"
SETTLE_TIMEOUT = 300.0


def recipients(n: int) -> list[str]:
    return [f"+1202555{i:04d}" for i in range(n)]


def post_all(api: str, numbers: list[str], distinct: bool) -> tuple[float, float]:
    """Post one request per number as fast as one client goes; (first ack, last ack)."""
    first = last = 0.0
    with httpx.Client(timeout=30) as client:
        for i, number in enumerate(numbers):
            text = f"{TEXT} #{i}" if distinct else TEXT
            response = client.post(f"{api}/api/v1/messages", json={"to": number, "message": text})
            if response.status_code != 202:
                raise SystemExit(f"request {i}: {response.status_code} {response.text}")
            last = time.time()
            first = first or last
    return first, last


def oldest_queued_age(api: str) -> float:
    metrics = httpx.get(f"{api}/metrics", timeout=10).text
    found = re.search(r"^sms_bridge_oldest_queued_age_seconds ([\d.e+-]+)$", metrics, re.M)
    return float(found.group(1)) if found else float("nan")


def one_round(n: int, distinct: bool, rpm: int, source: str | None = None) -> dict[str, float]:
    tmp = tempfile.mkdtemp(prefix="bench-flood-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMS_BRIDGE_")}
    port = free_port()
    serve_env = bridge_env(tmp, port, SMS_BRIDGE_PROVIDER_REQUESTS_PER_MINUTE=str(rpm))
    if source:  # that tree's `bridge` before the installed one
        serve_env["PYTHONPATH"] = source
    api = f"http://127.0.0.1:{port}"
    with sandbox_provider(env, tmp, requests_per_minute=rpm) as provider:
        sandbox = provider["SMS_BRIDGE_PROVIDER_BASE_URL"].removesuffix("/api/v1")
        with server([sys.executable, "-m", "bridge", "serve"], port, serve_env | provider, tmp):
            first_ack, last_ack = post_all(api, recipients(n), distinct)
            ages = []
            deadline = time.time() + SETTLE_TIMEOUT
            while time.time() < deadline:
                entries = httpx.get(f"{sandbox}/_sandbox/entries", timeout=30).json()
                if len(entries) >= n:
                    break
                ages.append(oldest_queued_age(api))
                time.sleep(1.0)
            requests = httpx.get(f"{sandbox}/_sandbox/requests", timeout=30).json()
    sends = [
        r for r in requests if r["path"].endswith(("/send", "/send-bulk")) and r["status"] < 300
    ]
    bulk = [r for r in sends if r["path"].endswith("/send-bulk")]
    return {
        "reached": len(entries),
        "last_ack_to_last": max(r["at"] for r in sends) - last_ack,
        "first_ack_to_first": min(r["at"] for r in sends) - first_ack,
        "ack_span": last_ack - first_ack,
        "send": len(sends) - len(bulk),
        "send_bulk": len(bulk),
        "per_call": (len(entries) - (len(sends) - len(bulk))) / len(bulk) if bulk else 0.0,
        "requests": len(requests),
        "max_60s": max_in_window([r["at"] for r in requests]),
        "429": sum(1 for r in requests if r["status"] == 429),
        "max_queue_age": max(ages, default=0.0),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--distinct", action="store_true", help="a different text each")
    parser.add_argument("--requests-per-minute", type=int, default=100)
    parser.add_argument("--baseline", help="source tree of the bridge to compare with")
    args = parser.parse_args()
    load = os.getloadavg()
    print(
        f"flood of {args.messages} {'distinct texts' if args.distinct else 'one text'}, one "
        f"recipient per request, one client; provider limit {args.requests_per_minute}/min; "
        f"load before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, {os.cpu_count()} cores"
    )
    for n in range(1, args.rounds + 1):
        runs = [("baseline", args.baseline)] if args.baseline else []
        for name, source in [*runs, ("this tree", None)]:
            r = one_round(args.messages, args.distinct, args.requests_per_minute, source)
            print(
                f"round {n}, {name}: acks over {r['ack_span']:.1f} s; last ack -> last "
                f"recipient {r['last_ack_to_last']:.2f} s; first ack -> first request "
                f"{r['first_ack_to_first'] * 1000:.0f} ms; {r['reached']:.0f} recipients in "
                f"{r['send']:.0f} /send + {r['send_bulk']:.0f} /send-bulk "
                f"({r['per_call']:.0f} per bulk call); {r['requests']:.0f} requests in all, "
                f"most in any 60 s: {r['max_60s']:.0f}; 429s: {r['429']:.0f}; oldest queued "
                f"age seen: {r['max_queue_age']:.0f} s; load now {os.getloadavg()[0]:.2f}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
