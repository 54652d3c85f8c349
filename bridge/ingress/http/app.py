"""The HTTP face: the generic API, message queries and health, as a Starlette app.

Every error is JSON `{"error": ..., "field": ...}` with the status the README documents;
bad input never produces a 500 and never touches the store. 202 is sent only after the
ingest transaction is durable. Overload and storage trouble answer 503, never 429,
because webhook senders retry 5xx and drop 4xx.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bridge.clock import Clock, zone
from bridge.config import Config, HttpConfig, LiveConfig, Recipients
from bridge.config.masking import mask
from bridge.errors import HttpError, InputError, StoreUnavailable, Unavailable
from bridge.firewall import cap_recipients, sender_id_for
from bridge.health import ProviderHealth
from bridge.ingress.http.auth import (
    ANONYMOUS,
    AuthError,
    Principal,
    acting_name,
    authorize,
    token_name,
)
from bridge.ingress.http.bodies import (
    JSONAnswer,
    accepted_response,
    error_response,
    header,
    parse_json,
    query_int,
    read_body,
)
from bridge.ingress.http.bulk import cancel_waiting, read_waiting
from bridge.ingress.http.changes import why_not
from bridge.ingress.http.console.activity import RouteActivity
from bridge.ingress.http.console.app import Console
from bridge.ingress.http.filters import read_list_query
from bridge.ingress.http.hooks import hook_endpoint
from bridge.ingress.http.hosts import HostCheck
from bridge.ingress.http.hot import HotRoutes
from bridge.ingress.http.lockout import AuthLockout, vouch
from bridge.ingress.http.openapi import LIST_LIMIT, MAX_LIST_LIMIT, openapi_spec
from bridge.ingress.ingest import Ingestor
from bridge.ingress.throttle import FailureThrottle
from bridge.loops import LoopHealth
from bridge.models import events_json
from bridge.ops.metrics import Metrics
from bridge.ops.probe import StoreProbe
from bridge.policy.decide import dedupe_scope
from bridge.policy.shaping import Draft
from bridge.schedule import parse_schedule_time
from bridge.store import Store
from bridge.text import is_blank

log = logging.getLogger(__name__)
# What /readyz says of a provider that refuses us, in our words (see readyz).
PROVIDER_REFUSED = (
    "the provider refuses our API key or path (401 or 404): sending paused, queue kept; "
    "its answer is in the console and the log"
)
PROVIDER_INACTIVE = (
    "account not active (the provider answered 403): sending paused, queue kept; "
    "its answer is in the console and the log"
)
PROVIDER_ACCOUNT = (
    "the provider says the account cannot send (no balance, key invalid, suspended): "
    "sending paused, queue kept, resumes once a send goes through; its answer is in the "
    "console and the log"
)
# How long every send must have got no answer (or a 5xx) before /readyz says so. Readiness stays
# green meanwhile: this instance still takes alerts and keeps them until the provider is
# back (that is its use in an outage); a 503 would have a load balancer refuse them all.
UNREACHABLE_WARNING = 60.0
MAX_DEDUPE_KEY = 256
RETRY_AFTER = 5  # seconds a 503 "retry later" asks for (a busy or unreachable store)
MAX_TEXT_CHARS = 5000


async def read_json(request: Request, http: HttpConfig) -> Any:
    """The JSON body, bounded in bytes (`http.max_body_bytes`) and items (`max_json_items`)."""
    return parse_json(await read_body(request, http.max_body_bytes), http.max_json_items)


def _string(
    body: dict[str, Any], key: str, *, required: bool = False, max_len: int | None = None
) -> str | None:
    value = body.get(key)
    if value is None:
        if required:
            raise HttpError(400, f"'{key}' is required", key)
        return None
    if not isinstance(value, str):
        raise HttpError(400, f"'{key}' must be a string", key)
    if required and is_blank(value):
        raise HttpError(400, f"'{key}' must not be empty", key)
    if max_len is not None and len(value) > max_len:
        raise HttpError(400, f"'{key}' is longer than {max_len} characters", key)
    return value


def recipients_field(value: Any, field: str = "to") -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    raise HttpError(
        400, f"'{field}' must be a phone number, a group name, or a non-empty list of them", field
    )


Handler = Callable[[Request], Awaitable[Response]]


def handle_errors(handler: Handler, live: LiveConfig) -> Handler:
    """`handler` with the bridge's errors as JSON answers; what another system said (the
    store's error) masked as in the log: a webhook sender may be anyone."""

    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except AuthError as exc:
            headers = (
                {"WWW-Authenticate": 'Bearer realm="sms-bridge"'} if exc.status == 401 else None
            )
            return JSONAnswer({"error": exc.message}, exc.status, headers=headers)
        except HttpError as exc:
            return error_response(exc.status, exc.message, exc.field)
        except InputError as exc:
            return error_response(400, str(exc), exc.field)
        except Unavailable as exc:  # the store, or the phone metadata on a recipient
            log.error("refused with 503: %s", exc)
            why = unavailable_reason(exc, request, live)
            response = error_response(503, f"not accepted, retry later: {why}")
            response.headers["Retry-After"] = str(RETRY_AFTER)
            return response

    return wrapped


