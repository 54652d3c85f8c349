"""The composition root: builds every part from a `Config`, and `serve` runs them.

`build()` wires store, provider client (or the in-process sandbox), limiter, dispatcher,
poller, digests, budget, ingestor, SMTP handler and web app, each handed its
collaborators and its own config sections as keyword arguments (the one way config is
handed out: see `bridge.service`), so tests build the same object with a manual clock
and a loopback sandbox. `serve()` binds the listeners first (a taken port is a config
error), runs the bridge in this event loop and owns shutdown: on SIGTERM/SIGINT it stops
accepting, lets in-flight requests finish, lets the dispatcher finish the request it is
making, and returns. SIGHUP reloads the config file (`Bridge.reload`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

import httpx

from bridge.clock import Clock, SystemClock
from bridge.config import Config, LiveConfig, Recipients
from bridge.delivery.cluster import Leader
from bridge.delivery.digests import DigestWorker
from bridge.delivery.dispatcher import Dispatcher
from bridge.delivery.poller import StatusPoller
from bridge.delivery.ratelimit import SlidingWindowLimiter
from bridge.errors import ConfigError
from bridge.health import ProviderHealth
from bridge.ingress.http.app import create_app
from bridge.ingress.ingest import Ingestor
from bridge.ingress.smtp import SmtpHandler
from bridge.loops import LoopHealth
from bridge.ops.metrics import Metrics
from bridge.policy.budgets import BudgetGuard
from bridge.policy.decide import Rules
from bridge.policy.shaping import Shaper
from bridge.pricing import PriceBook
from bridge.provider.client import ProviderClient
from bridge.service import Bridge
from bridge.sockets import bind_socket, bound_address, notify_systemd
from bridge.store import Store, describe, open_store, rate_window, serving
from bridge.store.api import instance_name

if TYPE_CHECKING:  # the sandbox itself is imported only when configured
    from bridge.provider.sandbox import SandboxState

log = logging.getLogger("bridge")
SANDBOX_BASE_URL = "http://sandbox.invalid/api/v1"  # never resolved: served in-process
# Young collections at the default 700 net new objects ran ~60 a second under load, for
# little: a request's objects die by reference counting. 10x fewer (see BENCHMARKS.md).
YOUNG_GC_THRESHOLD = 7000


@contextlib.asynccontextmanager
async def open_provider(
    config: Config,
    *,
    clock: Clock,
    transport: httpx.AsyncBaseTransport | None = None,
    observe: Callable[[str, str, float], None] | None = None,
    after_call: Callable[[], Awaitable[None]] | None = None,
) -> AsyncIterator[tuple[httpx.AsyncClient, ProviderClient, SandboxState | None]]:
    """The one HTTP client and the provider client; the in-process sandbox if no base_url.
    `after_call`: run after every request that came back (the rate window's re-stamp)."""
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
                after_call=after_call,
            ),
            sandbox,
        )


def _gauges(
    metrics: Metrics,
    *,
    store: Store,
    limiter: SlidingWindowLimiter,
    health: ProviderHealth,
    dispatcher: Dispatcher,
    budget: BudgetGuard,
) -> None:
    """The gauges read from the parts at scrape time."""
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
        "provider_balance", "Balance last reported by the provider", lambda: dispatcher.balance
    )
    # A count since start, not a level: as a gauge, `> 0` (what the docs advised) held
    # from the first cap that bit until a restart reset it.
    metrics.counter(
        "budget_over_cap",
        "Messages held back or failed by daily caps",
        lambda: budget.over_cap_total,
    )
    # Texts a reload on another instance released (its cap higher) held again here:
    # the instances' caps differ (one was not reloaded). `> 0` over an hour: reload all.
    metrics.counter(
        "budget_cap_mismatch",
        "Texts held again by a cap lower than the one another instance released them by",
        lambda: budget.cap_mismatch_total,
    )
    # Their rates' ratio is the group-commit batch size: writes per fsync. Counts since
    # start (`_total`): as gauges, rate() over a restart was told a level had dropped.
    metrics.counter(
        "store_commits", "Store transactions committed", lambda: store.stats().transactions
    )
    metrics.counter(
        "store_writes_committed",
        "Store writes committed (several share one transaction)",
        lambda: store.stats().writes,
    )


