"""Client addresses as the bridge's checks see them: an IPv4-mapped IPv6 address is its
IPv4 address.

A dual-stack listener (`[::]`) hands every IPv4 client over as `::ffff:a.b.c.d`, and
`ipaddress` keeps that an IPv6 address: outside `192.0.2.0/24`, outside `127.0.0.0/8`,
not loopback. Every allowlist, proxy check, loopback check and per-client key reads the
peer through `client_address`, so a genuine IPv4 sender is judged as one whichever
socket family accepted it.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@functools.lru_cache(maxsize=4096)  # asked per connection and request; few peers repeat
def client_address(host: str) -> Address | None:
    """`host` (`[bracketed]` or with a `%zone` allowed) as an address, IPv4-mapped IPv6
    as its IPv4 address; None when it is not an address."""
    try:
        address = ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def transport_host(transport: asyncio.BaseTransport) -> str:
    """The client's address, as the socket of `transport` gives it."""
    return host_of_peer(transport.get_extra_info("peername"))


def host_of_peer(peer: object) -> str:
    """The host of a socket's peer address (`accept`, `getpeername`): an (address, port,
    ...) tuple, or a path (a Unix socket) as it is."""
    return str(peer[0]) if isinstance(peer, tuple | list) and peer else str(peer)


def client_name(host: str) -> str:
    """`host` as answers and the log name the client: an IPv4 client of a dual-stack
    listener by its IPv4 address, as the checks judged it; not an address: as given."""
    address = client_address(host)
    return host if address is None else str(address)


def parse_network(cidr: str) -> Network:
    """`cidr` as a network (host bits cleared); one inside `::ffff:0:0/96` as the IPv4
    network it maps, since the clients it names arrive as IPv4 (`client_address`).
    Raises ValueError when it is not a network."""
    parsed = ipaddress.ip_network(cidr, strict=False)
    if isinstance(parsed, ipaddress.IPv6Network) and parsed.prefixlen >= 96:
        first = parsed.network_address.ipv4_mapped
        if first is not None:
            return ipaddress.IPv4Network((first, parsed.prefixlen - 96))
    return parsed


def in_networks(host: str, networks: tuple[Network, ...] | list[Network]) -> bool:
    """Is the client `host` inside one of `networks`? Not an address: no. An IPv4
    client is also inside an IPv6 network that holds its mapped form (`::/0`): such a
    network admitted it while it was judged as the socket gave it, and uvicorn's proxy
    trust (`with_mapped`) still does."""
    address = client_address(host)
    if address is None:
        return False
    forms: tuple[Address, ...] = (address,)
    if address.version == 4:
        forms += (ipaddress.IPv6Address(f"::ffff:{address}"),)
    return any(form in network for form in forms for network in networks)


def with_mapped(cidrs: tuple[str, ...] | list[str]) -> list[str]:
    """`cidrs` normalised (host bits cleared), each IPv4 network followed by its
    IPv4-mapped IPv6 form: for matchers that compare the peer as the socket gives it
    (uvicorn's X-Forwarded-For trust), so they agree with `client_address`."""
    out: list[str] = []
    for parsed in map(parse_network, cidrs):
        out.append(str(parsed))
        if parsed.version == 4:
            mapped = ipaddress.IPv6Address(f"::ffff:{parsed.network_address}")
            out.append(str(ipaddress.IPv6Network((mapped, 96 + parsed.prefixlen))))
    return out
