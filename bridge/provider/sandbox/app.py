"""The sandbox provider: the SMS provider's v1 API served for real, on loopback, from memory.

It is what `serve` talks to when `provider.base_url` is empty, what `sms-bridge sandbox`
runs standalone, and what the tests send to. It keeps the documented behaviour: key check
(`X-API-Key` or `Bearer`), 100 requests per sliding minute per key with 429 and
`Retry-After`, 400 with a message for invalid parameters, `sender_id` <= 11 characters,
bulk <= 1000, a balance that falls by a per-country price times the SMS parts, and `/logs`
entries that move pending -> sent -> delivered (or failed, for `fail_share` of them) as
its clock advances. Faults can be queued through `/_sandbox/faults` to make a real server
misbehave in tests. Its state never touches the bridge's store.

Where the documentation is silent, the sandbox does NOT copy the client's guesses: a
`Shape` (one of `VARIANTS`, `sandbox.variant` in the config) picks how it answers: numbers
with or without `+`, other key names in /logs, bulk answers with ids, a batch id only or a
count only, a success without an id, timestamps in a local zone, 201 for a send, and
stricter validation (past or unpadded `schedule_time`, `to` without `+`, unknown fields,
a balance that may not go negative). It is an independent oracle: parts, prices and
number checks come from its own tables, not from the bridge's text and phone modules.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import zoneinfo
from collections import deque
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, tzinfo
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bridge.clock import Clock
from bridge.config import SANDBOX_VARIANTS, Config

RATE_WINDOW = 60.0
MAX_BULK = 1000
MAX_SENDER_ID = 11
MAX_MESSAGE_CHARS = 1600
DEFAULT_PRICES = {1: 0.5, 33: 0.9, 44: 0.8, 49: 0.9, 961: 1.5, 971: 1.2}
DEFAULT_PRICE = 1.0
LOG_STATUSES = ("delivered", "sent", "pending", "failed")
_INTERNATIONAL = re.compile(r"^\+?[1-9]\d{6,14}$")
_STRICT_INTERNATIONAL = re.compile(r"^\+[1-9]\d{6,14}$")
_PADDED_SCHEDULE = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$")
SCHEDULE_FORMAT = "%Y-%m-%d %H:%M:%S"
SEND_FIELDS = {"to", "message", "sender_id", "message_type", "schedule_time"}
BULK_FIELDS = {"recipients", "message", "sender_id", "message_type"}
# GSM 03.38, the sandbox's own copy: the basic set (one septet) and the extension table
# (two septets). Anything else makes a text UCS-2 (70 characters, 67 per part).
GSM_BASIC = set(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM_EXTENSION = set("^{}\\[~]|€\f")


def sms_parts(message: str, message_type: int) -> int:
    """How many SMS the provider bills for `message` sent as `message_type`."""
    if message_type == 1 and all(c in GSM_BASIC or c in GSM_EXTENSION for c in message):
        septets = sum(2 if c in GSM_EXTENSION else 1 for c in message)
        return 1 if septets <= 160 else math.ceil(septets / 153)
    units = len(message.encode("utf-16-le")) // 2
    return 1 if units <= 70 else math.ceil(units / 67)


def calling_code(digits: str, known: dict[int, float]) -> int | None:
    """The country calling code that starts `digits`, among those priced (prefix-free)."""
    for length in (1, 2, 3):
        if int(digits[:length]) in known:
            return int(digits[:length])
    return None


@dataclass(frozen=True)
class Shape:
    """How the sandbox answers where the documentation does not say."""

    numbers: str = "e164"  # e164 | plain (digits only, no +) in /logs and bulk answers
    log_keys: str = "documented"  # documented | other (phone, sms, state, created)
    send_answer: str = "id"  # id | no-id (success and cost, no message id)
    bulk_answer: str = "ids"  # ids | batch (a batch id only) | count (a count and cost)
    timezone: str = "UTC"  # the zone of its timestamps and of schedule_time
    created_status: int = 200  # 200 | 201 for an accepted send
    strict: bool = False  # refuse past/unpadded schedule_time, `to` without +, unknown
    # fields, and a send the balance does not cover

    @property
    def zone(self) -> tzinfo:
        return UTC if self.timezone == "UTC" else zoneinfo.ZoneInfo(self.timezone)


VARIANTS: dict[str, Shape] = {
    "documented": Shape(),
    "plain-numbers": Shape(numbers="plain"),
    "other-keys": Shape(numbers="plain", log_keys="other"),
    "batch-only": Shape(bulk_answer="batch", send_answer="no-id"),
    "count-only": Shape(bulk_answer="count", send_answer="no-id"),
    "local-time": Shape(timezone="Asia/Beirut"),
    "created-201": Shape(created_status=201),
    "strict": Shape(strict=True),
    # The stand-in of issue 17: count-only answers, other keys, numbers without +.
    "stand-in": Shape(numbers="plain", log_keys="other", bulk_answer="count", send_answer="no-id"),
}
if set(VARIANTS) != set(SANDBOX_VARIANTS):  # config validates names from its own list
    raise RuntimeError("bridge.config.SANDBOX_VARIANTS and VARIANTS disagree")


@dataclass
class Fault:
    """One scripted misbehaviour: answer `status` (or stall `delay` s) `times` times."""

    status: int = 500
    times: int = 1
    path: str | None = None  # None: any API path
    body: str | None = None  # raw body; None: the usual JSON error
    retry_after: str | None = None
    # Real seconds to stall. With status 0 the request is handled first (the SMS is
    # taken and logged) and the answer stalls: what a client's read timeout hides.
    delay: float = 0.0
    # Handle the request for real (the SMS is taken and logged), then answer with this
    # fault instead: a 502 from a gateway, a 200 that says nothing, after the fact.
    taken: bool = False


@dataclass
class SentEntry:
    message_id: int
    to: str
    message: str
    sender_id: str
    message_type: int
    parts: int
    cost: float
    created_at: float
    deliver_from: float
    fails: bool
    bulk_id: str | None = None


@dataclass
class RequestRecord:
    at: float
    method: str
    path: str
    status: int
    # How the request authenticated ("x-api-key", "bearer", both joined by "+", or "none"):
    # the sandbox accepts either, so a test of the client's auth_header reads it here.
    auth: str = "none"


def auth_scheme(request: Request) -> str:
    """Which of the documented auth headers the request carried."""
    schemes = []
    if "x-api-key" in request.headers:
        schemes.append("x-api-key")
    if request.headers.get("authorization", "").lower().startswith("bearer "):
        schemes.append("bearer")
    return "+".join(schemes) or "none"


@dataclass
class SandboxState:
    clock: Clock
    api_key: str = "sandbox-key"
    balance: float = 1000.0
    rate_limit: int = 100
    sent_after: float = 1.0
    delivered_after: float = 3.0
    fail_share: float = 0.0
    send_retry_after: bool = True
    prices: dict[int, float] = field(default_factory=lambda: dict(DEFAULT_PRICES))
    seed: int = 0
    shape: Shape = field(default_factory=Shape)
    entries: list[SentEntry] = field(default_factory=list)
    requests: list[RequestRecord] = field(default_factory=list)
    faults: deque[Fault] = field(default_factory=deque)
    _window: deque[float] = field(default_factory=deque)
    _next_id: int = 10_000

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def price(self, number: str) -> float:
        code = calling_code(number.lstrip("+"), self.prices)
        return DEFAULT_PRICE if code is None else self.prices[code]

    def status_of(self, entry: SentEntry) -> str:
        now = self.clock.now()
        if now < entry.deliver_from + self.sent_after:
            return "pending"
        if now < entry.deliver_from + self.delivered_after:
            return "sent"
        return "failed" if entry.fails else "delivered"

    def admit(self) -> float | None:
        """Book one request in the sliding window; None if admitted, else seconds to wait."""
        now = self.clock.now()
        while self._window and self._window[0] <= now - RATE_WINDOW:
            self._window.popleft()
        if len(self._window) >= self.rate_limit:
            return self._window[0] + RATE_WINDOW - now
        self._window.append(now)
        return None

    def record_send(
        self,
        to: str,
        message: str,
        sender_id: str,
        message_type: int,
        deliver_from: float,
        bulk_id: str | None = None,
    ) -> SentEntry:
        parts = sms_parts(message, message_type)
        entry = SentEntry(
            message_id=self._next_id,
            to=to,
            message=message,
            sender_id=sender_id,
            message_type=message_type,
            parts=parts,
            cost=round(self.price(to) * parts, 4),
            created_at=self.clock.now(),
            deliver_from=deliver_from,
            fails=self._rng.random() < self.fail_share,
            bulk_id=bulk_id,
        )
        self._next_id += 1
        self.entries.append(entry)
        self.balance = round(self.balance - entry.cost, 4)
        return entry

    def number(self, to: str) -> str:
        """A number as this shape writes it back."""
        return to.lstrip("+") if self.shape.numbers == "plain" else to

    def to_log(self, entry: SentEntry) -> dict[str, Any]:
        stamp = _stamp(entry.created_at, self.shape.zone)
        if self.shape.log_keys == "other":
            return {
                "id": entry.message_id,
                "phone": self.number(entry.to),
                "sms": entry.message,
                "state": self.status_of(entry),
                "created": stamp,
                "price": entry.cost,
                "sender": entry.sender_id,
            }
        return {
            "id": entry.message_id,
            "message_id": entry.message_id,
            "to": self.number(entry.to),
            "message": entry.message,
            "sender_id": entry.sender_id,
            "message_type": entry.message_type,
            "parts": entry.parts,
            "cost": entry.cost,
            "status": self.status_of(entry),
            "created_at": stamp,
            "bulk_id": entry.bulk_id,
        }


def _stamp(epoch: float, tz: tzinfo = UTC) -> str:
    return datetime.fromtimestamp(epoch, tz).strftime(SCHEDULE_FORMAT)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"success": False, "message": message}, status, headers=headers)


class _Refused(Exception):
    """A refusal the provider reports as a 200 with `"success": false`."""

    def __init__(self, message: str) -> None:
        self.message = message


class _BadRequest(Exception):
    def __init__(self, message: str) -> None:
        self.message = message


def _check_number(value: Any, what: str, strict: bool = False) -> str:
    pattern = _STRICT_INTERNATIONAL if strict else _INTERNATIONAL
    if not isinstance(value, str) or not pattern.match(value.replace(" ", "")):
        raise _BadRequest(f"The {what} field must be a phone number in international format.")
    return "+" + value.replace(" ", "").lstrip("+")


def _check_fields(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise _BadRequest(f"Unknown field(s): {', '.join(unknown)}.")


def _check_common(body: dict[str, Any]) -> tuple[str, str, int]:
    message = body.get("message")
    if not isinstance(message, str) or not message:
        raise _BadRequest("The message field is required.")
    if len(message) > MAX_MESSAGE_CHARS:
        raise _BadRequest(f"The message may not be greater than {MAX_MESSAGE_CHARS} characters.")
    sender_id = body.get("sender_id", "SMS")
    if not isinstance(sender_id, str) or not sender_id or len(sender_id) > MAX_SENDER_ID:
        raise _BadRequest(f"The sender id may not be greater than {MAX_SENDER_ID} characters.")
    message_type = body.get("message_type", 1)
    if message_type not in (1, 2, 4) or isinstance(message_type, bool):
        raise _BadRequest("The message type must be 1, 2 or 4.")
    return message, sender_id, message_type


def create_sandbox_app(state: SandboxState) -> Starlette:
    """The provider's API under /api/v1 and the test controls under /_sandbox."""

    async def guarded(request: Request, handler: Any) -> Response:
        # Recorded on arrival, so a request whose answer stalls is already on the list.
        record = RequestRecord(
            state.clock.now(), request.method, request.url.path, 500, auth_scheme(request)
        )
        state.requests.append(record)
        fault = _take_fault(state, request.url.path)
        if fault is not None and fault.delay:
            if not fault.status:  # taken and logged first; then the answer stalls
                response = await answer(request, handler, None)
                record.status = response.status_code
                await asyncio.sleep(fault.delay)  # real seconds: client timeouts are too
                return response
            await asyncio.sleep(fault.delay)
        if fault is not None and fault.taken:
            await answer(request, handler, None)
        response = await answer(request, handler, fault)
        record.status = response.status_code
        return response

    async def answer(request: Request, handler: Any, fault: Fault | None) -> Response:
        if fault is not None and fault.status:
            headers = {"Retry-After": fault.retry_after} if fault.retry_after else None
            if fault.body is not None:
                return Response(
                    fault.body, fault.status, headers=headers, media_type="application/json"
                )
            return _error(fault.status, "injected fault", headers)
        key = request.headers.get("x-api-key") or ""
        auth = request.headers.get("authorization", "")
        if not key and auth.lower().startswith("bearer "):
            key = auth[7:].strip()
        if key != state.api_key:
            return _error(401, "Invalid or missing API key.")
        wait = state.admit()
        if wait is not None:
            headers = {"Retry-After": str(math.ceil(wait))} if state.send_retry_after else None
            return _error(429, "Too many requests.", headers)
        try:
            response: Response = await handler(request)
        except _BadRequest as exc:
            return _error(400, exc.message)
        except _Refused as exc:
            return _error(200, exc.message)
        return response

    async def json_body(request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError) as exc:
            raise _BadRequest("The request body must be JSON.") from exc
        if not isinstance(body, dict):
            raise _BadRequest("The request body must be a JSON object.")
        return body

    def covered(numbers: list[str], message: str, message_type: int) -> None:
        """Strict: a send the balance does not cover is refused, as real accounts do."""
        cost = sum(state.price(n) * sms_parts(message, message_type) for n in numbers)
        if state.shape.strict and cost > state.balance:
            raise _Refused("Insufficient balance.")

    async def send(request: Request) -> Response:
        body = await json_body(request)
        if state.shape.strict:
            _check_fields(body, SEND_FIELDS)
        to = _check_number(body.get("to"), "to", state.shape.strict)
        message, sender_id, message_type = _check_common(body)
        deliver_from = state.clock.now()
        if body.get("schedule_time") is not None:
            raw = str(body["schedule_time"])
            try:
                when = datetime.strptime(raw, SCHEDULE_FORMAT).replace(tzinfo=state.shape.zone)
            except ValueError as exc:
                raise _BadRequest("The schedule time must be in the format Y-m-d H:i:s.") from exc
            if state.shape.strict and not _PADDED_SCHEDULE.match(raw):
                raise _BadRequest("The schedule time must be in the format Y-m-d H:i:s.")
            if state.shape.strict and when.timestamp() <= deliver_from:
                raise _BadRequest("The schedule time must be a date after now.")
            deliver_from = max(deliver_from, when.timestamp())
        covered([to], message, message_type)
        entry = state.record_send(to, message, sender_id, message_type, deliver_from)
        data: dict[str, Any] = {"cost": entry.cost, "balance": state.balance}
        if state.shape.send_answer == "id":
            data = {"message_id": entry.message_id, **data}
        return JSONResponse(
            {"success": True, "message": "SMS sent successfully", "data": data},
            state.shape.created_status,
        )

    async def send_bulk(request: Request) -> Response:
        body = await json_body(request)
        recipients = body.get("recipients")
        if not isinstance(recipients, list) or not recipients:
            raise _BadRequest("The recipients field is required and must be an array.")
        if len(recipients) > MAX_BULK:
            raise _BadRequest(f"The recipients may not have more than {MAX_BULK} items.")
        if state.shape.strict:
            _check_fields(body, BULK_FIELDS)
        numbers = [
            _check_number(r, f"recipients.{i}", state.shape.strict)
            for i, r in enumerate(recipients)
        ]
        message, sender_id, message_type = _check_common(body)
        covered(numbers, message, message_type)
        bulk_id = f"bulk-{state._next_id}"
        entries = [
            state.record_send(n, message, sender_id, message_type, state.clock.now(), bulk_id)
            for n in numbers
        ]
        cost = round(sum(e.cost for e in entries), 4)
        data: dict[str, Any]
        if state.shape.bulk_answer == "count":
            data = {"total": len(entries), "cost": cost}
        elif state.shape.bulk_answer == "batch":
            data = {"batch_id": bulk_id, "cost": cost, "balance": state.balance}
        else:
            data = {
                "batch_id": bulk_id,
                "count": len(entries),
                "messages": [
                    {"to": state.number(e.to), "message_id": e.message_id} for e in entries
                ],
                "cost": cost,
                "balance": state.balance,
            }
        return JSONResponse(
            {"success": True, "message": "Bulk SMS sent successfully", "data": data},
            state.shape.created_status,
        )

    async def balance(request: Request) -> Response:
        return JSONResponse(
            {"success": True, "data": {"balance": state.balance, "currency": "points"}}
        )

    async def logs(request: Request) -> Response:
        q = request.query_params
        try:
            page = int(q.get("page", "1"))
            per_page = int(q.get("per_page", "20"))
        except ValueError as exc:
            raise _BadRequest("The page and per_page fields must be integers.") from exc
        if page < 1 or not 1 <= per_page <= 100:
            raise _BadRequest("The per page must be between 1 and 100.")
        wanted = q.get("status")
        if wanted is not None and wanted not in LOG_STATUSES:
            raise _BadRequest("The selected status is invalid.")
        bounds = []
        for key in ("date_from", "date_to"):
            try:
                day = datetime.strptime(q[key], "%Y-%m-%d") if q.get(key) else None
            except ValueError as exc:
                raise _BadRequest(f"The {key} must be a date (Y-m-d).") from exc
            bounds.append(day.replace(tzinfo=state.shape.zone).timestamp() if day else None)
        start = bounds[0] if bounds[0] is not None else -math.inf
        end = bounds[1] + 86400 if bounds[1] is not None else math.inf
        # Filter on plain fields; build response rows for the requested page only.
        matching = [
            e
            for e in reversed(state.entries)
            if start <= e.created_at < end and (not wanted or state.status_of(e) == wanted)
        ]
        last_page = max(1, math.ceil(len(matching) / per_page))
        chunk = [state.to_log(e) for e in matching[(page - 1) * per_page : page * per_page]]
        rows = matching
        return JSONResponse(
            {
                "success": True,
                "data": chunk,
                "pagination": {
                    "current_page": page,
                    "per_page": per_page,
                    "total": len(rows),
                    "last_page": last_page,
                },
            }
        )

    async def pricing(request: Request) -> Response:
        return JSONResponse(
            {
                "success": True,
                "data": {
                    "currency": "points",
                    "default": DEFAULT_PRICE,
                    "countries": [
                        {"country_code": f"+{c}", "price": p}
                        for c, p in sorted(state.prices.items())
                    ],
                },
            }
        )

    async def calculate(request: Request) -> Response:
        body = await json_body(request)
        if "recipients" in body:
            raw = body["recipients"]
            if not isinstance(raw, list) or not raw:
                raise _BadRequest("The recipients field must be a non-empty array.")
            numbers = [_check_number(r, f"recipients.{i}") for i, r in enumerate(raw)]
        else:
            numbers = [_check_number(body.get("to"), "to")]
        message, _, _ = _check_common(body)
        gsm = all(c in GSM_BASIC or c in GSM_EXTENSION for c in message)
        parts = sms_parts(message, 1 if gsm else 2)
        cost = round(sum(state.price(n) * parts for n in numbers), 4)
        return JSONResponse(
            {
                "success": True,
                "data": {
                    "recipients": len(numbers),
                    "parts": parts,
                    "cost": cost,
                    "currency": "points",
                    "balance": state.balance,
                },
            }
        )

    async def account(request: Request) -> Response:
        return JSONResponse(
            {
                "success": True,
                "data": {
                    "name": "Sandbox account",
                    "status": "active",
                    "balance": state.balance,
                    "currency": "points",
                    "rate_limit_per_minute": state.rate_limit,
                    "messages_sent": len(state.entries),
                },
            }
        )

    # -- controls for tests and trials (not part of the provider's API) ---------------
    async def control_requests(request: Request) -> Response:
        return JSONResponse([asdict(r) for r in state.requests])

    async def control_entries(request: Request) -> Response:
        return JSONResponse([state.to_log(e) for e in state.entries])

    async def control_faults(request: Request) -> Response:
        try:
            items = json.loads(await request.body())
            items = items if isinstance(items, list) else [items]
            state.faults.extend(Fault(**item) for item in items)
        except (ValueError, TypeError) as exc:
            return JSONResponse({"error": f"bad fault: {exc}"}, 400)
        return JSONResponse({"queued": len(state.faults)})

    def api(handler: Any) -> Any:
        async def endpoint(request: Request) -> Response:
            return await guarded(request, handler)

        return endpoint

    return Starlette(
        routes=[
            Route("/api/v1/send", api(send), methods=["POST"]),
            Route("/api/v1/send-bulk", api(send_bulk), methods=["POST"]),
            Route("/api/v1/balance", api(balance), methods=["GET"]),
            Route("/api/v1/logs", api(logs), methods=["GET"]),
            Route("/api/v1/pricing", api(pricing), methods=["GET"]),
            Route("/api/v1/calculate", api(calculate), methods=["POST"]),
            Route("/api/v1/account", api(account), methods=["GET"]),
            Route("/_sandbox/requests", control_requests, methods=["GET"]),
            Route("/_sandbox/entries", control_entries, methods=["GET"]),
            Route("/_sandbox/faults", control_faults, methods=["POST"]),
        ]
    )


def _take_fault(state: SandboxState, path: str) -> Fault | None:
    for fault in state.faults:
        if fault.path is None or path.endswith(fault.path):
            fault.times -= 1
            if fault.times <= 0:
                state.faults.remove(fault)
            return fault
    return None


def state_from_config(config: Config, clock: Clock) -> SandboxState:
    """The in-process sandbox `serve` runs when no provider.base_url is configured."""
    s = config.sandbox
    return SandboxState(
        clock=clock,
        api_key=s.api_key,
        balance=s.balance,
        sent_after=s.sent_after,
        delivered_after=s.delivered_after,
        fail_share=s.fail_share,
        rate_limit=config.provider.requests_per_minute,
        shape=VARIANTS[s.variant],
    )
