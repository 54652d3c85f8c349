"""The HTTP listener's edges, through the real listener: Host allowlist (DNS rebinding),
proxy headers believed only from trusted proxies, HTTPS, a route taking a token or basic
auth, and secrets masked in the log whichever key they came from.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import ssl
import subprocess
import sys
import textwrap

import httpx
import pytest

from bridge.app import build as build_bridge
from bridge.clock import ManualClock
from bridge.config import load_config, secret_values
from bridge.ingress.http.hosts import host_allowed
from bridge.ops.logs import JsonFormatter, MaskingFilter
from tests.helpers import bridge_config, running_bridge, write_config
from tests.test_smtp import _client_context, tls_files  # noqa: F401 - a fixture

MESSAGE = {"to": "+12025550143", "message": "disk full on db-2"}
API_TOKEN = '[tokens.api]\ntoken = "api-token-0123456789abcdef"\nscopes = ["send"]\n'
BEARER = {"Authorization": "Bearer api-token-0123456789abcdef"}


async def test_a_host_that_is_not_allowed_is_refused_before_anything_is_stored(
    tmp_path, sandbox_url: str, clock: ManualClock
) -> None:
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        port = url.rsplit(":", 1)[1]
        endpoint = f"{url}/api/v1/messages"
        # DNS rebinding: the browser reaches 127.0.0.1 but says the attacker's name.
        rebound = await http.post(endpoint, json=MESSAGE, headers={"Host": "attacker.example"})
        assert rebound.status_code == 400
        assert rebound.json() == {
            "error": "Host 'attacker.example' is not served here: add it to http.allowed_hosts",
            "field": "host",
        }
        read = await http.get(endpoint, headers={"Host": f"attacker.example:{port}"})
        assert read.status_code == 400 and "+1202" not in read.text
        assert await bridge.store.counts() == {}
        # Liveness stays answerable to probes that use any name or address.
        probe = await http.get(f"{url}/healthz", headers={"Host": "10.0.0.5"})
        assert probe.status_code == 200
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", "LOCALHOST.", "[::1]:80"):
            ok = await http.post(
                endpoint, json={**MESSAGE, "message": host}, headers={"Host": host}
            )
            assert ok.status_code == 202, host
        assert sum((await bridge.store.counts()).values()) == 4


async def test_allowed_hosts_lists_the_names_served(
    tmp_path, sandbox_url: str, clock: ManualClock
) -> None:
    # Names beyond loopback mean a proxy or DNS reaches the bridge: protected mode wants
    # a token for that (API_TOKEN), which every request below carries.
    config = bridge_config(
        tmp_path,
        sandbox_url,
        '[http]\nallowed_hosts = ["sms.example.org", "*.ops.example"]\n' + API_TOKEN,
    )
    async with (
        running_bridge(config, clock) as (bridge, url),
        httpx.AsyncClient(headers=BEARER) as http,
    ):
        endpoint = f"{url}/api/v1/messages"
        codes = {
            host: (await http.post(endpoint, json=MESSAGE, headers={"Host": host})).status_code
            for host in (
                "sms.example.org",
                "SMS.example.org:8443",
                "a.ops.example",
                "ops.example",
                "localhost",  # loopback names are served whatever the list
                "127.0.0.1:8080",
                "[::1]",
                "192.0.2.10",  # but the list replaces the other defaults
                "sms.example.org.attacker.example",
            )
        }
        assert codes == {
            "sms.example.org": 202,
            "SMS.example.org:8443": 202,
            "a.ops.example": 202,
            "ops.example": 400,
            "localhost": 202,
            "127.0.0.1:8080": 202,
            "[::1]": 202,
            "192.0.2.10": 400,
            "sms.example.org.attacker.example": 400,
        }
        # A reload that changes the list applies to the next request.
        bridge.live.current = load_config(
            write_config(
                tmp_path,
                f'[store]\npath = "{tmp_path / "bridge.db"}"\n[http]\nallowed_hosts = ["*"]\n'
                + API_TOKEN,
                name="reloaded.toml",
            ),
            env={},
        )
        anything = await http.post(endpoint, json=MESSAGE, headers={"Host": "anything.example"})
        assert anything.status_code == 202


@pytest.mark.parametrize(
    ("host", "listen", "allowed"),
    [
        ("192.0.2.10:8080", "0.0.0.0:8080", True),  # any address on a wildcard listener
        ("[2001:db8::1]:8080", "[::]:8080", True),
        ("attacker.example", "0.0.0.0:8080", False),  # but never an unlisted name
        ("192.0.2.10", "127.0.0.1:8080", False),
        ("bridge.lan:8080", "bridge.lan:8080", True),  # the listen host itself
        ("127.0.0.2", "127.0.0.1:8080", True),
        (None, "127.0.0.1:8080", False),
        ("", "127.0.0.1:8080", False),
    ],
)
def test_default_hosts(host: str | None, listen: str, allowed: bool) -> None:
    assert host_allowed(host, (), listen) is allowed


ROUTE = """
[routes.lan]
format = "generic"
to = ["+12025550143"]
allowed_networks = ["192.0.2.0/24"]
"""


@pytest.mark.parametrize(
    ("proxies", "status"), [("[]", 401), ('["127.0.0.1/32"]', 202), ('["10.0.0.0/8"]', 401)]
)
async def test_forwarded_for_is_believed_only_from_trusted_proxies(
    tmp_path, sandbox_url: str, clock: ManualClock, proxies: str, status: int
) -> None:
    # Proxies want a token; with tokens, a caller refused by the route's networks gets the
    # one answer an unknown route gets (401: names are not enumerable), not a 403.
    extra = f"[http]\ntrusted_proxies = {proxies}\n{ROUTE}{API_TOKEN}"
    config = bridge_config(tmp_path, sandbox_url, extra)
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        response = await http.post(
            f"{url}/hooks/lan",
            json={"message": "from the LAN"},
            headers={"X-Forwarded-For": "192.0.2.7"},
        )
        assert response.status_code == status, response.text
        assert sum((await bridge.store.counts()).values()) == (1 if status == 202 else 0)


async def test_https_on_the_http_listener(
    tmp_path,
    sandbox_url: str,
    clock: ManualClock,
    tls_files,  # noqa: F811 - the fixture imported above
) -> None:
    ca, cert, key = tls_files
    config = bridge_config(
        tmp_path, sandbox_url, f'[http]\ntls_cert = "{cert}"\ntls_key = "{key}"\n'
    )
    async with running_bridge(config, clock) as (bridge, url):
        assert url.startswith("https://")
        async with httpx.AsyncClient(verify=_client_context(ca)) as http:
            sent = await http.post(f"{url}/api/v1/messages", json=MESSAGE)
            assert sent.status_code == 202
        async with httpx.AsyncClient(verify=ssl.create_default_context()) as untrusting:
            with pytest.raises(httpx.ConnectError):  # the system store does not know our CA
                await untrusting.get(f"{url}/healthz")
        async with httpx.AsyncClient() as plain:
            with pytest.raises(httpx.HTTPError):  # clear text to a TLS port gets nothing
                await plain.get(url.replace("https://", "http://") + "/healthz")
        assert sum((await bridge.store.counts()).values()) == 1


def test_tls_cert_and_key_go_together(tmp_path, tls_files) -> None:  # noqa: F811
    _, cert, _ = tls_files
    with pytest.raises(Exception) as caught:
        bridge_config(tmp_path, "http://127.0.0.1:9", f'[http]\ntls_cert = "{cert}"\n')
    assert "http.tls_cert" in str(caught.value)


def basic(user: str, password: str) -> dict[str, str]:
    pair = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {pair}"}


async def test_a_route_with_a_token_and_basic_auth_takes_either(
    tmp_path, sandbox_url: str, clock: ManualClock
) -> None:
    route = """
