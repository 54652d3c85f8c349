"""Online guessing of HTTP credentials, throttled per client (ASGI middleware).

A 401 to a request that presented a credential (an `Authorization` header, a webhook
signature or token header, a console sign-in) counts as a failed guess for its client
(`bridge.ingress.throttle`: an IPv4 address or an IPv6 /64; behind `http.trusted_proxies`
the forwarded client). Past the throttle's limit the client's requests that present a
credential get 503 with `Retry-After` until the lockout ends, right credentials included
(but for those verified from it before, below): answering a right guess differently
would let the guessing go on. 503, not 429, as for overload (the contract): a genuine
sender behind the same address (a NAT, an untrusted proxy) retries a 5xx later and keeps
its alert, where it would drop a 4xx.

A lockout does not stop the genuine senders at the address: a credential the bridge
verified from it before (`vouch`: a token, a route's token or basic auth, GitLab's
token) passes it, when every credential the request carries is one of those
(`FailureThrottle.trust`). A request with a signature over its body (GitHub, Grafana),
or the sign-in form's token, carries nothing that could be vouched for: it waits for the
lockout's end as before (the console's sign-in page, not bare JSON, says so to a browser:
`locked_for`). A request with no credential at all guesses nothing and is not
refused: an open route's sender or the open API's on a loopback install (Alertmanager,
cron), a console page of a signed-in session (its cookie is 256 random bits, not
guessed, and a wrong one is not counted either).

The lockout is asked when a request arrives, and again where a credential is checked
only once the body is in (the sign-in form's token, a GitHub or Grafana signature,
GitLab's token: `locked_for`): a client that sent the headers of 32 guesses at once, then
their bodies, had every one checked and answered before the first 401 was counted.

A 401 to a request with no credential at all (a console page after its session
expired, a probe, a webhook sender not yet given its secret) is not a guess and is not
counted: on a loopback install every local sender shares 127.0.0.1, and one of them
without a credential must not lock the others out. `/healthz` and `/readyz` are never
refused.
"""

from __future__ import annotations

import functools
import logging
import math

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bridge.config import LiveConfig
from bridge.ingress.http.hosts import ALWAYS_SERVED_PATHS
from bridge.ingress.http.limits import refusal_app
from bridge.ingress.throttle import FailureThrottle, QuietLog

log = logging.getLogger(__name__)
# Headers that carry a credential: bearer/basic, GitHub's and GitLab's; each route's
# `signature_header` (Grafana's) is added from the config in force.
STATIC_CREDENTIAL_HEADERS = frozenset({b"authorization", b"x-gitlab-token"})
SIGNATURE_HEADERS = frozenset({b"x-hub-signature-256", b"x-hub-signature"})
CREDENTIAL_HEADERS = STATIC_CREDENTIAL_HEADERS | SIGNATURE_HEADERS
SIGNIN_PATH = "/ui/signin"  # the sign-in form posts a token: a guess, never vouched for
_VOUCHED = "sms_bridge.vouched"  # the request's credentials its handler verified
_LOCKED = "sms_bridge.locked_for"  # a sign-in refused: seconds left, for its page to say
_LOCKED_NOW = "sms_bridge.locked_now"  # the client's lockout as it is when asked (locked_for)


def locked_for(scope: Scope) -> float:
    """Seconds the lockout keeps this request's guess waiting, or 0: asked again where a
    credential is checked only after an await (the sign-in form's token, a signature over
    the body), since another request of the client may have started the lockout in the
    meantime. Without the second look, 32 guesses sent at once (headers first, then
    every body) were all checked and answered 401, where the lockout allows 10. The
    console's sign-in page answers it 503 itself, the token not even read."""
    wait = scope.get(_LOCKED, 0.0)
    if wait:
        return float(wait)
    now: functools.partial[float] | None = scope.get(_LOCKED_NOW)
    return now() if now is not None else 0.0


def locked_answer(wait: float) -> JSONResponse:
    """The 503 a guess gets while its client is locked out (as `AuthLockout` answers)."""
    seconds = max(1, math.ceil(wait))
    return JSONResponse(
        {"error": _locked_message(seconds)}, 503, headers={"retry-after": str(seconds)}
    )


def _locked_message(seconds: int) -> str:
    return f"too many failed logins from this address; retry in {seconds}s"


def vouch(scope: Scope, credential: str) -> None:
    """Tell the lockout that `credential` (a header's value as received) was verified
    for this request: it passes a later lockout of this client."""
    scope.setdefault(_VOUCHED, []).append(credential)


