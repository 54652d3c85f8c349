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

`HttpsServer` is uvicorn's server with its listening sockets served by the bridge's
own TLS listener (`bridge.ingress.tlsaccept`, as the implicit-TLS SMTP listener's):
each connection is counted in the client's `per_client` at once (past the cap the socket
is closed: no 503 can be told before TLS), its handshake bounded by
`http.header_timeout`; once the handshake is done the HTTP protocol takes the count
over (`handed_over`). uvicorn is asked to serve no socket of its own (`sockets=[]`):
it still runs the lifespan, the connections' shutdown and its main loop, and makes the
protocol as it would (`config.http_protocol_class` with its server state).
"""

from __future__ import annotations

import socket
import ssl

import uvicorn

from bridge.ingress.http.limits import LimitedHttpProtocol
from bridge.ingress.tlsaccept import Handshake, TlsListener


class HttpsHandshake(Handshake):
    """A connection counted in `per_client` as `key` until the HTTP protocol counts it."""

    def __init__(self, inner: type[LimitedHttpProtocol], key: str | None) -> None:
        super().__init__()
        self._inner = inner
        self._key = key  # its key in `inner.per_client` while counted (None: not counted)

    def release(self) -> None:
        if self._key is not None:
            self._inner.release(self._key)
            self._key = None


class HttpsServer(uvicorn.Server):
    """uvicorn serving HTTP (`inner`, the limited protocol) behind TLS with `context` on
    the sockets `serve` is given, each connection admitted from its first byte."""

    def __init__(
        self, config: uvicorn.Config, inner: type[LimitedHttpProtocol], context: ssl.SSLContext
    ) -> None:
        super().__init__(config)
        self._inner = inner
        self._context = context
        self._listeners: list[TlsListener] = []

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        if sockets is None:  # the bridge binds its sockets itself (a taken port: config error)
            raise ValueError("HttpsServer serves the sockets it is given only")
        await super().startup(sockets=[])  # lifespan and `started`; no socket of uvicorn's
        if not self.started:
            return
        self._listeners = [TlsListener(sock, self._admit, "HTTPS") for sock in sockets]

    def use_context(self, context: ssl.SSLContext) -> None:
        """Handshakes from now on use `context` (a renewed certificate, on SIGHUP); the
        connections made before keep theirs."""
        self._context = context

    def _admit(self, host: str) -> Handshake | None:
        limits = self._inner.live.current.http
        key, refusal = self._inner.admit(host, limits)  # a refusal is logged there
        if refusal is not None:
            return None
        protocol = self._inner(  # as uvicorn's own `create_protocol`
            config=self.config, server_state=self.server_state, app_state=self.lifespan.state
        )
        handshake = HttpsHandshake(self._inner, key)
        protocol.handed_over = handshake.release
        return handshake.layer(protocol, self._context, limits.header_timeout)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for listener in self._listeners:  # no new connection; handshakes under way cut
            listener.close()
        await super().shutdown(sockets=sockets)
        for listener in self._listeners:
            await listener.wait_closed()
