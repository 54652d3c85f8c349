"""The running bridge: what was built from a `Config`, served in one loop, and reloaded.

`bridge.app` builds a `Bridge` (the composition root); here it runs: `run()` serves
uvicorn, SMTP, the dispatcher, a watch for work stored by other instances, and the
singletons (poller, digests, retention: only while this instance leads, see
`bridge.delivery.cluster`) in one `asyncio.TaskGroup` until `stop` is set, and `reload()` applies a new config on SIGHUP
by calling each reloadable part's `reload` with its own sections.

How parts take config, one way: each takes the sections it reads as keyword-only
arguments (`smtp=`, `limits=`...), never the whole `Config` nor loose values picked
out of it; what can change on SIGHUP has `reload(<its sections>)`. The HTTP side, which
reads most sections per request, reads the live view (`bridge.config.LiveConfig`)
instead, and the reload updates that view. What needs a restart (listeners, store,
provider, logging) is listed in `bridge.config.RESTART_ONLY` and named in a warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import socket
import ssl
import threading
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import uvicorn
from starlette.applications import Starlette
from uvicorn.config import SSL_PROTOCOL_VERSION

from bridge.addresses import with_mapped
from bridge.certificates import TlsFiles, load_pair, read_pair
from bridge.clock import Clock
from bridge.config import (
    Config,
    HttpConfig,
    LiveConfig,
    Recipients,
    as_reloaded,
    exposed_secrets,
    load_config,
    protection_problems,
    purge_problem,
    secret_values,
)
from bridge.delivery.cluster import Leader, watch_work
from bridge.delivery.digests import DigestWorker
from bridge.delivery.dispatcher import Dispatcher
from bridge.delivery.poller import StatusPoller
from bridge.errors import ConfigError, InputError
from bridge.ingress.formats import template_problems
from bridge.ingress.http.handshake import HttpsServer
from bridge.ingress.http.limits import LimitedHttpProtocol, limited_protocol
from bridge.ingress.ingest import Ingestor
from bridge.ingress.smtp import SmtpHandler, read_tls, start_smtp
from bridge.loops import LoopHealth, run_steps
from bridge.ops.logs import mask_secrets
from bridge.policy.budgets import BudgetGuard
from bridge.policy.decide import Rules
from bridge.policy.shaping import Shaper
from bridge.store import Store
from bridge.templates import render_noting

if TYPE_CHECKING:  # the sandbox itself is imported only when configured
    from bridge.provider.sandbox import SandboxState

log = logging.getLogger("bridge")
SHUTDOWN_GRACE = 8  # seconds uvicorn lets in-flight requests finish
# Seconds a reload's read of the config (and the files it names) may take. Read on the
# event loop, a file on a hung NFS mount stopped the bridge: no mail, no request, no
# send answered until the mount came back.
RELOAD_READ_TIMEOUT = 10.0
RETENTION_INTERVAL = 3600.0
T = TypeVar("T")


class QuietServer(uvicorn.Server):
    """uvicorn without its own signal handlers: the service owns the lifecycle."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class QuietHttpsServer(HttpsServer, QuietServer):
    """The same, with HTTPS connections admitted from their first byte (`HttpsServer`)."""


def uvicorn_server(
    app: Starlette,
    *,
    lifespan: Literal["auto", "on", "off"] = "off",
    live: LiveConfig | None = None,
    http: HttpConfig | None = None,
) -> QuietServer:
    """The one place uvicorn is configured. With `live`, under the `[http]` limits, read
    per connection (bridge.ingress.http.limits); proxies and TLS from `http` (default: the live
    config's at start; neither without both). The server is then given its sockets."""
    http = http or (live.current.http if live is not None else HttpConfig())
    protocol: type[LimitedHttpProtocol] | None = None if live is None else limited_protocol(live)
    # TLS by uvicorn (asyncio's server) only without the limits: with them the bridge's
    # own TLS listener, so that a connection is under them from its first byte
    # (bridge.ingress.http.handshake says why).
    uvicorn_tls = bool(http.tls_cert) and protocol is None
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        lifespan=lifespan,
        timeout_graceful_shutdown=SHUTDOWN_GRACE,
        http=protocol or "auto",
        # uvicorn believes X-Forwarded-For from 127.0.0.1 unless told otherwise, which
        # would let any local process (or a loopback caller) pick its client address
        # and pass a route's allowed_networks: only http.trusted_proxies are believed.
        proxy_headers=bool(http.trusted_proxies),
        # uvicorn matches the peer as the socket gives it: on a dual-stack listener an
        # IPv4 proxy is ::ffff:a.b.c.d, so each IPv4 network goes with its mapped form.
        forwarded_allow_ips=with_mapped(http.trusted_proxies),
        ssl_certfile=http.tls_cert if uvicorn_tls else None,
        ssl_keyfile=(http.tls_key or None) if uvicorn_tls else None,
    )
    if protocol is not None and http.tls_cert:
        return QuietHttpsServer(config, protocol, https_context(http.tls_cert, http.tls_key))
    return QuietServer(config)


