"""Console sessions: a signed-in API token becomes a random session id in a cookie.

The cookie holds neither the token nor anything derived from it: only a random id
(256 bits) that names a server-side record in this process's memory. The record keeps
the token's name, a keyed digest of the token (HMAC with a per-process random key, so a
token rotated or removed by a reload ends its sessions at the next request), the expiry
and the CSRF token. Sign-out deletes the record, so a copied cookie dies with it; a
restart signs everyone out, which is the price of keeping no secret on disk.

Every visitor gets a session before signing in (an anonymous one: no token name), so the
sign-in form carries a CSRF token like every other form; signing in replaces the session
id (no fixation). On a bridge with no tokens the session is open from the start, as the
API is, and still carries a CSRF token: a loopback bridge is reachable from any page the
operator's browser opens.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field

from bridge.config import TokenConfig
from bridge.ingress.http.auth import ANONYMOUS, Principal, principal_of

COOKIE = "sms_bridge_session"
LIFETIME = 12 * 3600.0  # signed in: one on-call shift
VISITOR_LIFETIME = 3600.0  # a sign-in form left open this long asks again
MAX_SESSIONS = 10_000  # visitors cost memory: beyond this the oldest are forgotten


@dataclass(slots=True)
class Session:
    csrf: str
    expires: float
    token_name: str | None = None  # None: a visitor who has not signed in
    token_digest: bytes = b""
    open: bool = False  # created on a bridge without tokens
    # (path, note): said once, by the page an action sent the browser to (Gate._render)
    flash: list[tuple[str, str]] = field(default_factory=list)


class Sessions:
    """The live sessions of this process, keyed by a digest of their id."""

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)
        self._sessions: dict[bytes, Session] = {}

    def _id_key(self, session_id: str) -> bytes:
        return hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).digest()

    def _token_digest(self, token: str) -> bytes:
        return hmac.new(self._key, token.encode("utf-8", "surrogatepass"), "sha256").digest()

    def get(self, session_id: str | None, now: float) -> Session | None:
        if not session_id:
            return None
        session = self._sessions.get(self._id_key(session_id))
        if session is not None and session.expires <= now:
            self.drop(session_id)
            return None
        return session

    def create(
        self, now: float, *, token: TokenConfig | None = None, open_: bool = False
    ) -> tuple[str, Session]:
        """A new session id and its record: a visitor, signed in as `token`, or open."""
        self._make_room(now)
        session_id = secrets.token_urlsafe(32)
        signed_in = token is not None or open_
        session = Session(
            csrf=secrets.token_urlsafe(32),
            expires=now + (LIFETIME if signed_in else VISITOR_LIFETIME),
            token_name=token.name if token is not None else None,
            token_digest=self._token_digest(token.token) if token is not None else b"",
            open=open_,
        )
        self._sessions[self._id_key(session_id)] = session
        return session_id, session

    def drop(self, session_id: str | None) -> None:
        if session_id:
            self._sessions.pop(self._id_key(session_id), None)

    def principal(self, session: Session, tokens: Mapping[str, TokenConfig]) -> Principal | None:
        """Who the session speaks for under the tokens in force now; None: nobody."""
        if session.open:
            return ANONYMOUS if not tokens else None  # tokens added by a reload end it
        if session.token_name is None:
            return None
        spec = tokens.get(session.token_name)
        if spec is None or not hmac.compare_digest(
            self._token_digest(spec.token), session.token_digest
        ):
            return None  # removed or rotated since sign-in
        return principal_of(spec)

    def _make_room(self, now: float) -> None:
        if len(self._sessions) < MAX_SESSIONS:
            return
        for key in [k for k, s in self._sessions.items() if s.expires <= now]:
            del self._sessions[key]
        if len(self._sessions) >= MAX_SESSIONS:
            # Visitors first (anyone can make them), then the oldest; dicts keep order.
            visitors = [k for k, s in self._sessions.items() if s.token_name is None]
            for key in (visitors or list(self._sessions))[: max(1, MAX_SESSIONS // 10)]:
                del self._sessions[key]

    def __len__(self) -> int:
        return len(self._sessions)