def may_read(request: Request, live: LiveConfig) -> bool:
    """Whether the caller's token has `read` (any caller of a bridge with no tokens)."""
    try:
        authorize(live.current.tokens, request.headers.get("authorization"), "read")
    except AuthError:
        return False
    return True


def unavailable_reason(exc: Unavailable, request: Request, live: LiveConfig) -> str:
    """Why, for this caller: the store's own words (masked) for one that may read the
    messages, as the log has them; `exc.public` for anyone else. /readyz and hooks
    answer anonymous callers, and the store's words named its host and port there."""
    shown = exc.public if isinstance(exc, StoreUnavailable) and not may_read(request, live) else exc
    return mask(str(shown), live.secrets)


def requires(scope: str, live: LiveConfig, handler: Handler) -> Handler:
    """`handler` for callers whose token has `scope`; the principal in `request.state`."""

    async def guarded(request: Request) -> Response:
        authorization = header(request, b"authorization")
        principal = authorize(live.current.tokens, authorization, scope)
        if authorization and principal is not ANONYMOUS:
            vouch(request.scope, authorization)
        request.state.principal = principal
        return await handler(request)

    return handle_errors(guarded, live)


def api_actor(request: Request) -> str:
    """Who made a change through the API, for its reason and event (`acting_name`)."""
    host = request.client.host if request.client else None
    return acting_name(request.state.principal, "the API", host)


def posted(path: str, endpoint: Handler, method: str = "POST") -> list[Route]:
    """A POST endpoint at `path` and at `path/`. The router's answer to the second was a
    307 to the first, which curl and most scripts do not follow for a POST: the alert
    was not sent, and nothing said so. A trailing slash is served as written without.
    Another method on the same path goes through here too (`method`): once `path/` is a
    POST route, the router answers its GET with a 405, no longer the redirect."""
    return [
        Route(path, endpoint, methods=[method]),
        Route(f"{path}/", endpoint, methods=[method]),
    ]


def message_draft(
    body: Any,
    config: Config,
    resolver: Recipients,
    caller: Principal,
    clock: Clock,
    secrets: Sequence[str],
) -> Draft:
    """The text a `POST /api/v1/messages` body asks for, its fields checked (a 400 says
    which is wrong) and its recipients resolved."""
    if not isinstance(body, dict):
        raise HttpError(400, "body must be a JSON object", "body")
    targets = recipients_field(body.get("to"))
    cap_recipients(targets, config.http.max_recipients)
    text = _string(body, "message", required=True, max_len=MAX_TEXT_CHARS)
    sender_id = sender_id_for(config, _string(body, "sender_id"))
    dedupe_key = _string(body, "dedupe_key", max_len=MAX_DEDUPE_KEY)
    schedule = _string(body, "schedule_time")
    recipients = resolver.resolve(targets)
    return Draft(
        recipients=recipients,
        text=text or "",
        source="http",
        sender_id=sender_id,
        # API keys never meet a route's or a mail's, and one token's keys
        # never mute another's (no tokens: one anonymous caller, "api").
        scope=dedupe_scope("api", caller.name if config.tokens else None),
        token=token_name(caller),
        dedupe_key=dedupe_key,
        schedule_time=parse_schedule_time(
            schedule, now=clock.now(), tz=zone(config.provider.timezone), secrets=secrets
        )
        if schedule
        else None,
    )


