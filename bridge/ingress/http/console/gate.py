"""How the console lets people in: sign-in, sessions, scopes, CSRF and headers.

Looking needs `read`, acting (retry, cancel, test message) needs `admin`. A browser signs
in with an API token once and then carries a session cookie (`bridge.ingress.http.console.sessions`);
a script may instead send `Authorization: Bearer TOKEN` to the `.json` pages. On a bridge
with no tokens the console is open, as the API is. Every POST needs the session's CSRF
token and, when the browser sends one, an Origin equal to the console's own; the cookie
is HttpOnly, SameSite=Strict, Secure over TLS. Every answer carries a strict
Content-Security-Policy: no inline script or style, nothing from another origin.

`Gate` also renders: a page handler returns (template, data), and the gate answers HTML
or, for the `.json` twin of the page, the same data as JSON.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup, escape
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bridge.addresses import client_name
from bridge.clock import Clock
from bridge.config import LiveConfig
from bridge.config.masking import mask
from bridge.errors import HttpError, InputError, StoreUnavailable, Unavailable
from bridge.ingress.credentials import same_secret
from bridge.ingress.http.auth import (
    ANONYMOUS,
    AuthError,
    Principal,
    acting_name,
    authorize,
    identify,
)
from bridge.ingress.http.bodies import error_response, read_bounded
from bridge.ingress.http.console.routes import encoding_name
from bridge.ingress.http.console.sessions import COOKIE, LIFETIME, Session, Sessions
from bridge.ingress.http.lockout import locked_for, vouch
from bridge.models import iso_time

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
MAX_FORM_BYTES = 512 * 1024  # a pasted webhook payload fits
# The sign-in form takes anyone's post: a token, the CSRF token and the page to go back
# to. A form is parsed on the event loop, before its CSRF token can be checked: 512 KB
# of `a=1&` (131,000 fields) held it 0.8 s, and eight such posts at once kept /healthz
# (and every webhook, API call and mail) waiting 5 s.
SIGNIN_FORM_BYTES = 16 * 1024
MAX_FORM_FIELDS = 20  # every form here has fewer; more are refused before any is parsed
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


MAX_NOTES = 20  # actions' notes a session keeps for pages not visited yet
# Sent by console.js when it refreshes a page's live part in place: not a visit.
REFRESH_HEADER = "x-console-refresh"
# `/ui/signin?another`: the form, even to someone signed in (to switch tokens).
ANOTHER = "another"
# Someone on the sign-in page: no scope, no navigation.
VISITOR = Principal("visitor", frozenset())


class Refused(Exception):
    """Stop handling and answer this instead (a redirect, an error page)."""

    def __init__(
        self, status: int, message: str, location: str | None = None, *, field: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.location = location
        self.field = field  # what the `.json` answer names, as the API's errors do


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


class SlashlessPosts:
    """A POST under `/ui/` to `path/` is served as `path`, as the API serves its POSTs
    (`app.posted`). The router answered it with a 307 to `path`: curl without `-L`
    stopped there (the cancel was not done, and nothing said so), and a client that
    follows it may resend as a GET. Only POSTs: a GET's redirect is the browser's way
    to the page, and a page's links never end in a slash but the overview's."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path: str = scope["path"]
            if path.endswith("/") and path != scope.get("root_path", "") + "/":
                scope = {**scope, "path": path[:-1]}
        await self.app(scope, receive, send)


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


# The bridge's own words naming another message (bridge.policy.decide's duplicates,
# bridge.delivery.digests' folding), at the start of a reason: a "message 42" further
# on may be someone else's (a loop's reason quotes the mail's Auto-Submitted value).
_MESSAGE_REF = re.compile(r"^((?:duplicate of|storm control: folded into digest) )message (\d+)\b")


def _link_messages(text: str | None) -> Markup:
    """Escape `text`, then make the message it says it is about a link to that message."""
    escaped = str(escape(text or ""))
    return Markup(
        _MESSAGE_REF.sub(
            lambda m: f'{m[1]}<a href="/ui/messages/{m[2]}">message {m[2]}</a>', escaped
        )
    )


def _is_time(key: str) -> bool:
    """Whether view data under `key` is a time in epoch seconds: `at`, or ending `_at`."""
    return key == "at" or key.endswith("_at")


