"""The web console at `/ui/`: server-rendered pages over the store's queries.

Every page is plain HTML that works without script (a small same-origin script only
refreshes live figures and asks before a cancel), and every page is also JSON at the
same path with `.json` appended (Datasette's convention), with the same data.

Who may do what: looking needs `read`, acting (retry, cancel, test message) needs
`admin`. A browser signs in with an API token once and then carries a session cookie
(`bridge.console.sessions`); a script may instead send `Authorization: Bearer TOKEN`
to the `.json` pages. On a bridge with no tokens the console is open, as the API is.
Every POST needs the session's CSRF token and, when the browser sends one, an Origin
equal to the console's own; the cookie is HttpOnly, SameSite=Strict, Secure over TLS.
Every answer carries a strict Content-Security-Policy: no inline script or style,
nothing from another origin.
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup, escape
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route, Router
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bridge.auth import ANONYMOUS, AuthError, Principal, authorize, identify
from bridge.budget import day_bounds
from bridge.clock import Clock
from bridge.config import LiveConfig
from bridge.console import chart
from bridge.console.activity import RouteActivity
from bridge.console.routes import (
    authentication,
    encoding_name,
    postfix_snippet,
    preview,
    sample_payload,
    snippets,
)
from bridge.console.sessions import COOKIE, LIFETIME, Session, Sessions
from bridge.errors import InputError, StoreUnavailable
from bridge.health import ProviderHealth
from bridge.ingest import Draft, Ingestor
from bridge.models import State, iso_time
from bridge.phone import resolve_recipients
from bridge.store import Store
from bridge.text import split_parts

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
MAX_FORM_BYTES = 512 * 1024  # a pasted webhook payload fits
MAX_TEST_TEXT = 1000
CHART_MINUTES = 180
DELIVERY_WINDOW = 86400.0
RECENT_FAILURES = 10
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
]


# Someone on the sign-in page: no scope, no navigation.
VISITOR = Principal("visitor", frozenset())


class Refused(Exception):
    """Stop handling and answer this instead (a redirect, an error page)."""

    def __init__(self, status: int, message: str, location: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.location = location


@dataclass
class Caller:
    principal: Principal
    session: Session | None
    new_session_id: str | None = None  # set the cookie on the answer


class SecureHeaders:
    """Adds the CSP and its companions to every answer under `/ui/` (static files too)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers += [(k, v) for k, v in SECURITY_HEADERS if k not in present]
                if b"cache-control" not in present:  # pages hold personal data
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, sending)


def _clock_text(epoch: float | None) -> str:
    if epoch is None:
        return "never"
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


_MESSAGE_REF = re.compile(r"message (\d+)")


def _link_messages(text: str | None) -> Markup:
    """Escape `text`, then make each "message N" a link to that message."""
    escaped = str(escape(text or ""))
    return Markup(
        _MESSAGE_REF.sub(lambda m: f'<a href="/ui/messages/{m[1]}">message {m[1]}</a>', escaped)
    )


