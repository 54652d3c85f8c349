"""Listening sockets, bound by the service before anything is served."""

from __future__ import annotations

import socket

from bridge.config import parse_listen


def bind_socket(listen: str) -> socket.socket:
    """A listening, non-blocking socket on `listen`; `[::]` takes IPv4 clients too."""
    host, port = parse_listen(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
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