async def change_message(
    request: Request, action: str, *, store: Store, clock: Clock, wake: Callable[[], None] | None
) -> Response:
    """`POST .../retry` (failed -> queued) or `.../cancel` (queued, held -> failed)."""
    raw = request.path_params["message_id"]
    message_id = query_int(raw, "id", minimum=1) or 0  # never None: a path value
    who = api_actor(request)
    if action == "retry":
        done = await store.retry([message_id], clock.now(), by=who)
    else:
        done = await store.cancel([message_id], clock.now(), by=who)
    message = await store.get(message_id)
    if message is None:
        raise HttpError(404, f"no message {raw}", "id")
    if not done:
        # The state too, for a script to act on without reading the words.
        why = why_not(action, message_id, message.state)
        return JSONAnswer({"error": why, "state": str(message.state)}, 409)
    if wake is not None:
        wake()
    return JSONAnswer(message.to_json())


def liveness_problems(loops: LoopHealth, store: Store) -> dict[str, Any]:
    """Why /healthz answers 503 (empty: alive). Alive is more than answering: a
    dispatcher whose every step fails leaves what was acknowledged unsent, and a
    restart is what an orchestrator can offer."""
    problems: dict[str, Any] = {}
    if failing := loops.failing():
        problems["loops"] = failing
    if broken := store.stats().broken:  # nothing is acknowledged until a restart
        problems["store"] = broken
    return problems


async def readiness_problems(
    request: Request, live: LiveConfig, probe: StoreProbe, health: ProviderHealth, loops: LoopHealth
) -> dict[str, str]:
    """Why /readyz answers 503 (empty: ready)."""
    problems: dict[str, str] = {}
    try:
        await probe.write()  # a real write, every time: a full disk fails it
    except StoreUnavailable as exc:
        problems["store"] = unavailable_reason(exc, request, live)
    if not health.ready:
        # Not the provider's words: anyone may ask /readyz, and a provider's error may
        # quote anything (our key, the account's owner). A probe needs the status; the
        # console (a token's) and the log show the words, masked.
        refused = PROVIDER_INACTIVE if health.inactive else PROVIDER_REFUSED
        problems["provider"] = PROVIDER_ACCOUNT if health.account else refused
    if failing := loops.failing():
        problems["loops"] = "; ".join(f"{name}: {why}" for name, why in failing.items())
    return problems


def readiness_warnings(
    health: ProviderHealth, now: float, backoff_max: float
) -> dict[str, dict[str, str]]:
    """What /readyz says beside its status without turning red: every send for
    UNREACHABLE_WARNING or longer got no answer or a 5xx. In our words, as the problems
    are: anyone may ask /readyz."""
    failing = health.unreachable_for(now, retried_within=backoff_max + UNREACHABLE_WARNING)
    if failing is None or failing < UNREACHABLE_WARNING:
        return {}
    said = (
        f"no send has gone through for {failing / 60:.0f} min (the provider gave no answer,"
        " or a 5xx): alerts are still taken and kept, sending is retried; details in the log"
    )
    return {"warnings": {"provider": said}}


