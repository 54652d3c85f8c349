"""Reading HTTP requests for the API, the webhooks and the console: bodies bounded in size
and time, JSON checked for depth and unencodable text, integers in the range the store
can bind, and the one JSON error answer.

Apart from `bridge.ingress.http.app` (the app) so `bridge.ingress.http.hooks` reads bodies the same way without
importing the app that mounts it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from starlette.datastructures import QueryParams
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from bridge.errors import HttpError
from bridge.models import MAX_ROW_ID

MAX_JSON_DEPTH = 64  # real payloads nest under 10; deeper costs recursion in every reader
_INTEGER = re.compile(r"-?[0-9]{1,20}")  # ASCII digits only: str.isdigit() takes "²"


# Starlette's JSONResponse builds an encoder with these settings for every answer
# (json.dumps with arguments does); one built once writes the same bytes.
_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


class JSONAnswer(JSONResponse):
    """Starlette's JSONResponse, its body written by one encoder kept for every answer."""

    def render(self, content: Any) -> bytes:
        return _ENCODER.encode(content).encode("utf-8")


def error_response(status: int, message: str, field: str | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": message}
    if field:
        body["field"] = field
    return JSONAnswer(body, status)


def query_int(
    raw: str | None,
    name: str,
    *,
    default: int | None = None,
    minimum: int = 0,
    maximum: int = MAX_ROW_ID,
) -> int | None:
    """An integer query or path value from `minimum` to `maximum` (at most what SQLite
    can bind), else a 400 naming it and the range."""
    if raw is None:
        return default
    if not _INTEGER.fullmatch(raw) or not minimum <= int(raw) <= maximum:
        raise HttpError(400, f"'{name}' must be an integer from {minimum} to {maximum}", name)
    return int(raw)


def known(query: Mapping[str, str], key: str, allowed: Sequence[str]) -> str | None:
    """The filter `key` of a list, when given: one of `allowed`, else a 400 listing them
    (a typo listed nothing with a 200: "no failures" to a script that asked)."""
    value = query.get(key) or None
    if value is not None and value not in allowed:
        raise HttpError(400, f"unknown {key} {value!r}: one of {', '.join(allowed)}", key)
    return value


def check_query(query: QueryParams) -> None:
    """A 400 naming the first parameter given twice (`?state=failed&state=queued` listed
    the queued ones only, silently) or holding a NUL (PostgreSQL's text cannot hold
    one, and a search for it was a 500 there)."""
    seen: set[str] = set()  # one pass: `getlist` per parameter read them all, n * n
    for name, value in query.multi_items():
        if name in seen:
            raise HttpError(400, f"'{name}' is given more than once: give it once", name)
        seen.add(name)
        if "\x00" in value:
            raise HttpError(400, f"'{name}' holds a NUL character", name)


def page_size(raw: str | None, *, default: int, maximum: int) -> int:
    """A list's `limit`: 1 to `maximum`, else a 400 that says so (the API and the console
    alike). Not clamped: `limit=0` listed one message and `limit=5000` a thousand, each
    answered as if it were what was asked."""
    size = query_int(raw, "limit", default=default, minimum=1, maximum=maximum)
    return default if size is None else size


def header(request: Request, name: bytes) -> str | None:
    """The request's first `name` header (lower case, as ASGI servers give names), as
    `request.headers.get` answers, read off the scope: the ingest paths ask two or three
    headers a request, and Starlette's Headers object cost more than their reading."""
    for key, value in request.scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def media_type(request: Request) -> str:
    """The request's Content-Type without its parameters (`; charset=...`), lowercased."""
    return (header(request, b"content-type") or "").split(";")[0].strip().lower()


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The raw JSON body (415 for another content type), bounded as `read_bounded`."""
    ctype = media_type(request)
    if ctype != "application/json" and not ctype.endswith("+json"):
        raise HttpError(415, "Content-Type must be application/json", "content-type")
    return await read_bounded(request, max_bytes)


async def read_bounded(request: Request, max_bytes: int) -> bytes:
    """The raw body of any type, enforcing the size limit on the stream, not just the
    header (413). Its time limit (`http.body_timeout`, 408) is the connection's
    (bridge.ingress.http.limits), which cuts a trickling client whether or not the
    endpoint reads its body."""
    try:
        return await _read_body(request, max_bytes)
    except ClientDisconnect as exc:  # nobody is left to answer; no traceback for it
        raise HttpError(400, "client went away before the whole body arrived", "body") from exc


async def _read_body(request: Request, max_bytes: int) -> bytes:
    declared = header(request, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise HttpError(413, f"body larger than {max_bytes} bytes", "body")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise HttpError(413, f"body larger than {max_bytes} bytes", "body")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(body: bytes) -> Any:
    try:
        value = json.loads(body)
    except RecursionError as exc:
        raise HttpError(400, "body is JSON nested too deeply", "body") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise HttpError(400, f"body is not valid JSON: {exc}", "body") from exc
    check_json(value)
    return value


# Where a JSON value sits: None for the body, else (its parent's place, key or index).
_Place = tuple[Any, str | int] | None


def check_json(value: Any, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Refuse what parses but cannot be handled: deep nesting and lone surrogates.

    JSON's `\\ud800` escape yields a str that UTF-8 cannot encode; it would fail in the
    store or the provider call, long after the caller was told anything. Walked with a
    stack, not recursion, so the check itself cannot overflow.
    """
    # Each item with where it sits: (its parent's place, its key or index), spelt out
    # only for an error (building every path cost more than the check).
    stack: list[tuple[Any, _Place, int]] = [(value, None, 1)]
    while stack:
        item, place, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > max_depth:
                raise HttpError(400, f"body is JSON nested deeper than {max_depth}", "body")
            if isinstance(item, list):
                stack.extend((child, (place, i), depth + 1) for i, child in enumerate(item))
                continue
            for key, child in item.items():
                if not key.isascii():
                    _check_text(key, place)
                stack.append((child, (place, key), depth + 1))
        elif isinstance(item, str) and not item.isascii():
            _check_text(item, place)


def _path(place: _Place) -> str:
    """A place as the rest of the API names it: `a.b[0]`, `body` for the body itself."""
    steps: list[str | int] = []
    while place is not None:
        place, step = place
        steps.append(step)
    path = ""
    for step in reversed(steps):
        path = f"{path}[{step}]" if isinstance(step, int) else f"{path}.{step}" if path else step
    return path or "body"


def _check_text(text: str, place: _Place) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        path = _path(place)
        raise HttpError(
            400, f"'{path}' holds a lone surrogate (\\u{ord(exc.object[exc.start]):04x})", path
        ) from exc
