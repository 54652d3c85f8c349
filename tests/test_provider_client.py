"""The provider client against the sandbox on loopback; mock transports only for faults."""

from __future__ import annotations

import email.utils

import httpx
import pytest

from bridge.clock import ManualClock
from bridge.errors import (
    PermanentSendError,
    ProviderAuthError,
    RateLimitedError,
    TransientSendError,
)
from bridge.provider.client import (
    ProviderClient,
    ProviderFailed,
    TransientUnknownOutcome,
    parse_retry_after,
)
from bridge.provider.responses import classify
from bridge.provider.sandbox import Fault, SandboxState


def make_client(
    http: httpx.AsyncClient, url: str, clock: ManualClock, **kw: object
) -> ProviderClient:
    return ProviderClient(
        http=http,
        base_url=f"{url}/api/v1",
        api_key=str(kw.pop("key", "test-key")),
        clock=clock,
        **kw,
    )  # type: ignore[arg-type]


@pytest.mark.parametrize("auth_header", ["x-api-key", "bearer"])
async def test_every_endpoint_with_both_auth_styles(
    auth_header: str, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    async with httpx.AsyncClient() as http:
        client = make_client(http, sandbox_url, clock, auth_header=auth_header)
        one = await client.send("+12025550143", "hello", sender_id="OPS", message_type=1)
        assert one.message_ids == {"+12025550143": "10000"} and one.cost == 0.5
        bulk = await client.send_bulk(["+12025550144", "+447911123456"], "hi all")
        assert set(bulk.message_ids) == {"+12025550144", "+447911123456"}
        assert bulk.batch_id and bulk.cost == pytest.approx(0.5 + 0.8)
        balance = await client.balance()
        assert balance["balance"] == pytest.approx(1000 - 0.5 - 0.5 - 0.8)
        page = await client.logs(per_page=2)
        assert len(page.entries) == 2 and page.has_more
        assert page.entries[0].status == "pending"
        assert (await client.logs(page=2, per_page=2)).has_more is False
        assert (await client.pricing())["countries"]
        assert (await client.account())["status"] == "active"
        calc = await client.calculate(["+12025550143"], "x" * 200)
        assert calc["parts"] == 2 and calc["cost"] == 1.0
    answered = [r for r in sandbox_state.requests if r.status == 200]
    assert len(answered) == 8
    # The sandbox takes either header: what the client sent is what the setting says.
    assert {r.auth for r in sandbox_state.requests} == {auth_header}


async def test_classification_of_provider_answers(
    clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    async with httpx.AsyncClient() as http:
        client = make_client(http, sandbox_url, clock)
        with pytest.raises(PermanentSendError, match="international format"):
            await client.send("12", "x")
        with pytest.raises(PermanentSendError, match="sender id"):
            await client.send("+12025550143", "x", sender_id="TWELVE-CHARS")
        with pytest.raises(ProviderAuthError) as auth:
            await make_client(http, sandbox_url, clock, key="wrong").balance()
        assert auth.value.status == 401
        sandbox_state.faults.append(Fault(status=500))
        with pytest.raises(TransientSendError) as server:
            await client.balance()
        assert server.value.status == 500 and not isinstance(server.value, TransientUnknownOutcome)
        sandbox_state.faults.append(Fault(status=403))
        with pytest.raises(ProviderAuthError):
            await client.balance()
        # An undocumented path configured wrongly is a configuration error, not a retry.
        wrong_path = make_client(http, sandbox_url, clock, pricing_path="/prices")
        with pytest.raises(ProviderAuthError) as missing:
            await wrong_path.pricing()
        assert missing.value.status == 404
        sandbox_state.faults.append(Fault(status=200, body="<html>maintenance</html>"))
        with pytest.raises(TransientUnknownOutcome, match="unparseable"):
            await client.send("+12025550143", "x")


async def test_429_with_retry_after_seconds_and_http_date(
    clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    sandbox_state.rate_limit = 2
    async with httpx.AsyncClient() as http:
        client = make_client(http, sandbox_url, clock)
        await client.balance()
        clock.advance(10)
        await client.balance()
        with pytest.raises(RateLimitedError) as limited:
            await client.balance()
        assert limited.value.retry_after == 50
        date = email.utils.formatdate(clock.now() + 120, usegmt=True)
        sandbox_state.faults.append(Fault(status=429, retry_after=date))
        with pytest.raises(RateLimitedError) as dated:
            await client.balance()
        assert dated.value.retry_after == pytest.approx(120, abs=1)
        sandbox_state.faults.append(Fault(status=429))
        with pytest.raises(RateLimitedError) as bare:
            await client.balance()
        assert bare.value.retry_after is None


def test_parse_retry_after() -> None:
    assert parse_retry_after("7", 0) == 7
    assert parse_retry_after("garbage", 0) is None
    assert parse_retry_after("nan", 0) is None
    assert parse_retry_after("inf", 0) == parse_retry_after("1e12", 0) == 3600
    assert parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT", 0) == 3600
    assert parse_retry_after(None, 0) is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 1445412480 - 30) == 30


def _faulty(handler):
    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


async def test_transport_faults_are_transient(clock: ManualClock) -> None:
    def connect_fail(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    def read_timeout(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    def reset(request: httpx.Request) -> httpx.Response:
        raise httpx.RemoteProtocolError("peer closed connection mid-response", request=request)

    def odd_json(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=["not", "an", "object"])

    def tolerant_bulk(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            201,
            json={
                "success": True,
                "data": {"bulk_id": 77, "message_ids": [5, 6], "total_cost": "1.0"},
            },
        )

    cases = [
        (connect_fail, TransientSendError, False),
        (read_timeout, TransientUnknownOutcome, True),
        (reset, TransientUnknownOutcome, True),
        (odd_json, TransientUnknownOutcome, True),
    ]
    for handler, error, unknown in cases:
        async with _faulty(handler) as http:
            client = ProviderClient(
                http=http, base_url="http://127.0.0.1:9/api/v1", api_key="k", clock=clock
            )
            with pytest.raises(error) as caught:
                await client.send("+12025550143", "x")
            assert isinstance(caught.value, TransientUnknownOutcome) is unknown
    async with _faulty(tolerant_bulk) as http:
        client = ProviderClient(
            http=http, base_url="http://127.0.0.1:9/api/v1", api_key="k", clock=clock
        )
        result = await client.send_bulk(["+12025550143", "+12025550144"], "x")
    assert result.message_ids == {"+12025550143": "5", "+12025550144": "6"}
    assert result.batch_id == "77" and result.cost == 1.0


@pytest.mark.parametrize(
    ("said", "retried", "looked_up"),
    [
        ("Insufficient balance, please try again later", True, False),
        ("insufficient_balance", True, False),  # error codes: their words joined by _ or case
        ("RateLimitExceeded", True, False),
        ("rate-limited", True, False),
        ("TOO_MANY_REQUESTS", True, False),
        ("temporarilyUnavailable", True, False),
        ("GatewayTimeout", True, True),  # a timeout: the text may have gone before it
        ("credits exhausted", True, False),
        ("Low balances", True, False),
        ("TimeOut", True, True),
        ("timed out", True, True),
        ("time-out", True, True),
        ("ETIMEDOUT", True, True),
        ("Upstream SMSC request timed out", True, True),
        ("SMSC_TIMEOUT", True, True),
        ("Request timed out, please try again later", True, True),  # the timeout decides
        ("context deadline exceeded", True, True),  # Go's and gRPC's timeout
        ("DEADLINE_EXCEEDED", True, True),
        ("DeadlineExceeded", True, True),
        ("Upstream deadline expired", True, True),
        ("Invalid deadline for schedule_time", False, False),  # a deadline, not one passed
        ("RATELIMIT", True, False),
        ("too-many-requests", True, False),
        ("HTTP429TooManyRequests", True, False),
        ("SERVER_BUSY", True, False),
        ("maintenance_mode", True, False),
        ("NO_CREDITS", True, False),
        ("Number blacklisted", False, False),
        ("Sender ID not approved", False, False),
        ("collateral", False, False),
        ("Invalid recipient number; upgrade to unlimited plans", False, False),  # not "limit"
        ("UnlimitedPlanRequired", False, False),
        ("INVALID_NUMBER", False, False),
        ("Invalid timezone for schedule_time", False, False),  # not "time out"
    ],
)
def test_a_refusal_is_retried_on_its_words_or_codes(
    said: str, retried: bool, looked_up: bool
) -> None:
    """A `success: false` answer is retried when its words say it may pass later, judged
    as whole words: "unlimited" is no "limit". Whole words alone missed the codes that
    join them (insufficient_balance, RateLimitExceeded): those failed for good. One that
    says it timed out is looked up in /logs before the retry (`ProviderFailed`, as a 5xx
    in that shape): the provider may have sent it, and a blind retry texted twice."""
    answer = httpx.Response(200, json={"success": False, "message": said})
    with pytest.raises((PermanentSendError, TransientSendError)) as refused:
        classify(answer, 0.0)
    assert isinstance(refused.value, TransientSendError) is retried, type(refused.value)
    assert isinstance(refused.value, ProviderFailed) is looked_up, type(refused.value)