def _jsonable(value: Any) -> Any:
    """Times as the API writes them (`iso_time`: ISO 8601, UTC, milliseconds): keys
    `at` and ending in `_at` hold epoch seconds in the view data."""
    if isinstance(value, dict):
        return {
            k: iso_time(v) if _is_time(k) and isinstance(v, int | float) else _jsonable(v)
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


class Gate:
    """Sessions, scopes, CSRF and rendering; the pages build on it (`Console`)."""

    def __init__(self, *, live: LiveConfig, clock: Clock) -> None:
        self.live = live
        self.clock = clock
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
            vouch(request.scope, request.headers["authorization"])
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

    def _who(self, request: Request, caller: Caller) -> str:
        """Who acts, for a change's reason and event (`auth.acting_name`)."""
        host = request.client.host if request.client else None
        return acting_name(caller.principal, "the console", host)

    async def _form(
        self, request: Request, caller: Caller, max_bytes: int = MAX_FORM_BYTES
    ) -> dict[str, str]:
        """The posted form, once its CSRF token and origin are checked."""
        origin = request.headers.get("origin")
        own = f"{request.url.scheme}://{request.url.netloc}"
        if origin is not None and origin != own:
            raise Refused(403, f"a form from {origin} may not act here")
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/x-www-form-urlencoded":
            raise Refused(415, "expected a form (application/x-www-form-urlencoded)")
        # Bounded in time as the API's bodies are: the sign-in form takes anyone's post,
        # and a body trickled for ever would hold a place under http.max_concurrency.
        try:
            body = await read_bounded(request, max_bytes)
        except HttpError as exc:
            raise Refused(exc.status, exc.message) from exc
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise Refused(400, "the form is not valid UTF-8 form data") from exc
        try:
            fields = parse_qs(text, keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS)
        except ValueError as exc:  # counted before any is parsed
            raise Refused(400, f"the form has more than {MAX_FORM_FIELDS} fields") from exc
        form = {k: v[0] for k, v in fields.items()}
        expected = caller.session.csrf if caller.session is not None else ""
        if not expected or not same_secret(form.get("csrf", ""), expected):
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
        flash: list[str] = []
        if session is not None and REFRESH_HEADER not in request.headers:
            # Only the page the action went back to says its note: another tab's page,
            # or a page's own refresh (which replaces only its live part, not the note's
            # place), took the note before the browser got there, and it was never seen.
            path = request.url.path
            flash = [note for where, note in session.flash if where == path]
            session.flash = [(where, note) for where, note in session.flash if where != path]
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

    def _shown(self, text: str) -> str:
        """`text` as a console page may show it: an exception's words may quote what a
        store or a provider said, our secrets included, so they are masked as in the log
        and in the other HTTP answers."""
        return mask(text, self.live.secrets)

    def _error(
        self,
        request: Request,
        status: int,
        message: str,
        *,
        as_json: bool,
        field: str | None = None,
    ) -> Response:
        """The error page, or for a `.json` page the API's error answer (`field` too)."""
        message = self._shown(message)
        if as_json:
            return error_response(status, message, field)
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
            return self._error(request, exc.status, exc.message, as_json=as_json, field=exc.field)
        except AuthError as exc:
            return self._error(request, exc.status, exc.message, as_json=as_json)
        except HttpError as exc:  # a list's filter, read as the API reads it
            return self._error(request, exc.status, exc.message, as_json=as_json, field=exc.field)
        except InputError as exc:  # "FIELD: what is wrong", as the API's logs word it
            return self._error(request, 400, str(exc), as_json=as_json, field=exc.field)
        except StoreUnavailable as exc:
            return self._error(request, 503, f"the store cannot answer: {exc}", as_json=as_json)
        except Unavailable as exc:
            return self._error(request, 503, str(exc), as_json=as_json)
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
            except Unavailable as exc:  # the store, or the phone metadata on a recipient
                return self._error(request, 503, f"not done, retry: {exc}", as_json=False)

        return endpoint

    def _back(self, caller: Caller, location: str, note: str) -> Response:
        if caller.session is not None:
            # Bounded: a note whose page is never visited (a tab closed) waits for it.
            kept = caller.session.flash[-(MAX_NOTES - 1) :]
            caller.session.flash = [*kept, (location.split("?")[0], note)]
        return RedirectResponse(location, 303)

    # -- sign-in -------------------------------------------------------------------------
    async def signin_form(self, request: Request) -> Response:
        if not self.live.current.tokens:
            return RedirectResponse("/ui/", 303)
        now = self.clock.now()
        target = _safe_next(request.query_params.get("next"))
        signed_in = self.sessions.get(request.cookies.get(COOKIE), now)
        principal = (
            self.sessions.principal(signed_in, self.live.current.tokens) if signed_in else None
        )
        # Already in (a bookmark, a back button, a link from before): the form would
        # only ask for a token again. On to where they were going; not when they ask
        # for the form (an error page's "Sign in with another token": a reader going
        # for the admin's), nor with a token that may no longer read: the page they
        # would be sent to refuses it and links back here.
        if principal and principal.may("read") and ANOTHER not in request.query_params:
            return RedirectResponse(target, 303)
        session = self.sessions.form_session(request.cookies.get(COOKIE), now)
        new_id = None
        if session is None:
            new_id, session = self.sessions.create(now)
        visitor = Caller(VISITOR, session, new_id)
        if wait := locked_for(request.scope):
            return self._locked_out(request, visitor, target, wait)
        data = {"next": target, "error": None}
        response = self._render(request, visitor, "signin.html", data)
        response.headers["x-robots-tag"] = "noindex"
        return response

    def _locked_out(self, request: Request, visitor: Caller, target: str, wait: float) -> Response:
        """The sign-in page while the lockout keeps this address waiting (503, as the
        lockout answers everything else it refuses)."""
        seconds = max(1, math.ceil(wait))
        problem = f"Too many failed logins from this address: try again in {seconds} s."
        data = {"next": target, "error": problem}
        response = self._render(request, visitor, "signin.html", data, 503)
        response.headers["retry-after"] = str(seconds)
        response.headers["x-robots-tag"] = "noindex"
        return response

    async def signin(self, request: Request) -> Response:
        tokens = self.live.current.tokens
        now = self.clock.now()
        old_id = request.cookies.get(COOKIE)
        session = self.sessions.form_session(old_id, now)
        visitor = Caller(VISITOR, session)
        if wait := locked_for(request.scope):  # the token typed is not even read
            return self._locked_out(request, visitor, "/ui/", wait)
        try:
            form = await self._form(request, visitor, SIGNIN_FORM_BYTES)
        except Refused as exc:
            return self._error(request, exc.status, exc.message, as_json=False)
        if wait := locked_for(request.scope):  # locked by others while the form came
            return self._locked_out(request, visitor, "/ui/", wait)
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


def _client(request: Request) -> str:
    return client_name(request.client.host) if request.client else "?"