@contextlib.asynccontextmanager
async def build(
    config: Config,
    *,
    clock: Clock | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    store: Store | None = None,
) -> AsyncIterator[Bridge]:
    """Every part, built once from `config`; closed when the block ends. `store`: one
    built elsewhere (not opened: this opens and closes it) instead of the one
    `config.store` names; tests pass one that can play a failing disk."""
    clock = clock or SystemClock()
    store = store or open_store(config.store)
    await store.open()
    p = config.provider
    metrics = Metrics(store, clock.now)
    loops = LoopHealth()  # every background loop's failed steps: /metrics and /healthz
    metrics.counters(
        "loop_step_failures",
        "Failed steps of a background loop, each retried: an unexpected error, or the"
        " store unavailable or busy",
        "loop",
        loops.failures,
    )
    smtp_handler: SmtpHandler | None = None
    try:
        limiter = SlidingWindowLimiter(
            limit=p.requests_per_minute,
            clock=clock,
            store=store,  # the window every instance books in
            status_share=config.status.budget_share,
            backoff_initial=p.backoff_initial,
            backoff_max=p.backoff_max,
        )
        async with open_provider(
            config,
            clock=clock,
            transport=transport,
            observe=metrics.observe_request,
            after_call=limiter.came_back,  # every request's booking, stamped when it is over
        ) as (_, client, sandbox):
            live = LiveConfig(config, Recipients.from_config(config))
            health = ProviderHealth()
            prices = PriceBook()
            shaper = Shaper(limits=config.limits, provider=p, prices=prices)
            budget = BudgetGuard(
                store=store,
                clock=clock,
                budget=config.budget,
                routes=config.routes,
                tokens=config.tokens,
                smtp_users=config.smtp.user_texts_per_day,
                recipients=live.recipients,
                provider=p,
                prices=prices,
                shaper=shaper,
            )
            # The configured name names the leader's session (what an operator looks
            # for in pg_stat_activity); claims are the process's own, tagged (`instance_name`).
            instance = config.cluster.instance or instance_name()
            owner = instance_name(config.cluster.instance) if config.cluster.instance else instance
            leader = Leader(
                store.leadership("singletons", holder=instance),
                name=instance,
                clock=clock,
                on_lead=lambda: dispatcher.wake.set(),  # built below, called once running
                loops=loops,
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
                # Whose claims these are, and for how long (a shared store: see [cluster]).
                owner=owner,
                lease=config.cluster.lease,
                # Others' claims whose lease passed: the leader's sweep (one instance).
                takes_over=lambda: leader.leading,
                loops=loops,
            )
            poller = StatusPoller(
                store=store,
                client=client,
                limiter=limiter,
                clock=clock,
                config=config.status,
                provider=p,
                health=health,
                loops=loops,
            )
            digests = DigestWorker(
                store=store,
                clock=clock,
                limits=config.limits,
                provider=p,
                shaper=shaper,
                on_created=dispatcher.wake.set,
                loops=loops,
            )
            ingestor = Ingestor(
                store=store,
                clock=clock,
                rules=Rules.from_config(config),
                shaper=shaper,
                on_stored=dispatcher.wake.set,
            )
            metrics.counter(
                "ingest_refused",
                "Ingests answered 503 / 451 (retry later): the store could not take them",
                lambda: ingestor.refused,
            )
            smtp_handler = SmtpHandler(
                smtp=config.smtp,
                provider=p,
                recipients=live.recipients,
                ingestor=ingestor,
                secrets=live.secrets,
            )
            _gauges(
                metrics,
                store=store,
                limiter=limiter,
                health=health,
                dispatcher=dispatcher,
                budget=budget,
            )
            metrics.gauge(
                "leader",
                "1 while this instance runs the singletons (polling, digests, retention)",
                lambda: 1.0 if leader.leading else 0.0,
            )
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
                loops=loops,
            )
            bridge = Bridge(
                config=config,
                clock=clock,
                store=store,
                live=live,
                app=app,
                smtp_handler=smtp_handler,
                dispatcher=dispatcher,
                poller=poller,
                digests=digests,
                ingestor=ingestor,
                shaper=shaper,
                budget=budget,
                leader=leader,
                loops=loops,
                sandbox=sandbox,
                config_applied_at=clock.now(),
            )
            # `systemctl reload` says nothing of a file the bridge refused (SIGHUP has no
            # answer): what to alert on, as Prometheus's own config_last_reload_* are.
            metrics.gauge(
                "config_last_reload_successful",
                "0 while the last SIGHUP's config was refused (the running one is kept) or"
                " applied but for a certificate that did not load (the running one serves)",
                lambda: 1.0 if bridge.last_reload_ok else 0.0,
            )
            metrics.gauge(
                "config_last_reload_success_timestamp_seconds",
                "When the start or the last reload applied in full (no part of it failed)",
                lambda: bridge.config_applied_at,
            )
            yield bridge
    finally:
        if smtp_handler is not None:
            smtp_handler.close()
        await store.close()


