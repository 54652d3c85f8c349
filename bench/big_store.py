"""Fill a SQLite store with months of traffic, to measure the read paths on it (run by hand:
BENCHMARKS.md, "A store after months of traffic").

    python bench/big_store.py PATH [--messages 1000000] [--days 90]

The file is opened (and so migrated) by the bridge's own store first, then filled in bulk
with rows shaped as the bridge writes them: final states in the proportions the
section describes (mostly delivered; duplicates, storms, loops and budget suppressions;
provider errors and cancellations), routes, tokens, a skewed set of phones, and for each
message the events its life left (queued, sending, sent, delivered...). The triggers on
`messages` are dropped for the load and put back after it (a million row-by-row trigger
runs would take most of an hour); whatever they maintain besides events is rebuilt from
the rows (`schema.REBUILDS`). Deterministic (seeded): two builds are the same store.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sqlite3
import time
from pathlib import Path

from bridge.store.sqlite import SqliteStore
from bridge.store.sqlite.schema import REBUILDS

DAY = 86400.0
ROUTES = [f"route-{i}" for i in range(8)]
TOKENS = [f"token-{i}" for i in range(5)]
# (state, reason_kind, reason, weight per million), as the section's store had them.
OUTCOMES = [
    ("delivered", None, None, 800_494),
    ("sent", None, None, 69_728),
    ("suppressed", "duplicate", "duplicate of message {orig} within 300s", 60_000),
    ("suppressed", "storm", "storm control: folded into digest message {orig}", 20_000),
    ("suppressed", "loop", "mail loop: Auto-Submitted", 5_000),
    ("suppressed", "budget", "budget: texts_per_day reached", 4_544),
    ("failed", "provider", "provider refused: invalid number", 25_000),
    ("failed", "cancelled", "cancelled by admin", 8_000),
    ("failed", "unknown", "retry given up: no answer", 4_000),
    ("failed", "budget", "budget: cost_per_day reached", 2_697),
    ("queued", None, None, 535),
    ("held", "storm", "storm control: held", 1),
    ("sending", None, None, 1),
]
SOURCES = [("hook", 45), ("http", 40), ("smtp", 12), ("digest", 1), ("console", 1), ("budget", 1)]
# The life each final state leaves in `events`: the states it went through.
LIVES = {
    "delivered": ["queued", "sending", "sent", "delivered"],
    "sent": ["queued", "sending", "sent"],
    "failed": ["queued", "sending", "failed"],
    "suppressed": ["suppressed"],
    "queued": ["queued"],
    "held": ["held"],
    "sending": ["queued", "sending"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--days", type=float, default=90.0)
    parser.add_argument("--now", type=float, default=None, help="epoch seconds (default: now)")
    args = parser.parse_args()
    if args.path.exists():
        raise SystemExit(f"{args.path} exists: give a new file")
    asyncio.run(_migrate(args.path))
    started = time.monotonic()
    fill(args.path, args.messages, args.days, args.now or time.time())
    print(f"filled {args.path} in {time.monotonic() - started:.0f} s")


async def _migrate(path: Path) -> None:
    store = SqliteStore(path)
    await store.open()
    await store.close()


def fill(path: Path, count: int, days: float, now: float) -> None:
    rng = random.Random(20261130)
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = OFF")
    triggers = db.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'messages'"
    ).fetchall()
    for name, _ in triggers:
        db.execute(f"DROP TRIGGER {name}")
    # 5,000 phones, skewed: a few busy ones, most with under a hundred messages.
    phones = [f"+1202555{i:04d}" for i in range(5000)]
    phone_weights = [1.0 / (i + 1) ** 0.8 for i in range(5000)]
    states = rng.choices(OUTCOMES, weights=[o[3] for o in OUTCOMES], k=count)
    sources = rng.choices([s for s, _ in SOURCES], weights=[w for _, w in SOURCES], k=count)
    recipients = rng.choices(phones, weights=phone_weights, k=count)
    start = now - days * DAY
    step = days * DAY / count
    columns = (
        "id, recipient, text, source, sender_id, message_type, parts, route, dedupe_key,"
        " state, reason, attempts, provider_message_id, cost, created_at, updated_at,"
        " next_attempt_at, sent_at, reason_kind, estimated_cost, token, due_at"
    )
    marks = ",".join("?" * len(columns.split(",")))
    messages, events = [], []
    for i in range(count):
        mid = i + 1
        state, kind, reason, _ = states[i]
        source = sources[i]
        created = start + i * step
        if state in ("queued", "held", "sending"):
            created = now - rng.uniform(0, 600)  # the live few are recent
        parts = 1 if rng.random() < 0.85 else rng.randint(2, 4)
        life = LIVES[state]
        went_out = "sent" in life
        sent_at = created + rng.uniform(0.5, 5) if went_out else None
        route = rng.choice(ROUTES) if source == "hook" else None
        token = rng.choice(TOKENS) if source == "http" else None
        text = f"alert {mid}: disk usage on db-{mid % 97} at {50 + mid % 50}%"
        if reason and "{orig}" in reason:
            reason = reason.format(orig=max(1, mid - rng.randint(1, 500)))
        messages.append(
            (
                mid,
                recipients[i],
                text,
                source,
                "Bridge",
                1,
                parts,
                route,
                f"k{mid % 50000}" if source == "hook" else None,
                state,
                reason,
                1 if went_out or state == "failed" else 0,
                f"p{mid}" if went_out else None,
                round(0.04 * parts, 4) if went_out else None,
                created,
                (sent_at or created) + (30 if state == "delivered" else 0),
                created,
                sent_at,
                kind,
                round(0.04 * parts, 4),
                token,
                created,
            )
        )
        at = created
        for n, event_state in enumerate(life):
            detail = reason if n == len(life) - 1 else None
            events.append((mid, at, event_state, 1 if n and event_state != "queued" else 0, detail))
            at += 1.0
        if len(messages) >= 20_000:
            _flush(db, columns, marks, messages, events)
    _flush(db, columns, marks, messages, events)
    for _, sql in triggers:
        db.execute(sql)
    for sql in REBUILDS:
        db.execute(sql)
    db.commit()
    db.close()


def _flush(db: sqlite3.Connection, columns: str, marks: str, messages: list, events: list) -> None:
    db.executemany(f"INSERT INTO messages ({columns}) VALUES ({marks})", messages)
    db.executemany(
        "INSERT INTO events (message_id, at, state, attempts, detail) VALUES (?, ?, ?, ?, ?)",
        events,
    )
    db.commit()
    messages.clear()
    events.clear()


if __name__ == "__main__":
    main()
