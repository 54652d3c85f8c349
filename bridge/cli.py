"""`sms-bridge` commands. A config problem becomes exit code 1 with every problem listed."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import stat
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bridge import __version__
from bridge.clock import Clock, SystemClock
from bridge.config import (
    Config,
    config_path_from,
    inline_secrets,
    load_config,
    masked,
    parse_duration,
    parse_listen,
    secret_files,
    secret_values,
)
from bridge.errors import ConfigError, ProviderError, StoreUnavailable
from bridge.models import State
from bridge.ops.logs import setup_logging

if TYPE_CHECKING:  # imported where used: each command loads only what it needs
    from bridge.store import Store

log = logging.getLogger("bridge")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sms-bridge",
        description=(
            "Email and webhook to SMS gateway. With no config file, runs on built-in defaults "
            "with the in-process sandbox provider."
        ),
    )
    parser.add_argument("--version", action="version", version=f"sms-bridge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", "-c", help="TOML file (default: $SMS_BRIDGE_CONFIG, else none)")
        return p

    with_config(sub.add_parser("serve", help="run SMTP, HTTP and the dispatcher"))
    sandbox = sub.add_parser("sandbox", help="run the sandbox provider API on its own")
    sandbox.add_argument("--listen", default="127.0.0.1:8099", help="HOST:PORT")
    sandbox.add_argument(
        "--api-key", default=os.environ.get("SMS_BRIDGE_SANDBOX_API_KEY", "sandbox-key")
    )
    sandbox.add_argument("--requests-per-minute", type=int, default=100)
    sandbox.add_argument("--fail-share", type=float, default=0.0)
    sandbox.add_argument(
        "--variant", default="documented", help="answer shapes (see sandbox.variant)"
    )
    check = with_config(sub.add_parser("check-config", help="validate a config file"))
    check.add_argument("file", nargs="?", help="the file (instead of --config)")
    messages = with_config(sub.add_parser("messages", help="list stored messages"))
    messages.add_argument("--status", "--state", dest="state", choices=[str(s) for s in State])
    messages.add_argument(
        "--reason",
        choices=["duplicate", "storm", "loop", "budget", "unknown", "provider-error", "cancelled"],
    )
    messages.add_argument("--route", help="messages from this webhook route")
    messages.add_argument("--limit", type=int, default=50)
    messages.add_argument("--json", action="store_true")
    retry = with_config(sub.add_parser("retry", help="queue failed messages again"))
    retry.add_argument("ids", nargs="*", type=int, help="message ids")
    retry.add_argument("--failed", action="store_true", help="every failed message")
    with_config(sub.add_parser("migrate", help="create or upgrade the store's schema"))
    store = sub.add_parser("store", help="move a store").add_subparsers(
        dest="action", required=True
    )
    copy = with_config(
        store.add_parser(
            "copy",
            help="copy the SQLite store into PostgreSQL (stop serve first)",
            description=(
                "Copy every message, event and rate-window booking of the SQLite store"
                " (store.path) into the PostgreSQL database (store.url), ids kept. Every"
                " serve on the SQLite file must be stopped (the copy refuses a file in use);"
                " run `sms-bridge migrate` on the target first. One-shot: a target that"
                " holds data is refused unless --replace."
            ),
        )
    )
    copy.add_argument("--from", dest="source", help="the SQLite file (default: store.path)")
    copy.add_argument(
        "--to",
        dest="target",
        help="postgresql://... (default: store.url; a URL here shows its password in ps)",
    )
    copy.add_argument(
        "--replace",
        action="store_true",
        help="delete the target's messages, events and bookings first",
    )
    purge = with_config(sub.add_parser("purge", help="delete old finished messages"))
    purge.add_argument("--older-than", required=True, help="a duration such as 30d")
    provider = with_config(sub.add_parser("provider", help="call the provider's account API"))
    provider.add_argument("action", choices=["balance", "pricing", "account", "logs", "calculate"])
    provider.add_argument("--json", action="store_true")
    provider.add_argument("--page", type=int, default=1)
    provider.add_argument("--per-page", type=int, default=20)
    provider.add_argument("--status", choices=["delivered", "sent", "pending", "failed"])
    provider.add_argument("--to", action="append", default=[], help="calculate: a recipient")
    provider.add_argument("--message", default="", help="calculate: the text")
    return parser


def _config_path(args: argparse.Namespace) -> str | None:
    return getattr(args, "file", None) or config_path_from(getattr(args, "config", None))


def _load(args: argparse.Namespace) -> Config:
    return load_config(_config_path(args))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "sandbox":
            return _run_sandbox(args)
        config = _load(args)
        if args.command == "check-config":
            from bridge.ingress.formats import template_problems
            from bridge.templates import render

            warnings: list[tuple[str, str]] = []
            if problems := template_problems(config.routes, render, warnings):
                raise ConfigError(problems)
            for key, why in warnings:
                print(f"warning: {key}: {why}", file=sys.stderr)
    except ConfigError as exc:
        _print_problems(exc)
        return 1
    setup_logging(config.log.level, config.log.format, secret_values(config))
    for warning in _exposed_secrets(args) if args.command in ("check-config", "serve") else []:
        if args.command == "serve":
            log.warning("%s", warning)  # in the service's log, JSON or not
        else:
            print(f"warning: {warning}", file=sys.stderr)
    if args.command == "check-config":
        print(f"{config.source}: OK")
        print(json.dumps(masked(config), indent=2, default=list))
        return 0
    try:
        return _run_command(config, args)
    except StoreUnavailable as exc:
        from bridge.store import describe

        print(f"store {describe(config.store)}: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:  # a store this build cannot open (store.url)
        _print_problems(exc)
        return 1


def _run_command(config: Config, args: argparse.Namespace) -> int:
    if args.command == "serve":
        from bridge.app import serve

        try:
            with asyncio.Runner(loop_factory=_loop_factory()) as runner:
                runner.run(serve(config, config_path=_config_path(args)))
        except ConfigError as exc:
            _print_problems(exc)
            return 1
        return 0
    if args.command == "messages":
        return asyncio.run(_messages(config, args))
    if args.command == "provider":
        # Only a store `serve` keeps holds a window to share; none is created for this.
        shared = not config.uses_sandbox and (
            bool(config.store.url) or Path(config.store.path).is_file()
        )
        return asyncio.run(_provider(config, args, shared))
    if args.command in ("retry", "purge"):
        return asyncio.run(_maintain(config, args))
    if args.command == "migrate":
        from bridge.store import describe, migrate_store

        applied = asyncio.run(migrate_store(config.store))
        for name in applied:
            print(f"applied {name}")
        print(f"store {describe(config.store)}: schema up to date")
        return 0
    if args.command == "store":
        return asyncio.run(_store_copy(config, args))
    return 2


async def _store_copy(config: Config, args: argparse.Namespace) -> int:
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


def _world_readable(path: str) -> bool:
    try:
        return bool(os.stat(path).st_mode & stat.S_IROTH)
    except OSError:
        return False  # a file that cannot be read is check-config's own problem


def _exposed_secrets(args: argparse.Namespace) -> list[str]:
    """Why files' modes expose secrets: the config's inline ones, or a secret file's."""
    path = _config_path(args)
    if path is None:
        return []
    warnings = []
    keys = inline_secrets(path) if _world_readable(path) else []
    if keys:
        warnings.append(
            f"{path} is readable by every user and holds secrets ({', '.join(keys)}): "
            f"chmod 600 {path}, or move them to *_file keys"
        )
    warnings += [
        f"{key}: {file} is readable by every user: chmod 600 {file}"
        for key, file in secret_files(path)
        if _world_readable(file)
    ]
    return warnings