@contextlib.asynccontextmanager
async def build_serving(config: Config, *, clock: Clock | None = None) -> AsyncIterator[Bridge]:
    """`build` for `serve`: with the store held for this one serve (`serving`)."""
    with serving(config.store):
        async with build(config, clock=clock) as bridge:
            yield bridge


def _listen(key: str, listen: str) -> socket.socket | None:
    """Bind before anything else starts; a taken port is a config problem, not a traceback."""
    if not listen:
        return None
    try:
        return bind_socket(listen)
    except OSError as exc:
        raise ConfigError([(key, f"cannot listen on {listen}: {exc.strerror or exc}")]) from exc


async def serve(
    config: Config,
    *,
    config_path: str | None = None,
    clock: Clock | None = None,
    reload_pending: Callable[[], bool] | None = None,
) -> None:
    """`sms-bridge serve`: everything in this event loop until SIGTERM or SIGINT.
    `reload_pending`: whether a SIGHUP came before this loop handled them (the CLI's
    `EarlyHangups`); if so the config is reloaded once running."""
    if config.uses_sandbox:
        log.warning(
            "no provider.base_url configured: using the in-process sandbox provider; "
            "no SMS leaves this machine"
        )
    else:
        log.info("provider %s (config: %s)", config.provider.base_url, config.source)
        log.info("%s", rate_window(config.provider, config.store))
    http_socket = _listen("http.listen", config.http.listen)
    smtp_socket = _listen("smtp.listen", config.smtp.listen)
    # Bound on its own too: implicit TLS alone (smtp.listen = "") keeps every mail
    # encrypted, and check-config takes it.
    tls_socket = _listen("smtp.tls_listen", config.smtp.tls_listen)
    smtp_sockets = [smtp_socket, tls_socket] if smtp_socket or tls_socket else None
    async with build_serving(config, clock=clock) as bridge:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, bridge.stop.set)
        reloads: asyncio.Queue[str | None] = asyncio.Queue()
        loop.add_signal_handler(signal.SIGHUP, reloads.put_nowait, config_path)
        if reload_pending is not None and reload_pending():
            reloads.put_nowait(config_path)
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
        domains = ", ".join(config.smtp.domains)
        if smtp_socket is not None:
            log.info("SMTP listening on %s for %s", bound_address(smtp_socket), domains)
        if tls_socket is not None:
            log.info("SMTPS listening on %s for %s", bound_address(tls_socket), domains)
        log.info(
            "store %s; %d requests/minute to the provider",
            describe(config.store),
            config.provider.requests_per_minute,
        )
        # systemd (Type=notify) holds `systemctl start` until here, and a reload until
        # the bridge can take one; it also learns of a bridge that failed to start.
        notify_systemd("READY=1")
        # What start-up built (modules, phone metadata, config, the app) lives as long as
        # the process: keep the collector from walking it on every full collection. Under
        # load that walk took about a tenth of the event loop (see BENCHMARKS.md).
        gc.freeze()
        gc.set_threshold(YOUNG_GC_THRESHOLD, *gc.get_threshold()[1:])
        await runner
        log.info("stopped")
