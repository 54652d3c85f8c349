"""The HTTPS listener (`http.tls_cert`) under the same connection limits as plain HTTP,
through a real `serve` process and in this one, on uvloop and on asyncio's own loop: a
connection counts and is timed from its first byte, not from the end of its TLS
handshake."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import ssl
import threading
import time
from pathlib import Path

import httpx
import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from bridge.clock import ManualClock
from tests.helpers import bridge_config, running_bridge
from tests.processes import ANY_PORT, clean_env, process, wait_for
from tests.test_smtp import tls_files  # noqa: F401 - a fixture

pytestmark = pytest.mark.slow

HEADER_TIMEOUT = 3.0
SCRAPER = "scraper-token-0123456789abcdef"
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


def _env(tmp_path: Path, loop_kind: str) -> dict[str, str]:
    """`serve`'s environment: on uvloop (its loop where installed), or on asyncio's own
    loop, uvloop made impossible to import."""
    if loop_kind == "uvloop":
        return clean_env()
    shadow = tmp_path / "no-uvloop"
    shadow.mkdir()
    (shadow / "uvloop.py").write_text('raise ImportError("uvloop left out by the test")\n')
    return clean_env(PYTHONPATH=os.pathsep.join([str(shadow), os.environ.get("PYTHONPATH", "")]))


@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
def test_https_connections_count_and_time_out_before_their_handshake(
    tmp_path: Path, loop_kind: str
) -> None:
    """Behind asyncio's own TLS the HTTP protocol (and every limit of `[http]`) began
    only once a handshake was done: a client that connected and sent nothing was held
    for asyncio's 60 s handshake timeout, past `http.max_connections_per_client` and
    `http.header_timeout`, as many times as it liked (300 from one address held 300
    file descriptors). Now a fifth connection from one client (three silent, one served
    and kept alive) is closed at once, the silent ones at the header timeout, on uvloop
    and on asyncio's own loop; another client is served meanwhile,
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
        ["serve", "--config", str(config)], tmp_path, _env(tmp_path, loop_kind), tmp_path / "log"
    ) as proc:
        port = proc.port()
        held = [_silent(port, "127.0.0.1") for _ in range(3)]
        # The fourth from that client, handshake done: counted once, not twice.
        with httpx.Client(verify=trusting) as client:
            assert client.get(f"https://127.0.0.1:{port}/healthz").status_code == 200
            # While it is kept alive (closed, it is counted out only once the bridge has
            # read its end, which may come after the next connection's accept).
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


@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
def test_a_stop_cuts_the_https_handshakes_under_way(
    tmp_path: Path,
    sandbox_url: str,
    tls_files: tuple[trustme.CA, str, str],  # noqa: F811 - the fixture imported above
    loop_kind: str,
) -> None:
    """A connection still in its handshake when the bridge stops is closed with the
    listener (it has said nothing, nothing is lost), not left open until its header
    timeout, and the stop does not wait for it."""
    import uvloop

    _, cert, key = tls_files
    config = bridge_config(
        tmp_path,
        sandbox_url,
        f'[http]\ntls_cert = "{cert}"\ntls_key = "{key}"\nheader_timeout = "30s"\n',
    )
    seen: dict[str, object] = {}

    async def scenario() -> None:
        async with running_bridge(config, ManualClock()) as (_, url):
            port = int(url.rsplit(":", 1)[1])
            silent = await asyncio.to_thread(_silent, port, "127.0.0.1")
            await asyncio.sleep(0.2)  # accepted, in its handshake
            stopping = time.monotonic()
        seen["stop"] = time.monotonic() - stopping
        seen["closed"] = await asyncio.to_thread(_closed_within, silent, 5.0)
        silent.close()

    run = uvloop.run if loop_kind == "uvloop" else asyncio.run
    worker = threading.Thread(target=run, args=(scenario(),))
    worker.start()
    worker.join(60)
    assert seen.get("closed") is True, (loop_kind, seen)
    assert isinstance(seen["stop"], float) and seen["stop"] < 5.0, (loop_kind, seen)


def _served_by(port: int, ca: trustme.CA) -> bool:
    """Whether the certificate `port` serves now is one `ca` issued (a new connection)."""
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    try:
        with httpx.Client(verify=trusting) as client:
            return client.get(f"https://127.0.0.1:{port}/healthz").status_code == 200
    except httpx.ConnectError:  # its verification failed
        return False