def _print_problems(exc: ConfigError) -> None:
    print("configuration problems:", file=sys.stderr)
    for key, why in exc.problems:
        print(f"  {key}: {why}", file=sys.stderr)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where installed (as uvicorn itself would pick), else asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _run_sandbox(args: argparse.Namespace) -> int:
    import uvicorn

    from bridge.provider.sandbox import VARIANTS, SandboxState, create_sandbox_app
    from bridge.sockets import bind_socket, bound_address

    if args.variant not in VARIANTS:
        print(f"--variant must be one of {', '.join(sorted(VARIANTS))}", file=sys.stderr)
        return 2
    setup_logging("info", "human", [args.api_key])
    try:
        parse_listen(args.listen)
        sock = bind_socket(args.listen)
    except (ValueError, OSError) as exc:
        print(f"--listen: cannot listen on {args.listen}: {exc}", file=sys.stderr)
        return 2
    state = SandboxState(
        clock=SystemClock(),
        api_key=args.api_key,
        rate_limit=args.requests_per_minute,
        fail_share=args.fail_share,
        shape=VARIANTS[args.variant],
    )
    # The bound address, not --listen: with port 0 the caller reads the port from here.
    log.warning(
        "sandbox provider on http://%s/api/v1 - nothing leaves this machine", bound_address(sock)
    )
    config = uvicorn.Config(create_sandbox_app(state), log_config=None, access_log=False)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def _store_exists(config: Config) -> bool:
    """Whether the store file the commands read exists; says which file (or why not) on stderr.

    The commands find the store as `serve` does: `store.path` from `--config`, else
    `$SMS_BRIDGE_CONFIG`, else `$SMS_BRIDGE_STORE_PATH`, else `sms-bridge.db` in the
    current directory. Opening a missing file would create an empty store and list
    nothing, which reads as "no messages": refuse instead.
    """
    if config.store.url:
        return True  # a server: opening it says whether it is there
    path = os.path.abspath(config.store.path)
    if config.store.path == ":memory:" or os.path.isfile(path):
        print(f"store: {path}", file=sys.stderr)
        return True
    print(
        f"store {path}: no such file (store.path = {config.store.path!r} from "
        f"{config.source}, relative to {os.getcwd()}). Run this where `sms-bridge serve` "
        "runs, or give the same --config / SMS_BRIDGE_CONFIG / SMS_BRIDGE_STORE_PATH.",
        file=sys.stderr,
    )
    return False


