"""The provider client against the sandbox on loopback; mock transports only for faults."""

from __future__ import annotations

import email.utils

import httpx
import pytest

from bridge.clock import ManualClock
from bridge.errors import (
    PermanentSendError,
    ProviderAccountError,
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
from bridge.provider.responses import classify, read_bulk, read_send
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
    ("said", "kind"),
    [
        ("Insufficient balance, please try again later", "account"),  # the account's
        ("Invalid API key", "account"),
        ("invalid_api_key", "account"),
        ("Your account has been suspended", "account"),
        ("Account is not active", "account"),
        ("Subscription expired", "account"),
        ("Recipient number not active", "failed"),  # the number's, not the account's
        ("Unicode disabled for this sender", "failed"),
        ("insufficient_balance", "account"),  # error codes: their words joined by _ or case
        ("RateLimitExceeded", "retried"),
        ("rate-limited", "retried"),
        ("TOO_MANY_REQUESTS", "retried"),
        ("temporarilyUnavailable", "retried"),
        ("GatewayTimeout", "looked_up"),  # a timeout: the text may have gone before it
        ("credits exhausted", "account"),
        ("Low balances", "account"),
        ("TimeOut", "looked_up"),
        ("timed out", "looked_up"),
        ("time-out", "looked_up"),
        ("ETIMEDOUT", "looked_up"),
        ("Upstream SMSC request timed out", "looked_up"),
        ("SMSC_TIMEOUT", "looked_up"),
        ("Request timed out, please try again later", "looked_up"),  # the timeout decides
        ("context deadline exceeded", "looked_up"),  # Go's and gRPC's timeout
        ("DEADLINE_EXCEEDED", "looked_up"),
        ("DeadlineExceeded", "looked_up"),
        ("Upstream deadline expired", "looked_up"),
        ("Invalid deadline for schedule_time", "failed"),  # a deadline, not one passed
        ("RATELIMIT", "retried"),
        ("rate limit exceeded", "retried"),
        ("Throttled, try again", "retried"),
        ("too-many-requests", "retried"),
        ("HTTP429TooManyRequests", "retried"),
        ("SERVER_BUSY", "retried"),
        ("maintenance_mode", "retried"),
        ("NO_CREDITS", "account"),
        ("Number blacklisted", "failed"),
        ("Sender ID not approved", "failed"),
        ("collateral", "failed"),
        ("Invalid recipient number; upgrade to unlimited plans", "failed"),  # not "limit"
        ("UnlimitedPlanRequired", "failed"),
        ("INVALID_NUMBER", "failed"),
        ("Invalid timezone for schedule_time", "failed"),  # not "time out"
    ],
)
@pytest.mark.parametrize(
    "answer",
    [
        (200, {"success": False}),
        (200, {"success": 0}),  # read `is False` only, these were an unknown outcome
        (200, {"success": "false"}),
        (200, {"success": "error"}),
        (200, {"status": "error"}),
        (200, {"status": "Failed"}),
        (400, {"success": False}),
        (402, {"success": False}),  # read by status alone, every 4xx was permanent
        (413, {"error": None}),
        (422, {}),
    ],
)
def test_a_refusal_is_read_on_its_words_or_codes(
    said: str, kind: str, answer: tuple[int, dict[str, object]]
) -> None:
    """A refusal (a 4xx other than 401/403/404/429, or a 2xx whose success flag is falsy
    in any spelling) is read on its words, whatever its status: retried when they say it
    may pass later, waited out when they say the account cannot send (no balance, key
    invalid, suspended: `ProviderAccountError`, not the text's fault), failed otherwise.
    Judged as whole words: "unlimited" is no "limit"; codes join them (insufficient_balance,
    RateLimitExceeded). One that says it timed out is looked up in /logs before the retry
    (`ProviderFailed`, as a 5xx in that shape): the provider may have sent it."""
    status, shape = answer
    body = {**shape, "message": said}
    with pytest.raises((PermanentSendError, TransientSendError, ProviderAccountError)) as refused:
        classify(httpx.Response(status, json=body), 0.0)
    got = {
        ProviderFailed: "looked_up",
        TransientSendError: "retried",
        ProviderAccountError: "account",
        PermanentSendError: "failed",
    }[type(refused.value)]
    assert got == kind, type(refused.value)
    assert refused.value.reason == said and refused.value.status == status


def test_an_id_given_to_several_recipients_is_none_of_theirs() -> None:
    """A bulk answer's ids read as the provider's /logs writes them (10000.0 is 10000),
    and an id it gives to several recipients is the call's: those recipients are taken
    (`shared`, sent and matched in /logs by recipient and text), not unknown outcomes."""
    numbers = ["+12025550143", "+12025550144", "+12025550145"]
    answer = {
        "success": True,
        "data": {
            "messages": [
                {"to": numbers[0], "message_id": 777},
                {"to": numbers[1], "message_id": "777"},
                {"to": numbers[2], "message_id": 10000.0},
            ]
        },
    }
    result = read_bulk(answer, numbers)
    assert result.message_ids == {numbers[2]: "10000"}
    assert result.shared == frozenset(numbers[:2])
    everyone = {"success": True, "data": {"message_ids": [777, 777, 777]}}
    alike = read_bulk(everyone, numbers)
    assert alike.message_ids == {} and alike.shared == frozenset(numbers)
    assert read_send(
        {"success": True, "data": {"message_id": 10000.0}}, numbers[0]
    ).message_ids == {numbers[0]: "10000"}