[routes.both]
format = "generic"
to = ["+12025550143"]
token = "route-token-0123456789"
username = "jenkins"
password = "jenkins-pass-0123456789"
"""
    config = bridge_config(tmp_path, sandbox_url, route)
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        endpoint = f"{url}/hooks/both"

        async def post(headers: dict[str, str]) -> int:
            response = await http.post(endpoint, json={"message": "build"}, headers=headers)
            return response.status_code

        assert await post({"Authorization": "Bearer route-token-0123456789"}) == 202
        assert await post(basic("jenkins", "jenkins-pass-0123456789")) == 202
        assert await post({"Authorization": "Bearer jenkins-pass-0123456789"}) == 401
        assert await post(basic("jenkins", "route-token-0123456789")) == 401
        assert await post(basic("jenkins", "jenkins-päss-0123456789")) == 401  # non-ASCII: no 500
        refused = await http.post(endpoint, json={"message": "build"})
        assert refused.status_code == 401
        assert refused.json()["error"] == (  # the route's own keys: not an API token's
            "missing or wrong bearer token (routes.both.token)"
            " or basic auth (routes.both.username and password)"
        )
        challenge = refused.headers["www-authenticate"]
        assert challenge == 'Bearer realm="sms-bridge", Basic realm="sms-bridge"'
        assert sum((await bridge.store.counts()).values()) == 2


async def test_a_basic_header_of_bytes_beyond_ascii_is_a_401_not_a_500(
    tmp_path, sandbox_url: str, clock: ManualClock
) -> None:
    """Headers arrive as latin-1: `Basic \xc3\xa9` reached base64 as a str with a
    non-ASCII character, whose ValueError is not a binascii.Error: a 500 and a traceback."""
    route = """
