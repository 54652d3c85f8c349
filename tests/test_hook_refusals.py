"""What `POST /hooks/{name}` tells a caller it refuses, and what the console keeps of it,
through the real HTTP listener.

Once `[tokens.*]` exist, a caller without a `read` token must not learn which routes
exist: an unknown name, a client outside a route's networks, a missing or wrong token or
signature, and a body refused before its signature is checked all get the same 401.
A call refused so never becomes the route's "last call" in the console: anyone who knows
a name could have hidden the genuine sender's last call behind it.
"""

from __future__ import annotations

import hashlib
import hmac

import httpx
import pytest

from bridge.clock import ManualClock
from tests.helpers import bridge_config, running_bridge
from tests.test_console import sign_in

READER = "read-token-0123456789abcdef"
ROUTE_TOKEN = "route-secret-token-0123456789"
PASSWORD = "route-password-0123456789"
SECRET = "route-hmac-secret-0123456789"
CONFIG = f"""
[http]
max_body_bytes = 4096
[tokens.ops]
token = "{READER}"
scopes = ["read"]
[routes.keyed]
format = "generic"
to = ["+12025550143"]
token = "{ROUTE_TOKEN}"
[routes.basic]
format = "generic"
to = ["+12025550143"]
username = "nas"
password = "{PASSWORD}"
[routes.lan]
format = "generic"
to = ["+12025550143"]
allowed_networks = ["::1/128"]  # not 127.0.0.1, where the tests connect from
[routes.gh]
format = "github"
to = ["+12025550143"]
secret = "{SECRET}"
[routes.gl]
format = "gitlab"
to = ["+12025550143"]
secret = "{SECRET}"
[routes.graf]
format = "grafana"
to = ["+12025550143"]
secret = "{SECRET}"
[routes.open]  # nothing to check: every call passes, and hears what is wrong with it
format = "grafana"
to = ["+12025550143"]
public = true
"""
ROUTES = ("keyed", "basic", "lan", "gh", "gl", "graf")
JSON = {"content-type": "application/json"}
# What an unauthenticated caller may send: the answer must not depend on the name.
PROBES = {
    "nothing": (b'{"message": "x"}', JSON),
    "a wrong bearer token": (b'{"message": "x"}', {**JSON, "authorization": "Bearer guess"}),
    "wrong basic auth": (b'{"message": "x"}', {**JSON, "authorization": "Basic eDp5"}),
    "a wrong signature": (b"{}", {**JSON, "x-hub-signature-256": "sha256=00"}),
    "a wrong GitLab token": (b"{}", {**JSON, "x-gitlab-token": "guess"}),
    "no JSON": (b"x", {"content-type": "text/plain"}),
    "a body too large": (b"[" + b"1," * 4000 + b"1]", JSON),
}


@pytest.fixture
def config(tmp_path, sandbox_url: str):
    return bridge_config(tmp_path, sandbox_url, CONFIG)


def _answer(response: httpx.Response) -> tuple[int, bytes, str | None]:
    return response.status_code, response.content, response.headers.get("www-authenticate")


@pytest.mark.parametrize("probe", sorted(PROBES))
async def test_an_unauthenticated_caller_cannot_tell_a_route_from_no_route(
    config, clock: ManualClock, probe: str
) -> None:
    body, headers = PROBES[probe]
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        nowhere = _answer(await http.post(f"{url}/hooks/nowhere", content=body, headers=headers))
        assert nowhere[0] == 401 and b"no such route, or missing or wrong" in nowhere[1]
        for name in ROUTES:
            response = await http.post(f"{url}/hooks/{name}", content=body, headers=headers)
            assert _answer(response) == nowhere, (name, response.text)
        assert await bridge.store.counts() == {}


async def test_a_caller_with_read_is_told_why(config, clock: ManualClock) -> None:
    """The route map is theirs already (`/openapi.json`): the real answer helps set up."""
    reader = {"authorization": f"Bearer {READER}"}
    async with running_bridge(config, clock) as (_, url), httpx.AsyncClient() as http:
        nowhere = await http.post(f"{url}/hooks/nowhere", json={}, headers=reader)
        assert nowhere.status_code == 404 and "no route named 'nowhere'" in nowhere.text
        lan = await http.post(f"{url}/hooks/lan", json={}, headers=reader)
        assert lan.status_code == 403 and "127.0.0.1 is not allowed" in lan.text
        keyed = await http.post(f"{url}/hooks/keyed", json={}, headers=reader)
        assert keyed.status_code == 401 and "routes.keyed.token" in keyed.text
        assert keyed.headers["www-authenticate"] == 'Bearer realm="sms-bridge"'


