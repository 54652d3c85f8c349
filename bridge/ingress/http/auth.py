"""Who is calling: API tokens from `[tokens.NAME]` turned into a principal with scopes.

Pure (no I/O), so every face of the bridge (the JSON API, `/metrics`, the console) asks
the same question the same way. With no token configured the bridge is open, as on a
loopback install; protected mode (config validation) refuses to serve a non-loopback
listener in that state with a real provider. Once one token exists, every caller must
present one.

Comparisons are over SHA-256 digests (`bridge.ingress.credentials`) against every configured
token, so neither the position of the first wrong byte nor which token matched (nor the
length of the secret) shows in the answer time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from bridge.addresses import client_name
from bridge.config import TokenConfig
from bridge.ingress.credentials import same_secret

# `admin` may do everything; `read` also covers the metrics a scraper needs.
_IMPLIED = {
    "admin": frozenset({"admin", "read", "send", "metrics"}),
    "read": frozenset({"read", "metrics"}),
    "send": frozenset({"send"}),
    "metrics": frozenset({"metrics"}),
}


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller: a token's name and what it may do. `name` goes into the event log."""

    name: str
    scopes: frozenset[str]

    def may(self, scope: str) -> bool:
        return scope in self.scopes


# The caller of a bridge that has no tokens at all (open, loopback by protected mode).
ANONYMOUS = Principal("anonymous", _IMPLIED["admin"])


def token_name(principal: Principal) -> str | None:
    """The `[tokens.NAME]` a caller used, stored with what it sends (its daily cap counts
    it); None for the open bridge's anonymous caller."""
    return None if principal is ANONYMOUS else principal.name


def acting_name(principal: Principal, face: str, client: str | None) -> str:
    """Who made a change, as its reason and event record it: the token's name; on a
    bridge with no tokens, which face (`face`: "the console", "the API") and which
    client it came from. "cancelled by anonymous" left an operator asking who, and from
    where: the client is what the checks saw (a trusted proxy's X-Forwarded-For read)."""
    if principal is not ANONYMOUS:
        return principal.name
    where = f", from {client_name(client)}" if client else ""
    return f"{face} (no tokens configured){where}"


class AuthError(Exception):
    """401 (`status`) for no or a wrong token, 403 for a token without the scope."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _expand(scopes: tuple[str, ...]) -> frozenset[str]:
    return frozenset().union(*(_IMPLIED.get(s, frozenset()) for s in scopes))


def principal_of(spec: TokenConfig) -> Principal:
    """The principal a configured token stands for."""
    return Principal(spec.name, _expand(spec.scopes))


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` header, else None."""
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    value = value.strip()
    return value if scheme.lower() == "bearer" and value else None


def identify(tokens: Mapping[str, TokenConfig], presented: str | None) -> Principal | None:
    """The principal whose token is `presented`; ANONYMOUS when no token is configured."""
    if not tokens:
        return ANONYMOUS
    if presented is None:
        return None
    found: Principal | None = None
    for spec in tokens.values():  # every token compared: the time does not tell which
        if same_secret(presented, spec.token) and found is None:
            found = Principal(spec.name, _expand(spec.scopes))
    return found


def authorize(
    tokens: Mapping[str, TokenConfig], authorization: str | None, scope: str
) -> Principal:
    """The caller if it may use `scope`; AuthError (401 or 403, with why) otherwise."""
    presented = bearer_token(authorization)
    principal = identify(tokens, presented)
    if principal is None:
        why = "missing bearer token" if presented is None else "wrong bearer token"
        raise AuthError(401, f"{why}: send 'Authorization: Bearer TOKEN' (a [tokens.*] entry)")
    if not principal.may(scope):
        raise AuthError(403, f"token {principal.name!r} lacks the {scope!r} scope")
    return principal
