"""The provider's REST API (the SMS provider's published v1 API): one client per
process over the injected `httpx.AsyncClient`.

It builds each request (auth header as configured, the undocumented paths from config,
`message_type` on bulk only where the provider takes it) and turns transport failures
into outcomes: no connection, a connect or pool timeout, is transient (nothing reached
the provider); a read timeout, a reset mid-request or an answer whose body cannot be
decoded is an unknown outcome (the provider may have taken it: /logs decides before
anything is resent). What the provider answered
is read by responses.py, the one classification of its answers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import httpx

from bridge.clock import Clock
from bridge.errors import (
    ProviderAuthError,
    ProviderError,
    ProviderInactiveError,
    TransientSendError,
)
from bridge.provider.responses import (
    OUTCOMES,
    LogEntry,
    LogsPage,
    ProviderFailed,
    SendResult,
    TransientUnknownOutcome,
    classify,
    data_of,
    parse_retry_after,
    read_bulk,
    read_logs,
    read_send,
)

# What callers of the client catch and read come from here too (the dispatcher and the
# poller import them from the client they call).
__all__ = [
    "MAX_LOGS_PER_PAGE",
    "LogEntry",
    "LogsPage",
    "ProviderClient",
    "ProviderFailed",
    "SendResult",
    "TransientUnknownOutcome",
    "parse_retry_after",
]

SEND_PATH = "/send"
BULK_PATH = "/send-bulk"
BALANCE_PATH = "/balance"
LOGS_PATH = "/logs"
MAX_LOGS_PER_PAGE = 100


class ProviderClient:
    """One per process; shares the injected `httpx.AsyncClient`."""

    def __init__(
        self,
        *,
        http: httpx.AsyncClient,
        base_url: str,
        api_key: str,
        clock: Clock,
        auth_header: str = "x-api-key",
        pricing_path: str = "/pricing",
        account_path: str = "/account",
        calculate_path: str = "/calculate",
        bulk_message_type: bool = False,
        observe: Callable[[str, str, float], None] | None = None,
        after_call: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._http = http
        self._base = base_url.rstrip("/")
        self._clock = clock
        self._api_key = api_key  # masked in what the provider's errors quote
        self._headers = (
            {"Authorization": f"Bearer {api_key}"}
            if auth_header == "bearer"
            else {"X-API-Key": api_key}
        )
        self._headers["Accept"] = "application/json"
        self.paths = {"pricing": pricing_path, "account": account_path, "calculate": calculate_path}
        self.bulk_message_type = bulk_message_type
        self._observe = observe  # (endpoint, outcome, seconds) for metrics
        # After every request, answered or failed (not cut short by a cancel): the rate
        # window moves the request's booking to then (`SlidingWindowLimiter.came_back`).
        self._after_call = after_call

    async def _request(
        self,
        method: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        started = time.perf_counter()
        outcome = "success"
        cancelled = False
        try:
            return await self._exchange(method, path, body=body, params=params)
        except ProviderError as exc:
            outcome = OUTCOMES.get(type(exc), "transient")
            raise
        except asyncio.CancelledError:
            cancelled = True  # a stop: no store write on the way out
            raise
        finally:
            if self._observe is not None:
                self._observe(path.strip("/") or "/", outcome, time.perf_counter() - started)
            if self._after_call is not None and not cancelled:
                await self._after_call()

    async def _exchange(
        self,
        method: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        url = self._base + path
        try:
            response = await self._http.request(
                method, url, json=body, params=params, headers=self._headers
            )
        except httpx.ConnectError as exc:
            raise TransientSendError(f"cannot connect to the provider: {exc}") from exc
        except httpx.ConnectTimeout as exc:
            raise TransientSendError("connect timeout") from exc
        except httpx.PoolTimeout as exc:
            raise TransientSendError("connection pool timeout") from exc
        except httpx.TimeoutException as exc:
            raise TransientUnknownOutcome(f"timeout waiting for the provider ({exc!r})") from exc
        except httpx.TransportError as exc:
            raise TransientUnknownOutcome(f"connection failed mid-request: {exc!r}") from exc
        except httpx.DecodingError as exc:
            # The provider answered, but its body cannot be decoded (a gateway's gzip
            # header over a plain body): what it said is unknown. No transport error, so
            # uncaught it ended the dispatcher's step, and `serve` with it.
            raise TransientUnknownOutcome(f"undecodable provider answer: {exc}") from exc
        return classify(response, self._clock.now(), key=self._api_key)

    # -- sending -------------------------------------------------------------------
    async def send(
        self,
        to: str,
        message: str,
        *,
        sender_id: str | None = None,
        message_type: int | None = None,
        schedule_time: str | None = None,
    ) -> SendResult:
        body: dict[str, Any] = {"to": to, "message": message}
        if sender_id:
            body["sender_id"] = sender_id
        if message_type is not None:
            body["message_type"] = message_type
        if schedule_time:
            body["schedule_time"] = schedule_time
        return read_send(await self._request("POST", SEND_PATH, body=body), to)

    async def send_bulk(
        self,
        recipients: Sequence[str],
        message: str,
        *,
        sender_id: str | None = None,
        message_type: int | None = None,
    ) -> SendResult:
        body: dict[str, Any] = {"recipients": list(recipients), "message": message}
        if sender_id:
            body["sender_id"] = sender_id
        if message_type is not None and self.bulk_message_type:
            body["message_type"] = message_type
        return read_bulk(await self._request("POST", BULK_PATH, body=body), recipients)

    # -- account endpoints -----------------------------------------------------------
    async def balance(self) -> dict[str, Any]:
        return data_of(await self._request("GET", BALANCE_PATH))

    async def pricing(self) -> Any:
        return (await self._request("GET", self.paths["pricing"])).get("data")

    async def account(self) -> Any:
        return (await self._request("GET", self.paths["account"])).get("data")

    async def calculate(self, recipients: Sequence[str], message: str) -> Any:
        body: dict[str, Any] = {"message": message}
        if len(recipients) == 1:
            body["to"] = recipients[0]
        else:
            body["recipients"] = list(recipients)
        return (await self._request("POST", self.paths["calculate"], body=body)).get("data")

    async def logs(
        self,
        *,
        page: int = 1,
        per_page: int = MAX_LOGS_PER_PAGE,
        status: str | None = None,
        date_from: str | None = None,
        date_to: str | None = None,
    ) -> LogsPage:
        params: dict[str, Any] = {"page": page, "per_page": per_page}
        for key, value in (("status", status), ("date_from", date_from), ("date_to", date_to)):
            if value:
                params[key] = value
        try:
            body = await self._request("GET", LOGS_PATH, params=params)
        except ProviderInactiveError:
            raise
        except ProviderAuthError as exc:
            if exc.status != 404:
                raise
            # /balance and /send work with this key and base URL, so a 404 here says
            # nothing about them (an empty page, a path the plan lacks): not an auth error.
            raise TransientSendError(f"/logs answered 404: {exc.reason}", status=404) from exc
        return read_logs(body, page)