async def test_a_genuine_sender_still_passes(config, clock: ManualClock) -> None:
    body = b'{"message": "disk full"}'
    ping = b'{"zen": "hi"}'
    async with running_bridge(config, clock) as (_, url), httpx.AsyncClient() as http:
        keyed = await http.post(
            f"{url}/hooks/keyed",
            content=body,
            headers={**JSON, "authorization": f"Bearer {ROUTE_TOKEN}"},
        )
        basic = await http.post(
            f"{url}/hooks/basic", content=body, headers=JSON, auth=("nas", PASSWORD)
        )
        gh = await http.post(
            f"{url}/hooks/gh",
            content=ping,
            headers={
                **JSON,
                "x-github-event": "ping",
                "x-hub-signature-256": "sha256="
                + hmac.new(SECRET.encode(), ping, hashlib.sha256).hexdigest(),
            },
        )
        assert [keyed.status_code, basic.status_code, gh.status_code] == [202, 202, 200]
        # Past its checks, a sender's own mistake is said as it is.
        large = await http.post(
            f"{url}/hooks/keyed",
            content=PROBES["a body too large"][0],
            headers={**JSON, "authorization": f"Bearer {ROUTE_TOKEN}"},
        )
        assert large.status_code == 413
        for body, status in ((PROBES["a body too large"][0], 413), (b"x", 400)):
            response = await http.post(f"{url}/hooks/open", content=body, headers=JSON)
            assert response.status_code == status, response.text


async def test_a_refused_call_never_hides_the_routes_last_call(config, clock: ManualClock) -> None:
    genuine = {"authorization": f"Bearer {ROUTE_TOKEN}"}
    async with (
        running_bridge(config, clock) as (_, url),
        httpx.AsyncClient(base_url=url) as http,
        httpx.AsyncClient() as anyone,
    ):
        sent = await http.post("/hooks/keyed", json={"message": "disk full"}, headers=genuine)
        assert sent.status_code == 202
        clock.advance(60)
        for _ in range(3):
            refused = await anyone.post(f"{url}/hooks/keyed", json={"message": "hide it"})
            assert refused.status_code == 401
        await sign_in(http, READER)
        route = (await http.get("/ui/routes/keyed.json")).json()
        assert route["last_call"]["status"] == 202, route["last_call"]
        assert route["last_call"]["answer"] == "stored 1: 1 queued"
        # Counted apart, with the real reason the caller was not told.
        assert route["refused"]["count"] == 3
        assert route["refused"]["last"]["status"] == 401
        assert "routes.keyed.token" in route["refused"]["last"]["answer"]
        page = await http.get("/ui/routes/keyed")
        assert "3 since the bridge started" in page.text
        assert "(3 refused)" in (await http.get("/ui/routes")).text


async def test_refused_calls_are_logged_once_a_minute_per_client_and_route(
    config, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    """No lockout stops a caller that presents no credential: a log line for each of its
    calls let anyone fill the disk. The first is logged, the rest counted in the next."""
    caplog.set_level("WARNING", logger="bridge.ingress.http.hooks")
    async with running_bridge(config, clock) as (_, url), httpx.AsyncClient() as http:
        for _ in range(50):
            assert (await http.post(f"{url}/hooks/keyed", json={})).status_code == 401
        await http.post(f"{url}/hooks/lan", json={})  # another route: its own line
        clock.advance(61)
        await http.post(f"{url}/hooks/keyed", json={})
    lines = [m for m in caplog.messages if m.startswith("route ")]
    assert len(lines) == 3, lines
    assert lines[0].startswith("route keyed: 401 for 127.0.0.1: missing or wrong bearer token")
    assert lines[1] == (
        "route lan: 403 for 127.0.0.1: client 127.0.0.1 is not allowed on this route (answered 401)"
    )
    assert lines[2].endswith("(49 more like it in the last 60s not logged)")


async def test_an_unknown_name_the_answer_hides_is_in_the_log(
    config, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    """The 401 says "the bridge's log says which": a sender pointed at a mistyped route
    name must find it there. Every unknown name is one line a minute per client (a scan
    fills no disk), the name escaped (a caller chose it)."""
    caplog.set_level("WARNING", logger="bridge.ingress.http.hooks")
    async with running_bridge(config, clock) as (_, url), httpx.AsyncClient() as http:
        assert (await http.post(f"{url}/hooks/kumaa", json={})).status_code == 401
        for n in range(20):
            await http.post(f"{url}/hooks/scan{n}%1b%5b2J", json={})
        clock.advance(61)
        await http.post(f"{url}/hooks/evil%1b%5b2J", json={})
    lines = [m for m in caplog.messages if m.startswith("hook: ")]
    assert lines[0] == "hook: 404 for 127.0.0.1: no route named 'kumaa' (answered 401)"
    assert len(lines) == 2, lines
    assert lines[1].startswith("hook: 404 for 127.0.0.1: no route named 'evil\\x1b[2J'")
    assert lines[1].endswith("(20 more like it in the last 60s not logged)")
    assert not any("\x1b" in m for m in caplog.messages)
