"""Reading HTTP requests for the API, the webhooks and the console: bodies bounded in size
and time, JSON bounded in items before it is parsed, checked for depth and unencodable text, integers in the range the store
can bind, and the one JSON error answer.

Apart from `bridge.ingress.http.app` (the app) so `bridge.ingress.http.hooks` reads bodies the same way without
importing the app that mounts it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from json.encoder import encode_basestring
from typing import Any

from starlette.datastructures import QueryParams
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from bridge.config.sections import MAX_JSON_ITEMS
from bridge.errors import HttpError
from bridge.ingress.ingest import Accepted
from bridge.models import MAX_ROW_ID

MAX_JSON_DEPTH = 64  # real payloads nest under 10; deeper costs recursion in every reader
_ITEM_MARKS = (b",", b":", b"[", b"{")
_CONTAINERS = (dict, list)  # exactly the types json.loads makes them
NAMED_WITHIN = 50_000  # items searched for the place of a lone surrogate
_INTEGER = re.compile(r"-?[0-9]{1,20}")  # ASCII digits only: str.isdigit() takes "²"


# Starlette's JSONResponse builds an encoder with these settings for every answer
# (json.dumps with arguments does); one built once writes the same bytes.
_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
_QUOTED = encode_basestring  # a str as that encoder writes it (ensure_ascii off)


class JSONAnswer(JSONResponse):
    """Starlette's JSONResponse, its body written by one encoder kept for every answer."""

    def render(self, content: Any) -> bytes:
        # A lone surrogate (a name a template made of a payload's number, in the 202)
        # cannot be UTF-8: written as its JSON escape, `\ud800`, it was a 500 after
        # the message was stored.
        return _ENCODER.encode(content).encode("utf-8", "backslashreplace")


def _nullable(text: str | None) -> str:
    return "null" if text is None else _QUOTED(text)


def accepted_response(
    rows: Sequence[Accepted], reports: Sequence[Any | None] | None = None
) -> Response:
    """The 202 of an ingest (`POST /api/v1/messages`, a webhook's), byte for byte what
    `JSONAnswer({"ids": [...], "messages": [{"id", "to", "state", "reason"[, "template"]},
    ...]}, 202)` writes (a test holds them equal), its body written here: the encoder
    took ~20,000 instructions for one row's two small objects, 4 % of the loop's work
    on an alert (BENCHMARKS.md, issue #16). `reports`: each row's `template` (a
    webhook's), as the encoder writes it, or None for a row without one."""
    ids, messages = [], []
    for row, report in (
        zip(rows, reports, strict=True) if reports is not None else ((r, None) for r in rows)
    ):
        template = "" if report is None else ',"template":' + _ENCODER.encode(report)
        ids.append(str(row.id))
        messages.append(
            f'{{"id":{row.id},"to":{_QUOTED(row.recipient)},"state":{_QUOTED(str(row.state))}'
            f',"reason":{_nullable(row.reason)}{template}}}'
        )
    body = f'{{"ids":[{",".join(ids)}],"messages":[{",".join(messages)}]}}'
    # as JSONAnswer.render: a lone surrogate as its JSON escape
    return Response(body.encode("utf-8", "backslashreplace"), 202, media_type=JSONAnswer.media_type)


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


def parse_json(body: bytes, max_items: int = MAX_JSON_ITEMS) -> Any:
    """The JSON value of `body`: 413 for more than `max_items` items (0: no cap), 400 for
    what is not JSON or is refused by `check_json`."""
    check_items(body, max_items)
    try:
        # Bytes, not text: json.loads detects the encoding and skips a UTF-8 BOM (RFC
        # 8259 8.1 lets a parser ignore one; Windows PowerShell 5 and .NET send it), where
        # a str starting with one is refused.
        value = json.loads(body)
    except RecursionError as exc:
        raise HttpError(400, "body is JSON nested too deeply", "body") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise HttpError(400, f"body is not valid JSON: {exc}", "body") from exc
    if may_nest_deeper(body) or may_hold_surrogates(body):  # else it would pass
        check_json(value)
    return value


def may_nest_deeper(body: bytes, max_depth: int = MAX_JSON_DEPTH) -> bool:
    """Whether `body` parsed may nest deeper than `max_depth`: every level opens with a
    `[` or `{` byte (those inside strings count too, erring towards the check)."""
    return body.count(b"[") + body.count(b"{") > max_depth


