"""The provider's v1 endpoints as the sandbox answers them: send, send-bulk, balance,
logs, pricing, calculate and account.

Each handler assumes the request has passed the key check and the rate window (app.py
guards them) and raises `BadRequest` / `Refused` for the guard to answer. Answers follow
the documented examples where there are any and the state's `Shape` where there are not.
Parts and prices come from billing.py, the sandbox's own tables.
"""

from __future__ import annotations

import math
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from bridge.provider.sandbox.billing import DEFAULT_PRICE, is_gsm, sms_parts
from bridge.provider.sandbox.state import SandboxState
from bridge.provider.sandbox.validation import (
    BULK_FIELDS,
    LOG_STATUSES,
    MAX_BULK,
    SEND_FIELDS,
    BadRequest,
    Refused,
    check_common,
    check_day,
    check_fields,
    check_number,
    check_page,
    check_schedule,
    json_body,
)


class ProviderApi:
    """The handlers, over one `SandboxState`."""

    def __init__(self, state: SandboxState) -> None:
        self.state = state

    def covered(self, numbers: list[str], message: str, message_type: int) -> None:
        """Strict: a send the balance does not cover is refused, as real accounts do."""
        state = self.state
        cost = sum(state.price(n) * sms_parts(message, message_type) for n in numbers)
        if state.shape.strict and cost > state.balance:
            raise Refused("Insufficient balance.")

    async def send(self, request: Request) -> Response:
        state = self.state
        body = await json_body(request)
        if state.shape.strict:
            check_fields(body, SEND_FIELDS)
        to = check_number(body.get("to"), "to", state.shape.strict)
        message, sender_id, message_type = check_common(body)
        deliver_from = state.clock.now()
        if body.get("schedule_time") is not None:
            deliver_from = check_schedule(
                str(body["schedule_time"]), state.shape.zone, deliver_from, state.shape.strict
            )
        self.covered([to], message, message_type)
        entry = state.record_send(to, message, sender_id, message_type, deliver_from)
        data: dict[str, Any] = {"cost": entry.cost, "balance": state.balance}
        if state.shape.send_answer == "id":
            data = {"message_id": entry.message_id, **data}
        return JSONResponse(
            {"success": True, "message": "SMS sent successfully", "data": data},
            state.shape.created_status,
        )

    async def send_bulk(self, request: Request) -> Response:
        state = self.state
        body = await json_body(request)
        recipients = body.get("recipients")
        if not isinstance(recipients, list) or not recipients:
            raise BadRequest("The recipients field is required and must be an array.")
        if len(recipients) > MAX_BULK:
            raise BadRequest(f"The recipients may not have more than {MAX_BULK} items.")
        if state.shape.strict:
            check_fields(body, BULK_FIELDS)
        numbers = [
            check_number(r, f"recipients.{i}", state.shape.strict) for i, r in enumerate(recipients)
        ]
        message, sender_id, message_type = check_common(body)
        self.covered(numbers, message, message_type)
        bulk_id = state.next_bulk_id()
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

    async def balance(self, request: Request) -> Response:
        return JSONResponse(
            {"success": True, "data": {"balance": self.state.balance, "currency": "points"}}
        )

    async def logs(self, request: Request) -> Response:
        state = self.state
        q = request.query_params
        page, per_page = check_page(q)
        wanted = q.get("status")
        if wanted is not None and wanted not in LOG_STATUSES:
            raise BadRequest("The selected status is invalid.")
        first = check_day(q, "date_from", state.shape.zone)
        last = check_day(q, "date_to", state.shape.zone)
        start = first if first is not None else -math.inf
        end = last + 86400 if last is not None else math.inf
        # Filter on plain fields; build response rows for the requested page only.
        matching = [
            e
            for e in reversed(state.entries)
            if start <= e.created_at < end and (not wanted or state.status_of(e) == wanted)
        ]
        last_page = max(1, math.ceil(len(matching) / per_page))
        chunk = [state.to_log(e) for e in matching[(page - 1) * per_page : page * per_page]]
        return JSONResponse(
            {
                "success": True,
                "data": chunk,
                "pagination": {
                    "current_page": page,
                    "per_page": per_page,
                    "total": len(matching),
                    "last_page": last_page,
                },
            }
        )

    async def pricing(self, request: Request) -> Response:
        countries = [
            {"country_code": f"+{c}", "price": p} for c, p in sorted(self.state.prices.items())
        ]
        return JSONResponse(
            {
                "success": True,
                "data": {"currency": "points", "default": DEFAULT_PRICE, "countries": countries},
            }
        )

    async def calculate(self, request: Request) -> Response:
        state = self.state
        body = await json_body(request)
        if "recipients" in body:
            raw = body["recipients"]
            if not isinstance(raw, list) or not raw:
                raise BadRequest("The recipients field must be a non-empty array.")
            numbers = [check_number(r, f"recipients.{i}") for i, r in enumerate(raw)]
        else:
            numbers = [check_number(body.get("to"), "to")]
        message, _, _ = check_common(body)
        # The calculator picks the type from the text, as a send of it would go.
        parts = sms_parts(message, 1 if is_gsm(message) else 2)
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

    async def account(self, request: Request) -> Response:
        state = self.state
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
