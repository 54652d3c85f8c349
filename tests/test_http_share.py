"""The last quarter of `http.max_concurrency` goes one request to a client, through the
real listener: four clients at `http.max_connections_per_client`, each connection a
request whose body never comes (a signed route reads the body before it checks the
signature, so no credential is needed), held every place until `http.body_timeout`, and
every genuine sender's alert got 503."""

from __future__ import annotations

import asyncio
import socket

import httpx

from bridge.clock import ManualClock
from tests.helpers import bridge_config, running_bridge

LIMITS = """
[http]
max_concurrency = 8
max_connections_per_client = 2
"""


def _held(port: int, source: str) -> socket.socket:
    """A request whose headers are in and whose body never comes."""
    sock = socket.create_connection(("127.0.0.1", port), 10, (source, 0))
    sock.sendall(
        b"POST /api/v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
    )
    return sock


async def test_a_few_clients_cannot_hold_every_request_in_flight(
    tmp_path, sandbox_url: str, clock: ManualClock
) -> None:
    config = bridge_config(tmp_path, sandbox_url, LIMITS)
    async with running_bridge(config, clock) as (bridge, url):
        port = int(url.rsplit(":", 1)[1])
        held = [
            _held(port, client)
            for client in ("127.0.0.1", "127.0.0.2", "127.0.0.3")
            for _ in range(2)
        ]
        held.append(_held(port, "127.0.0.4"))  # its first: one of the reserved places
        second = _held(port, "127.0.0.4")
        try:
            refused = await asyncio.to_thread(second.makefile("rb").read)  # closed after
            assert refused.startswith(b"HTTP/1.1 503"), refused
            assert b"too many requests in flight from 127.0.0.4" in refused
            assert b"the last 2 of 8 are kept for clients with none" in refused
            transport = httpx.AsyncHTTPTransport(local_address="127.0.0.5")
            async with httpx.AsyncClient(transport=transport) as other:
                sent = await other.post(
                    f"{url}/api/v1/messages", json={"to": "+12025550143", "message": "up"}
                )
            assert sent.status_code == 202, sent.text
        finally:
            for sock in [*held, second]:
                sock.close()
        assert await bridge.store.counts() == {"queued": 1}