async def _messages(config: Config, args: argparse.Namespace) -> int:
    from bridge.store import open_store

    if not _store_exists(config):
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
        print(json.dumps([m.to_json() for m in rows], indent=2, ensure_ascii=False))
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


async def _maintain(config: Config, args: argparse.Namespace) -> int:
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
    if not _store_exists(config):
        return 1
    store = open_store(config.store)
    await store.open()
    try:
        now = SystemClock().now()
        if args.command == "purge":
            print(f"purged {await store.purge(now - age)} messages")
            return 0
        chosen = await store.retry(None if args.failed else args.ids, now)
    finally:
        await store.close()
    missing = sorted(set(args.ids) - set(chosen))
    print(f"queued again: {', '.join(map(str, chosen)) or 'none'}")
    if chosen:  # this process only wrote the store: the running serve finds them on its own
        print(f"a running `sms-bridge serve` sends them within {IDLE_WAIT:.0f} s")
    if missing:
        print(f"not failed (left alone): {', '.join(map(str, missing))}", file=sys.stderr)
    return 0 if not missing else 1


CLI_MAX_WAIT = 65.0  # longer than one window: the budget is not coming back soon


async def book_cli_request(
    store: Store,
    config: Config,
    clock: Clock,
    kind: str,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Book one request in the window `serve` persists (and reads back, see the
    dispatcher): waits while it is full, so a CLI call cannot push `serve` into 429s.
    Counting and booking are one step of the store's, so two CLI calls cannot both take
    the last place."""
    from bridge.delivery.dispatcher import FOREIGN_PREFIX
    from bridge.delivery.ratelimit import WINDOW_MARGIN, WINDOW_SECONDS

    waited = 0.0
    while True:
        wait = await store.book_request(
            clock.now(),
            f"{FOREIGN_PREFIX}:{kind}",
            limit=config.provider.requests_per_minute,
            window=WINDOW_SECONDS + WINDOW_MARGIN,
        )
        if wait <= 0:
            return
        if waited + wait > CLI_MAX_WAIT:
            raise ProviderError(f"the provider's rate window is full for {wait:.0f}s more")
        print(f"rate window full (serve is busy): waiting {wait:.1f}s", file=sys.stderr)
        await sleep(wait)
        waited += wait


async def _provider(config: Config, args: argparse.Namespace, shared: bool) -> int:
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
        return await _provider_call(config, args, None, clock)
    store = stores.open_store(config.store)
    await store.open()
    try:
        return await _provider_call(config, args, store, clock)
    finally:
        await store.close()


async def _provider_call(
    config: Config, args: argparse.Namespace, store: Store | None, clock: Clock
) -> int:
    from bridge.app import open_provider

    async with open_provider(config, clock=clock) as (_, client, _sandbox):
        try:
            if store is not None:
                await book_cli_request(store, config, clock, args.action)
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
        print(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        _print_any(result)
    return 0


def _short(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _print_table(header: list[str], rows: list[list[str]]) -> None:
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
            print(f"\n{name}:")
            _print_any(items)
    elif isinstance(result, list) and result and all(isinstance(r, dict) for r in result):
        keys = list(dict.fromkeys(k for r in result for k in r))
        _print_table(keys, [[_short(str(r.get(k, "")), 40) for k in keys] for r in result])
    elif isinstance(result, list) and not result:
        print("(none)")
    else:
        print(result)
