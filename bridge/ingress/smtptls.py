"""The implicit-TLS SMTP listener (port 465 style), on asyncio's public API alone.

Each connection is counted in `Sessions` the moment it is accepted, before its TLS
handshake: served by `create_server(ssl=...)` (as aiosmtpd's own implicit TLS is), a
session was counted only once its handshake was done, so connections that never began
one were not counted at all, each held up to the 60 s handshake timeout: anyone could
hold every file descriptor of the bridge (its SMTP and HTTP listeners then took no one)
while `smtp.max_sessions` read 0. Past a limit the socket is closed at once: a 421
cannot be told before TLS.

So this listener accepts for itself (`loop.sock_accept`), counts, and hands the socket
to `loop.connect_accepted_socket(ssl=...)`, which layers TLS before a byte is read.
Layering it on a transport the server had made (`loop.start_tls`) came a turn of the
loop after `connection_made`, and uvloop, which starts reading right after that call
whatever the protocol asked, had handed the ClientHello to the protocol before it: the
handshake hung. (It was layered with asyncio's private `sslproto` for that reason.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Protocol

from bridge.ingress.smtplimits import LimitedSMTP, Sessions

log = logging.getLogger(__name__)
ACCEPT_RETRY_DELAY = 1.0  # seconds, after the process ran out of file descriptors (as asyncio)
HANDSHAKE_TIMEOUT = 60.0  # seconds a client has for its TLS handshake (asyncio's default)


class Listener(Protocol):
    """What serves an SMTP port: an `asyncio.Server`, or an `ImplicitTlsListener`."""

    def close(self) -> None: ...

    async def wait_closed(self) -> None: ...


class TlsGate:
    """One accepted connection until its handshake is done: counted in `Sessions` (it is
    what `Sessions.shut_down` ends), then handed to its SMTP session, which counts itself."""

    def __init__(self, sessions: Sessions, host: str) -> None:
        self._sessions = sessions
        self._host: str | None = host  # counted in `sessions` while set
        self._handshake: asyncio.Task[None] | None = None

    def admit(self) -> str | None:
        return self._sessions.admit(self, self._host or "")

    async def serve(
        self, sock: socket.socket, session: LimitedSMTP, context: ssl.SSLContext
    ) -> None:
        """TLS on `sock`, then `session` on it; the count released either way."""
        session.handed_over = self._release  # its connection_made: the session counts
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(
                lambda: session, sock, ssl=context, ssl_handshake_timeout=HANDSHAKE_TIMEOUT
            )
        except Exception as exc:  # the client went, timed out or spoke no TLS: closed
            log.info("SMTP TLS handshake from %s failed: %s", self._host, exc)
        finally:  # a stop cancelled it: connect_accepted_socket closed the socket
            self._release()

    def start(
        self, sock: socket.socket, session: LimitedSMTP, context: ssl.SSLContext
    ) -> asyncio.Task[None]:
        self._handshake = asyncio.ensure_future(self.serve(sock, session, context))
        return self._handshake

    def _release(self) -> None:
        if self._host is not None:
            self._sessions.release(self, self._host)
            self._host = None

    def end_after_mail(self, reply: str, *, from_mail: bool = True) -> None:
        self.end_now(reply)  # no mail before TLS

    def end_now(self, reply: str) -> None:
        if self._handshake is not None:
            self._handshake.cancel()


class ImplicitTlsListener:
    """Accepts on `sock` until closed; each connection gets `session()` over TLS with
    `context()`, the certificate in force when it comes (a reload renews it)."""

    def __init__(
        self,
        sock: socket.socket,
        sessions: Sessions,
        session: Callable[[], LimitedSMTP],
        context: Callable[[], ssl.SSLContext],
    ) -> None:
        self._sock = sock
        self._sessions = sessions
        self._session = session
        self._context = context
        self._gates: dict[TlsGate, asyncio.Task[None]] = {}  # in their handshake
        self._accepting = asyncio.ensure_future(self._accept())

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, peer = await loop.sock_accept(self._sock)
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue  # the client went before it was accepted
            except OSError as exc:  # out of file descriptors or memory: as asyncio's server
                log.error("SMTP TLS: cannot accept (%s); again in %gs", exc, ACCEPT_RETRY_DELAY)
                await asyncio.sleep(ACCEPT_RETRY_DELAY)
                continue
            self._take(sock, str(peer[0]) if isinstance(peer, tuple) else str(peer))

    def _take(self, sock: socket.socket, host: str) -> None:
        gate = TlsGate(self._sessions, host)
        refusal = gate.admit()
        if refusal is not None:
            log.warning("SMTP TLS connection from %s refused: %s", host, refusal)
            sock.close()
            return
        sock.setblocking(False)
        self._gates[gate] = task = gate.start(sock, self._session(), self._context())
        task.add_done_callback(lambda _: self._gates.pop(gate, None))

    def close(self) -> None:
        """No new connections; handshakes under way are cut (no mail is in one)."""
        self._accepting.cancel()
        for task in list(self._gates.values()):
            task.cancel()
        with contextlib.suppress(OSError):
            self._sock.close()

    async def wait_closed(self) -> None:
        await asyncio.wait({self._accepting, *self._gates.values()})
