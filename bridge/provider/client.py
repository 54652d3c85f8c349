"""The provider's REST API (the SMS provider's published v1 API) and the one classification of its answers.

Every call goes through `_request`, which turns an HTTP exchange into either a parsed JSON
object or one of the exceptions in `bridge.errors`: 400 permanent; 401/404 (and
redirects) auth or configuration; 403 an inactive account; 429 rate-limited with
`Retry-After` (seconds or an HTTP-date); 5xx, timeouts, resets and unparseable bodies
transient. Any 2xx is a success (201 = 200); a 2xx saying `"success": false` is transient
when its reason reads so (balance, limit, try again), else permanent. A 2xx that says it
took the message but gives no id is a success without ids (the poller then matches the
message by recipient and text); only an answer that says nothing is an unknown outcome.
Response parsing is tolerant because the bulk, logs, pricing and account bodies are not
documented: numbers are mapped back to ours whatever their form, keys have variants.
"""

from __future__ import annotations

import email.utils
import json
import re
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
    ProviderInactiveError,
    RateLimitedError,
    TransientSendError,
)
from bridge.provider.logmatch import same_number

SEND_PATH = "/send"
BULK_PATH = "/send-bulk"
BALANCE_PATH = "/balance"
LOGS_PATH = "/logs"
MAX_LOGS_PER_PAGE = 100
_TRANSIENT_4XX = {408, 425}
# A `"success": false` whose reason reads like one of these may pass: retry, do not fail.
_TRANSIENT_WORDS = re.compile(
    r"balance|credit|insufficient|limit|too many|try again|later|temporar|busy|throttl|"
    r"unavailable|timeout|maintenance",
    re.IGNORECASE,
)
_ACCEPTED_WORDS = {"success", "ok", "sent", "queued", "accepted", "pending", "true"}
ID_KEYS = ("message_id", "id", "messageId", "sms_id", "uuid")
NUMBER_KEYS = ("to", "recipient", "number", "phone", "msisdn", "mobile", "destination")
TEXT_KEYS = ("message", "sms", "text", "content", "body")
STATUS_KEYS = ("status", "state", "delivery_status")
TIME_KEYS = ("created_at", "sent_at", "date", "timestamp", "created", "time")


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


class ProviderFailed(TransientSendError):
    """A 5xx in the provider's own error shape (`"success": false`): it says it failed, but
    a send is still looked up in /logs before it goes again."""