def _signs_in(scope: Scope) -> bool:
    """Whether the request is to the sign-in form's path, or to it with the one trailing
    slash the console serves a POST at as well (`SlashlessPosts`): seen by its exact path
    alone, `POST /ui/signin/` guessed tokens in its body uncounted and past a lockout."""
    return scope.get("path") in (SIGNIN_PATH, SIGNIN_PATH + "/")


def _presents_credential(scope: Scope, credential_headers: frozenset[bytes]) -> bool:
    """`credential_headers`: CREDENTIAL_HEADERS and the routes' signature headers."""
    if _signs_in(scope):
        return True
    return any(name in credential_headers for name, _ in scope["headers"])


@functools.lru_cache(maxsize=16)  # one per config in force
def _signature_headers(names: tuple[str, ...]) -> frozenset[bytes]:
    return frozenset(name.lower().encode("latin-1") for name in names if name)


class AuthLockout:
    """Counts failed guesses per client and refuses locked-out clients."""

    def __init__(self, app: ASGIApp, throttle: FailureThrottle, live: LiveConfig) -> None:
        self.app = app
        self.throttle = throttle
        self.live = live
        self.quiet = QuietLog(log, throttle.clock)
        # The routes' signature headers, alone and with CREDENTIAL_HEADERS, read once
        # for each routes table in force rather than on every request.
        self._for: object = None
        self._signed: frozenset[bytes] = frozenset()
        self._credentials = CREDENTIAL_HEADERS

    def _headers_in_force(self) -> tuple[frozenset[bytes], frozenset[bytes]]:
        routes = self.live.current.routes
        if routes is not self._for:
            signed = _signature_headers(tuple(route.signature_header for route in routes.values()))
            self._for, self._signed, self._credentials = routes, signed, CREDENTIAL_HEADERS | signed
        return self._signed, self._credentials

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in ALWAYS_SERVED_PATHS:
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        host = str(client[0]) if client else ""
        signed, credentials = self._headers_in_force()
        presents = bool(host) and _presents_credential(scope, credentials)
        wait = self.throttle.locked(host) if presents else 0.0
        if wait and not self._vouched_for(host, scope, signed):
            self.quiet.warning(
                "http-locked",
                host,
                "HTTP request from %s refused: locked out after failed logins",
                host,
            )
            if _signs_in(scope):
                # A browser's page: the console's sign-in page says why, not bare JSON.
                scope[_LOCKED] = wait
                await self.app(scope, receive, send)
                return
            await _refuse(scope, receive, send, wait)
            return
        if not presents:  # guesses nothing: passes a lockout (an open route's sender)
            await self.app(scope, receive, send)
            self._remember(host, scope)
            return
        if not wait and not self._vouched_for(host, scope, signed):
            # A guess, maybe: checked after an await, a lockout others start meanwhile
            # must stop it too (locked_for). Credentials verified here before pass.
            scope[_LOCKED_NOW] = functools.partial(self.throttle.locked, host)

        async def watched(message: Message) -> None:
            failed = message["type"] == "http.response.start" and message["status"] == 401
            if failed and self.throttle.failed(host):
                log.warning(
                    "HTTP client %s locked out for %gs: %d failed logins within %gs",
                    host,
                    self.throttle.lockout,
                    self.throttle.max_failures,
                    self.throttle.window,
                )
            await send(message)

        await self.app(scope, receive, watched)
        self._remember(host, scope)

    def _remember(self, host: str, scope: Scope) -> None:
        vouched = scope.get(_VOUCHED)
        if vouched and host:
            self.throttle.trust(host, vouched)

    def _vouched_for(self, host: str, scope: Scope, signed: frozenset[bytes]) -> bool:
        """Whether the request carries only credentials verified from `host` before."""
        if _signs_in(scope):
            return False
        static: list[str] = []
        for name, value in scope["headers"]:
            if name in SIGNATURE_HEADERS or name in signed:
                return False
            if name in STATIC_CREDENTIAL_HEADERS:
                static.append(value.decode("latin-1"))
        return self.throttle.trusted(host, static)


async def _refuse(scope: Scope, receive: Receive, send: Send, wait: float) -> None:
    seconds = max(1, math.ceil(wait))
    retry_after = ((b"retry-after", str(seconds).encode()),)
    await refusal_app(503, _locked_message(seconds), retry_after)(scope, receive, send)
