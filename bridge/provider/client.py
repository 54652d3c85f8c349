"""The provider's REST API (docs/sms-api.md) and the one classification of its answers.

Every call goes through `_request`, which turns an HTTP exchange into either a parsed JSON
object or one of the exceptions in `bridge.errors`: 400 permanent; 401/403/404 (and
redirects) auth or configuration; 429 rate-limited with `Retry-After` (seconds or an
HTTP-date); 5xx, timeouts, resets and unparseable bodies transient. Response parsing is
tolerant because the bulk, logs, pricing and account bodies are not documented.
"""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from bridge.clock import Clock
from bridge.errors import (
    PermanentSendError,
    ProviderAuthError,
    ProviderError,
    RateLimitedError,
    TransientSendError,
)

SEND_PATH = "/send"
BULK_PATH = "/send-bulk"
BALANCE_PATH = "/balance"
LOGS_PATH = "/logs"
MAX_LOGS_PER_PAGE = 100
_TRANSIENT_4XX = {408, 425}


@dataclass(frozen=True, slots=True)
class SendResult:
    """What a send call returned: ids by recipient where the provider gave them."""

    message_ids: dict[str, str] = field(default_factory=dict)
    batch_id: str | None = None
    cost: float | None = None
    balance: float | None = None


@dataclass(frozen=True, slots=True)
class LogEntry:
    id: str
    recipient: str
    message: str
    status: str
    cost: float | None
    created_at: str | None


@dataclass(frozen=True, slots=True)
class LogsPage:
    entries: list[LogEntry]
    page: int
    has_more: bool


class TransientUnknownOutcome(TransientSendError):
    """The request may have reached the provider (read timeout, reset): verify before resending."""


_OUTCOMES: dict[type[ProviderError], str] = {
    PermanentSendError: "permanent",
    ProviderAuthError: "auth",
    RateLimitedError: "rate_limited",
    TransientSendError: "transient",
    TransientUnknownOutcome: "unknown",
}


