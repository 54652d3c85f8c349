"""The implicit-TLS SMTP listener (port 465 style), counted from accept.

Each connection is counted in `Sessions` the moment it is accepted, before its TLS
handshake: served by `create_server(ssl=...)` (as aiosmtpd's own implicit TLS is), a
session was counted only once its handshake was done, so connections that never began
one were not counted at all, each held up to the 60 s handshake timeout: anyone could
hold every file descriptor of the bridge (its SMTP and HTTP listeners then took no one)
while `smtp.max_sessions` read 0. Past a limit the socket is closed at once: a 421
cannot be told before TLS. The accepting and the TLS are `bridge.ingress.tlsaccept`'s,
shared with the HTTPS listener.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Callable
from typing import Protocol

from bridge.ingress.smtplimits import LimitedSMTP, Sessions
from bridge.ingress.tlsaccept import Handshake, TlsListener

log = logging.getLogger(__name__)
HANDSHAKE_TIMEOUT = 60.0  # seconds a client has for its TLS handshake (asyncio's default)


class Listener(Protocol):
    """What serves an SMTP port: an `asyncio.Server`, or an `ImplicitTlsListener`."""

    def close(self) -> None: ...

    async def wait_closed(self) -> None: ...


class TlsGate(Handshake):
    """One accepted connection until its handshake is done: counted in `Sessions` (it is
    what `Sessions.shut_down` ends), then handed to its SMTP session, which counts itself."""

    def __init__(self, sessions: Sessions, host: str) -> None:
        super().__init__()
        self._sessions = sessions
        self._host: str | None = host  # counted in `sessions` while set

    def admit(self) -> str | None:
        refusal = self._sessions.admit(self, self._host or "")
        if refusal is not None:
            self._host = None
        return refusal

    def release(self) -> None:
        if self._host is not None:
            self._sessions.release(self, self._host)
            self._host = None

    def end_after_mail(self, reply: str, *, from_mail: bool = True) -> None:
        self.end_now(reply)  # no mail before TLS

    def end_now(self, reply: str) -> None:
        self.cancel()


class ImplicitTlsListener(TlsListener):
    """Accepts on `sock` until closed; each connection gets `session()` over TLS with
    `context()`, the certificate in force when it comes (a reload renews it)."""

    def __init__(
        self,
        sock: socket.socket,
        sessions: Sessions,
        session: Callable[[], LimitedSMTP],
        context: Callable[[], ssl.SSLContext],
    ) -> None:
        self._sessions = sessions
        self._session = session
        self._context = context
        super().__init__(sock, self._gate, "SMTP")

    def _gate(self, host: str) -> TlsGate | None:
        gate = TlsGate(self._sessions, host)
        refusal = gate.admit()
        if refusal is not None:
            log.warning("SMTP TLS connection from %s refused: %s", host, refusal)
            return None
        session = self._session()
        session.handed_over = gate.release  # its connection_made: the session counts
        return gate.layer(session, self._context(), HANDSHAKE_TIMEOUT)