# Where json.loads can get a lone surrogate from in a UTF-8 body: a `\uD800`-`\uDFFF`
# escape (JSON writes escapes with a lower-case u, as json reads them), or, since it
# decodes with 'surrogatepass', the UTF-8 form of one (ED A0-BF ..). Pairs written as
# escapes (json.dumps' emoji) match too: they only take the full check.
_SURROGATE_SOURCE = re.compile(rb"\\u[dD]|\xed[\xa0-\xbf]")
_UTF16_OR_32 = (b"\xff\xfe", b"\xfe\xff")  # json.detect_encoding's BOMs; or NULs in the head


def may_hold_surrogates(body: bytes) -> bool:
    """Whether `body` parsed may hold a lone surrogate. With `may_nest_deeper`, a search
    at C speed (a few hundred ns for an alert) that spares nearly every body
    `check_json`'s walk and its encoding of the whole value (BENCHMARKS.md, issue #16).
    UTF-16 and UTF-32 bodies carry surrogates as plain code units: always checked."""
    if body.startswith(_UTF16_OR_32) or b"\x00" in body[:4]:
        return True
    return _SURROGATE_SOURCE.search(body) is not None


def check_items(body: bytes, max_items: int) -> None:
    """A 413 for a body that holds more than `max_items` of `,` `:` `[` `{` (0: no cap),
    before it is parsed. Parsing and `check_json` run on the event loop at some 0.1 to
    0.3 us an item, whatever the item: a megabyte of `[0,0,...]` or `[[],[],...]` held
    every other request, `/healthz` too, for 100 to 300 ms. Counted in the raw bytes
    (C speed, ~1 ms a megabyte; marks inside strings count too, erring towards refusal),
    and not at all for a body shorter than the cap: each mark is one byte."""
    if not max_items or len(body) <= max_items:
        return
    items = sum(body.count(mark) for mark in _ITEM_MARKS)
    if items > max_items:
        raise HttpError(
            413,
            f"body holds {items} JSON separators and brackets (`,` `:` `[` `{{`), more"
            f" than {max_items} (http.max_json_items)",
            "body",
        )


# Where a JSON value sits: None for the body, else (its parent's place, key or index).
_Place = tuple[Any, str | int] | None


def check_json(value: Any, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Refuse what parses but cannot be handled: deep nesting and lone surrogates.

    JSON's `\\ud800` escape yields a str that UTF-8 cannot encode; it would fail in the
    store or the provider call, long after the caller was told anything. Checked at C
    speed where it can be, and otherwise over containers level by level, a place spelled
    out only for what is refused: a walk of every item with its path (an f-string each)
    held the event loop ten times as long as parsing a 1 MB body, and every webhook and
    mail waited behind it. No recursion, so the check itself cannot overflow.
    """
    if _deeper_than(value, max_depth):
        raise HttpError(400, f"body is JSON nested deeper than {max_depth}", "body")
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")  # raises on any lone one
    except UnicodeEncodeError as exc:
        path, char = _lone_surrogate(value) or ("body", exc.object[exc.start])
        raise HttpError(400, f"'{path}' holds a lone surrogate (\\u{ord(char):04x})", path) from exc


def _deeper_than(value: Any, max_depth: int) -> bool:
    level, depth = ([value] if type(value) in _CONTAINERS else []), 0
    while level:
        depth += 1
        if depth > max_depth:
            return True
        level = [
            child
            for item in level
            for child in (item.values() if type(item) is dict else item)
            if type(child) in _CONTAINERS
        ]
    return False


def _lone_surrogate(value: Any) -> tuple[str, str] | None:
    """Where the first lone surrogate is (as `_spelled`), and it; None if none is, or
    if finding it would take more than NAMED_WITHIN items (a caller who put one after
    300,000 empty objects is told `body`, not kept waiting while its place is sought)."""
    if type(value) is str:
        return ("body", char) if (char := _surrogate_in(value)) else None
    level: list[tuple[Any, tuple[str | int, ...]]] = [(value, ())]
    looked = 0
    while level:
        deeper = []
        for item, where in level:
            looked += len(item)
            if looked > NAMED_WITHIN:
                return None
            pairs = item.items() if type(item) is dict else enumerate(item)
            for key, child in pairs:
                if type(key) is str and (char := _surrogate_in(key)):
                    return _spelled(where), char
                if type(child) is str:
                    if char := _surrogate_in(child):
                        return _spelled((*where, key)), char
                elif type(child) in _CONTAINERS:
                    deeper.append((child, (*where, key)))
        level = deeper
    return None


def _surrogate_in(text: str) -> str | None:
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return str(exc.object[exc.start])
    return None


def _spelled(where: tuple[str | int, ...]) -> str:
    """A place in the body as the rest of the API names it (`a.b[0]`), or `body`."""
    path = ""
    for part in where:
        path = f"{path}[{part}]" if isinstance(part, int) else f"{path}.{part}" if path else part
    return path or "body"
