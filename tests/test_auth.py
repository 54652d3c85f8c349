"""API tokens and scopes, through the real HTTP listener.

Once a `[tokens.*]` exists, every endpoint that sends, reads or changes wants a bearer
token with the right scope: 401 without one (or with a wrong one), 403 with one that
lacks the scope, and nothing is stored for a refused send.
"""

from __future__ import annotations

import httpx
import pytest

from bridge.clock import ManualClock
from bridge.config import TokenConfig
from bridge.errors import ConfigError
from bridge.ingress.http.auth import ANONYMOUS, authorize, identify
from tests.helpers import bridge_config, running_bridge

SENDER = "send-token-0123456789abcdef"
READER = "read-token-0123456789abcdef"
ADMIN = "admin-token-0123456789abcdef"
SCRAPER = "metrics-token-0123456789abcd"
TOKENS = f"""
[tokens.deploy]
token = "{SENDER}"
scopes = ["send"]
[tokens.ops]
token = "{READER}"
scopes = ["read"]
[tokens.root]
token = "{ADMIN}"
scopes = ["admin"]
[tokens.prometheus]
token = "{SCRAPER}"
scopes = ["metrics"]
"""
MESSAGE = {"to": "+12025550143", "message": "disk full on db-2"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def config(tmp_path, sandbox_url: str):
    return bridge_config(tmp_path, sandbox_url, TOKENS)


async def test_send_needs_a_token_with_the_send_scope(config, clock: ManualClock) -> None:
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        endpoint = f"{url}/api/v1/messages"
        missing = await http.post(endpoint, json=MESSAGE)
        wrong = await http.post(endpoint, json=MESSAGE, headers=bearer(SENDER + "x"))
        basic = await http.post(endpoint, json=MESSAGE, headers={"Authorization": "Basic eDp5"})
        reader = await http.post(endpoint, json=MESSAGE, headers=bearer(READER))
        assert [r.status_code for r in (missing, wrong, basic, reader)] == [401, 401, 401, 403]
        assert missing.headers["www-authenticate"].startswith("Bearer")
        assert "missing bearer token" in missing.json()["error"]
        assert "wrong bearer token" in wrong.json()["error"]
        assert "lacks the 'send' scope" in reader.json()["error"]
        assert await bridge.store.counts() == {}  # nothing refused was stored

        sent = await http.post(endpoint, json=MESSAGE, headers=bearer(SENDER))
        by_admin = await http.post(
            endpoint, json={**MESSAGE, "message": "other"}, headers=bearer(ADMIN)
        )
        assert [sent.status_code, by_admin.status_code] == [202, 202]
        assert sum((await bridge.store.counts()).values()) == 2


@pytest.mark.parametrize(
    "path", ["/api/v1/messages", "/api/v1/messages/1", "/api/v1/stats", "/metrics"]
)
async def test_reading_needs_the_read_scope(config, clock: ManualClock, path: str) -> None:
    async with running_bridge(config, clock) as (_, url), httpx.AsyncClient() as http:
        await http.post(f"{url}/api/v1/messages", json=MESSAGE, headers=bearer(SENDER))
        anonymous = await http.get(url + path)
        sender = await http.get(url + path, headers=bearer(SENDER))
        reader = await http.get(url + path, headers=bearer(READER))
        admin = await http.get(url + path, headers=bearer(ADMIN))
        assert [anonymous.status_code, sender.status_code] == [401, 403]
        assert [reader.status_code, admin.status_code] == [200, 200]
        assert "+12025550143" not in anonymous.text + sender.text


async def test_a_metrics_token_reads_metrics_and_nothing_else(config, clock: ManualClock) -> None:
    async with running_bridge(config, clock) as (_, url), httpx.AsyncClient() as http:
        metrics = await http.get(f"{url}/metrics", headers=bearer(SCRAPER))
        messages = await http.get(f"{url}/api/v1/messages", headers=bearer(SCRAPER))
        send = await http.post(f"{url}/api/v1/messages", json=MESSAGE, headers=bearer(SCRAPER))
        assert metrics.status_code == 200 and "sms_bridge" in metrics.text
        assert [messages.status_code, send.status_code] == [403, 403]


async def test_health_stays_open_and_the_spec_needs_read(config, clock: ManualClock) -> None:
    """Once tokens exist the spec (every route's name, the sender ids) is for callers
    with `read`; it declares its security schemes."""
    async with running_bridge(config, clock) as (_, url), httpx.AsyncClient() as http:
        assert (await http.get(f"{url}/healthz")).status_code == 200
        assert (await http.get(f"{url}/readyz")).status_code in (200, 503)
        assert (await http.get(f"{url}/openapi.json")).status_code == 401
        sender = await http.get(f"{url}/openapi.json", headers=bearer(SENDER))
        assert sender.status_code == 403
        spec = (await http.get(f"{url}/openapi.json", headers=bearer(READER))).json()
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert spec["security"] == [{"bearer": []}]
    assert spec["paths"]["/healthz"]["get"]["security"] == []


async def test_without_tokens_the_api_is_open(tmp_path, sandbox_url, clock: ManualClock) -> None:
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (_, url), httpx.AsyncClient() as http:
        assert (await http.post(f"{url}/api/v1/messages", json=MESSAGE)).status_code == 202
        assert (await http.get(f"{url}/api/v1/messages")).status_code == 200


def test_identify_compares_every_token_and_expands_scopes() -> None:
    tokens = {
        "a": TokenConfig(name="a", token="a" * 16, scopes=("read",)),
        "b": TokenConfig(name="b", token="b" * 16, scopes=("admin",)),
    }
    assert identify({}, None) is ANONYMOUS
    assert identify(tokens, None) is None
    assert identify(tokens, "a" * 15) is None
    reader = identify(tokens, "a" * 16)
    assert reader is not None and reader.name == "a"
    assert reader.may("read") and reader.may("metrics") and not reader.may("send")
    admin = authorize(tokens, "Bearer " + "b" * 16, "send")
    assert admin.name == "b" and admin.may("admin")


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ('token = "short"\nscopes = ["send"]', "tokens.t.token"),
        (f'token = "{SENDER}"\nscopes = []', "tokens.t.scopes"),
        (f'token = "{SENDER}"\nscopes = ["root"]', "tokens.t.scopes"),
        (
            f'token = "{SENDER}"\nscopes = ["send"]\n[tokens.u]\ntoken = "{SENDER}"',
            "tokens.u.token",
        ),
    ],
)
def test_bad_tokens_are_config_errors(tmp_path, table: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        bridge_config(tmp_path, "http://127.0.0.1:9", f"[tokens.t]\n{table}\n")
    assert key in [k for k, _ in caught.value.problems]


def test_a_token_may_come_from_a_file(tmp_path) -> None:
    secret = tmp_path / "deploy.token"
    secret.write_text(SENDER + "\n")
    config = bridge_config(
        tmp_path,
        "http://127.0.0.1:9",
        f'[tokens.deploy]\ntoken_file = "{secret}"\nscopes = ["send"]\n',
    )
    assert config.tokens["deploy"].token == SENDER


async def test_one_tokens_dedupe_keys_never_mute_anothers(config, clock: ManualClock) -> None:
    keyed = {**MESSAGE, "dedupe_key": "deploy-42"}
    async with running_bridge(config, clock) as (_, url), httpx.AsyncClient() as http:
        endpoint = f"{url}/api/v1/messages"
        first = await http.post(endpoint, json=keyed, headers=bearer(SENDER))
        again = await http.post(endpoint, json=keyed, headers=bearer(SENDER))
        other = await http.post(endpoint, json=keyed, headers=bearer(ADMIN))
    states = [r.json()["messages"][0]["state"] for r in (first, again, other)]
    assert states == ["queued", "suppressed", "queued"]