def create_app(
    *,
    live: LiveConfig,
    store: Store,
    ingestor: Ingestor,
    health: ProviderHealth,
    clock: Clock,
    metrics: Metrics | None = None,
    lifespan: Any = None,
    status: Callable[[], dict[str, Any]] | None = None,
    wake: Callable[[], None] | None = None,
    loops: LoopHealth | None = None,
) -> Starlette:
    """The HTTP app; `status` and `wake` let the console show the dispatcher's rate
    window and balance and wake it after a retry; `loops`: the background loops whose
    steps keep failing make /healthz and /readyz answer 503."""
    loops = loops or LoopHealth()
    # One probe for /readyz and /metrics: a scrape takes /readyz's recent write as proof.
    probe = metrics.probe if metrics is not None else StoreProbe(store, clock.now)
    activity = RouteActivity(live=live, clock=clock)
    console = Console(
        live=live,
        store=store,
        ingestor=ingestor,
        health=health,
        clock=clock,
        activity=activity,
        status=status,
        wake=wake,
    )

    async def post_message(request: Request) -> Response:
        # all three before the first await: one config for the whole request
        config, resolver, secrets = live.current, live.recipients, live.secrets
        body = await read_json(request, config.http)
        draft = message_draft(body, config, resolver, request.state.principal, clock, secrets)
        del body  # what else the caller sent must not wait for the store (hooks.py says why)
        return accepted_response(await ingestor.submit([draft]))

    async def list_messages(request: Request) -> Response:
        wanted = await read_list_query(
            request.query_params,
            default_limit=LIST_LIMIT,
            max_limit=MAX_LIST_LIMIT,
            routes=live.current.routes,
            store=store,
        )
        messages = await wanted.page(store, limit=wanted.limit, recipient=wanted.recipient)
        return JSONAnswer({"messages": [m.to_json() for m in messages]})

    async def get_message(request: Request) -> Response:
        raw = request.path_params["message_id"]
        message_id = query_int(raw, "id", minimum=1)
        message = await store.get(message_id or 0)  # never None: a path value
        if message is None:
            raise HttpError(404, f"no message {raw}", "id")
        out = message.to_json()
        out["events"] = events_json(await store.events(message.id))
        return JSONAnswer(out)

    def change(action: str) -> Handler:
        async def changed(request: Request) -> Response:
            return await change_message(request, action, store=store, clock=clock, wake=wake)

        return changed

    async def cancel_many(request: Request) -> Response:
        """`POST /api/v1/messages/cancel`: every waiting message a filter selects (the
        console's "Cancel all", the same store operation: bridge.ingress.http.bulk)."""
        config = live.current
        body = await read_json(request, config.http)
        wanted = await read_waiting(body, config.routes, store)
        who = api_actor(request)
        done = await cancel_waiting(store, wanted, clock.now, by=who)
        log.info("api: %s cancelled %d waiting messages (%s)", who, done.cancelled, wanted)
        return JSONAnswer(
            {
                "cancelled": done.cancelled,
                "in_flight": done.in_flight,
                "in_flight_more": done.in_flight_more,
                "gone": done.gone,
                "more": done.more,
            }
        )

    async def metrics_endpoint(request: Request) -> Response:
        if metrics is None:
            raise HttpError(404, "metrics are not enabled")
        return Response(await metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    async def stats(request: Request) -> Response:
        return JSONAnswer(
            {"states": await store.counts(), "reasons": await store.counts_by_reason()}
        )

    async def openapi(request: Request) -> Response:
        return JSONAnswer(openapi_spec(live.current))

    async def healthz(request: Request) -> Response:
        if problems := liveness_problems(loops, store):
            return JSONAnswer({"status": "failing", "problems": problems}, 503)
        return JSONAnswer({"status": "ok"})

    async def readyz(request: Request) -> Response:
        warnings = readiness_warnings(health, clock.now(), live.current.provider.backoff_max)
        if problems := await readiness_problems(request, live, probe, health, loops):
            return JSONAnswer({"status": "unavailable", "problems": problems, **warnings}, 503)
        return JSONAnswer({"status": "ready", **warnings})

    async def not_found(request: Request, exc: Exception) -> Response:
        return error_response(404, f"no such endpoint: {request.url.path}")

    async def method_not_allowed(request: Request, exc: Exception) -> Response:
        return error_response(405, f"{request.method} not allowed on {request.url.path}")

    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s", request.url.path)
        return error_response(500, "internal error; nothing was acknowledged")

    send_message = requires("send", live, post_message)
    hook = activity.observe(
        handle_errors(hook_endpoint(live=live, ingestor=ingestor, clock=clock), live)
    )
    return Starlette(
        routes=[
            *posted("/api/v1/messages", send_message),
            *posted("/api/v1/messages", requires("read", live, list_messages), "GET"),
            # Before `{message_id}`, whose GET takes "cancel" for an id (a 400 saying so).
            *posted("/api/v1/messages/cancel", requires("admin", live, cancel_many)),
            Route(
                "/api/v1/messages/{message_id}",
                requires("read", live, get_message),
                methods=["GET"],
            ),
            *(
                route
                for action in ("retry", "cancel")
                for route in posted(
                    f"/api/v1/messages/{{message_id}}/{action}",
                    requires("admin", live, change(action)),
                )
            ),
            Route("/api/v1/stats", requires("read", live, stats), methods=["GET"]),
            *posted("/hooks/{name}", hook),
            # The route map is for callers with `read` once tokens exist (openapi.py says why).
            Route("/openapi.json", requires("read", live, openapi), methods=["GET"]),
            Route("/metrics", requires("metrics", live, metrics_endpoint), methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            *console.routes(),
        ],
        exception_handlers={404: not_found, 405: method_not_allowed, 500: server_error},
        middleware=[
            Middleware(HostCheck, live=live),  # before any route: DNS rebinding
            Middleware(AuthLockout, throttle=FailureThrottle(clock), live=live),  # online guessing
            # Last: the ingest endpoints without the router's layers (hot.py says why).
            Middleware(
                HotRoutes,
                exact={"/api/v1/messages": send_message, "/api/v1/messages/": send_message},
                hook=hook,
            ),
        ],
        lifespan=lifespan,
    )
