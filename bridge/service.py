"""The composition root: builds every part from a `Config` and runs them in one loop.

`Bridge.build()` wires store, provider client (or the in-process sandbox), limiter,
dispatcher, poller, ingestor and web app, each handed its collaborators as keyword
arguments, so tests build the same object with a manual clock and a loopback sandbox.
`serve()` runs uvicorn, the dispatcher and the poller in one `asyncio.TaskGroup` and owns
shutdown: on SIGTERM/SIGINT it stops accepting, lets in-flight requests finish, lets the
dispatcher finish the request it is making, and returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import httpx
import uvicorn
from starlette.applications import Starlette

from bridge.clock import Clock, SystemClock
from bridge.config import (
    Config,
    HttpConfig,
    LiveConfig,
    as_reloaded,
    load_config,
    protection_problems,
    secret_values,
)
from bridge.delivery.digests import DigestWorker
from bridge.delivery.dispatcher import Dispatcher
from bridge.delivery.poller import StatusPoller
from bridge.delivery.ratelimit import SlidingWindowLimiter
from bridge.errors import ConfigError
from bridge.health import ProviderHealth
from bridge.ingress.http.app import create_app
from bridge.ingress.http.limits import limited_protocol
from bridge.ingress.ingest import Ingestor
from bridge.ingress.smtp import SmtpHandler, start_smtp
from bridge.loops import run_steps
from bridge.ops.logs import mask_secrets
from bridge.ops.metrics import Metrics
from bridge.policy.budgets import BudgetGuard
from bridge.policy.decide import Rules
from bridge.policy.shaping import Shaper
from bridge.pricing import PriceBook
from bridge.provider.client import ProviderClient
from bridge.sockets import bind_socket, bound_address
from bridge.store import Store, open_store

if TYPE_CHECKING:  # the sandbox itself is imported only when configured
    from bridge.provider.sandbox import SandboxState

log = logging.getLogger("bridge")
SANDBOX_BASE_URL = "http://sandbox.invalid/api/v1"  # never resolved: served in-process
SHUTDOWN_GRACE = 8  # seconds uvicorn lets in-flight requests finish
RETENTION_INTERVAL = 3600.0


class QuietServer(uvicorn.Server):
    """uvicorn without its own signal handlers: the service owns the lifecycle."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def uvicorn_server(
    app: Starlette,
    *,
    lifespan: Literal["auto", "on", "off"] = "off",
    live: LiveConfig | None = None,
    http: HttpConfig | None = None,
) -> QuietServer:
    """The one place uvicorn is configured. With `live`, under the `[http]` limits, read
    per connection (bridge.ingress.http.limits); proxies and TLS from `http` (default: the live
    config's at start; neither without both)."""
    http = http or (live.current.http if live is not None else HttpConfig())
    return QuietServer(
        uvicorn.Config(
            app,
            log_config=None,
            access_log=False,
            lifespan=lifespan,
            timeout_graceful_shutdown=SHUTDOWN_GRACE,
            http=limited_protocol(live) if live is not None else "auto",
            # uvicorn believes X-Forwarded-For from 127.0.0.1 unless told otherwise, which
            # would let any local process (or a loopback caller) pick its client address
            # and pass a route's allowed_networks: only http.trusted_proxies are believed.
            proxy_headers=bool(http.trusted_proxies),
            forwarded_allow_ips=list(http.trusted_proxies),
            ssl_certfile=http.tls_cert or None,
            ssl_keyfile=http.tls_key or None,
        )
    )


