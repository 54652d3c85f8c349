"""Every secret a caller presents over HTTP is compared as a SHA-256 digest, through the
real listener: `hmac.compare_digest` on raw secrets may answer sooner on unequal lengths,
which told a guesser how long a route's token or password was. Checked on the code path
(each comparison's arguments), not on a stopwatch; SMTP AUTH's is in test_smtp."""

from __future__ import annotations

import hmac

import httpx
import pytest

from bridge.clock import ManualClock
from tests.helpers import bridge_config, running_bridge
from tests.test_console import csrf_of
from tests.test_hook_refusals import CONFIG, JSON, READER


@pytest.fixture
def compared(monkeypatch) -> list[tuple[int, int]]:
    """The lengths of what each `hmac.compare_digest` call compared."""
    lengths: list[tuple[int, int]] = []
    compare = hmac.compare_digest

    def spy(a: bytes | str, b: bytes | str) -> bool:
        lengths.append((len(a), len(b)))
        return compare(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    return lengths


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/api/v1/messages", {"authorization": "Bearer short"}),
        ("/hooks/keyed", {"authorization": "Bearer short"}),
        ("/hooks/basic", {"authorization": "Basic bmFzOnNob3J0"}),  # nas:short
        ("/hooks/gh", {"x-hub-signature-256": "sha256=00"}),
        ("/hooks/gl", {"x-gitlab-token": "short"}),
        ("/hooks/graf", {"x-grafana-alerting-signature": "00"}),
    ],
)
async def test_a_presented_secret_is_compared_as_a_digest(
    tmp_path, sandbox_url, clock: ManualClock, compared, path: str, headers: dict[str, str]
) -> None:
    config = bridge_config(tmp_path, sandbox_url, CONFIG)
    async with running_bridge(config, clock) as (_, url), httpx.AsyncClient() as http:
        response = await http.post(url + path, content=b"{}", headers={**JSON, **headers})
    assert response.status_code == 401, response.text
    assert compared, "no comparison seen: one made past hmac.compare_digest?"
    assert set(compared) == {(32, 32)}, compared


async def test_the_consoles_sign_in_and_csrf_token_are_compared_as_digests(
    tmp_path, sandbox_url, clock: ManualClock, compared
) -> None:
    config = bridge_config(tmp_path, sandbox_url, CONFIG)
    async with running_bridge(config, clock) as (_, url), httpx.AsyncClient(base_url=url) as http:
        form = await http.get("/ui/signin")
        csrf = csrf_of(form)
        compared.clear()
        wrong = await http.post("/ui/signin", data={"csrf": "x", "token": READER})
        assert wrong.status_code == 403 and compared == [(32, 32)], compared
        signed = await http.post("/ui/signin", data={"csrf": csrf, "token": "short"})
        assert signed.status_code == 401 and compared and set(compared) == {(32, 32)}, compared
