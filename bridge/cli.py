"""`sms-bridge` commands. A config problem becomes exit status 78 (EX_CONFIG) with every
problem listed; a store out of reach at start, exit 1."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bridge import __version__, commands
from bridge.clock import SystemClock
from bridge.commands import book_cli_request
from bridge.config import (
    MAX_REQUESTS_PER_MINUTE,
    Config,
    config_path_from,
    exposed_secrets,
    load_config,
    masked,
    parse_listen,
    secret_values,
    store_file_problem,
    store_url_problem,
)
from bridge.errors import ConfigError, StoreUnavailable
from bridge.models import MAX_ROW_ID, REASON_KINDS, State
from bridge.ops.logs import setup_logging

if TYPE_CHECKING:
    import ssl

log = logging.getLogger("bridge")
# sysexits.h's EX_CONFIG: the config is refused, and starting again changes nothing. The
# unit names it in RestartPreventExitStatus=, so systemd stops there rather than restart
# a refused file every few seconds for ever; a store out of reach at start stays 1, which
# a restart may cure.
EX_CONFIG = 78
# A listen address another process holds, or one not on this host yet (an interface that
# comes up after the bridge at boot), or a listen name the resolver cannot answer for yet
# (its DNS server not up at boot: EAI_AGAIN, a negative number no errno has): each may
# pass a moment later, so a restart is due. Taken for a refused file (78), a bridge
# listening on a name stayed down after a reboot whose network came up late.
TRANSIENT_BIND_ERRORS = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL, socket.EAI_AGAIN})
HEALTHCHECK_TIMEOUT = 4.0  # seconds: within the image's HEALTHCHECK --timeout=5s
__all__ = ["book_cli_request", "main"]  # book_cli_request: the CLI's booking, for tests


def _page_size(text: str) -> int:
    """`messages --limit`: 1 or more. 0 listed nothing, and a negative number every
    message on SQLite (a million rows printed) and a traceback on PostgreSQL."""
    try:
        size = int(text)
    except ValueError:
        size = 0
    if not 1 <= size <= MAX_ROW_ID:  # past SQLite's integers: a traceback
        raise argparse.ArgumentTypeError(
            f"must be a whole number from 1 up to {MAX_ROW_ID}, not {text!r}"
        )
    return size


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
    sandbox = sub.add_parser(
        "sandbox",
        help="run the sandbox provider API on its own",
        # Its key and port are what a bridge pointed at it must be told: show them.
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sandbox.add_argument("--listen", default="127.0.0.1:8099", help="HOST:PORT")
    sandbox.add_argument(
        "--api-key",
        default=os.environ.get("SMS_BRIDGE_SANDBOX_API_KEY", "sandbox-key"),
        help="the key clients must send (SMS_BRIDGE_SANDBOX_API_KEY)",
    )
    sandbox.add_argument(
        "--requests-per-minute",
        type=_between(int, 1, MAX_REQUESTS_PER_MINUTE),
        default=100,
        help="its rate limit",
    )
    sandbox.add_argument(
        "--fail-share",
        type=_between(float, 0, 1),
        default=0.0,
        help="share of texts reported failed, not delivered (0 to 1)",
    )
    sandbox.add_argument(
        "--variant", default="documented", help="answer shapes (see sandbox.variant)"
    )
    with_config(
        sub.add_parser(
            "healthcheck",
            help="ask the running serve's /healthz where the config has it listen, or its"
            " SMTP greeting if it has no HTTP listener (over TLS on smtp.tls_listen without"
            " smtp.listen; the image's HEALTHCHECK): exit 0 if it answers 200 (220)",
        )
    )
    check = with_config(sub.add_parser("check-config", help="validate a config file"))
    check.add_argument("file", nargs="?", help="the file (instead of --config)")
    check.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        help="print nothing for a file that passes (problems and warnings still on stderr):"
        " the systemd unit's ExecReload, whose output goes to the journal on every reload",
    )
    messages = with_config(sub.add_parser("messages", help="list stored messages"))
    messages.add_argument("--status", "--state", dest="state", choices=[str(s) for s in State])
    messages.add_argument("--reason", choices=REASON_KINDS)
    messages.add_argument("--route", help="messages from this webhook route")
    messages.add_argument("--limit", type=_page_size, default=50, help="at most this many")
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
    copy.add_argument(
        "--from",
        dest="source",
        type=_store_file,
        help="the SQLite file (default: store.path)",
    )
    copy.add_argument(
        "--to",
        dest="target",
        type=_store_url,
        help="postgresql://... (default: store.url; a URL here shows its password in ps)",
    )
    copy.add_argument(
        "--replace",
        action="store_true",
        help="delete the target's messages, events and bookings first"
        " (refused while a bridge serves it)",
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


def _store_file(text: str) -> str:
    """`store copy --from`: a store file's path, refused as `store.path` is (a usage
    error, exit 2). An SQLite URI opened another file than the one checked, `:memory:`
    said "no SQLite store" without why, and an empty path copied store.path instead."""
    if "://" in text:  # a URL named whole as a missing file showed its password
        from bridge.store import display_url

        raise argparse.ArgumentTypeError(
            f"{display_url(text)}: a URL; --from takes the SQLite store's file (--to the URL)"
        )
    if why := store_file_problem(text):
        raise argparse.ArgumentTypeError(f"{text!r}: {why}")
    return text


def _store_url(text: str) -> str:
    """An argparse type: `store copy --to`, refused as store.url would be (a usage
    error, exit 2): a raw "/" in the password went to the driver, whose error quoted
    the part before it. Shown without its password."""
    if why := store_url_problem(text):
        from bridge.store import display_url

        raise argparse.ArgumentTypeError(f"{display_url(text)}: {why}")
    return text


def _between(kind: type[int] | type[float], low: float, high: float) -> Callable[[str], Any]:
    """An argparse type: a number from `low` to `high`, else a usage error (exit 2).
    `sandbox --requests-per-minute 0` answered every call 500."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not low <= value <= high:  # NaN too
            raise argparse.ArgumentTypeError(f"{text} is not from {low} to {high}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _config_path(args: argparse.Namespace) -> str | None:
    return getattr(args, "file", None) or config_path_from(getattr(args, "config", None))


def _load(args: argparse.Namespace) -> Config:
    return load_config(_config_path(args))


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        # Ctrl-C before `serve` handles SIGINT itself (waiting for the store at start), or
        # during any other command: the shell's status for it, not a page of traceback.
        print("interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except BrokenPipeError:
        # The reader left early (`sms-bridge check-config | head`): not an error of ours
        # to print a traceback for. Python would still fail flushing stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


class EarlyHangups:
    """SIGHUPs that reach `serve` before its event loop handles them.

    Python leaves SIGHUP at its default action, which ends the process, and systemd
    does not restart a service a HUP ended (a clean signal for `Restart=on-failure`):
    `systemctl enable --now sms-bridge && systemctl reload sms-bridge` left the bridge
    dead. Noted instead from the moment the command line is read; `serve` reloads once
    running (the file may have changed after it was read).
    """

    def __init__(self) -> None:
        self.count = 0
        signal.signal(signal.SIGHUP, self._note)

    def _note(self, signum: int, frame: object) -> None:
        self.count += 1

    def __call__(self) -> bool:
        return self.count > 0


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    early_hangups = EarlyHangups() if args.command == "serve" else None
    try:
        if args.command == "sandbox":
            return _run_sandbox(args)
        config = _load(args)
        warnings: list[tuple[str, str]] = []
        if args.command in ("check-config", "serve"):
            # serve refuses what check-config refuses (a reload too: Bridge.reload).
            from bridge.ingress.formats import template_problems
            from bridge.templates import render_noting

            problems = template_problems(config.routes, render_noting, warnings)
            if problems := problems + _listen_problems(config) + _tls_problems(config):
                raise ConfigError(problems)
        if args.command == "check-config":
            for key, why in warnings:
                print(f"warning: {key}: {why}", file=sys.stderr)
    except ConfigError as exc:
        refused = _refused(exc)
        if args.command == "healthcheck":
            # Docker reads a HEALTHCHECK's status as 0 healthy, 1 unhealthy, anything else
            # reserved: the file refused (edited in place, not reloaded yet) says where
            # nothing listens, and a restart would not start on it either.
            print("healthcheck: cannot tell where serve listens: unhealthy", file=sys.stderr)
            return 1
        return refused
    setup_logging(config.log.level, config.log.format, secret_values(config))
    if args.command == "serve":
        for key, why in warnings:
            log.warning("%s: %s", key, why)
    if args.command in ("check-config", "serve"):
        exposed = exposed_secrets(config, _config_path(args), os.environ)
    else:
        exposed = []
    for warning in exposed:
        if args.command == "serve":
            log.warning("%s", warning)  # in the service's log, JSON or not
        else:
            print(f"warning: {warning}", file=sys.stderr)
    if args.command == "healthcheck":
        return _healthcheck(config)
    if args.command == "check-config":
        if args.quiet:
            return 0
        print(f"{config.source}: OK")
        from bridge.store import rate_window

        print(rate_window(config.provider, config.store))
        print(json.dumps(masked(config), indent=2, default=list))
        return 0
    try:
        return _run_command(config, args, early_hangups)
    except StoreUnavailable as exc:
        from bridge.store import describe

        print(f"store {describe(config.store)}: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:  # a store this build cannot open (store.url)
        return _refused(exc)


def _run_command(
    config: Config, args: argparse.Namespace, early_hangups: EarlyHangups | None = None
) -> int:
    if args.command == "serve":
        from bridge.app import serve

        try:
            with asyncio.Runner(loop_factory=_loop_factory()) as runner:
                runner.run(
                    serve(config, config_path=_config_path(args), reload_pending=early_hangups)
                )
        except ConfigError as exc:
            return _refused(exc)
        return 0
    if args.command == "messages":
        return asyncio.run(commands.messages(config, args))
    if args.command == "provider":
        # Only a store `serve` keeps holds a window to share; none is created for this.
        shared = not config.uses_sandbox and (
            bool(config.store.url) or Path(config.store.path).is_file()
        )
        return asyncio.run(commands.provider(config, args, shared))
    if args.command in ("retry", "purge"):
        return asyncio.run(commands.maintain(config, args))
    if args.command == "migrate":
        from bridge.store import describe, migrate_store

        applied = asyncio.run(migrate_store(config.store))
        for name in applied:
            print(f"applied {name}")
        print(f"store {describe(config.store)}: schema up to date")
        return 0
    if args.command == "store":
        return asyncio.run(commands.store_copy(config, args))
    return 2


def _listen_problems(config: Config) -> list[tuple[str, str]]:
    """Two listeners of this config on one port and overlapping addresses: check-config
    said OK, and serve could not bind the second ("Address already in use", exit 1, which
    reads as a port another process holds: restarted for ever)."""
    listeners = [
        (key, listen)
        for key, listen in (
            ("http.listen", config.http.listen),
            ("smtp.listen", config.smtp.listen),
            ("smtp.tls_listen", config.smtp.tls_listen),
        )
        if listen
    ]
    problems = []
    for index, (key, listen) in enumerate(listeners):
        host, port = parse_listen(listen)
        for earlier, other in listeners[:index]:
            other_host, other_port = parse_listen(other)
            if port and port == other_port and _overlap(host, other_host):
                problems.append((key, f"{listen} is where {earlier} ({other}) listens"))
    return problems


def _overlap(host: str, other: str) -> bool:
    """Whether two listen hosts on one port take the same connections: the same address
    as bound (`localhost` and `127.0.0.1` are one), `::` (dual-stack, bridge.sockets:
    every address), or `0.0.0.0` and an IPv4 one."""
    from bridge.sockets import bound_host

    host, other = bound_host(host), bound_host(other)
    if host == other or "::" in (host, other):
        return True
    return "0.0.0.0" in (host, other) and ":" not in host + other


def _tls_problems(config: Config) -> list[tuple[str, str]]:
    """Each certificate and key `serve` would load, loaded now. A key of another
    certificate, or a file that is no PEM, passed check-config and then ended `serve` with
    a traceback (uvicorn's or the SMTP listener's) and exit 1, restarted for ever."""
    import ssl

    from bridge.certificates import load_pair

    problems = []
    for section, tls in (("http", config.http), ("smtp", config.smtp)):
        if not tls.tls_cert:
            continue
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            load_pair(context, tls.tls_cert, tls.tls_key)
        except (OSError, ssl.SSLError) as exc:
            why = f"{tls.tls_cert} with {section}.tls_key {tls.tls_key} does not load: {exc}"
            problems.append((f"{section}.tls_cert", why))
    return problems


def _refused(exc: ConfigError) -> int:
    """Every problem on stderr; the exit status: EX_CONFIG, but 1 for a listen address
    that may be free or present a moment later (see TRANSIENT_BIND_ERRORS)."""
    print("configuration problems:", file=sys.stderr)
    for key, why in exc.problems:
        print(f"  {key}: {why}", file=sys.stderr)
    cause = exc.__cause__
    if isinstance(cause, OSError) and cause.errno in TRANSIENT_BIND_ERRORS:
        return 1
    return EX_CONFIG


def _healthcheck(config: Config) -> int:
    """Ask the listener the config has `serve` open: GET /healthz on `http.listen`, or,
    with no HTTP listener (`http.listen = ""`, a mail-only bridge), the SMTP greeting on
    `smtp.listen`, else on `smtp.tls_listen` over TLS. The image's HEALTHCHECK asked
    http://127.0.0.1:8080 whatever the config said, so a bridge on HTTPS or another port
    was "unhealthy" for ever; a mail-only one exited 1 here, and its recipe said to turn
    the check off; so did one taking mail over implicit TLS only."""
    listeners = (
        ("http.listen", config.http.listen),
        ("smtp.listen", config.smtp.listen),
        ("smtp.tls_listen", config.smtp.tls_listen),
    )
    key, listen = next(((k, v) for k, v in listeners if v), ("", ""))
    if not listen:
        print(
            "healthcheck: http.listen, smtp.listen and smtp.tls_listen are all empty:"
            " no listener to ask",
            file=sys.stderr,
        )
        return 1
    if parse_listen(listen)[1] == 0:
        # Port 0: the kernel picked a port when serve bound it, and only serve's log
        # names it ("HTTP listening on ..."). Asking port 0 said "Connection refused",
        # which reads as a bridge that is down.
        print(
            f"healthcheck: {key} = {listen!r} is an ephemeral port (0), chosen when serve"
            " started: it cannot be probed; give the listener a fixed port",
            file=sys.stderr,
        )
        return 1
    if key == "http.listen":
        return _ask_http(config)
    return _ask_smtp(listen, tls=key == "smtp.tls_listen")


def _on_loopback(listen: str) -> tuple[str, int]:
    """Where a local client reaches `listen`: a wildcard address is asked on loopback."""
    host, port = parse_listen(listen)
    # `[::]` is dual-stack (bridge.sockets): IPv4 loopback, which every container has.
    return {"0.0.0.0": "127.0.0.1", "::": "127.0.0.1", "": "127.0.0.1"}.get(host, host), port


def _unverified_tls() -> ssl.SSLContext:
    """TLS to the bridge's own listener on loopback, its certificate not verified: it is
    issued for the public name (mail.example.org), not the address the probe dials, is
    often self-signed, and a renewed file on disk may not be the one `serve` has loaded
    yet. The probe asks whether the listener answers; a certificate's trouble is the
    clients' to report, and a restart (what "unhealthy" leads to) would not mend it."""
    import ssl

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _ask_http(config: Config) -> int:
    """/healthz over HTTPS with `http.tls_cert` (`_unverified_tls`): 200 is healthy, and a
    loop whose steps keep failing makes it 503."""
    import urllib.error
    import urllib.request

    host, port = _on_loopback(config.http.listen)
    scheme = "https" if config.http.tls_cert else "http"
    url = f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}/healthz"
    context = _unverified_tls()
    try:
        with urllib.request.urlopen(url, timeout=HEALTHCHECK_TIMEOUT, context=context) as answer:
            status = answer.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (OSError, ValueError) as exc:
        print(f"healthcheck: {url}: {getattr(exc, 'reason', exc)}", file=sys.stderr)
        return 1
    print(f"healthcheck: {url}: {status}", file=sys.stderr if status != 200 else sys.stdout)
    return 0 if status == 200 else 1


def _ask_smtp(listen: str, *, tls: bool = False) -> int:
    """The SMTP greeting, then QUIT: a 220 is healthy. It proves the listener and the event
    loop answer; what /healthz adds (background loops failing) has no SMTP word. `tls`:
    implicit TLS first (`smtp.tls_listen`, `_unverified_tls`)."""
    import smtplib

    host, port = _on_loopback(listen)
    where = f"{'smtps' if tls else 'smtp'}://{f'[{host}]' if ':' in host else host}:{port}"
    try:
        client = smtplib.SMTP(timeout=HEALTHCHECK_TIMEOUT)
        if tls:
            # The handshake here, not by SMTP_SSL: it names the server by its constructor's
            # host alone ("" refused), and given one there it keeps the greeting to itself.
            raw = socket.create_connection((host, port), timeout=HEALTHCHECK_TIMEOUT)
            client.sock = _unverified_tls().wrap_socket(raw, server_hostname=host)
            code, greeting = client.getreply()
        else:
            code, greeting = client.connect(host, port)
    except (OSError, smtplib.SMTPException) as exc:  # refused, timed out, no greeting
        print(f"healthcheck: {where}: {exc}", file=sys.stderr)
        return 1
    with contextlib.suppress(OSError, smtplib.SMTPException):
        client.quit()  # a clean end: the bridge logs no dropped session
    line = f"healthcheck: {where}: {code} {greeting.decode(errors='replace')}"
    print(line, file=sys.stdout if code == 220 else sys.stderr)
    return 0 if code == 220 else 1


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
