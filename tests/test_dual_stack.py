"""IPv4 clients of a dual-stack listener (`[::]`), through the real listeners: the socket
hands them over as `::ffff:a.b.c.d`, and every check must judge them as the IPv4
address they are (bridge.addresses): route and SMTP allowlists, trusted proxies (their
X-Forwarded-For and their connections), the lockout's per-client key."""

from __future__ import annotations

import asyncio
import smtplib
import socket
from typing import Any

import httpx
import pytest

from bridge.clock import ManualClock
from bridge.ingress.smtp import start_smtp
from bridge.sockets import bind_socket
from tests.helpers import bridge_config, running_bridge
from tests.test_console import sign_in
from tests.test_smtp import DEFAULT_RCPT, with_smtp


def _no_ipv6() -> str | None:
    """Why this machine has no IPv6 loopback; None if it has one. Asked of a plain
    socket, not of bind_socket: a dual-stack listener that stopped taking IPv4 clients
    must fail these tests, not skip them."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as listener:
            listener.bind(("::1", 0))
            listener.listen(1)
            with socket.create_connection(listener.getsockname()[:2], timeout=2):
                listener.accept()[0].close()
    except OSError as exc:
        return f"no IPv6 loopback here: {exc}"
    return None


NO_IPV6 = _no_ipv6()
pytestmark = pytest.mark.skipif(NO_IPV6 is not None, reason=NO_IPV6 or "")


class _V6OnlyByDefault(socket.socket):
    """A socket as BSD and Windows make one: IPv6 only unless told otherwise."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.family == socket.AF_INET6 and kwargs.get("fileno") is None:
            self.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)


