"""TLS listeners counted from the moment a connection is accepted, on asyncio's public
API alone: the implicit-TLS SMTP listener (`bridge.ingress.smtptls`) and the HTTPS one
(`bridge.ingress.http.handshake`).

Served by `create_server(ssl=...)`, a listener's protocol (and every limit it keeps) is
made only once a connection's TLS handshake is done: a client that connected and sent
nothing was counted nowhere and held for asyncio's 60 s handshake timeout, as many times
as it liked from one address, each a file descriptor. So a `TlsListener` accepts for
itself (`loop.sock_accept`), asks its `admit` to count the client (past a limit the
socket is closed at once: nothing can be told before TLS), and hands the socket to
`loop.connect_accepted_socket(ssl=..., ssl_handshake_timeout=...)`, which layers TLS
before a byte is read. The protocol takes the count over in its `connection_made`
(`Handshake.release`, idempotent), so a connection is never counted twice.

Layering TLS on a transport a server had made (`loop.start_tls`) came a turn of the
loop after `connection_made`, and uvloop, which starts reading right after that call
whatever the protocol asked, had handed the ClientHello to the protocol before it: the
handshake hung. Layering it in `connection_made` takes asyncio's private `sslproto`,
which changes between Python versions and is not uvloop's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Self

from bridge.addresses import host_of_peer

log = logging.getLogger(__name__)
ACCEPT_RETRY_DELAY = 1.0  # seconds, after the process ran out of file descriptors (as asyncio)


class Handshake:
    """One admitted connection until its TLS handshake is done: `protocol` then serves
    it (`layer` says what it gets). Subclasses count the connection out in `release`,
    which must do so once only: the protocol's `connection_made` calls it as it takes
    the count over, and the handshake's end calls it again."""

    protocol: asyncio.Protocol
    context: ssl.SSLContext
    timeout: float  # seconds the client has for its handshake

    def __init__(self) -> None:
        self.task: asyncio.Task[None] | None = None  # set by the listener

    def layer(self, protocol: asyncio.Protocol, context: ssl.SSLContext, timeout: float) -> Self:
        """`protocol` over TLS with `context`, the handshake done within `timeout` s."""
        self.protocol, self.context, self.timeout = protocol, context, timeout
        return self

    def release(self) -> None:
        raise NotImplementedError

    def cancel(self) -> None:
        """Cut the handshake (the socket is closed); nothing if it is over."""
        if self.task is not None:
            self.task.cancel()

    async def run(self, sock: socket.socket, name: str, host: str) -> None:
        """TLS on `sock`, then `protocol` on it; the count released either way."""
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(
                lambda: self.protocol, sock, ssl=self.context, ssl_handshake_timeout=self.timeout
            )
        except Exception as exc:  # the client went, timed out or spoke no TLS: closed
            log.info("%s TLS handshake from %s failed: %s", name, host, exc or type(exc).__name__)
        finally:  # a stop cancelled it: connect_accepted_socket closed the socket
            self.release()


class TlsListener:
    """Accepts on `sock` until closed; `admit(host)` counts each connection and says what
    serves it (a `Handshake`), or None to close it. `name` is the listener's, for the log."""

    def __init__(
        self, sock: socket.socket, admit: Callable[[str], Handshake | None], name: str
    ) -> None:
        sock.setblocking(False)  # as asyncio's server does: `sock_accept` must never block
        self._sock = sock
        self._admit = admit
        self._name = name
        self._handshakes: set[asyncio.Task[None]] = set()
        self._accepting = asyncio.ensure_future(self._accept())

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, peer = await loop.sock_accept(self._sock)
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue  # the client went before it was accepted
            except OSError as exc:  # out of file descriptors or memory: as asyncio's server
                log.error(
                    "%s: cannot accept (%s); again in %gs", self._name, exc, ACCEPT_RETRY_DELAY
                )
                await asyncio.sleep(ACCEPT_RETRY_DELAY)
                continue
            self._take(sock, host_of_peer(peer))

    def _take(self, sock: socket.socket, host: str) -> None:
        try:
            handshake = self._admit(host)
        except Exception:  # a bug of ours: this connection is lost, not the listener
            log.exception("%s: cannot admit a connection from %s", self._name, host)
            handshake = None
        if handshake is None:  # refused, and said why
            sock.close()
            return
        sock.setblocking(False)
        handshake.task = task = asyncio.ensure_future(handshake.run(sock, self._name, host))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    def close(self) -> None:
        """No new connections; handshakes under way are cut (nothing was said in one)."""
        self._accepting.cancel()
        for task in list(self._handshakes):
            task.cancel()
        with contextlib.suppress(OSError):
            self._sock.close()

    async def wait_closed(self) -> None:
        await asyncio.wait({self._accepting, *self._handshakes})