@contextlib.asynccontextmanager
async def open_provider(
    config: Config,
    *,
    clock: Clock,
    transport: httpx.AsyncBaseTransport | None = None,
    observe: Callable[[str, str, float], None] | None = None,
) -> AsyncIterator[tuple[httpx.AsyncClient, ProviderClient, SandboxState | None]]:
    """The one HTTP client and the provider client; the in-process sandbox if no base_url."""
    sandbox = None
    base_url, api_key = config.provider.base_url, config.provider.api_key
    if config.uses_sandbox:
        # Imported only here: a bridge with a real provider never loads the sandbox and
        # its fault-injection endpoints.
        from bridge.provider.sandbox import create_sandbox_app, state_from_config

        sandbox = state_from_config(config, clock)
        transport = httpx.ASGITransport(app=create_sandbox_app(sandbox))
        base_url, api_key = SANDBOX_BASE_URL, sandbox.api_key
    p = config.provider
    async with httpx.AsyncClient(
        transport=transport,
        timeout=httpx.Timeout(p.timeout, connect=p.connect_timeout),
        follow_redirects=False,
    ) as http:
        yield (
            http,
            ProviderClient(
                http=http,
                base_url=base_url,
                api_key=api_key,
                clock=clock,
                auth_header=p.auth_header,
                pricing_path=p.pricing_path,
                account_path=p.account_path,
                calculate_path=p.calculate_path,
                bulk_message_type=p.bulk_message_type,
                observe=observe,
            ),
            sandbox,
        )


