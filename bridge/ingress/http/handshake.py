"""HTTPS connections counted and timed from the moment they are accepted.

With `http.tls_cert`, uvicorn handed its TLS context to asyncio's `create_server`, which
makes the HTTP protocol only once a connection's TLS handshake is done. Until then no
limit of `bridge.ingress.http.limits` saw it: not `http.max_connections_per_client`, not
`http.header_timeout`. A client that connected and sent nothing was held for asyncio's
own 60 s handshake timeout, as many times as it liked from one address: measured, 300
silent connections from one client (at a cap of 8) were all held past the header
timeout, each a file descriptor. Under systemd's default limit of 1,024 descriptors a
few hundred of those a minute left the bridge unable to accept an alert, a mail, or a
connection to the provider.

`TlsGate` is the protocol the listener makes instead: it counts the connection in the
client's `per_client` at once (past the cap the socket is closed: no 503 can be told
before TLS), bounds the handshake by `http.header_timeout`, and layers TLS as asyncio's
server does (in `connection_made`, so no byte of the ClientHello reaches anything else).
Once the handshake is done, the HTTP protocol takes the count over (`handed_over`), as
the SMTP implicit-TLS listener's gate does (`bridge.ingress.smtplimits.TlsGate`).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from asyncio import sslproto
from typing import Any, ClassVar

from bridge.addresses import transport_host
from bridge.ingress.http.limits import LimitedHttpProtocol

log = logging.getLogger(__name__)


class TlsGate(asyncio.Protocol):
    """A connection to the HTTPS listener until its TLS handshake is done; `inner` (the
    HTTP protocol) and `context` are set per server (`tls_gate`). uvicorn makes one per
    connection with the HTTP protocol's own arguments, which are handed on."""

    inner: ClassVar[type[LimitedHttpProtocol]]
    context: ClassVar[ssl.SSLContext]

    def __init__(self, **arguments: Any) -> None:
        self._arguments = arguments
        self._counted_as: str | None = None  # its key in `inner.per_client` while counted

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        limits = self.inner.live.current.http
        self._counted_as, refusal = self.inner.admit(transport_host(transport), limits)
        if refusal is not None:
            transport.close()
            return
        loop = asyncio.get_running_loop()
        protocol = self.inner(**self._arguments)
        protocol.handed_over = self._release
        handshake = loop.create_future()
        handshake.add_done_callback(self._handshake_done)
        tls = sslproto.SSLProtocol(
            loop,
            protocol,
            self.context,
            handshake,
            server_side=True,
            # seconds (above 0, validated); typeshed says int, asyncio takes a float
            ssl_handshake_timeout=limits.header_timeout,  # type: ignore[arg-type]
        )
        transport.set_protocol(tls)
        tls.connection_made(transport)

    def _handshake_done(self, handshake: asyncio.Future[None]) -> None:
        exc = None if handshake.cancelled() else handshake.exception()
        if exc is not None:  # the client went, was too slow, or spoke no TLS: closed
            log.debug("HTTPS handshake failed: %s", exc)
        self._release()

    def _release(self) -> None:
        if self._counted_as is not None:
            self.inner.release(self._counted_as)
            self._counted_as = None

    def connection_lost(self, exc: Exception | None) -> None:  # refused: never handed on
        self._release()


def tls_gate(inner: type[LimitedHttpProtocol], context: ssl.SSLContext) -> type[TlsGate]:
    """The protocol class for one HTTPS server: `inner` behind TLS with `context`."""
    return type("TlsGate", (TlsGate,), {"inner": inner, "context": context})
