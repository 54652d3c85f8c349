"""What the store- and provider-facing commands do (`messages`, `retry`, `purge`,
`provider`, `store copy`); `bridge.cli` parses the command line and calls them. Each
imports the store or the provider client only when it runs."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from bridge.clock import Clock, SystemClock
from bridge.config import Config, file_problem, parse_duration, purge_problem
from bridge.errors import ProviderError, StoreUnavailable

if TYPE_CHECKING:  # imported where used: each command loads only what it needs
    from bridge.store import Store


async def store_copy(config: Config, args: argparse.Namespace) -> int:
    from bridge.store import copy_into_postgres, display_url

    source = args.source or config.store.path
    target = args.target or config.store.url
    if not target.startswith(("postgresql://", "postgres://")):
        print(
            "store copy: no PostgreSQL target: set store.url (SMS_BRIDGE_STORE_URL) or pass"
            " --to postgresql://...",
            file=sys.stderr,
        )
        return 1
    try:
        summary = await copy_into_postgres(source, target, replace=args.replace)
    except StoreUnavailable as exc:  # names the side at fault, never the password
        print(f"store copy {source} -> {display_url(target)}: {exc}", file=sys.stderr)
        return 1
    print(summary.line())
    return 0


def store_exists(config: Config) -> bool:
    """Whether the store file the commands read exists; says which file (or why not) on stderr.

    The commands find the store as `serve` does: `$SMS_BRIDGE_STORE_PATH` (relative to
    the current directory), which wins over the config file, else the `store.path` of the
    config file (`--config`, else `$SMS_BRIDGE_CONFIG`; relative to that file's
    directory), else `sms-bridge.db` in the current directory. Opening a missing file
    would create an empty store and list nothing, which reads as "no messages": refuse
    instead.
    """
    if config.store.url:
        return True  # a server: opening it says whether it is there
    path = os.path.abspath(config.store.path)
    if (why := file_problem(path)) is None:
        print(f"store: {path}", file=sys.stderr)
        return True
    # A store.path the config file wrote is already joined to the file's directory; one
    # still relative is the environment's or the default, read from the current one.
    relative = "" if os.path.isabs(config.store.path) else f", relative to {os.getcwd()}"
    where = f"store.path = {config.store.path!r} from {config.source}{relative}"
    if why != "no such file":  # there, but not a store: no other directory will help
        print(f"store {path}: {why} ({where})", file=sys.stderr)
        return False
    print(
        f"store {path}: no such file ({where}). Run this where `sms-bridge serve` "
        "runs, or give the same --config / SMS_BRIDGE_CONFIG / SMS_BRIDGE_STORE_PATH.",
        file=sys.stderr,
    )
    return False


async def messages(config: Config, args: argparse.Namespace) -> int:
    from bridge.store import open_store

    if not store_exists(config):
        return 1
    store = open_store(config.store)
    await store.open()
    try:
        rows = await store.query(
            state=args.state, limit=args.limit, reason_kind=args.reason, route=args.route
        )
    finally:
        await store.close()
    if args.json:
        print(_json([m.to_json() for m in rows]))
        return 0
    table = [
        [
            str(m.id),
            m.to_json()["created_at"][:19],
            m.recipient,
            str(m.state),
            str(m.attempts),
            m.provider_message_id or "",
            _short(m.reason or m.text, 50),
        ]
        for m in rows
    ]
    _print_table(["id", "created", "to", "state", "tries", "provider id", "reason / text"], table)
    return 0


async def maintain(config: Config, args: argparse.Namespace) -> int:
    from bridge.delivery.dispatcher import IDLE_WAIT
    from bridge.store import open_store

    if args.command == "retry" and not (args.ids or args.failed):
        print("retry needs message ids or --failed", file=sys.stderr)
        return 2
    try:
        age = parse_duration(args.older_than) if args.command == "purge" else 0.0
    except ValueError as exc:
        print(f"--older-than: {exc}", file=sys.stderr)
        return 2
    if args.command == "purge" and (why := purge_problem(config, age)):
        print(f"--older-than: {why}", file=sys.stderr)
        return 2
    if not store_exists(config):
        return 1
    store = open_store(config.store)
    await store.open()
    try:
        now = SystemClock().now()
        if args.command == "purge":
            print(f"purged {await store.purge(now - age)} messages")
            return 0
        chosen = await store.retry(None if args.failed else args.ids, now)
        # Why each other id was not retried: its state, or that there is no such message
        # (a mistyped id, or the store of another directory), not "not failed" for both.
        left = {i: await store.get(i) for i in sorted(set(args.ids) - set(chosen))}
    finally:
        await store.close()
    print(f"queued again: {', '.join(map(str, chosen)) or 'none'}")
    if chosen:  # this process only wrote the store: the running serve finds them on its own
        print(f"a running `sms-bridge serve` sends them within {IDLE_WAIT:.0f} s")
    alone = [f"{i} ({m.state.value})" for i, m in left.items() if m is not None]
    absent = [str(i) for i, m in left.items() if m is None]
    if alone:
        print(f"not failed (left alone): {', '.join(alone)}", file=sys.stderr)
    if absent:
        print(f"no such message: {', '.join(absent)}", file=sys.stderr)
    return 0 if not left else 1


CLI_MAX_WAIT = 65.0  # longer than one window: the budget is not coming back soon


async def book_cli_request(
    store: Store,
    config: Config,
    clock: Clock,
    kind: str,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> float:
    """Book one request in the window `serve` persists (and reads back, see the
    dispatcher): waits while it is full, so a CLI call cannot push `serve` into 429s.
    Counting and booking are one step of the store's, so two CLI calls cannot both take
    the last place. The booking's time: re-stamped once the call is over."""
    from bridge.delivery.dispatcher import FOREIGN_PREFIX
    from bridge.delivery.ratelimit import WINDOW_MARGIN, WINDOW_SECONDS, StampRead

    waited = 0.0
    while True:
        stamp = StampRead(clock)
        wait = await store.book_request(
            stamp,
            f"{FOREIGN_PREFIX}:{kind}",
            limit=config.provider.requests_per_minute,
            window=WINDOW_SECONDS + WINDOW_MARGIN,
        )
        if wait <= 0:
            return stamp.at
        if waited + wait > CLI_MAX_WAIT:
            raise ProviderError(f"the provider's rate window is full for {wait:.0f}s more")
        print(f"rate window full (serve is busy): waiting {wait:.1f}s", file=sys.stderr)
        await sleep(wait)
        waited += wait


