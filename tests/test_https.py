"""The HTTPS listener (`http.tls_cert`) under the same connection limits as plain HTTP,
through a real `serve` process: a connection counts and is timed from its first byte,
not from the end of its TLS handshake."""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

import httpx
import pytest
import trustme

from tests.processes import ANY_PORT, clean_env, process

pytestmark = pytest.mark.slow

HEADER_TIMEOUT = 3.0
CONFIG = """
[http]
listen = "{http}"
tls_cert = "{cert}"
tls_key = "{key}"
max_connections_per_client = 4
header_timeout = "{timeout}s"
[smtp]
listen = ""
[store]
path = "{db}"
[tokens.reader]
token = "reader-token-0123456789abcdef"
scopes = ["read"]
"""


def _silent(port: int, source: str) -> socket.socket:
    """A TCP connection from `source` that never begins its TLS handshake."""
    sock = socket.create_connection(("127.0.0.1", port), 10, (source, 0))
    sock.settimeout(HEADER_TIMEOUT + 5)
    return sock


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the bridge closes `sock` within `seconds` (a silent one: nothing to read)."""
    started = time.monotonic()
    try:
        data = sock.recv(1)
    except TimeoutError:
        return False
    except ConnectionResetError:
        data = b""
    return data == b"" and time.monotonic() - started < seconds


def test_https_connections_count_and_time_out_before_their_handshake(tmp_path: Path) -> None:
    """Behind asyncio's own TLS the HTTP protocol (and every limit of `[http]`) began
    only once a handshake was done: a client that connected and sent nothing was held
    for asyncio's 60 s handshake timeout, past `http.max_connections_per_client` and
    `http.header_timeout`, as many times as it liked (300 from one address held 300
    file descriptors). Now the fifth silent connection from one client is closed at
    once, the four others at the header timeout; another client is served meanwhile,
    and the console still knows it is on HTTPS (its cookie is `Secure`)."""
    ca = trustme.CA()
    issued = ca.issue_cert("localhost", "127.0.0.1")
    issued.cert_chain_pems[0].write_to_path(tmp_path / "cert.pem")
    issued.private_key_pem.write_to_path(tmp_path / "key.pem")
    config = tmp_path / "bridge.toml"
    config.write_text(
        CONFIG.format(
            http=ANY_PORT,
            cert=tmp_path / "cert.pem",
            key=tmp_path / "key.pem",
            timeout=HEADER_TIMEOUT,
            db=tmp_path / "bridge.db",
        )
    )
    config.chmod(0o600)
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    with process(
        ["serve", "--config", str(config)], tmp_path, clean_env(), tmp_path / "log"
    ) as proc:
        port = proc.port()
        held = [_silent(port, "127.0.0.1") for _ in range(3)]
        # The fourth from that client, handshake done: counted once, not twice.
        with httpx.Client(verify=trusting) as client:
            assert client.get(f"https://127.0.0.1:{port}/healthz").status_code == 200
        held.append(_silent(port, "127.0.0.1"))
        over = _silent(port, "127.0.0.1")
        assert _closed_within(over, 1.0), "a fifth connection from one client was held"
        other = httpx.HTTPTransport(verify=trusting, local_address="127.0.0.2")
        with httpx.Client(transport=other, base_url=f"https://127.0.0.1:{port}") as client:
            assert client.get("/healthz").json() == {"status": "ok"}
            signin = client.get("/ui/signin")
        assert signin.status_code == 200
        assert "secure" in signin.headers["set-cookie"].lower()
        assert all(_closed_within(sock, HEADER_TIMEOUT + 2) for sock in held)
        # Counted out once closed: the first client is served again.
        with httpx.Client(verify=trusting) as client:
            assert client.get(f"https://127.0.0.1:{port}/healthz").status_code == 200
        for sock in (*held, over):
            sock.close()
    assert "Traceback" not in (tmp_path / "log").read_text()
