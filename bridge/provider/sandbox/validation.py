"""The sandbox's checks of request parameters, as the documentation states them: a 400
with a message for each invalid one (`sender_id` <= 11 characters, bulk <= 1000, numbers
in international format, `message_type` 1, 2 or 4, `schedule_time` as `Y-m-d H:i:s`).

A strict shape (`Shape.strict`) also refuses what the documentation does not promise to
accept: `to` without `+`, unknown fields, past or unpadded schedule times.
"""

from __future__ import annotations

import re
from datetime import datetime, tzinfo
from typing import Any

from starlette.requests import Request

from bridge.provider.sandbox.state import SCHEDULE_FORMAT

MAX_BULK = 1000
MAX_SENDER_ID = 11
MAX_MESSAGE_CHARS = 1600
LOG_STATUSES = ("delivered", "sent", "pending", "failed")
SEND_FIELDS = {"to", "message", "sender_id", "message_type", "schedule_time"}
BULK_FIELDS = {"recipients", "message", "sender_id", "message_type"}
_INTERNATIONAL = re.compile(r"^\+?[1-9]\d{6,14}$")
_STRICT_INTERNATIONAL = re.compile(r"^\+[1-9]\d{6,14}$")
_PADDED_SCHEDULE = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$")


class BadRequest(Exception):
    """Invalid parameters: answered 400 with `message`."""

    def __init__(self, message: str) -> None:
        self.message = message


class Refused(Exception):
    """A refusal the provider reports as a 200 with `"success": false`."""

    def __init__(self, message: str) -> None:
        self.message = message


async def json_body(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest("The request body must be JSON.") from exc
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    return body


def check_number(value: Any, what: str, strict: bool = False) -> str:
    """`value` as E.164 with `+`; BadRequest unless it is in international format."""
    pattern = _STRICT_INTERNATIONAL if strict else _INTERNATIONAL
    if not isinstance(value, str) or not pattern.match(value.replace(" ", "")):
        raise BadRequest(f"The {what} field must be a phone number in international format.")
    return "+" + value.replace(" ", "").lstrip("+")


def check_fields(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise BadRequest(f"Unknown field(s): {', '.join(unknown)}.")


def check_common(body: dict[str, Any]) -> tuple[str, str, int]:
    """The message, sender id and message type every send carries (with defaults)."""
    message = body.get("message")
    if not isinstance(message, str) or not message:
        raise BadRequest("The message field is required.")
    if len(message) > MAX_MESSAGE_CHARS:
        raise BadRequest(f"The message may not be greater than {MAX_MESSAGE_CHARS} characters.")
    sender_id = body.get("sender_id", "SMS")
    if not isinstance(sender_id, str) or not sender_id or len(sender_id) > MAX_SENDER_ID:
        raise BadRequest(f"The sender id may not be greater than {MAX_SENDER_ID} characters.")
    message_type = body.get("message_type", 1)
    if message_type not in (1, 2, 4) or isinstance(message_type, bool):
        raise BadRequest("The message type must be 1, 2 or 4.")
    return message, sender_id, message_type


def check_schedule(raw: str, zone: tzinfo, now: float, strict: bool) -> float:
    """When a scheduled send is due (epoch seconds, never before `now`)."""
    try:
        when = datetime.strptime(raw, SCHEDULE_FORMAT).replace(tzinfo=zone)
    except ValueError as exc:
        raise BadRequest("The schedule time must be in the format Y-m-d H:i:s.") from exc
    if strict and not _PADDED_SCHEDULE.match(raw):
        raise BadRequest("The schedule time must be in the format Y-m-d H:i:s.")
    if strict and when.timestamp() <= now:
        raise BadRequest("The schedule time must be a date after now.")
    return max(now, when.timestamp())


def check_page(query: Any) -> tuple[int, int]:
    """`page` and `per_page` of a /logs query (1-100 per page)."""
    try:
        page = int(query.get("page", "1"))
        per_page = int(query.get("per_page", "20"))
    except ValueError as exc:
        raise BadRequest("The page and per_page fields must be integers.") from exc
    if page < 1 or not 1 <= per_page <= 100:
        raise BadRequest("The per page must be between 1 and 100.")
    return page, per_page


def check_day(query: Any, key: str, zone: tzinfo) -> float | None:
    """The start of day `key` (`Y-m-d`, in the provider's zone) of a /logs query."""
    try:
        day = datetime.strptime(query[key], "%Y-%m-%d") if query.get(key) else None
    except ValueError as exc:
        raise BadRequest(f"The {key} must be a date (Y-m-d).") from exc
    return day.replace(tzinfo=zone).timestamp() if day else None