@dataclass
class Bridge:
    config: Config
    clock: Clock
    store: Store
    http: httpx.AsyncClient
    client: ProviderClient
    limiter: SlidingWindowLimiter
    health: ProviderHealth
    dispatcher: Dispatcher
    poller: StatusPoller
    digests: DigestWorker
    budget: BudgetGuard
    metrics: Metrics
    live: LiveConfig
    ingestor: Ingestor
    app: Starlette
    smtp_handler: SmtpHandler
    sandbox: SandboxState | None = None
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    @contextlib.asynccontextmanager
    async def build(
        cls,
        config: Config,
        *,
        clock: Clock | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        store: Store | None = None,
    ) -> AsyncIterator[Bridge]:
        """`store`: one built elsewhere (not opened: this opens and closes it) instead of
        the one `config.store` names; tests pass one that can play a failing disk."""
        clock = clock or SystemClock()
        store = store or open_store(config.store)
        await store.open()
        p = config.provider
        metrics = Metrics(store, clock.now)
        smtp_handler: SmtpHandler | None = None
        try:
            async with open_provider(
                config, clock=clock, transport=transport, observe=metrics.observe_request
            ) as (
                http,
                client,
                sandbox,
            ):
                limiter = SlidingWindowLimiter(
                    limit=p.requests_per_minute,
                    clock=clock,
                    status_share=config.status.budget_share,
                    backoff_initial=p.backoff_initial,
                    backoff_max=p.backoff_max,
                )
                health = ProviderHealth()
                prices = PriceBook()
                shaper = Shaper.from_config(config, prices)
                budget = BudgetGuard(
                    store=store,
                    clock=clock,
                    config=config,
                    sender_id=p.sender_id,
                    prices=prices,
                    shaper=shaper,
                )
                dispatcher = Dispatcher(
                    store=store,
                    client=client,
                    limiter=limiter,
                    clock=clock,
                    config=p,
                    health=health,
                    budget=budget,
                    prices=prices,
                    low_balance=config.budget.low_balance,
                )
                # Whose claims these are, and for how long (a shared store: see [cluster]).
                dispatcher.owner = config.cluster.instance or dispatcher.owner
                dispatcher.lease = config.cluster.lease
                poller = StatusPoller(
                    store=store,
                    client=client,
                    limiter=limiter,
                    clock=clock,
                    config=config.status,
                    health=health,
                    timezone=p.timezone,
                )
                digests = DigestWorker(
                    store=store,
                    clock=clock,
                    window=config.limits.per_recipient_window,
                    sender_id=p.sender_id,
                    shaper=shaper,
                    on_created=dispatcher.wake.set,
                )
                ingestor = Ingestor(
                    store=store,
                    clock=clock,
                    rules=Rules.from_config(config),
                    shaper=shaper,
                    on_stored=dispatcher.wake.set,
                )
                smtp_handler = SmtpHandler(config=config, ingestor=ingestor)
                metrics.gauge(
                    "rate_budget_left",
                    "Provider requests left in the window",
                    lambda: limiter.limit - limiter.used(),
                )
                metrics.gauge(
                    "provider_ready",
                    "1 when the provider accepts our key",
                    lambda: 1.0 if health.ready else 0.0,
                )
                metrics.gauge(
                    "provider_balance",
                    "Balance last reported by the provider",
                    lambda: dispatcher.balance,
                )
                metrics.gauge(
                    "budget_over_cap",
                    "Messages held back or failed by daily caps",
                    lambda: budget.over_cap_total,
                )
                # Their ratio is the group-commit batch size: writes per fsync.
                metrics.gauge(
                    "store_commits",
                    "Store transactions committed",
                    lambda: store.stats().transactions,
                )
                metrics.gauge(
                    "store_writes_committed",
                    "Store writes committed (several share one transaction)",
                    lambda: store.stats().writes,
                )
                live = LiveConfig(config)
                app = create_app(
                    live=live,
                    store=store,
                    ingestor=ingestor,
                    health=health,
                    clock=clock,
                    metrics=metrics,
                    status=lambda: {
                        "rate_used": limiter.used(),
                        "paused_until": limiter.paused_until or None,
                        "balance": dispatcher.balance,
                    },
                    wake=dispatcher.wake.set,
                )
                yield cls(
                    config=config,
                    clock=clock,
                    store=store,
                    http=http,
                    client=client,
                    limiter=limiter,
                    health=health,
                    dispatcher=dispatcher,
                    poller=poller,
                    digests=digests,
                    budget=budget,
                    metrics=metrics,
                    live=live,
                    ingestor=ingestor,
                    app=app,
                    smtp_handler=smtp_handler,
                    sandbox=sandbox,
                )
        finally:
            if smtp_handler is not None:
                smtp_handler.close()
            await store.close()

    def reload(self, new: Config) -> list[str]:
        """Apply everything but listen addresses, the store, the provider and logging.

        Routes, groups, limits, budgets, HTTP limits and every SMTP setting (auth, users,
        networks, sizes, limits, TLS certificates) hold for the next request or session.
        Returns warnings: each key that changed but needs a restart, by name, and
        anything that could not be applied (a certificate that does not load). Raises
        ConfigError, applying nothing, where protected mode refuses what would then run.
        """
        new, waiting = as_reloaded(new, self.config)
        refused = protection_problems(new)
        if refused:  # judged on what would run: the running provider and listeners
            raise ConfigError(refused)
        warnings = [f"{key} changed but needs a restart" for key in waiting]
        warnings += self.smtp_handler.reload(new)
        new = self.smtp_handler.config  # with the TLS files that stayed, if any
        self.config = new
        self.live.current = new
        self.ingestor.rules = Rules.from_config(new)
        self.ingestor.shaper.reload(new)  # budget warnings and digests share it
        self.digests.window = new.limits.per_recipient_window
        self.budget.reload(new)
        return warnings

    async def _reloader(self, reloads: asyncio.Queue[str | None]) -> None:
        """Each SIGHUP puts the config path here; a bad file keeps the running config."""
        while not self.stop.is_set():
            getter = asyncio.ensure_future(reloads.get())
            stopper = asyncio.ensure_future(self.stop.wait())
            done, _ = await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            for task in (getter, stopper):
                task.cancel()
            if getter not in done:
                return
            path = getter.result()
            try:
                warnings = self.reload(load_config(path))
            except ConfigError as exc:
                log.error("reload refused, keeping the running config: %s", exc)
                continue
            mask_secrets(secret_values(self.config))  # a new route token is masked from now on
            log.warning("configuration reloaded from %s", path or "built-in defaults")
            for warning in warnings:
                log.warning("reload: %s", warning)

    async def retention(self, stop: asyncio.Event) -> None:
        """Purge finished messages older than `store.retention`, hourly, on the
        cluster's leader (one process: always this one)."""

        async def purge() -> float:
            keep = self.config.store.retention
            if keep > 0:
                purged = await self.store.purge(self.clock.now() - keep)
                if purged:
                    log.info("retention: purged %d messages older than %gs", purged, keep)
            return RETENTION_INTERVAL

        await run_steps(
            purge,
            name="retention",
            clock=self.clock,
            stop=stop,
            retry_after=RETENTION_INTERVAL,
            gate=self.store.leading,
        )

    async def run(
        self,
        *,
        http_socket: socket.socket | None = None,
        smtp_sockets: list[socket.socket] | None = None,
        started: asyncio.Event | None = None,
        reloads: asyncio.Queue[str | None] | None = None,
    ) -> None:
        """Serve until `self.stop` is set; then stop accepting, drain and return."""
        server = uvicorn_server(self.app, live=self.live) if http_socket is not None else None
        smtp_servers = (
            await start_smtp(self.config, self.smtp_handler, smtp_sockets) if smtp_sockets else []
        )
        try:
            async with asyncio.TaskGroup() as tasks:
                if server is not None and http_socket is not None:
                    tasks.create_task(server.serve(sockets=[http_socket]), name="http")
                tasks.create_task(self.dispatcher.run(self.stop), name="dispatcher")
                # The singletons: on one instance of a cluster at a time (its leader).
                leader = self.store.leading
                tasks.create_task(self.poller.run(self.stop, leader), name="status-poller")
                tasks.create_task(self.digests.run(self.stop, leader), name="storm-digests")
                tasks.create_task(self.retention(self.stop), name="retention")
                if reloads is not None:
                    tasks.create_task(self._reloader(reloads), name="reloader")
                if server is not None:
                    while not server.started:  # noqa: ASYNC110 - uvicorn exposes a flag only
                        await asyncio.sleep(0.01)
                if started is not None:
                    started.set()
                await self.stop.wait()
                for smtp_server in smtp_servers:
                    smtp_server.close()  # no new SMTP connections; sessions finish on their own
                if server is not None:
                    server.should_exit = True
        finally:
            for smtp_server in smtp_servers:
                smtp_server.close()


