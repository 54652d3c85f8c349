"""Listening sockets, bound by the service before anything is served."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket

from bridge.config import parse_listen

log = logging.getLogger(__name__)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def bound_host(host: str) -> str:
    """The address `bind_socket` binds for a listen host: an address in its one
    spelling (`::1`, not `0:0:0:0:0:0:0:1`), `localhost` as the resolver maps it (the
    hosts file: no network asked), any other name as written (resolving it might ask
    DNS, which check-config must not wait for)."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if host.lower() == "localhost":
        try:
            found = socket.getaddrinfo(host, None, _family(host), socket.SOCK_STREAM)
        except OSError:
            return host.lower()
        return str(found[0][4][0])
    return host.lower()


def bind_socket(listen: str) -> socket.socket:
    """A listening, non-blocking socket on `listen`; `[::]` takes IPv4 clients too."""
    host, port = parse_listen(listen)
    family = _family(host)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        # `[::]` takes IPv4 clients too (as ::ffff:a.b.c.d) only where the OS default says
        # so (Linux, unless net.ipv6.bindv6only); BSD and Windows default to IPv6 only.
        # Said explicitly, `[::]` is dual-stack everywhere.
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    # Accepted sockets inherit this; without it uvicorn's separate header and body writes
    # meet Nagle and delayed ACK, and every keep-alive request waits ~40 ms.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def bound_address(sock: socket.socket) -> str:
    """`host:port` (or `[v6]:port`) the socket is bound to: the real port when 0 was asked."""
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def notify_systemd(state: str) -> None:
    """Tell the service manager `state` (`READY=1`) on `$NOTIFY_SOCKET`, as a `Type=notify`
    unit expects; nothing where that is not set (a shell, Docker)."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):  # Linux's abstract namespace
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        return
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("cannot tell the service manager %s on %s: %s", state, address, exc)