[routes.jenkins]
format = "generic"
to = ["+12025550143"]
username = "jenkins"
password = "jenkins-pass-0123456789"
"""
    config = bridge_config(tmp_path, sandbox_url, route)
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        for raw in (b"Basic \xc3\xa9\xc3\xa9", b"Basic \xff", b"basic amVua2luczo\xe9"):
            response = await http.post(
                f"{url}/hooks/jenkins",
                content=json.dumps({"message": "build"}).encode(),
                headers=[(b"content-type", b"application/json"), (b"authorization", raw)],
            )
            assert response.status_code == 401, (raw, response.text)
            assert "basic auth (routes.jenkins.username and password)" in response.text
        assert sum((await bridge.store.counts()).values()) == 0


def test_every_secret_field_is_masked_in_the_log(tmp_path) -> None:
    config = load_config(
        write_config(
            tmp_path,
            """
            [sandbox]
            api_key = "sbx"
            [smtp.users]
            ups = "ups-password-0123"
            [routes.j]
            format = "generic"
            to = ["+12025550143"]
            username = "jenkins"
            password = "route-basic-password"
            [tokens.deploy]
            token = "deploy-token-0123456789abcdef"
            scopes = ["send"]
            """,
        ),
        env={},
    )
    masking = MaskingFilter(secret_values(config))
    formatter = JsonFormatter()
    logger = logging.getLogger("test.masking")

    def logged(*args: object, exc: BaseException | None = None) -> str:
        record = logger.makeRecord(
            "test.masking",
            logging.WARNING,
            __file__,
            1,
            args[0],
            args[1:],
            (type(exc), exc, exc.__traceback__) if exc else None,
        )
        assert masking.filter(record)
        return formatter.format(record)

    line = logged(
        "%s %s %s %s and a",
        "ups-password-0123",
        "route-basic-password",
        "deploy-token-0123456789abcdef",
        "sbx",
    )
    for secret in ("ups-password-0123", "route-basic-password", "deploy-token", "sbx"):
        assert secret not in line
    assert line.count("***") == 4 and "jenkins" not in line and " and a" in line
    try:
        raise ValueError("upstream refused key route-basic-password")
    except ValueError as error:
        traced = logged("failed", exc=error)
    assert "route-basic-password" not in traced and "refused key ***" in traced
    # Two characters are masked; a single character would garble every line and is kept.
    assert MaskingFilter(["ab", "x"]).mask("tab x") == "t*** x"


async def test_a_request_without_host_is_refused(
    tmp_path, sandbox_url: str, clock: ManualClock
) -> None:
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (_, url):
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /api/v1/messages HTTP/1.0\r\n\r\n")  # HTTP/1.0 may omit Host
        answer = await reader.read()
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    assert json.loads(body) == {"error": "a Host header is required", "field": "host"}


@pytest.mark.slow
def test_the_cli_masks_every_secret_key_it_loaded(tmp_path) -> None:
    """`sms-bridge` installs the masking: a route password and a token, not a list in cli."""
    path = write_config(
        tmp_path,
        """
        [routes.j]
        format = "generic"
        to = ["+12025550143"]
        username = "jenkins"
        password = "route-basic-password"
        [tokens.deploy]
        token = "deploy-token-0123456789abcdef"
        scopes = ["send"]
        """,
    )
    path.chmod(0o600)
    code = textwrap.dedent(f"""
        import logging
        from bridge.cli import main
        assert main(["check-config", {str(path)!r}]) == 0
        log = logging.getLogger("bridge")
        log.warning("basic %s token %s", "route-basic-password", "deploy-token-0123456789abcdef")
    """)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "basic *** token ***" in result.stderr
    assert "route-basic-password" not in result.stderr + result.stdout


async def test_a_reload_masks_the_new_secrets(tmp_path, sandbox_url: str, clock) -> None:
    config = bridge_config(tmp_path, sandbox_url)
    handler = logging.StreamHandler()
    masking = MaskingFilter(secret_values(config))
    handler.addFilter(masking)
    root = logging.getLogger()
    root.addHandler(handler)
    reloaded = write_config(
        tmp_path,
        f'[store]\npath = "{tmp_path / "bridge.db"}"\n[provider]\n'
        f'base_url = "{sandbox_url}/api/v1"\napi_key = "test-key"\n'
        '[routes.new]\nformat = "generic"\nto = ["+12025550143"]\ntoken = "new-route-token-0123456789"\n',
        name="reloaded.toml",
    )
    try:
        async with build_bridge(config, clock=clock) as bridge:
            reloads: asyncio.Queue[str | None] = asyncio.Queue()
            task = asyncio.create_task(bridge._reloader(reloads))
            await reloads.put(str(reloaded))
            async with asyncio.timeout(10):  # a refused reload would never add the route
                while "new" not in bridge.live.current.routes:  # noqa: ASYNC110 - an attribute
                    await asyncio.sleep(0.01)
            bridge.stop.set()
            await task
    finally:
        root.removeHandler(handler)
    assert "new-route-token-0123456789" in masking.secrets