def parse_retry_after(value: str | None, now: float) -> float | None:
    """`Retry-After` as delta-seconds or an HTTP-date, in seconds from `now`."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - now)


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip()
        return text[:200] or response.reason_phrase or "no reason given"
    if isinstance(body, dict):
        for key in ("message", "error", "detail", "errors"):
            if body.get(key):
                value = body[key]
                return value if isinstance(value, str) else json.dumps(value)[:200]
    return json.dumps(body)[:200]


def _first(mapping: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if key in mapping and mapping[key] is not None:
            return mapping[key]
    return None


def _number(value: Any) -> float | None:
    try:
        return None if value is None or isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        return None


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
    ) -> None:
        self._http = http
        self._base = base_url.rstrip("/")
        self._clock = clock
        self._headers = (
            {"Authorization": f"Bearer {api_key}"}
            if auth_header == "bearer"
            else {"X-API-Key": api_key}
        )
        self._headers["Accept"] = "application/json"
        self.paths = {"pricing": pricing_path, "account": account_path, "calculate": calculate_path}
        self.bulk_message_type = bulk_message_type
        self._observe = observe  # (endpoint, outcome, seconds) for metrics

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
        try:
            return await self._exchange(method, path, body=body, params=params)
        except ProviderError as exc:
            outcome = _OUTCOMES.get(type(exc), "transient")
            raise
        finally:
            if self._observe is not None:
                self._observe(path.strip("/") or "/", outcome, time.perf_counter() - started)

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
        return self._classify(response)

    def _classify(self, response: httpx.Response) -> dict[str, Any]:
        status = response.status_code
        if status == 429:
            retry_after = parse_retry_after(response.headers.get("Retry-After"), self._clock.now())
            raise RateLimitedError(_error_message(response), status=status, retry_after=retry_after)
        if status >= 500 or status in _TRANSIENT_4XX:
            raise TransientSendError(
                _error_message(response),
                status=status,
                retry_after=parse_retry_after(
                    response.headers.get("Retry-After"), self._clock.now()
                ),
            )
        if status in (401, 403, 404) or 300 <= status < 400:
            raise ProviderAuthError(_error_message(response), status=status)
        if status >= 400:
            raise PermanentSendError(_error_message(response), status=status)
        try:
            body = response.json()
        except ValueError as exc:
            raise TransientUnknownOutcome(
                f"unparseable provider answer (HTTP {status}): {response.text[:100]!r}",
                status=status,
            ) from exc
        if not isinstance(body, dict):
            raise TransientUnknownOutcome(
                f"unexpected provider answer (HTTP {status}): {response.text[:100]!r}",
                status=status,
            )
        if body.get("success") is False:
            raise PermanentSendError(_error_message(response), status=status)
        return body

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
        data = (await self._request("POST", SEND_PATH, body=body)).get("data")
        data = data if isinstance(data, dict) else {}
        message_id = _first(data, "message_id", "id")
        if message_id is None:
            raise TransientUnknownOutcome("provider answered success without a message id")
        return SendResult(
            message_ids={to: str(message_id)},
            cost=_number(data.get("cost")),
            balance=_number(data.get("balance")),
        )

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
        data = (await self._request("POST", BULK_PATH, body=body)).get("data")
        result = _parse_bulk(data, recipients)
        if not result.message_ids and result.batch_id is None:
            # An unexpected body: whether the provider took it is unknown, so /logs decides.
            raise TransientUnknownOutcome("provider answered success without any message id")
        return result

    # -- account endpoints -----------------------------------------------------------
    async def balance(self) -> dict[str, Any]:
        return _data(await self._request("GET", BALANCE_PATH))

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
        return _parse_logs(await self._request("GET", LOGS_PATH, params=params), page, per_page)


def _data(body: Mapping[str, Any]) -> dict[str, Any]:
    data = body.get("data")
    return data if isinstance(data, dict) else {}


def _parse_bulk(data: Any, recipients: Sequence[str]) -> SendResult:
    if not isinstance(data, dict):
        return SendResult()
    ids: dict[str, str] = {}
    items = _first(data, "messages", "results", "message_ids", "recipients")
    if isinstance(items, dict):
        ids = {str(k): str(v) for k, v in items.items()}
    elif isinstance(items, list):
        for index, item in enumerate(items):
            if isinstance(item, dict):
                to = _first(item, "to", "recipient", "number", "phone")
                mid = _first(item, "message_id", "id")
                if to is not None and mid is not None:
                    ids[str(to)] = str(mid)
            elif isinstance(item, str | int) and index < len(recipients):
                ids[recipients[index]] = str(item)
    batch = _first(data, "batch_id", "bulk_id", "message_id")
    return SendResult(
        message_ids=ids,
        batch_id=None if batch is None else str(batch),
        cost=_number(_first(data, "cost", "total_cost")),
        balance=_number(data.get("balance")),
    )


def _parse_logs(body: Mapping[str, Any], page: int, per_page: int) -> LogsPage:
    data = body.get("data")
    meta: Mapping[str, Any] = body
    if isinstance(data, dict):
        meta = data
        data = _first(data, "data", "logs", "items", "entries", "messages")
    rows = data if isinstance(data, list) else []
    paging = _first(meta, "pagination", "meta") or _first(body, "pagination", "meta") or meta
    paging = paging if isinstance(paging, dict) else {}
    entries = []
    for row in rows:
        if not isinstance(row, dict):
            continue
        entry_id = _first(row, "message_id", "id")
        if entry_id is None:
            continue
        entries.append(
            LogEntry(
                id=str(entry_id),
                recipient=str(_first(row, "to", "recipient", "number", "phone") or ""),
                message=str(_first(row, "message", "text", "body") or ""),
                status=str(row.get("status") or "").lower(),
                cost=_number(row.get("cost")),
                created_at=_first(row, "created_at", "sent_at", "date"),
            )
        )
    last_page = _first(paging, "last_page", "total_pages", "pages")
    if isinstance(last_page, int):
        has_more = page < last_page
    elif isinstance(paging.get("has_more"), bool):
        has_more = paging["has_more"]
    else:
        has_more = len(entries) >= per_page
    return LogsPage(entries=entries, page=page, has_more=has_more)