def _jsonable(value: Any) -> Any:
    """Times as ISO 8601: keys ending in `_at` hold epoch seconds in the view data."""
    if isinstance(value, dict):
        return {
            k: iso_time(v) if k.endswith("_at") and isinstance(v, int | float) else _jsonable(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(default=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["clock"] = _clock_text
    env.filters["ago"] = _ago
    env.filters["iso"] = iso_time
    env.filters["link_messages"] = _link_messages
    env.filters["encoding"] = encoding_name
    env.filters["money"] = lambda v: "unknown" if v is None else f"{v:.4f}".rstrip("0").rstrip(".")
    return env


def _safe_next(target: str | None) -> str:
    """Only a console path is a place to go back to after sign-in (no open redirect)."""
    if target and target.startswith("/ui/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/ui/"


class Console:
    def __init__(
        self,
        *,
        live: LiveConfig,
        store: Store,
        ingestor: Ingestor,
        health: ProviderHealth,
        clock: Clock,
        activity: RouteActivity,
        status: Callable[[], dict[str, Any]] | None = None,
        wake: Callable[[], None] | None = None,
    ) -> None:
        self.live = live
        self.store = store
        self.ingestor = ingestor
        self.health = health
        self.clock = clock
        self.activity = activity
        # What only the running dispatcher knows (rate window, balance); None in tests
        # that build the app alone.
        self.status = status or (lambda: {})
        self.wake = wake or (lambda: None)
        self.sessions = Sessions()
        self.templates = _environment()

    # -- who is asking ---------------------------------------------------------------
    def _caller(self, request: Request, scope: str, *, as_json: bool) -> Caller:
        """The caller if it may use `scope`; Refused or AuthError otherwise."""
        now = self.clock.now()
        tokens = self.live.current.tokens
        session = self.sessions.get(request.cookies.get(COOKIE), now)
        principal = self.sessions.principal(session, tokens) if session else None
        new_id = None
        if principal is None and not tokens:
            principal = ANONYMOUS
            if not as_json and request.method == "GET":
                # An open bridge still needs a CSRF token for its forms: give one.
                new_id, session = self.sessions.create(now, open_=True)
        if principal is None and as_json and "authorization" in request.headers:
            principal = authorize(tokens, request.headers["authorization"], scope)
        if principal is None:
            if as_json:
                raise AuthError(401, "sign in at /ui/signin, or send 'Authorization: Bearer TOKEN'")
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            if request.method != "GET":
                target = "/ui/"
            raise Refused(303, "sign in first", f"/ui/signin?next={quote(target)}")
        if not principal.may(scope):
            raise AuthError(403, f"token {principal.name!r} lacks the {scope!r} scope")
        return Caller(principal, session, new_id)

    async def _form(self, request: Request, caller: Caller) -> dict[str, str]:
        """The posted form, once its CSRF token and origin are checked."""
        origin = request.headers.get("origin")
        own = f"{request.url.scheme}://{request.url.netloc}"
        if origin is not None and origin != own:
            raise Refused(403, f"a form from {origin} may not act here")
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/x-www-form-urlencoded":
            raise Refused(415, "expected a form (application/x-www-form-urlencoded)")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM_BYTES:
                raise Refused(413, f"form larger than {MAX_FORM_BYTES} bytes")
        try:
            fields = parse_qs(body.decode("utf-8"), keep_blank_values=True)
        except (UnicodeDecodeError, ValueError) as exc:
            raise Refused(400, "the form is not valid UTF-8 form data") from exc
        form = {k: v[0] for k, v in fields.items()}
        expected = caller.session.csrf if caller.session is not None else ""
        if not expected or not hmac.compare_digest(
            form.get("csrf", "").encode(), expected.encode()
        ):
            raise Refused(403, "missing or wrong CSRF token: reload the page and try again")
        return form

    # -- answers -----------------------------------------------------------------------
    def _render(
        self,
        request: Request,
        caller: Caller | None,
        template: str,
        data: dict[str, Any],
        status: int = 200,
    ) -> Response:
        session = caller.session if caller else None
        flash = []
        if session is not None:
            flash, session.flash = session.flash, []
        html = self.templates.get_template(template).render(
            data=data,
            me=caller.principal if caller else None,
            open_bridge=not self.live.current.tokens,
            csrf=session.csrf if session else "",
            flash=flash,
            now=self.clock.now(),
            path=request.url.path,
        )
        response = HTMLResponse(html, status)
        if caller is not None and caller.new_session_id:
            self._set_cookie(request, response, caller.new_session_id)
        return response

    def _set_cookie(self, request: Request, response: Response, session_id: str) -> None:
        response.set_cookie(
            COOKIE,
            session_id,
            max_age=int(LIFETIME),
            path="/ui",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )

    def _error(self, request: Request, status: int, message: str, *, as_json: bool) -> Response:
        if as_json:
            return JSONResponse({"error": message}, status)
        return self._render(
            request, None, "error.html", {"status": status, "message": message}, status
        )

    def page(
        self,
        scope: str,
        handler: Callable[[Request, Caller], Awaitable[tuple[str, dict[str, Any]]]],
    ) -> tuple[Callable[[Request], Awaitable[Response]], Callable[[Request], Awaitable[Response]]]:
        """A GET page as (HTML, JSON) endpoints over the same data."""

        async def html(request: Request) -> Response:
            return await self._guard(request, scope, handler, as_json=False)

        async def as_json(request: Request) -> Response:
            return await self._guard(request, scope, handler, as_json=True)

        return html, as_json

    async def _guard(
        self,
        request: Request,
        scope: str,
        handler: Callable[[Request, Caller], Awaitable[tuple[str, dict[str, Any]]]],
        *,
        as_json: bool,
    ) -> Response:
        try:
            caller = self._caller(request, scope, as_json=as_json)
            template, data = await handler(request, caller)
        except Refused as exc:
            if exc.location:
                return RedirectResponse(exc.location, exc.status)
            return self._error(request, exc.status, exc.message, as_json=as_json)
        except AuthError as exc:
            return self._error(request, exc.status, exc.message, as_json=as_json)
        except InputError as exc:
            return self._error(request, 400, str(exc), as_json=as_json)
        except StoreUnavailable as exc:
            return self._error(request, 503, f"the store cannot answer: {exc}", as_json=as_json)
        if as_json:
            return JSONResponse(_jsonable(data))
        return self._render(request, caller, template, data)

    def action(
        self,
        scope: str,
        handler: Callable[[Request, Caller, dict[str, str]], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        """A POST: the scope, then the CSRF token, then `handler`."""

        async def endpoint(request: Request) -> Response:
            try:
                caller = self._caller(request, scope, as_json=False)
                form = await self._form(request, caller)
                return await handler(request, caller, form)
            except Refused as exc:
                if exc.location:
                    return RedirectResponse(exc.location, exc.status)
                return self._error(request, exc.status, exc.message, as_json=False)
            except AuthError as exc:
                return self._error(request, exc.status, exc.message, as_json=False)
            except StoreUnavailable as exc:
                return self._error(request, 503, f"not done, retry: {exc}", as_json=False)

        return endpoint

    def _back(self, caller: Caller, location: str, note: str) -> Response:
        if caller.session is not None:
            caller.session.flash.append(note)
        return RedirectResponse(location, 303)

    # -- sign-in -------------------------------------------------------------------------
    async def signin_form(self, request: Request) -> Response:
        if not self.live.current.tokens:
            return RedirectResponse("/ui/", 303)
        now = self.clock.now()
        session = self.sessions.get(request.cookies.get(COOKIE), now)
        new_id = None
        if session is None:
            new_id, session = self.sessions.create(now)
        visitor = Caller(VISITOR, session, new_id)
        data = {"next": _safe_next(request.query_params.get("next")), "error": None}
        response = self._render(request, visitor, "signin.html", data)
        response.headers["x-robots-tag"] = "noindex"
        return response

    async def signin(self, request: Request) -> Response:
        tokens = self.live.current.tokens
        now = self.clock.now()
        old_id = request.cookies.get(COOKIE)
        session = self.sessions.get(old_id, now)
        visitor = Caller(VISITOR, session)
        try:
            form = await self._form(request, visitor)
        except Refused as exc:
            return self._error(request, exc.status, exc.message, as_json=False)
        target = _safe_next(form.get("next"))
        principal = identify(tokens, form.get("token", "").strip() or None)
        problem, status = None, 200
        if not tokens:
            return RedirectResponse("/ui/", 303)
        if principal is None:
            problem, status = "That is not a configured API token.", 401
        elif not principal.may("read"):
            problem, status = (
                f"Token {principal.name!r} lacks the 'read' scope the console needs.",
                403,
            )
        if problem:
            log.warning("console sign-in refused from %s: %s", _client(request), problem)
            return self._render(
                request, visitor, "signin.html", {"next": target, "error": problem}, status
            )
        assert principal is not None
        self.sessions.drop(old_id)  # a new id on sign-in: no session fixation
        new_id, _ = self.sessions.create(now, token=tokens[principal.name])
        log.info("console: %s signed in from %s", principal.name, _client(request))
        response = RedirectResponse(target, 303)
        self._set_cookie(request, response, new_id)
        return response

    async def signout(self, request: Request, caller: Caller, form: dict[str, str]) -> Response:
        self.sessions.drop(request.cookies.get(COOKIE))
        response = RedirectResponse("/ui/signin", 303)
        response.delete_cookie(COOKIE, path="/ui")
        return response

    # -- pages -------------------------------------------------------------------------
    async def overview(self, request: Request, caller: Caller) -> tuple[str, dict[str, Any]]:
        config = self.live.current
        now = self.clock.now()
        day_start, _, date = day_bounds(now)
        since = now - now % 60 - (CHART_MINUTES - 1) * 60  # the last bar is this minute
        summary = await self.store.overview(
            now=now, day_start=day_start, since=now - DELIVERY_WINDOW
        )
        activity = await self.store.activity(since, 60.0)
        requests = [0] * CHART_MINUTES
        for kind, series in activity.items():
            if kind != "messages":
                for index, count in series.items():
                    if 0 <= index < CHART_MINUTES:
                        requests[index] += count
        messages = [activity["messages"].get(i, 0) for i in range(CHART_MINUTES)]
        answers = summary["answers"]
        delivered, failed = answers.get("delivered", 0), answers.get("failed", 0)
        status = self.status()
        today = summary["today"]
        caps = {
            "texts_per_day": config.budget.texts_per_day,
            "parts_per_day": config.budget.parts_per_day,
            "on_exceeded": config.budget.on_exceeded,
            "routes": {
                name: {"cap": route.max_texts_per_day, "used": today["routes"].get(name, 0)}
                for name, route in config.routes.items()
                if route.max_texts_per_day
            },
        }
        storms = [
            {**s, "digest_at": s["first_at"] + config.limits.per_recipient_window}
            for s in await self.store.held_storms()
        ]
        failures = await self.store.query(state="failed", limit=RECENT_FAILURES)
        queue = summary["queue"]
        data: dict[str, Any] = {
            "states": {str(s): 0 for s in State} | await self.store.counts(),
            "queue": {
                **queue,
                "oldest_age_seconds": None
                if queue["oldest_created_at"] is None
                else now - queue["oldest_created_at"],
            },
            "delivery": {
                "since_at": now - DELIVERY_WINDOW,
                "delivered": delivered,
                "failed": failed,
                "awaiting": answers.get("sent", 0),
                "ratio": delivered / (delivered + failed) if delivered + failed else None,
            },
            "rate": {
                "limit_per_minute": config.provider.requests_per_minute,
                "used_in_window": status.get("rate_used"),
                "paused_until_at": paused
                if (paused := status.get("paused_until")) and paused > now
                else None,
                "chart": {
                    "since_at": since,
                    "minutes": CHART_MINUTES,
                    "requests": requests,
                    "messages": messages,
                },
            },
            "provider": {
                "sandbox": config.uses_sandbox,
                "ready": self.health.ready,
                "problem": self.health.auth_error,
                "problem_since_at": self.health.since,
                "last_success_at": self.health.last_success,
                "balance": status.get("balance"),
                "low_balance": config.budget.low_balance,
            },
            "today": {"date": date, **today, "caps": caps},
            "storms": storms,
            "failures": [
                {
                    "id": m.id,
                    "recipient": m.recipient,
                    "reason": m.reason,
                    "updated_at": m.updated_at,
                }
                for m in failures
            ],
        }
        if request.url.path.endswith(".json"):
            return "", data
        data["chart"] = chart.build(
            requests,
            messages,
            limit=config.provider.requests_per_minute,
            since=since,
            bucket=60.0,
        )
        return "overview.html", data

    async def messages(self, request: Request, caller: Caller) -> tuple[str, dict[str, Any]]:
        q = request.query_params
        filters = {
            key: q.get(key, "").strip() for key in ("state", "recipient", "route", "source", "q")
        }
        if filters["state"] and filters["state"] not in {str(s) for s in State}:
            raise InputError("state", f"unknown state {filters['state']!r}")
        try:
            limit = max(1, min(MAX_PAGE_SIZE, int(q.get("limit") or PAGE_SIZE)))
            before = int(q["before"]) if q.get("before") else None
        except ValueError as exc:
            raise InputError("before", "'limit' and 'before' must be integers") from exc
        found = await self.store.query(
            state=filters["state"] or None,
            recipient=filters["recipient"].lstrip("+ ") or None,
            route=filters["route"] or None,
            source=filters["source"] or None,
            text=filters["q"] or None,
            before_id=before,
            limit=limit + 1,  # one more tells whether there is an older page
        )
        page, more = found[:limit], len(found) > limit
        kept = {k: v for k, v in filters.items() if v}
        older = urlencode({**kept, "before": page[-1].id}) if more and page else None
        config = self.live.current
        return "messages.html", {
            "filters": filters,
            "states": [str(s) for s in State],
            "routes": sorted(config.routes),
            "sources": ["http", "hook", "smtp", "console", "digest", "budget"],
            "messages": [m.to_json() for m in page],
            "older": f"?{older}" if older else None,
            "newest": f"?{urlencode(kept)}" if before else None,
        }

    async def message(self, request: Request, caller: Caller) -> tuple[str, dict[str, Any]]:
        message_id = request.path_params["message_id"]
        message = await self.store.get(message_id)
        if message is None:
            raise Refused(404, f"no message {message_id}")
        data = message.to_json()
        data["encoding"] = encoding_name(message.message_type)
        data["parts_text"] = split_parts(message.text)
        data["events"] = [
            {**e, "at": iso_time(e["at"]), "epoch": e["at"]}
            for e in await self.store.events(message.id)
        ]
        data["can_retry"] = message.state == State.FAILED
        data["can_cancel"] = message.state in (State.QUEUED, State.HELD)
        return "message.html", data

    async def route_list(self, request: Request, caller: Caller) -> tuple[str, dict[str, Any]]:
        config = self.live.current
        stored = await self.store.route_last_messages()
        base = str(request.base_url).rstrip("/")
        routes = []
        for name, route in sorted(config.routes.items()):
            call = self.activity.last.get(name)
            routes.append(
                {
                    "name": name,
                    "url": f"{base}/hooks/{name}",
                    "format": route.format,
                    "to": list(route.to),
                    "authentication": authentication(route),
                    "last_call": None if call is None else dataclasses.asdict(call),
                    "last_message": stored.get(name),
                }
            )
        return "routes.html", {
            "routes": routes,
            "postfix": postfix_snippet(config),
            "smtp_domains": list(config.smtp.domains),
        }

    def _route(self, name: str) -> Any:
        route = self.live.current.routes.get(name)
        if route is None:
            raise Refused(404, f"no route named {name!r}")
        return route

    async def route_page(
        self, request: Request, caller: Caller, result: Any = None
    ) -> tuple[str, dict[str, Any]]:
        name = request.path_params["name"]
        route = self._route(name)
        listing = (await self.route_list(request, caller))[1]
        [entry] = [r for r in listing["routes"] if r["name"] == name]
        entry["snippets"] = [{"title": t, "text": s} for t, s in snippets(route, entry["url"])]
        entry["sample"] = sample_payload(route)
        entry["event_header"] = {"github": "X-GitHub-Event", "gitlab": "X-Gitlab-Event"}.get(
            route.format
        )
        entry["preview"] = result
        return "route.html", entry

    async def route_preview(
        self, request: Request, caller: Caller, form: dict[str, str]
    ) -> Response:
        route = self._route(request.path_params["name"])
        payload = sample_payload(route) if "sample" in form else form.get("payload", "")
        result = preview(
            route,
            payload,
            event=form.get("event", "").strip(),
            config=self.live.current,
            ingestor=self.ingestor,
        )
        _, data = await self.route_page(request, caller, result)
        return self._render(request, caller, "route.html", data)

    # -- actions (admin) ---------------------------------------------------------------
    async def retry(self, request: Request, caller: Caller, form: dict[str, str]) -> Response:
        message_id = request.path_params["message_id"]
        done = await self.store.retry([message_id], self.clock.now(), by=caller.principal.name)
        if not done:
            return await self._not_now(request, message_id, "only a failed message can be retried")
        self.wake()
        log.info("console: %s retried message %d", caller.principal.name, message_id)
        return self._back(
            caller, f"/ui/messages/{message_id}", f"Message {message_id} queued again."
        )

    async def cancel(self, request: Request, caller: Caller, form: dict[str, str]) -> Response:
        message_id = request.path_params["message_id"]
        done = await self.store.cancel([message_id], self.clock.now(), by=caller.principal.name)
        if not done:
            return await self._not_now(
                request, message_id, "only a queued or held message can be cancelled"
            )
        log.info("console: %s cancelled message %d", caller.principal.name, message_id)
        return self._back(caller, f"/ui/messages/{message_id}", f"Message {message_id} cancelled.")

    async def _not_now(self, request: Request, message_id: int, why: str) -> Response:
        message = await self.store.get(message_id)
        if message is None:
            return self._error(request, 404, f"no message {message_id}", as_json=False)
        return self._error(
            request, 409, f"message {message_id} is {message.state}: {why}", as_json=False
        )

    async def send_form(self, request: Request, caller: Caller) -> tuple[str, dict[str, Any]]:
        return "send.html", {
            "to": "",
            "text": "Test from the sms-bridge console",
            "error": None,
            "groups": sorted(self.live.current.groups),
        }

    async def send(self, request: Request, caller: Caller, form: dict[str, str]) -> Response:
        config = self.live.current
        to, text = form.get("to", "").strip(), form.get("text", "").strip()
        data = {"to": to, "text": text, "error": None, "groups": sorted(config.groups)}
        try:
            if not to:
                raise InputError("to", "a phone number or a group name is needed")
            if not text or len(text) > MAX_TEST_TEXT:
                raise InputError("text", f"the text must be 1 to {MAX_TEST_TEXT} characters")
            recipients = resolve_recipients(
                [t.strip() for t in to.split(",") if t.strip()],
                config.groups,
                default_region=config.phone.default_region or None,
                require_valid=config.phone.require_valid,
            )
        except InputError as exc:
            data["error"] = str(exc)
            return self._render(request, caller, "send.html", data, 400)
        accepted = await self.ingestor.submit(
            [
                Draft(
                    recipients=recipients,
                    text=text,
                    source="console",
                    sender_id=config.provider.sender_id,
                    # A test is meant to go, even when the same test went a minute ago.
                    dedupe_key=f"console-test:{secrets.token_hex(8)}",
                )
            ]
        )
        ids = [a.id for a in accepted]
        await self.store.note(
            ids, f"test message sent from the console by {caller.principal.name}", self.clock.now()
        )
        log.info("console: %s sent a test message to %s", caller.principal.name, recipients)
        count = len(ids)
        return self._back(
            caller,
            f"/ui/messages/{ids[0]}" if count == 1 else "/ui/messages?source=console",
            f"Test message stored for {count} recipient{'s' if count != 1 else ''}.",
        )

    # -- the routes --------------------------------------------------------------------
    def routes(self) -> list[BaseRoute]:
        def both(path: str, scope: str, handler: Any) -> list[Route]:
            html, as_json = self.page(scope, handler)
            json_path = path.rstrip("/") + (".json" if path != "/" else "/overview.json")
            # JSON first: "/routes/{name}" would also match "/routes/x.json".
            return [
                Route(json_path, as_json, methods=["GET"]),
                Route(path, html, methods=["GET"]),
            ]

        async def to_slash(request: Request) -> Response:
            return RedirectResponse("/ui/", 308)

        inner: list[BaseRoute] = [
            *both("/", "read", self.overview),
            *both("/messages", "read", self.messages),
            *both("/messages/{message_id:int}", "read", self.message),
            *both("/routes", "read", self.route_list),
            *both("/routes/{name}", "read", self.route_page),
            Route("/send", self.page("admin", self.send_form)[0], methods=["GET"]),
            Route("/send", self.action("admin", self.send), methods=["POST"]),
            Route(
                "/messages/{message_id:int}/retry",
                self.action("admin", self.retry),
                methods=["POST"],
            ),
            Route(
                "/messages/{message_id:int}/cancel",
                self.action("admin", self.cancel),
                methods=["POST"],
            ),
            Route(
                "/routes/{name}/preview",
                self.action("read", self.route_preview),
                methods=["POST"],
            ),
            Route("/signin", self.signin_form, methods=["GET"]),
            Route("/signin", self.signin, methods=["POST"]),
            Route("/signout", self.action("read", self.signout), methods=["POST"]),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ]
        return [
            Route("/ui", to_slash, methods=["GET"]),
            Mount("/ui", app=SecureHeaders(Router(routes=inner))),
        ]


def _client(request: Request) -> str:
    return request.client.host if request.client else "?"
