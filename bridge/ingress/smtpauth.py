"""SMTP AUTH against `[smtp.users]`: constant-time comparison, failures throttled per
client (`bridge.ingress.throttle`), and logged without ever naming a password."""

from __future__ import annotations

import hmac
import logging
import math
import secrets
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from bridge.ingress.credentials import digest, same_secret
from bridge.ingress.throttle import FailureThrottle, QuietLog

log = logging.getLogger("bridge.ingress.smtp")  # where operators have always looked


def fingerprint(login: bytes, password: bytes) -> bytes:
    """The SHA-256 of a login and its password: what a session keeps of the credential
    it logged in with, so that a reload that changed the password is seen at its next
    MAIL or DATA (`Authenticator.still_valid`). Never the password itself."""
    return digest(login + b"\0" + password)


def peer_host(session: Session) -> str:
    """The client's address (aiosmtpd keeps the socket's peername tuple in `peer`)."""
    peer: Any = session.peer
    return str(peer[0]) if isinstance(peer, tuple | list) and peer else str(peer or "")


class Authenticator:
    """aiosmtpd authenticator over `[smtp.users]`, compared in constant time, with
    failures throttled per client (`FailureThrottle`): a locked-out client gets 454 for
    every attempt, right or wrong, unchecked, except a login and password that already
    succeeded from it (a UPS at the address of a guesser: the same NAT, or 127.0.0.1 on
    a loopback install, must keep sending its alerts). A login is named in the log only
    when it is a configured user (a password typed into the login field must not be
    logged), and failures at most once a minute per client."""

    def __init__(self, users: dict[str, str], throttle: FailureThrottle) -> None:
        self.users = {k.encode(): v.encode() for k, v in users.items()}
        self.fingerprints = {login: fingerprint(login, pw) for login, pw in self.users.items()}
        # What an unknown login's password is compared with: a password no one has.
        self.nobody = secrets.token_urlsafe(24).encode()
        self.throttle = throttle
        self.quiet = QuietLog(log, throttle.clock)

    def __call__(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        host = peer_host(session)
        # Its fingerprint only (FailureThrottle.trust): the login and password as sent.
        credential = (auth_data.login + b"\0" + auth_data.password).decode(errors="surrogateescape")
        wait = self.throttle.locked(host)
        if wait and not self.throttle.trusted(host, [credential]):
            self.quiet.warning("smtp-locked", host, "SMTP AUTH from %s refused: locked out", host)
            return AuthResult(
                success=False,
                handled=False,
                message=f"454 4.7.0 Too many failed logins from {host}; "
                f"try again in {math.ceil(wait)}s",
            )
        expected = self.users.get(auth_data.login)
        # An unknown login is compared too (the same work): answering it sooner would
        # tell a guesser which logins exist.
        matched = same_secret(auth_data.password, self.nobody if expected is None else expected)
        ok = matched and expected is not None
        if ok:  # passes a later lockout of this client: a guesser there cannot stop it
            self.throttle.trust(host, [credential])
        else:
            who = auth_data.login.decode(errors="replace") if expected else "an unknown login"
            if self.throttle.failed(host):
                log.warning(
                    "SMTP client %s locked out for %gs after %d failed logins",
                    host,
                    self.throttle.lockout,
                    self.throttle.max_failures,
                )
            self.quiet.warning("smtp-auth", host, "SMTP AUTH failed for %s from %s", who, host)
        # The login rides on the session (`auth_data`): what the user may text, its
        # dedupe scope and the name its messages are stored under are read from it.
        # Not the password: its fingerprint only, for `still_valid` after a reload.
        who_logged_in = (
            LoginPassword(auth_data.login, fingerprint(auth_data.login, auth_data.password))
            if ok
            else None
        )
        return AuthResult(success=ok, handled=False, auth_data=who_logged_in)

    def still_valid(self, auth_data: Any) -> bool:
        """Whether a session's `auth_data` (as `__call__` left it: the login and the
        fingerprint of what it logged in with) still logs in under these `users`: a
        reload that removed the login or changed its password ends what a session
        opened before may send (the Authenticator in force at its AUTH let it in)."""
        if not isinstance(auth_data, LoginPassword):
            return False
        expected = self.fingerprints.get(auth_data.login)
        return expected is not None and hmac.compare_digest(expected, auth_data.password)