def test_a_sighup_serves_a_certificate_renewed_in_place(tmp_path: Path) -> None:
    """certbot renews a certificate in place (the same paths) and reloads the service.
    SMTP's certificate was read again on SIGHUP, the HTTPS listener's only at a restart:
    it served the old one until it expired. Now the next connection gets the new one; a
    renewal that does not load (a half-written file) keeps the running one, warned of."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    first, second = trustme.CA(), trustme.CA()

    def issue(ca: trustme.CA) -> None:
        issued = ca.issue_cert("127.0.0.1")
        issued.cert_chain_pems[0].write_to_path(cert)
        issued.private_key_pem.write_to_path(key)

    issue(first)
    config = tmp_path / "bridge.toml"
    config.write_text(
        CONFIG.format(http=ANY_PORT, cert=cert, key=key, timeout=10, db=tmp_path / "bridge.db")
    )
    config.chmod(0o600)
    log = tmp_path / "log"
    with process(["serve", "--config", str(config)], tmp_path, clean_env(), log) as proc:
        port = proc.port()
        assert _served_by(port, first) and not _served_by(port, second)

        issue(second)
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: proc.output().count("configuration reloaded") == 1, what="a reload")
        assert _served_by(port, second) and not _served_by(port, first)

        cert.write_text("-----BEGIN CERTIFICATE-----\nhalf written")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: proc.output().count("configuration reloaded") == 2, what="a reload")
        assert _served_by(port, second)
        assert "http.tls_cert: cannot load, the previous certificate stays" in proc.output()

        # A renewal with a passphrase on its key: OpenSSL asked for it on the terminal
        # (the read hung to its bound; here, with none, "[Errno 22] Invalid argument").
        issue(first)
        encrypted = serialization.load_pem_private_key(key.read_bytes(), None).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"a passphrase"),
        )
        key.write_bytes(encrypted)
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: proc.output().count("configuration reloaded") == 3, what="a reload")
        assert _served_by(port, second)
        assert f"the key {key} is encrypted, and the bridge has no passphrase" in proc.output()
    assert "Traceback" not in log.read_text()


def test_a_certificate_that_does_not_load_on_sighup_fails_the_reload_in_metrics(
    tmp_path: Path,
) -> None:
    """A renewal that did not load kept the running certificate, as it should, but the
    reload counted as a success: `sms_bridge_config_last_reload_successful` stayed 1, and
    nothing could alert on a certificate that was never renewed. Now it is 0 (and its
    success timestamp stays) until a reload applies in full."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    issued.cert_chain_pems[0].write_to_path(cert)
    issued.private_key_pem.write_to_path(key)
    auth = {"Authorization": f"Bearer {SCRAPER}"}
    config = tmp_path / "bridge.toml"
    config.write_text(
        CONFIG.format(http=ANY_PORT, cert=cert, key=key, timeout=10, db=tmp_path / "bridge.db")
        + f'[tokens.scraper]\ntoken = "{SCRAPER}"\nscopes = ["metrics"]\n'
    )
    config.chmod(0o600)
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)

    def gauges() -> dict[str, float]:
        with httpx.Client(verify=trusting) as client:  # served with the first certificate
            got = client.get(f"https://127.0.0.1:{port}/metrics", headers=auth)
        text = got.raise_for_status().text
        found = re.findall(r"^sms_bridge_config_last_reload_(\w+) (\S+)$", text, re.MULTILINE)
        return {name: float(value) for name, value in found}

    def reloaded(times: int) -> None:
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: proc.output().count("configuration reloaded") == times, what="a reload")

    with process(
        ["serve", "--config", str(config)], tmp_path, clean_env(), tmp_path / "log"
    ) as proc:
        port = proc.port()
        started = gauges()
        assert started["successful"] == 1
        cert.write_text("-----BEGIN CERTIFICATE-----\nhalf written")
        reloaded(1)
        assert gauges() == {**started, "successful": 0}  # served by the old one still
        assert "reload failed in part: 1 certificate(s) did not load" in proc.output()
        issued.cert_chain_pems[0].write_to_path(cert)
        reloaded(2)
        after = gauges()
        assert after["successful"] == 1
        assert after["success_timestamp_seconds"] > started["success_timestamp_seconds"]
    assert "Traceback" not in (tmp_path / "log").read_text()
