"""Which `Host` header values the HTTP listener serves (`http.allowed_hosts`).

DNS rebinding: a web page on `attacker.example` re-points its name at 127.0.0.1, and the
victim's browser then talks to a loopback bridge as a same-origin site, with
`Host: attacker.example`. Refusing Host names the owner did not list stops it before any
handler runs, so nothing is read or stored.

`localhost` and loopback addresses (`127.0.0.1`, `[::1]`) are always served: a rebinding
page cannot send them as its Host (its own name is what the browser sends), and the
host's own scripts and console keep working when a list names the public names. With
`allowed_hosts = []` the bridge also serves its listen host. On a wildcard listener (`0.0.0.0`, `::`) any IP literal is served too:
a browser sends an IP literal only when the page's own origin is that address, which a
rebinding attacker cannot choose, and probes and clients that know only the machine's
address keep working. `/healthz` and `/readyz` answer whatever the Host, for load
balancers and orchestrators that probe by address; they store nothing and show no data.
"""

from __future__ import annotations

import fnmatch
import functools
import ipaddress
import json

from starlette.types import ASGIApp, Receive, Scope, Send

from bridge.config import LiveConfig, is_loopback_host, parse_listen

ALWAYS_SERVED_PATHS = frozenset({"/healthz", "/readyz"})
_WILDCARDS = frozenset({"0.0.0.0", "::", ""})


def host_name(header: str) -> str:
    """The name part of a Host header: no port, no brackets, lower case, no final dot."""
    header = header.strip().lower()
    if header.startswith("["):  # [v6] or [v6]:port
        return header[1 : header.find("]")] if "]" in header else header
    if header.count(":") == 1:
        header = header.partition(":")[0]
    return header.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=256)  # asked on every request; clients send a few Hosts
def host_allowed(header: str | None, allowed: tuple[str, ...], listen: str) -> bool:
    """May a request with this Host header be served? `allowed` is `http.allowed_hosts`."""
    if header is None:
        return False  # HTTP/1.1 requires Host; uvicorn passes its absence through
    name = host_name(header)
    if not name:
        return False
    if name == "localhost" or (is_loopback_host(name) and _is_ip(name)):
        return True  # whatever the list: this host's own scripts and console
    if allowed:
        return any(
            pattern == "*" or fnmatch.fnmatchcase(name, host_name(pattern)) for pattern in allowed
        )
    try:
        listen_host = parse_listen(listen)[0].lower() if listen else ""
    except ValueError:
        listen_host = ""
    return name == listen_host or (listen_host in _WILDCARDS and _is_ip(name))


class HostCheck:
    """ASGI middleware: 400 for a Host that `http.allowed_hosts` does not admit.

    Reads the live config on every request, so a reload that changes the list applies
    to the next request.
    """

    def __init__(self, app: ASGIApp, live: LiveConfig) -> None:
        self.app = app
        self.live = live

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in ALWAYS_SERVED_PATHS:
            await self.app(scope, receive, send)
            return
        http = self.live.current.http
        raw = next((v for k, v in scope["headers"] if k == b"host"), None)
        header = raw.decode("latin-1") if raw is not None else None
        if host_allowed(header, http.allowed_hosts, http.listen):
            await self.app(scope, receive, send)
            return
        why = (
            f"Host {header!r} is not served here: add it to http.allowed_hosts"
            if header is not None
            else "a Host header is required"
        )
        body = json.dumps({"error": why, "field": "host"}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 400,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