async def provider(config: Config, args: argparse.Namespace, shared: bool) -> int:
    from bridge import store as stores

    if args.action == "calculate" and (not args.to or not args.message):
        print("calculate needs --to NUMBER (repeatable) and --message TEXT", file=sys.stderr)
        return 2
    if config.uses_sandbox:
        print(
            "note: provider.base_url is empty, so this command asks a fresh in-process sandbox "
            "of its own, not the one inside a running `sms-bridge serve`: it has sent nothing "
            "and its logs are empty. See what serve sent with `sms-bridge messages` or "
            "GET /api/v1/messages. To share one sandbox, run `sms-bridge sandbox` and give "
            "both SMS_BRIDGE_PROVIDER_BASE_URL=http://127.0.0.1:8099/api/v1 and "
            "SMS_BRIDGE_PROVIDER_API_KEY=sandbox-key.",
            file=sys.stderr,
        )
    clock = SystemClock()
    if not shared:
        return await call_provider(config, args, None, clock)
    store = stores.open_store(config.store)
    await store.open()
    try:
        return await call_provider(config, args, store, clock)
    finally:
        await store.close()


async def call_provider(
    config: Config, args: argparse.Namespace, store: Store | None, clock: Clock
) -> int:
    from bridge.app import open_provider

    booked: float | None = None

    async def came_back() -> None:
        """As `serve`'s limiter does: the booking counts from when its call is over
        (the provider counted it when it arrived, before that)."""
        from bridge.delivery.dispatcher import FOREIGN_PREFIX

        if store is None or booked is None or clock.now() <= booked:
            return
        try:
            await store.restamp_request(booked, f"{FOREIGN_PREFIX}:{args.action}", clock.now())
        except Exception as exc:  # the answer matters more: the booking keeps its stamp
            print(f"note: the rate window's booking not re-stamped: {exc}", file=sys.stderr)

    async with open_provider(config, clock=clock, after_call=came_back) as (_, client, _sandbox):
        try:
            if store is not None:
                booked = await book_cli_request(store, config, clock, args.action)
            if args.action == "balance":
                result: Any = await client.balance()
            elif args.action == "pricing":
                result = await client.pricing()
            elif args.action == "account":
                result = await client.account()
            elif args.action == "logs":
                page = await client.logs(page=args.page, per_page=args.per_page, status=args.status)
                result = [dataclasses.asdict(entry) for entry in page.entries]
            else:
                result = await client.calculate(args.to, args.message)
        except ProviderError as exc:
            print(f"provider error: {exc}", file=sys.stderr)
            return 1
    if args.json:
        print(_json(result))
    else:
        _print_any(result)
    return 0


# C0 controls, DEL and C1 controls (CSI 0x9b among them): a message's text, a provider's
# id or answer may hold any of them, and printed raw they were the sender's escape
# sequences run by the operator's terminal (clear the screen, retitle it, move the cursor
# over the lines above). Tables show them as \xNN, JSON as \u00NN (the same string).
_CONTROLS = [*range(0x20), *range(0x7F, 0xA0)]
_VISIBLE = {c: f"\\x{c:02x}" for c in _CONTROLS}
_JSON_ESCAPED = {c: f"\\u{c:04x}" for c in range(0x7F, 0xA0)}  # json escapes C0 itself


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False).translate(_JSON_ESCAPED)


def _short(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    rows = [[str(c).translate(_VISIBLE) for c in row] for row in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)).rstrip())


def _print_any(result: Any) -> None:
    """A readable table of whatever shape the provider answered with."""
    if isinstance(result, dict):
        lists = {k: v for k, v in result.items() if isinstance(v, list)}
        scalars = [
            [str(k), json.dumps(v) if isinstance(v, dict) else str(v)]
            for k, v in result.items()
            if k not in lists
        ]
        if scalars:
            _print_table(["key", "value"], scalars)
        for name, items in lists.items():
            print(f"\n{name.translate(_VISIBLE)}:")
            _print_any(items)
    elif isinstance(result, list) and result and all(isinstance(r, dict) for r in result):
        keys = list(dict.fromkeys(k for r in result for k in r))
        _print_table(keys, [[_short(str(r.get(k, "")), 40) for k in keys] for r in result])
    elif isinstance(result, list) and not result:
        print("(none)")
    else:
        print(str(result).translate(_VISIBLE))