_OUTCOMES: dict[type[ProviderError], str] = {
    PermanentSendError: "permanent",
    ProviderAuthError: "auth",
    ProviderInactiveError: "inactive",
    ProviderFailed: "transient",
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


def _error_body(response: httpx.Response) -> bool:
    """Is this the provider's documented error shape, `{"success": false, ...}`?"""
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("success") is False


def accepted(body: Mapping[str, Any]) -> bool:
    """Does the answer say the provider took the request (whatever else it omits)?"""
    if body.get("success") is True:
        return True
    status = body.get("status")
    return isinstance(status, str) and status.strip().lower() in _ACCEPTED_WORDS


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
            # The provider's own error body says it failed; anything else (a gateway's
            # HTML, an empty 502/504) may have come after the provider took the request.
            kind: type[TransientSendError] = TransientSendError
            if status >= 500:
                kind = ProviderFailed if _error_body(response) else TransientUnknownOutcome
            raise kind(
                _error_message(response),
                status=status,
                retry_after=parse_retry_after(
                    response.headers.get("Retry-After"), self._clock.now()
                ),
            )
        if status == 403:
            raise ProviderInactiveError(_error_message(response), status=status)
        if status in (401, 404) or 300 <= status < 400:
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
            reason = _error_message(response)
            if _TRANSIENT_WORDS.search(reason):
                raise TransientSendError(reason, status=status)
            raise PermanentSendError(reason, status=status)
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
        answer = await self._request("POST", SEND_PATH, body=body)
        data = _data(answer)
        message_id = _first(data, *ID_KEYS)
        if message_id is None and not accepted(answer):
            raise TransientUnknownOutcome("provider answered without an id or a success flag")
        return SendResult(
            message_ids={} if message_id is None else {to: str(message_id)},
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
        answer = await self._request("POST", BULK_PATH, body=body)
        result, count = _parse_bulk(answer.get("data"), recipients)
        if count is not None and count != len(recipients) and not result.message_ids:
            # Some were taken, we cannot tell which: /logs decides for each.
            raise TransientUnknownOutcome(
                f"provider accepted {count} of {len(recipients)} recipients, without ids"
            )
        nothing = not result.message_ids and result.batch_id is None and count is None
        if nothing and not accepted(answer):
            # An unexpected body: whether the provider took it is unknown: /logs decides.
            raise TransientUnknownOutcome("provider answered without ids or a success flag")
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
        return _parse_logs(body, page, per_page)


def _data(body: Mapping[str, Any]) -> dict[str, Any]:
    data = body.get("data")
    return data if isinstance(data, dict) else {}


def _ours(number: Any, recipients: Sequence[str]) -> str | None:
    """Which of our recipients the provider's `number` is, in whatever form it wrote it."""
    text = str(number)
    if text in recipients:
        return text
    return next((r for r in recipients if same_number(r, text)), None)


def _parse_bulk(data: Any, recipients: Sequence[str]) -> tuple[SendResult, int | None]:
    """Per-recipient ids (never the batch id), the batch id, cost; and an accepted count."""
    if not isinstance(data, dict):
        return SendResult(), None
    ids: dict[str, str] = {}
    items = _first(data, "messages", "results", "message_ids", "ids", "recipients")
    if isinstance(items, dict):
        for number, mid in items.items():
            ours = _ours(number, recipients)
            if ours is not None and not isinstance(mid, dict | list):
                ids[ours] = str(mid)
    elif isinstance(items, list):
        for index, item in enumerate(items):
            if isinstance(item, dict):
                to, mid = _first(item, *NUMBER_KEYS), _first(item, *ID_KEYS)
                ours = None if to is None else _ours(to, recipients)
                if ours is not None and mid is not None:
                    ids[ours] = str(mid)
            elif isinstance(item, int) and not isinstance(item, bool):
                if len(items) == len(recipients):  # ids in the order sent
                    ids[recipients[index]] = str(item)
            elif (
                isinstance(item, str)
                and len(items) == len(recipients)
                and _ours(item, recipients) is None  # an id, not a number echoed back
            ):
                ids[recipients[index]] = item
    batch = _first(data, "batch_id", "bulk_id", "batch", "campaign_id")
    count = _first(data, "count", "total", "accepted", "total_recipients", "sent")
    if isinstance(count, list | bool) or _number(count) is None:
        count = None
    return (
        SendResult(
            message_ids=ids,
            batch_id=None if batch is None else str(batch),
            cost=_number(_first(data, "cost", "total_cost", "price")),
            balance=_number(data.get("balance")),
        ),
        None if count is None else int(float(count)),
    )


def _parse_logs(body: Mapping[str, Any], page: int, per_page: int) -> LogsPage:
    data = _first(body, "data", "logs", "items", "entries", "messages", "records")
    meta: Mapping[str, Any] = body
    if isinstance(data, dict):
        meta = data
        data = _first(data, "data", "logs", "items", "entries", "messages", "records")
    rows = data if isinstance(data, list) else []
    paging = _first(meta, "pagination", "meta") or _first(body, "pagination", "meta") or meta
    paging = paging if isinstance(paging, dict) else {}
    entries = []
    for row in rows:
        if not isinstance(row, dict):
            continue
        entry_id = _first(row, *ID_KEYS)
        if entry_id is None:
            continue
        created = _first(row, *TIME_KEYS)
        entries.append(
            LogEntry(
                id=str(entry_id),
                recipient=str(_first(row, *NUMBER_KEYS) or ""),
                message=str(_first(row, *TEXT_KEYS) or ""),
                status=str(_first(row, *STATUS_KEYS) or "").strip().lower(),
                cost=_number(row.get("cost")),
                created_at=None if created is None else str(created),
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