def https_context(cert: str, key: str) -> ssl.SSLContext:
    """The HTTPS listener's TLS context, as uvicorn's `create_ssl_context` makes it from
    the same two files (no password, CA or ciphers), but never asking for a passphrase."""
    context = ssl.SSLContext(SSL_PROTOCOL_VERSION)
    load_pair(context, cert, key)
    context.verify_mode = ssl.CERT_NONE
    return context


def read_https(http: HttpConfig) -> TlsFiles:
    """`http.tls_cert` and `tls_key` read again, as `read_tls` reads SMTP's: blocking,
    off the event loop on a reload."""
    return read_pair(https_context, http.tls_cert, http.tls_key)


async def off_loop(work: Callable[[], T], limit: float) -> T:
    """`work()` in a thread of its own, waited for `limit` seconds at most (TimeoutError
    past that). A daemon thread, not the loop's executor: a read stuck in the kernel
    cannot be cancelled, and one left in the executor would hold up the process's exit
    (asyncio waits for its threads)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not done.done():  # else given up on: the file was read too late
            outcome()

    def run() -> None:
        try:
            result = work()
        except BaseException as exc:  # handed to the loop, raised there
            outcome = functools.partial(done.set_exception, exc)
        else:
            outcome = functools.partial(done.set_result, result)
        with contextlib.suppress(RuntimeError):  # the loop closed while it read
            loop.call_soon_threadsafe(settle, outcome)

    threading.Thread(target=run, name="config-reload", daemon=True).start()
    try:
        return await asyncio.wait_for(asyncio.shield(done), limit)
    except TimeoutError:
        done.cancel()
        raise


async def read_config(path: str | None, limit: float) -> Config:
    """`load_config(path)` off the loop (`off_loop`): ConfigError past `limit` seconds
    (the running config stays)."""
    try:
        return await off_loop(functools.partial(load_config, path), limit)
    except TimeoutError:
        why = f"not read within {limit:g} s (a file on a mount that hangs?)"
        raise ConfigError([(path or "config", why)]) from None


@dataclass
class Bridge:
    """A built bridge. It holds what `run` serves and what `reload` re-configures, and
    nothing else: the HTTP client, provider client, limiter, health and metrics stay
    with the parts that use them (`bridge.app.build` hands them over)."""

    config: Config  # in force: the last reload's, restart-only keys as started
    clock: Clock
    store: Store  # retention
    live: LiveConfig  # the HTTP side's view: updated by reload
    app: Starlette
    smtp_handler: SmtpHandler  # reload(smtp, recipients)
    dispatcher: Dispatcher
    poller: StatusPoller
    digests: DigestWorker  # reload(limits)
    ingestor: Ingestor  # reload(rules)
    shaper: Shaper  # reload(limits): shared by ingest, budget warnings and digests
    budget: BudgetGuard  # reload(budget, routes, recipients, tokens)
    leader: Leader  # runs the poller, digests, retention while this instance leads
    loops: LoopHealth = field(default_factory=LoopHealth)  # every loop's failed steps
    sandbox: SandboxState | None = None  # the in-process provider, when configured
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    # For /metrics: whether the last SIGHUP's file was applied in full (a certificate that
    # did not load fails it), and when the start or the last such reload was.
    last_reload_ok: bool = True
    config_applied_at: float = 0.0
    https: HttpsServer | None = None  # the HTTPS listener `run` serves, if any

    def reload(
        self, new: Config, *, tls: TlsFiles | None = None, https: TlsFiles | None = None
    ) -> list[str]:
        """Apply everything but listen addresses, the store, the provider and logging.

        Routes, groups, phone rules, limits, budgets, dedupe, tokens, HTTP limits and
        every SMTP setting (auth, users, networks, sizes, limits, TLS certificates) hold
        for the next request or session, and so does the HTTPS certificate read again
        from its files. Returns warnings: each key that changed but needs a restart, by
        name, and anything that could not be applied (a certificate that does not load).
        Raises ConfigError, applying nothing, where protected mode refuses what would then
        run or a recipient the budget names cannot be resolved. `tls` and `https`: the
        SMTP and HTTPS certificates, read off the loop (`_reloader`); None: read here.
        """
        new, waiting = as_reloaded(new, self.config)
        refused = protection_problems(new)
        if refused:  # judged on what would run: the running provider and listeners
            raise ConfigError(refused)
        # The running retention (the store waits for a restart) against the new caps.
        if new.store.retention > 0 and (why := purge_problem(new, new.store.retention)):
            raise ConfigError([("store.retention", f"{why}; the running value, until a restart")])
        # What check-config and serve refuse: a route template that fails on its format.
        template_warnings: list[tuple[str, str]] = []
        if refused := template_problems(new.routes, render_noting, template_warnings):
            raise ConfigError(refused)
        recipients = Recipients.from_config(new)
        try:  # first: the one part that can refuse, before anything else has changed
            self.budget.reload(
                budget=new.budget,
                routes=new.routes,
                recipients=recipients,
                tokens=new.tokens,
                smtp_users=new.smtp.user_texts_per_day,
            )
        except InputError as exc:
            raise ConfigError([(exc.field, exc.message)]) from exc
        if self.budget.loosened:  # a cap raised: what waits for midnight is judged now
            self.dispatcher.wake.set()
        warnings = [f"{key} changed but needs a restart" for key in waiting]
        warnings += [f"{key}: {why}" for key, why in template_warnings]
        warnings += self.smtp_handler.reload(
            smtp=new.smtp, recipients=recipients, secrets=secret_values(new), tls=tls
        )
        new = dataclasses.replace(new, smtp=self.smtp_handler.smtp)  # TLS files that stayed
        warnings += self._renew_https(new.http, https)
        self.shaper.reload(new.limits)
        self.ingestor.reload(Rules.from_config(new))
        self.digests.reload(new.limits)
        self.live.update(new, recipients)
        self.config = new
        return warnings

    def _renew_https(self, http: HttpConfig, https: TlsFiles | None) -> list[str]:
        """The HTTPS listener's certificate and key, read again from the files it runs
        with (a new path waits for a restart): a certificate renewed in place, as
        certbot does, is served from the next connection on, where it once took a
        restart. One that does not load keeps the running one, with a warning."""
        if self.https is None:
            return []
        https = read_https(http) if https is None else https
        if https.context is None:
            return [f"http.tls_cert: cannot load, the previous certificate stays: {https.problem}"]
        self.https.use_context(https.context)
        return []

    async def _reloader(self, reloads: asyncio.Queue[str | None]) -> None:
        """Each SIGHUP puts the config path here; a bad file keeps the running config.
        A stop cuts a reload's reads short (nothing is applied until they are done)."""
        while not self.stop.is_set():
            got = await self._until_stop(reloads.get())
            if got is None or await self._until_stop(self._reload_from(got.result())) is None:
                return

    async def _until_stop(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T] | None:
        """`work` until it is done (its task) or `stop` is set (cancelled: None)."""
        task = asyncio.ensure_future(work)
        stopper = asyncio.ensure_future(self.stop.wait())
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if task.done():
            return task
        task.cancel()
        await asyncio.wait({task})  # its end, without taking a cancellation of our own
        return None

    async def _reload_from(self, path: str | None) -> None:
        """One SIGHUP: the file and every file it names read off the event loop (a slow
        disk stalled every mail and request meanwhile), then applied on it."""
        try:
            new = await read_config(path, RELOAD_READ_TIMEOUT)
            tls = await self._read_tls(functools.partial(read_tls, new.smtp))
            https = None
            if self.https is not None:  # its files as running: a new path waits for a restart
                https = await self._read_tls(functools.partial(read_https, self.config.http))
            warnings = self.reload(new, tls=tls, https=https)
        except ConfigError as exc:
            self.last_reload_ok = False
            log.error("reload refused, keeping the running config: %s", exc)
            return
        except Exception:
            # A file nobody foresaw (a bug of ours on it) must not end the bridge: the
            # reloader ran in the task group, and its error stopped everything.
            self.last_reload_ok = False
            log.exception("reload failed part way (a bug: report it); restart to be sure")
            return
        # A certificate that did not load is a part of the file not applied (the running
        # one stays, warned of below): the reload failed, as /metrics must say. It once
        # counted as a success, so nothing could alert on a renewal that never took.
        unloaded = [t for t in (tls, https) if t is not None and t.problem is not None]
        self.last_reload_ok = not unloaded
        if self.last_reload_ok:
            self.config_applied_at = self.clock.now()
        mask_secrets(secret_values(self.config))  # a new route token is masked from now on
        # Files the new config reads (a token_file, a TLS key) are judged as at start.
        warnings += await self._exposure(path)
        for warning in warnings:
            log.warning("reload: %s", warning)
        if unloaded:  # why is in the warnings above (the file's error, no secret in it)
            log.error(
                "reload failed in part: %d certificate(s) did not load, the previous"
                " stays; everything else applied",
                len(unloaded),
            )
        # Last: the line that says the reload is over (what its warnings were is
        # above it; a reader waiting for this line has them all).
        log.info("configuration reloaded from %s", path or "built-in defaults")

    async def _read_tls(self, read: Callable[[], TlsFiles]) -> TlsFiles:
        """A certificate `read` (`read_tls`, `read_https`) off the loop; one that does not
        come within the bound is one that does not load (the running one stays)."""
        try:
            return await off_loop(read, RELOAD_READ_TIMEOUT)
        except TimeoutError:
            return TlsFiles(None, f"not read within {RELOAD_READ_TIMEOUT:g} s")

    async def _exposure(self, path: str | None) -> list[str]:
        """`exposed_secrets` for the config in force: its stat calls off the loop."""
        check = functools.partial(exposed_secrets, self.config, path, dict(os.environ))
        try:
            return await off_loop(check, RELOAD_READ_TIMEOUT)
        except TimeoutError:
            return [f"secret files' modes not checked: not read within {RELOAD_READ_TIMEOUT:g} s"]

    async def retention(self, stop: asyncio.Event) -> None:
        """Purge finished messages older than `store.retention`, and the store's upkeep,
        hourly, on the cluster's leader (one process: always this one)."""

        async def purge() -> float:
            keep = self.config.store.retention
            try:
                if keep > 0:
                    purged = await self.store.purge(self.clock.now() - keep)
                    if purged:
                        log.info("retention: purged %d messages older than %gs", purged, keep)
            finally:
                await self.store.upkeep()  # with retention off, or failing, too
            return RETENTION_INTERVAL

        await run_steps(
            purge,
            name="retention",
            clock=self.clock,
            stop=stop,
            retry_after=RETENTION_INTERVAL,
            health=self.loops,
        )

    async def run(
        self,
        *,
        http_socket: socket.socket | None = None,
        smtp_sockets: Sequence[socket.socket | None] | None = None,
        started: asyncio.Event | None = None,
        reloads: asyncio.Queue[str | None] | None = None,
    ) -> None:
        """Serve until `self.stop` is set; then stop accepting, drain and return."""
        server = uvicorn_server(self.app, live=self.live) if http_socket is not None else None
        self.https = server if isinstance(server, HttpsServer) else None
        smtp_servers = await start_smtp(self.smtp_handler, smtp_sockets) if smtp_sockets else []
        try:
            async with asyncio.TaskGroup() as tasks:
                if server is not None and http_socket is not None:
                    tasks.create_task(server.serve(sockets=[http_socket]), name="http")
                tasks.create_task(self.dispatcher.run(self.stop), name="dispatcher")
                # One instance of a cluster at a time (one process: always this one).
                singletons = [
                    ("status-poller", self.poller.run),
                    ("storm-digests", self.digests.run),
                    ("retention", self.retention),
                ]
                tasks.create_task(self.leader.run(self.stop, singletons), name="leader")
                watch = self.store.watch_work(self.dispatcher.wake.set)
                tasks.create_task(
                    watch_work(watch, clock=self.clock, stop=self.stop, loops=self.loops),
                    name="work-watch",
                )
                if reloads is not None:
                    tasks.create_task(self._reloader(reloads), name="reloader")
                if server is not None:
                    while not server.started:  # noqa: ASYNC110 - uvicorn exposes a flag only
                        await asyncio.sleep(0.01)
                if started is not None:
                    started.set()
                await self.stop.wait()
                for smtp_server in smtp_servers:
                    smtp_server.close()  # no new SMTP connections
                if smtp_servers:  # the sessions: a mail in transfer is answered, then 421
                    tasks.create_task(
                        self.smtp_handler.sessions.shut_down(SHUTDOWN_GRACE), name="smtp-drain"
                    )
                if server is not None:
                    server.should_exit = True
        finally:
            for smtp_server in smtp_servers:
                smtp_server.close()