def _listen(key: str, listen: str) -> socket.socket | None:
    """Bind before anything else starts; a taken port is a config problem, not a traceback."""
    if not listen:
        return None
    try:
        return bind_socket(listen)
    except OSError as exc:
        raise ConfigError([(key, f"cannot listen on {listen}: {exc.strerror or exc}")]) from exc


async def serve(
    config: Config, *, config_path: str | None = None, clock: Clock | None = None
) -> None:
    """`sms-bridge serve`: everything in this event loop until SIGTERM or SIGINT."""
    if config.uses_sandbox:
        log.warning(
            "no provider.base_url configured: using the in-process sandbox provider; "
            "no SMS leaves this machine"
        )
    else:
        log.info("provider %s (config: %s)", config.provider.base_url, config.source)
    http_socket = _listen("http.listen", config.http.listen)
    smtp_socket = _listen("smtp.listen", config.smtp.listen)
    tls_socket = _listen("smtp.tls_listen", config.smtp.tls_listen) if smtp_socket else None
    smtp_sockets = [s for s in (smtp_socket, tls_socket) if s is not None] or None
    async with Bridge.build(config, clock=clock) as bridge:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, bridge.stop.set)
        reloads: asyncio.Queue[str | None] = asyncio.Queue()
        loop.add_signal_handler(signal.SIGHUP, reloads.put_nowait, config_path)
        started = asyncio.Event()
        runner = asyncio.create_task(
            bridge.run(
                http_socket=http_socket,
                smtp_sockets=smtp_sockets,
                started=started,
                reloads=reloads,
            )
        )
        waiter = asyncio.create_task(started.wait())
        await asyncio.wait({waiter, runner}, return_when=asyncio.FIRST_COMPLETED)
        if runner.done():  # failed while starting: surface its error
            waiter.cancel()
            await runner
            return
        # The addresses actually bound, so `listen = "127.0.0.1:0"` is usable: whoever
        # started the process (a test, a supervisor script) reads the port from here.
        if http_socket is not None:
            log.info("HTTP listening on %s", bound_address(http_socket))
        if smtp_socket is not None:
            domains = ", ".join(config.smtp.domains)
            log.info("SMTP listening on %s for %s", bound_address(smtp_socket), domains)
        if tls_socket is not None:
            log.info("SMTPS listening on %s", bound_address(tls_socket))
        log.info(
            "store %s; %d requests/minute to the provider",
            config.store.path,
            config.provider.requests_per_minute,
        )
        # What start-up built (modules, phone metadata, config, the app) lives as long as
        # the process: keep the collector from walking it on every full collection. Under
        # load that walk took about a tenth of the event loop (see BENCHMARKS.md).
        gc.freeze()
        await runner
        log.info("stopped")