@pytest.mark.parametrize("default", ["this OS", "IPv6 only (BSD, Windows)"])
def test_an_any_address_ipv6_listener_takes_ipv4_clients(
    default: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`[::]` is dual-stack whatever the OS default: bind_socket clears IPV6_V6ONLY."""
    if default != "this OS":
        monkeypatch.setattr(socket, "socket", _V6OnlyByDefault)
    with bind_socket("[::]:0") as listener:
        assert listener.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
        listener.setblocking(True)
        port = listener.getsockname()[1]
        for source in ("127.0.0.1", "::1"):
            with socket.create_connection((source, port), timeout=2):
                accepted, peer = listener.accept()
                accepted.close()
            assert peer[0] == ("::ffff:127.0.0.1" if source == "127.0.0.1" else "::1")


TOKEN = "api-token-0123456789abcdef"
READER = "read-token-0123456789abcdef"
HTTP = f"""
[http]
listen = "[::]:0"
trusted_proxies = ["127.0.0.2"]
[tokens.api]
token = "{TOKEN}"
scopes = ["send"]
[tokens.ops]
token = "{READER}"
scopes = ["read"]
[routes.v4]
format = "generic"
to = ["+12025550143"]
allowed_networks = ["127.0.0.0/8"]
[routes.mapped]
format = "generic"
to = ["+12025550143"]
allowed_networks = ["::ffff:127.0.0.0/104"]  # the same clients, written as they arrive
[routes.lan]
format = "generic"
to = ["+12025550143"]
allowed_networks = ["192.0.2.0/24"]
[routes.any6]
format = "generic"
to = ["+12025550143"]
allowed_networks = ["::/0"]  # every IPv6 address, the mapped IPv4 ones among them
public = true  # (protected mode: ::/0 admits the Internet)
[routes.keyed]
format = "generic"
to = ["+12025550143"]
token = "route-token-0123456789abcdef"
"""
MESSAGE = {"to": "+12025550143", "message": "x"}


def client(source: str = "127.0.0.1", base_url: str = "") -> httpx.AsyncClient:
    transport = httpx.AsyncHTTPTransport(local_address=source)
    return httpx.AsyncClient(transport=transport, base_url=base_url)


async def test_ipv4_clients_of_a_dual_stack_http_listener(
    tmp_path, sandbox_url: str, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    config = bridge_config(tmp_path, sandbox_url, HTTP)
    async with running_bridge(config, clock, listen="[::]:0") as (bridge, url), client() as http:
        assert (await http.post(f"{url}/hooks/v4", json={"message": "v4"})).status_code == 202
        assert (await http.post(f"{url}/hooks/mapped", json={"message": "m"})).status_code == 202
        assert (await http.post(f"{url}/hooks/any6", json={"message": "a"})).status_code == 202
        # A caller that may read the route map is told why (others get hooks.NOT_AUTHORIZED).
        told = {"Authorization": f"Bearer {READER}"}
        refused = await http.post(f"{url}/hooks/lan", json={"message": "no"}, headers=told)
        # Named as the IPv4 client it was judged as, not as the socket gave it.
        assert refused.status_code == 403
        assert refused.json()["error"] == "client 127.0.0.1 is not allowed on this route"
        caplog.set_level("INFO", logger="bridge")
        wrong = {"Authorization": "Bearer not-the-route-token-0123456789"}
        refused = await http.post(f"{url}/hooks/keyed", json={"message": "no"}, headers=wrong)
        assert refused.status_code == 401
        assert any(m.startswith("route keyed: 401 for 127.0.0.1: ") for m in caplog.messages)
        async with client(base_url=url) as console:
            await sign_in(console, READER)
            assert "console: ops signed in from 127.0.0.1" in caplog.messages
            lan = (await console.get("/ui/routes/lan.json")).json()
            assert lan["refused"]["last"]["client"] == "127.0.0.1", lan["refused"]
        # The IPv6 loopback is not 127.0.0.0/8.
        async with client("::1") as v6:
            v6_url = url.replace("127.0.0.1", "[::1]")
            response = await v6.post(f"{v6_url}/hooks/v4", json={"message": "v6"}, headers=told)
            assert response.status_code == 403
            assert response.json()["error"] == "client ::1 is not allowed on this route"
        # X-Forwarded-For is believed from the trusted proxy 127.0.0.2 (::ffff:127.0.0.2
        # on this socket), and from no one else.
        forwarded = {"X-Forwarded-For": "192.0.2.7"}
        lan = {"message": "via proxy"}
        async with client("127.0.0.2") as proxy:
            response = await proxy.post(f"{url}/hooks/lan", json=lan, headers=forwarded)
            assert response.status_code == 202, response.text
        response = await http.post(f"{url}/hooks/lan", json=lan, headers=forwarded | told)
        assert response.status_code == 403
        # Locked out: 127.0.0.3 alone, not every IPv4 client (as one ::ffff:0:0/64).
        async with client("127.0.0.3") as guesser:
            for n in range(10):
                wrong = {"Authorization": f"Bearer wrong-token-{n:04d}-0123456789"}
                response = await guesser.post(f"{url}/api/v1/messages", json=MESSAGE, headers=wrong)
                assert response.status_code == 401
            right = {"Authorization": f"Bearer {TOKEN}"}
            response = await guesser.post(f"{url}/api/v1/messages", json=MESSAGE, headers=right)
            assert response.status_code == 503
        async with client("127.0.0.4") as other:
            response = await other.post(f"{url}/api/v1/messages", json=MESSAGE, headers=right)
            assert response.status_code == 202, response.text
        assert await bridge.store.counts() == {"queued": 5}


def _healthz(port: int, source: str) -> tuple[socket.socket, bytes]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    return sock, sock.recv(65536)


async def test_trusted_proxy_connections_are_not_counted_as_one_client(
    tmp_path, sandbox_url: str, clock: ManualClock
) -> None:
    """max_connections_per_client = 1: the proxy (many clients behind it) may hold more."""
    one_each = HTTP.replace("[http]\n", "[http]\nmax_connections_per_client = 1\n")
    config = bridge_config(tmp_path, sandbox_url, one_each)
    async with running_bridge(config, clock, listen="[::]:0") as (_, url):
        port = int(url.rsplit(":", 1)[1])
        for source, second in (("127.0.0.2", b"HTTP/1.1 200"), ("127.0.0.1", b"HTTP/1.1 503")):
            first_sock, first = await asyncio.to_thread(_healthz, port, source)
            second_sock, answer = await asyncio.to_thread(_healthz, port, source)
            first_sock.close()
            second_sock.close()
            assert first.startswith(b"HTTP/1.1 200")
            assert answer.startswith(second), (source, answer)


async def test_ipv4_clients_of_a_dual_stack_smtp_listener(
    tmp_path, sandbox_url: str, clock: ManualClock
) -> None:
    config = bridge_config(tmp_path, sandbox_url, with_smtp('allowed_networks = ["127.0.0.0/8"]'))

    def send(host: str) -> dict:
        with smtplib.SMTP(host, port, timeout=10) as smtp:
            return smtp.sendmail("ups@example.org", [DEFAULT_RCPT], "Subject: x\r\n\r\nx\r\n")

    async with running_bridge(config, clock) as (bridge, _):
        sock = bind_socket("[::]:0")
        port = sock.getsockname()[1]
        servers = await start_smtp(bridge.smtp_handler, [sock])
        try:
            assert await asyncio.to_thread(send, "127.0.0.1") == {}
            with pytest.raises(smtplib.SMTPSenderRefused) as refused:
                await asyncio.to_thread(send, "::1")
            assert refused.value.smtp_code == 550
        finally:
            for server in servers:
                server.close()
                await server.wait_closed()
        assert await bridge.store.counts() == {"queued": 1}
