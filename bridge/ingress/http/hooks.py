"""`POST /hooks/{name}`: a configured route turns a sender's webhook into stored SMS.

Order of checks, cheapest and most telling first: route (404), client network (403),
token or basic auth (401), content type and size on the stream (415, 413), signature over
the raw body (401), JSON (400; in the form field a format names, for a sender that posts
forms), the format's own fields (400 naming the field). Then the
texts are rendered (a failing template falls back to the format's default text, so the
alert still goes out), stored, and only then answered 202: on a route with a template,
each message's answer says whether its default text went out instead, and which fields
the template printed as empty because the payload lacked them. A sender that is told 4xx
drops the alert, so anything that is our trouble (store, overload) answers 503.

Until a call has passed the route's checks (network, credentials, signature), what it is
told must not say which routes exist: once `[tokens.*]` exist, a caller whose bearer
token lacks `read` (the callers `/openapi.json` refuses its route map) gets one answer for
every refusal before that point, an unknown name's included: 401, `NOT_AUTHORIZED`, both
challenges. The log and the console keep the real reason (`AUTHENTICATED` tells the
console which calls passed).
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import Response

from bridge.addresses import client_address, client_name, in_networks, parse_network
from bridge.clock import Clock, zone
from bridge.config import Config, LiveConfig, Recipients, RouteConfig
from bridge.errors import HttpError
from bridge.firewall import cap_recipients
from bridge.ingress.credentials import same_secret
from bridge.ingress.formats import HookMessage, HookRequest, Ignored, Unauthorized, registry
from bridge.ingress.http.auth import AuthError, authorize
from bridge.ingress.http.bodies import (
    JSONAnswer,
    accepted_response,
    media_type,
    parse_json,
    read_body,
    read_bounded,
)
from bridge.ingress.http.lockout import locked_answer, locked_for, vouch
from bridge.ingress.ingest import Accepted, Ingestor
from bridge.ingress.templated import Templated, render_template
from bridge.ingress.throttle import QuietLog
from bridge.policy.decide import dedupe_scope
from bridge.policy.shaping import Draft
from bridge.schedule import FIELD, MAIL_HEADER, parse_schedule_time
from bridge.text import is_blank

log = logging.getLogger(__name__)
FALLBACK_CHARS = 300
FORM = "application/x-www-form-urlencoded"
FORM_MAX_FIELDS = 100
# The scope key set once a call passed its route's network, credential and signature
# checks: only such a call is the route's "last call" in the console (console.activity).
AUTHENTICATED = "sms_bridge.route_authenticated"
REFUSAL = "sms_bridge.route_refusal"  # why such a call was refused, whatever it was told
# What a caller that may not see the route map is told of any call refused before it was
# authenticated, an unknown route's included: the same bytes for every name.
NOT_AUTHORIZED = (
    "not authorized: no such route, or missing or wrong credentials (the bridge's log says which)"
)
BOTH_CHALLENGES = 'Bearer realm="sms-bridge", Basic realm="sms-bridge"'


def _check_network(route: RouteConfig, request: Request) -> None:
    if not route.allowed_networks:
        return
    host = request.client.host if request.client else ""
    if client_address(host) is None:
        raise HttpError(403, f"client {host or '(unknown)'} is not allowed")
    if not in_networks(host, [parse_network(n) for n in route.allowed_networks]):
        raise HttpError(403, f"client {client_name(host)} is not allowed on this route")


def _token_matches(route: RouteConfig, value: str) -> bool:
    return same_secret(value, route.token)


def _basic_matches(route: RouteConfig, value: str) -> bool:
    try:
        user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
    except ValueError:  # binascii.Error, UnicodeDecodeError, and a non-ASCII header's
        # "string argument should contain only ASCII characters" (headers are latin-1)
        user, password = "", ""
    # Both compared every time, so the answer time does not tell whether the user name
    # was right.
    ok_user = same_secret(user, route.username)
    ok_password = same_secret(password, route.password)
    return ok_user and ok_password


def _check_credentials(route: RouteConfig, request: Request) -> None:
    """A bearer token or basic auth, compared in constant time.

    A route with both accepts either: one `Authorization` header cannot carry both, so
    demanding both would refuse every request.
    """
    if not route.token and not route.username:
        return
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    scheme, value = scheme.lower(), value.strip()
    if route.token and scheme == "bearer" and _token_matches(route, value):
        return
    if route.username and scheme == "basic" and _basic_matches(route, value):
        return
    # Named by its keys: an API token (`[tokens.*]`) is not one of the route's.
    accepted = " or ".join(
        f"{name} (routes.{route.name}.{keys})"
        for name, keys, on in (
            ("bearer token", "token", route.token),
            ("basic auth", "username and password", route.username),
        )
        if on
    )
    raise Unauthorized(f"missing or wrong {accepted}")


def _verified_credentials(route: RouteConfig, module: object, request: Request) -> list[str]:
    """The header values the route's checks verified: its token or basic auth, and the
    token header of a format that has one (GitLab's). A signature is over one body and
    never passes another request, so it is none of them."""
    names = ["authorization"] if route.token or route.username else []
    token_header: str | None = getattr(module, "TOKEN_HEADER", None)
    names += [token_header] if token_header else []
    return [request.headers[name] for name in names if name in request.headers]


def _challenge(route: RouteConfig) -> str | None:
    """`WWW-Authenticate`: one challenge per scheme the route accepts (RFC 9110 11.6.1)."""
    challenges = [
        f'{scheme} realm="sms-bridge"'
        for scheme, on in (("Bearer", route.token), ("Basic", route.username))
        if on
    ]
    return ", ".join(challenges) or None


def _form_json(body: bytes, field: str) -> bytes:
    """The JSON a form-encoded delivery carries in its field `field`."""
    try:
        fields = parse_qs(body.decode("ascii"), max_num_fields=FORM_MAX_FIELDS, errors="strict")
    except ValueError as exc:  # UnicodeDecodeError, too many fields
        raise HttpError(400, f"body is not a valid form: {exc}", "body") from exc
    values = fields.get(field)
    if not values:
        raise HttpError(400, f"form has no {field!r} field (the JSON payload)", field)
    return values[0].encode()


def template_report(route: RouteConfig, text: Templated) -> dict[str, Any] | None:
    """What the 202 tells the sender of one message's text, on a route with a template."""
    if not route.template:
        return None
    return {"default_text": text.default_text, "missing": list(text.missing)}


def route_text(route: RouteConfig, message: HookMessage, secrets: Sequence[str]) -> Templated:
    """The SMS text of one hook message: the route's template, else the format's text;
    and why the template was not used, or which fields it found missing (masked with
    `secrets`, as the log is)."""
    templated = None
    if route.template:
        templated = render_template(
            route.template,
            message.context,
            secrets=secrets,
            where=f"route {route.name}",
            instead="the route's default text",
        )
        if templated.text:
            return templated
    text = message.text  # the shaper reads what it needs
    if is_blank(text):
        compact = json.dumps(message.context, ensure_ascii=False, separators=(",", ":"))
        text = f"{route.name}: {compact[:FALLBACK_CHARS]}"
    return replace(templated, text=text) if templated else Templated(text)


def hook_recipients(
    route: RouteConfig,
    message: HookMessage,
    extra: Sequence[str],
    config: Config,
    resolver: Recipients,
) -> list[str]:
    """The E.164 recipients of one hook message (and the console's preview of it): the
    route's own; the payload's and `?to=` ones only where the owner allowed them (else
    the payload's `to` is just data), at most `http.max_recipients` of those."""
    payload_to = message.recipients if route.allow_payload_to else ()
    cap_recipients([*payload_to, *extra], config.http.max_recipients, route.to_path)
    if not (route.to or payload_to or extra):
        raise HttpError(
            400,
            "no recipients: the route has none and the payload named none",
            route.to_path if route.format == "generic" else "to",
        )
    return list(
        dict.fromkeys(
            [
                *resolver.resolve(route.to, field=f"routes.{route.name}.to"),
                *resolver.resolve(payload_to, field=route.to_path),
                *resolver.resolve(extra, field="?to"),
            ]
        )
    )


def _schedule(request: Request, config: Config, now: float, secrets: Sequence[str]) -> str | None:
    """`?schedule_time=` or the `X-SMS-Schedule` header (as for mail): one parser."""
    value = request.query_params.get(FIELD) or request.headers.get(MAIL_HEADER)
    if not value:
        return None
    tz = zone(config.provider.timezone)
    return parse_schedule_time(value, now=now, tz=tz, secrets=secrets)


def hook_endpoint(
    *,
    live: LiveConfig,
    ingestor: Ingestor,
    clock: Clock,
) -> Callable[[Request], Awaitable[Response]]:
    formats = registry()
    quiet = QuietLog(log, clock)

    async def endpoint(request: Request) -> Response:
        # One config, resolver and secrets for the whole request, even across a reload:
        # all read before the first await (the secrets read after the body masked the
        # old config's report with the new one's: a rotated token stayed unmasked).
        config, resolver, secrets = live.current, live.recipients, live.secrets
        name = request.path_params["name"]
        route = config.routes.get(name)
        module = formats[route.format] if route is not None else None
        # A format whose sender may post a form (GitHub's default content type) names the
        # field that holds the JSON; the signature is over the body as sent, the form.
        form_field: str | None = getattr(module, "FORM_FIELD", None)
        form = form_field is not None and media_type(request) == FORM
        try:
            if route is None:
                raise HttpError(404, f"no route named {name!r}", "name")
            _check_network(route, request)
            body = await _verified_body(request, route, module, form, config, clock.now())
        except (HttpError, Unauthorized) as exc:
            if request.scope.get(AUTHENTICATED) and isinstance(exc, HttpError):
                raise  # the sender's own mistake, past the route's checks: said as it is
            return _refused(request, config, route, exc, quiet)
        if isinstance(body, Response):
            return body
        assert route is not None and module is not None  # refused above otherwise
        for credential in _verified_credentials(route, module, request):
            vouch(request.scope, credential)  # passes a later lockout of this client
        hook = HookRequest(
            route=route,
            headers=request.headers,
            body=body,
            payload=parse_json(
                _form_json(body, form_field) if form and form_field else body,
                config.http.max_json_items,
            ),
            query=request.query_params,
        )
        try:
            messages = module.parse(hook)
        except Ignored as exc:
            return JSONAnswer({"ignored": str(exc)}, 200)
        schedule = _schedule(request, config, clock.now(), secrets)
        extra = request.query_params.getlist("to")
        if extra and not (route.allow_payload_to or route.allow_query_to):
            raise HttpError(400, "this route does not take ?to= (allow_payload_to)", "to")
        drafts, reports = hook_drafts(
            route, messages, extra, schedule, config=config, resolver=resolver, secrets=secrets
        )
        # Nothing of the payload waits for the store: a parsed megabyte of JSON is ~25 MB
        # of objects, and every request in flight held its own until its ingest was
        # done (30 such posts at once to a public route: 850 MB).
        del body, hook, messages
        return _accepted(await ingestor.submit(drafts), reports)

    return endpoint


def hook_drafts(
    route: RouteConfig,
    messages: Sequence[HookMessage],
    extra: Sequence[str],
    schedule: str | None,
    *,
    config: Config,
    resolver: Recipients,
    secrets: Sequence[str],
) -> tuple[list[Draft], list[dict[str, Any] | None]]:
    """The drafts of a hook's messages, and what the 202 reports of each row's text
    (masked with `secrets`, those of `config`)."""
    drafts, reports = [], []
    for message in messages:
        text = route_text(route, message, secrets)
        recipients = hook_recipients(route, message, extra, config, resolver)
        reports += [template_report(route, text)] * len(recipients)  # one row per recipient
        drafts.append(
            Draft(
                recipients=recipients,
                text=text.text,
                source="hook",
                sender_id=route.sender_id or config.provider.sender_id,
                route=route.name,
                scope=dedupe_scope("route", route.name),
                dedupe_key=message.dedupe_key,
                topic=message.topic,
                instance=message.instance,
                schedule_time=schedule,
                note=text.note(),
            )
        )
    return drafts, reports


async def _verified_body(
    request: Request, route: RouteConfig, module: Any, form: bool, config: Config, now: float
) -> bytes | Response:
    """The body, read once the route's credentials hold (Unauthorized otherwise; a body
    refused before its signature is checked is a refusal of the unauthenticated too), or
    the lockout's answer when the client was locked out while its body came. Sets
    AUTHENTICATED once the call has passed every check the route has."""
    _check_credentials(route, request)
    verify = getattr(module, "verify", None)
    if verify is None or not route.secret:  # no signature to wait for: passed already
        request.scope[AUTHENTICATED] = True
    if form:
        body = await read_bounded(request, config.http.max_body_bytes)
    else:
        body = await read_body(request, config.http.max_body_bytes)
    if verify is not None:
        if wait := locked_for(request.scope):  # locked while the body came
            return locked_answer(wait)
        hook = HookRequest(
            route=route,
            headers=request.headers,
            body=body,
            payload=None,
            query=request.query_params,
        )
        verify(hook, now)
        request.scope[AUTHENTICATED] = True
    return body


def shows_routes(request: Request, config: Config) -> bool:
    """Whether the caller may tell one route's refusals from another's and from no route:
    the callers `/openapi.json` names every route to (a token with `read`, or anyone at a
    bridge with no `[tokens.*]`)."""
    try:
        authorize(config.tokens, request.headers.get("authorization"), "read")
    except AuthError:
        return False
    return True


def _refused(
    request: Request,
    config: Config,
    route: RouteConfig | None,
    exc: HttpError | Unauthorized,
    quiet: QuietLog,
) -> Response:
    """The answer to a call refused before it passed its route's checks: the real one for
    a caller that may see the route map, else NOT_AUTHORIZED whatever the reason. Logged
    for a configured route at most once a minute per client and route (QuietLog): no
    lockout stops a caller that presents no credential, and a line for each of its calls
    let anyone fill the log's disk. An unknown name the caller was not told of is logged
    too, at most once a minute per client for all such names."""
    status = 401 if isinstance(exc, Unauthorized) else exc.status
    why = str(exc) if isinstance(exc, Unauthorized) else exc.message
    request.scope[REFUSAL] = why
    shown = shows_routes(request, config)
    host = request.client.host if request.client else ""
    if route is None and not shown:
        # NOT_AUTHORIZED sends the caller to the log: a sender pointed at a mistyped name
        # must find it there. One key for every unknown name (a scan is one line a
        # minute); the name as repr, so a control character in it is never written raw.
        quiet.warning(
            "hook:?",
            host,
            "hook: 404 for %s: %s (answered 401)",
            client_name(host) if host else "?",
            why,
        )
    if route is not None:
        quiet.warning(
            f"hook:{route.name}",
            host,
            "route %s: %d for %s: %s%s",
            route.name,
            status,
            client_name(host) if host else "?",
            why,
            "" if shown or status == 401 else " (answered 401)",
        )
    if shown:
        if isinstance(exc, HttpError):
            raise exc  # answered by the endpoint's error handler, its field named
        challenge = _challenge(route) if route is not None else None
        return JSONAnswer(
            {"error": why}, 401, headers={"WWW-Authenticate": challenge} if challenge else None
        )
    return JSONAnswer({"error": NOT_AUTHORIZED}, 401, headers={"WWW-Authenticate": BOTH_CHALLENGES})


def _accepted(accepted: list[Accepted], reports: list[dict[str, Any] | None]) -> Response:
    """The 202: each row's id, phone, state and reason, and what its template did."""
    return accepted_response(accepted, reports)
