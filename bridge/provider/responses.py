"""Reading the provider's answers into outcomes: the one classification of every answer.

An HTTP answer becomes either a parsed JSON object or one of the exceptions in
`bridge.errors`: 401/404 (and redirects) auth or configuration; 403 an inactive account;
429 rate-limited with `Retry-After` (seconds or an HTTP-date); 5xx and unparseable bodies
transient. Any 2xx is a success (201 = 200) unless it says it failed (`"success"` false,
0, "false", a `"status"` of "error": `_says_failed`). Such a 2xx and any other 4xx are
refusals, read on their words whatever the status (`_refusal`): one that says it timed
out (or its deadline passed) is checked in /logs before the retry, as a 5xx is (the text
may have gone before the timeout); the account's words (balance, key invalid, suspended)
hold the queue as a 403 does; a transient cause (limit, try again) is retried; any other
is permanent. A 2xx that says it took the message but gives no id is a success without
ids (the poller then matches the message by recipient and text); only an answer that says
nothing is an unknown outcome, to be checked in /logs before anything is resent.

Parsing is tolerant because the bulk, logs, pricing and account bodies are not
documented by the provider: numbers are mapped back to ours whatever their form, keys
have variants. Pure functions over what the client received; no I/O.
"""

from __future__ import annotations

import email.utils
import json
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from bridge.errors import (
    PermanentSendError,
    ProviderAccountError,
    ProviderAuthError,
    ProviderError,
    ProviderInactiveError,
    RateLimitedError,
    TransientSendError,
)
from bridge.provider.logmatch import same_number

_TRANSIENT_4XX = {408, 425}
# A timeout in the provider's words. "Deadline exceeded" is how gRPC and Go services
# (context.DeadlineExceeded) say it: read as a refusal, a text the provider may have sent
# before its deadline passed was marked failed. Only the deadline passing: a refusal that
# names a deadline otherwise ("invalid deadline") is judged on its other words.
_TIMEOUT = r"time ?outs?|timed ?out|etimedout|deadline ?(?:exceeded|expired)"
# A refusal (a 4xx, a 2xx whose success flag is falsy) whose reason reads like one of
# these may pass: retry, do not fail, whatever the status ("rate limit exceeded" on a 400
# failed for good).
# Whole words (or their inflections): a refusal is judged on all its words, and
# "unlimited" or "collateral" in an invalid number's refusal made it retryable.
_TRANSIENT_WORDS = re.compile(
    r"\b(?:limit\w*|ratelimit\w*|too many|try again|later|"
    rf"temporar\w*|busy|throttl\w*|unavailable|{_TIMEOUT}|maintenance)\b",
    re.IGNORECASE,
)
# Words saying the *account* cannot send, whatever the message: no balance or credit, a
# key the provider says is wrong, an account suspended or ended. Not the message's fault:
# failed for good, every queued alert was lost to an empty balance (and none went after
# the top-up); taken for a transient refusal, each text gave up after retry_max_age. Read
# as an inactive account (`ProviderAccountError`): the queue waits, the next send is the
# probe. Checked before _TRANSIENT_WORDS ("insufficient balance, try again later" is the
# account's). Only the account's words: "number not active", "sender disabled" or an
# invalid number's refusal offering "unlimited plans" are the message's.
_ACCOUNT_WORDS = re.compile(
    r"\b(?:balance\w*|credits?|insufficient|funds|top ?up|"
    r"(?:invalid|wrong|unknown|expired|revoked|bad|missing)\s+(?:api\s*)?(?:key|token)|"
    r"account (?:is |has been )?(?:suspended|blocked|locked|closed|expired|banned|disabled"
    r"|deactivated|inactive|not active)|suspended|"
    r"(?:plan|subscription) (?:has )?(?:expired|ended|lapsed))\b",
    re.IGNORECASE,
)
# Of the transient ones, a timeout's: it may have come after the text went (the provider's upstream
# SMSC slow to answer it, as our own read timeout), so such a refusal is looked up in
# /logs before it goes again (`ProviderFailed`, as the same body on a 5xx); retried blind,
# a text the provider had sent went twice. The others say nothing went (no balance, a
# limit, busy) and are retried as they are. Checked first: "timed out, try again later"
# says both, and a /logs read costs a request where a resend costs an SMS.
_TIMEOUT_WORDS = re.compile(rf"\b(?:{_TIMEOUT})\b", re.IGNORECASE)
# Where an error code's words meet: insufficient_balance, too-many-requests,
# RateLimitExceeded, HTTP429TooManyRequests.
_CODE_JOINS = re.compile(r"[_-]|(?<=[a-z0-9])(?=[A-Z])")
_ACCEPTED_WORDS = {"success", "ok", "sent", "queued", "accepted", "pending", "true"}
# A success flag or status saying the request failed (`_says_failed`).
_FAILED_WORDS = {"false", "0", "no", "error", "failed", "fail", "failure", "rejected", "refused"}
# A /logs entry's status, lower case. sms-api.md names four (pending, sent, delivered,
# failed); providers write more. The final ones beside `delivered` all say the text did
# not reach the phone: read as `failed`, the provider's word as the reason (only
# delivered and failed were final, an "undelivered" text asked about for 48 h). The
# in-flight ones are not final and expected; any other is not final either but unknown
# (`bridge.delivery.poller` asks about it less often).
DELIVERED_STATUSES = frozenset({"delivered", "delivrd"})
FAILED_STATUSES = frozenset(
    {
        "failed",
        "failure",
        "undelivered",
        "undeliverable",
        "undeliv",
        "rejected",
        "rejectd",
        "expired",
        "blocked",
        "cancelled",
        "canceled",
        "error",
        "refused",
        "deleted",
    }
)
IN_FLIGHT_STATUSES = frozenset(
    {"pending", "sent", "queued", "accepted", "scheduled", "submitted", "sending", "enroute"}
)


def status_kind(status: str) -> str:
    """A /logs status read: "delivered", "failed", "pending" (in flight) or "unknown"."""
    word = re.sub(r"[\s_-]", "", status.lower())
    if word in DELIVERED_STATUSES:
        return "delivered"
    if word in FAILED_STATUSES:
        return "failed"
    return "pending" if word in IN_FLIGHT_STATUSES or not word else "unknown"


ID_KEYS = ("message_id", "id", "messageId", "sms_id", "uuid")
NUMBER_KEYS = ("to", "recipient", "number", "phone", "msisdn", "mobile", "destination")
TEXT_KEYS = ("message", "sms", "text", "content", "body")
STATUS_KEYS = ("status", "state", "delivery_status")
TIME_KEYS = ("created_at", "sent_at", "date", "timestamp", "created", "time")
LIST_KEYS = ("data", "logs", "items", "entries", "messages", "records")


@dataclass(frozen=True, slots=True)
class SendResult:
    """What a send call returned: ids by recipient where the provider gave them."""

    message_ids: dict[str, str] = field(default_factory=dict)
    batch_id: str | None = None
    cost: float | None = None
    balance: float | None = None
    # Recipients the answer named with an id it gave to others too (`_own_ids`): taken,
    # without an id of their own.
    shared: frozenset[str] = frozenset()


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
    rows: int = 0  # as served, with or without an id: a provider may serve fewer than asked


class TransientUnknownOutcome(TransientSendError):
    """The request may have reached the provider (read timeout, reset): verify before resending."""


class ProviderFailed(TransientSendError):
    """A 5xx in the provider's own error shape (`"success": false`), or a 2xx refusal
    saying it timed out: it says it failed, but a send is still looked up in /logs before
    it goes again."""


# Each failure's name in the request metrics (an exact type: subclasses named apart).
OUTCOMES: dict[type[ProviderError], str] = {
    PermanentSendError: "permanent",
    ProviderAccountError: "inactive",
    ProviderAuthError: "auth",
    ProviderInactiveError: "inactive",
    ProviderFailed: "transient",
    RateLimitedError: "rate_limited",
    TransientSendError: "transient",
    TransientUnknownOutcome: "unknown",
}


# The longest Retry-After obeyed. A 429's pauses every request of the key and a 5xx's
# holds the message: "inf" or a date years ahead (a broken gateway, a typo) would stop
# sending for good and leave the message in no final state. Longer is asked again then.
MAX_RETRY_AFTER = 3600.0


def parse_retry_after(value: str | None, now: float) -> float | None:
    """`Retry-After` as delta-seconds or an HTTP-date, in seconds from `now`, at most
    `MAX_RETRY_AFTER`; None when it is neither (or not a number: "nan")."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - now
    if math.isnan(seconds):
        return None
    return min(MAX_RETRY_AFTER, max(0.0, seconds))


def _hidden(text: str, key: str) -> str:
    """`text` without our API key. What the provider says becomes messages' reasons and
    events, which the API and the console show to any `read` token (a dashboard's): a
    provider that quotes the key it was sent must not hand it to them. Masked before any
    cut, so no part of the key is left; a key of one character is not masked (as in the
    log: it would star every reason)."""
    return text.replace(key, "***") if len(key) >= 2 else text


# Of the provider's words kept in a reason. Uncut, a refusal's 100 kB `message` went
# into every reason and event of the texts it refused.
REASON_CHARS = 200


# NUL shown as what it is not: PostgreSQL's text cannot hold NUL. A reason or an id that
# held one could not be written; the dispatcher took the outcome for unknown and sent the
# text again (a refused text ended `sent`, a sent one went twice).
_NUL, _NUL_SHOWN = "\x00", "\ufffd"


def _without_nul(value: Any) -> Any:
    """`value` (decoded JSON) with NUL in every string and key shown as U+FFFD."""
    if isinstance(value, str):
        return value.replace(_NUL, _NUL_SHOWN)
    if isinstance(value, dict):
        return {_without_nul(k): _without_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_nul(item) for item in value]
    return value


def _json(response: httpx.Response) -> Any:
    """The answer's JSON (ValueError if it is none), NUL shown as U+FFFD. JSON writes NUL
    only as the escape `\\u0000` (a raw one is refused), so most answers skip the walk."""
    body = response.json()
    return _without_nul(body) if b"\\u0000" in response.content else body


def _text(response: httpx.Response) -> str:
    """The answer as text (a gateway's page, a body that is no JSON), NUL as U+FFFD."""
    return response.text.replace(_NUL, _NUL_SHOWN)


def _error_words(response: httpx.Response, key: str = "") -> str:
    """What the provider says went wrong, whole, with our key masked (`_hidden`)."""
    try:
        body = _json(response)
    except ValueError:
        return _hidden(_text(response), key).strip() or response.reason_phrase or "no reason given"
    if isinstance(body, dict):
        for name in ("message", "error", "detail", "errors"):
            if body.get(name):
                value = body[name]
                return _hidden(value if isinstance(value, str) else json.dumps(value), key)
    return _hidden(json.dumps(body), key)


def _error_message(response: httpx.Response, key: str = "") -> str:
    """`_error_words` as a reason: cut to REASON_CHARS, the key masked before the cut."""
    return _error_words(response, key)[:REASON_CHARS]


def _says_failed(body: Any) -> bool:
    """Does a JSON answer say it failed, in any spelling: `"success"` false, 0, "false"
    (read `is False` only, `"success": 0, "message": "Insufficient balance"` was taken for
    an answer saying nothing: sent twice, then `sent` "outcome unknown", its reason lost),
    or a `"status"` of failure ("error", "failed")."""
    if not isinstance(body, dict):
        return False
    flag = body.get("success")
    if isinstance(flag, bool):
        return not flag
    if isinstance(flag, int | float):
        return flag == 0
    if isinstance(flag, str) and flag.strip().lower() in _FAILED_WORDS:
        return True
    status = body.get("status")
    return isinstance(status, str) and status.strip().lower() in _FAILED_WORDS


def _error_body(response: httpx.Response) -> bool:
    """Is this the provider's error shape, `{"success": false, ...}` in any spelling?"""
    try:
        body = _json(response)
    except ValueError:
        return False
    return _says_failed(body)


def _refusal(response: httpx.Response, key: str) -> ProviderError:
    """What a refusal (a 4xx that is none of the statuses read apart, a 2xx saying it
    failed) means, by its words: judged on all of them, stored cut ("insufficient
    balance" after the cut made a retryable refusal a permanent failure)."""
    status = response.status_code
    words = _error_words(response, key)
    reason = words[:REASON_CHARS]
    joined = _CODE_JOINS.sub(" ", words)
    if _TIMEOUT_WORDS.search(joined):
        return ProviderFailed(reason, status=status)
    if _ACCOUNT_WORDS.search(joined):
        return ProviderAccountError(reason, status=status)
    if _TRANSIENT_WORDS.search(joined):
        return TransientSendError(reason, status=status)
    return PermanentSendError(reason, status=status)


def classify(response: httpx.Response, now: float, *, key: str = "") -> dict[str, Any]:
    """The answer's JSON object if it is a success; else the exception that says why,
    in the provider's words with `key` (our API key) masked."""
    status = response.status_code
    retry_after = parse_retry_after(response.headers.get("Retry-After"), now)
    if status == 429:
        raise RateLimitedError(
            _error_message(response, key), status=status, retry_after=retry_after
        )
    if status >= 500 or status in _TRANSIENT_4XX:
        # The provider's own error body says it failed; anything else (a gateway's
        # HTML, an empty 502/504) may have come after the provider took the request.
        kind: type[TransientSendError] = TransientSendError
        if status >= 500:
            kind = ProviderFailed if _error_body(response) else TransientUnknownOutcome
        raise kind(_error_message(response, key), status=status, retry_after=retry_after)
    if status == 403:
        raise ProviderInactiveError(_error_message(response, key), status=status)
    if status in (401, 404) or 300 <= status < 400:
        raise ProviderAuthError(_error_message(response, key), status=status)
    if status >= 400:
        # Read for its words as a 2xx refusal is: a 402 "Insufficient balance" failed
        # every queued alert for good, a 400 "rate limit exceeded" its text.
        raise _refusal(response, key)
    try:
        body = _json(response)
    except ValueError as exc:
        raise TransientUnknownOutcome(
            f"unparseable provider answer (HTTP {status}): {_hidden(_text(response), key)[:100]!r}",
            status=status,
        ) from exc
    if not isinstance(body, dict):
        raise TransientUnknownOutcome(
            f"unexpected provider answer (HTTP {status}): {_hidden(_text(response), key)[:100]!r}",
            status=status,
        )
    if _says_failed(body):
        raise _refusal(response, key)
    return body


def accepted(body: Mapping[str, Any]) -> bool:
    """Does the answer say the provider took the request (whatever else it omits)?"""
    flag = body.get("success")
    if flag is True or (isinstance(flag, int | float) and not isinstance(flag, bool) and flag == 1):
        return True
    if isinstance(flag, str) and flag.strip().lower() in _ACCEPTED_WORDS:
        return True
    status = body.get("status")
    return isinstance(status, str) and status.strip().lower() in _ACCEPTED_WORDS


def _first(mapping: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if key in mapping and mapping[key] is not None:
            return mapping[key]
    return None


# A price per message beyond any real one. A provider's cost past it (or below 0) is no
# price: stored as unknown rather than counted (1e13 overflowed the running totals'
# millionths in PostgreSQL and stopped the dispatcher at every try).
MAX_COST = 1e9


def _id(value: Any) -> str | None:
    """An id as the provider gave it (an integral float as its integer), or None for
    none: JSON null, a bool, a container, or blank text (`"message_id": ""` kept as an id was looked for in /logs for ever,
    the text's delivery never known)."""
    if value is None or isinstance(value, bool | dict | list):
        return None
    if isinstance(value, float) and value.is_integer():
        # 10000.0 is the id /logs writes 10000: kept as "10000.0", it never matched.
        return str(int(value))
    text = str(value)
    return text if text.strip() else None


def _number(value: Any) -> float | None:
    """A finite number, from a JSON number or a numeric string; else None (inf and NaN
    too: Python's json reads `Infinity` and `NaN`)."""
    try:
        number = None if value is None or isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        return None
    return number if number is not None and math.isfinite(number) else None


def _cost(value: Any) -> float | None:
    cost = _number(value)
    return cost if cost is not None and 0 <= cost <= MAX_COST else None


def data_of(body: Mapping[str, Any]) -> dict[str, Any]:
    """The answer's `data` object ({} if it has none)."""
    data = body.get("data")
    return data if isinstance(data, dict) else {}


def read_send(answer: Mapping[str, Any], to: str) -> SendResult:
    """A /send success: the id if given; with neither id nor a word of success, unknown."""
    data = data_of(answer)
    message_id = _id(_first(data, *ID_KEYS))
    if message_id is None and not accepted(answer):
        raise TransientUnknownOutcome("provider answered without an id or a success flag")
    return SendResult(
        message_ids={} if message_id is None else {to: message_id},
        cost=_cost(data.get("cost")),
        balance=_number(data.get("balance")),
    )


def read_bulk(answer: Mapping[str, Any], recipients: Sequence[str]) -> SendResult:
    """A /send-bulk success; unknown where it cannot say which recipients were taken."""
    result, count = _parse_bulk(answer.get("data"), recipients)
    if count is not None and count != len(recipients) and not result.message_ids:
        # Some were taken, we cannot tell which: /logs decides for each.
        raise TransientUnknownOutcome(
            f"provider accepted {count} of {len(recipients)} recipients, without ids"
        )
    nothing = (
        not result.message_ids and not result.shared and result.batch_id is None and count is None
    )
    if nothing and not accepted(answer):
        # An unexpected body: whether the provider took it is unknown: /logs decides.
        raise TransientUnknownOutcome("provider answered without ids or a success flag")
    return result


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
    bare = 0  # ids without their recipient's number (read in the order sent)
    items = _first(data, "messages", "results", "message_ids", "ids", "recipients")
    if isinstance(items, dict):
        for number, mid in items.items():
            ours, their_id = _ours(number, recipients), _id(mid)
            if ours is not None and their_id is not None:
                ids[ours] = their_id
    elif isinstance(items, list):
        for index, item in enumerate(items):
            if isinstance(item, dict):
                to, mid = _first(item, *NUMBER_KEYS), _id(_first(item, *ID_KEYS))
                ours = None if to is None else _ours(to, recipients)
                if ours is not None and mid is not None:
                    ids[ours] = mid
            elif isinstance(item, int | float) and not isinstance(item, bool) and _id(item):
                bare += 1
                if len(items) == len(recipients):  # ids in the order sent
                    ids[recipients[index]] = str(_id(item))
            # An id, not blank, not one of our numbers echoed back.
            elif isinstance(item, str) and _id(item) and _ours(item, recipients) is None:
                bare += 1
                if len(items) == len(recipients):
                    ids[recipients[index]] = item
    batch = _first(data, "batch_id", "bulk_id", "batch", "campaign_id")
    count = _first(data, "count", "total", "accepted", "total_recipients", "sent")
    if isinstance(count, list | bool) or _number(count) is None:
        count = None
    if count is None and bare and bare != len(recipients):
        # Fewer (or more) ids than recipients, without their numbers: how many the
        # provider took, not which. Read as a success without ids, all were `sent`,
        # those it had not taken too (an alert lost under a state that says it went).
        count = bare
    accepted = None if count is None else int(float(count))
    ids, shared = _own_ids(ids)
    return (
        SendResult(
            message_ids=ids,
            shared=shared,
            batch_id=None if batch is None else str(batch),
            cost=_bulk_cost(data, len(ids) or accepted or len(recipients)),
            balance=_number(data.get("balance")),
        ),
        accepted,
    )


def _own_ids(ids: dict[str, str]) -> tuple[dict[str, str], frozenset[str]]:
    """The ids each naming one recipient. An id the answer gives to several is the
    call's, not a message's (a batch id written in each recipient's place): kept on each,
    /logs could pair it with one of them at most, the others' states never learnt and
    asked about until `give_up_after`. Those recipients (returned apart) are left without
    an id, as after a bulk answer without ids: sent, matched in /logs by recipient and
    text; not unknown outcomes (looked up, and resent if /logs showed only the shared id,
    taken by another of them)."""
    twice = {mid for mid, n in Counter(ids.values()).items() if n > 1}
    own = {number: mid for number, mid in ids.items() if mid not in twice}
    return own, frozenset(number for number, mid in ids.items() if mid in twice)


def _bulk_cost(data: Mapping[str, Any], messages: int) -> float | None:
    """What a bulk call cost: its `cost` (or `total_cost`), else its `price` times the
    `messages` it took. In sms-api.md's words a price is what one SMS costs (the price
    list's "price per SMS") and a cost what a send cost (`/send`'s); read as the call's
    total, a `price` counted three texts billed 1.5 as 0.5 against the cost cap."""
    cost = _first(data, "cost", "total_cost")
    if cost is not None:
        return _cost(cost)
    price = _cost(data.get("price"))
    return None if price is None else _cost(round(price * messages, 6))


def read_logs(body: Mapping[str, Any], page: int) -> LogsPage:
    """One /logs page: entries with an id, and whether another page follows."""
    data = _first(body, *LIST_KEYS)
    meta: Mapping[str, Any] = body
    if isinstance(data, dict):
        meta = data
        data = _first(data, *LIST_KEYS)
    rows = data if isinstance(data, list) else []
    paging = _first(meta, "pagination", "meta") or _first(body, "pagination", "meta") or meta
    paging = paging if isinstance(paging, dict) else {}
    entries = []
    for row in rows:
        if not isinstance(row, dict):
            continue
        entry_id = _id(_first(row, *ID_KEYS))
        if entry_id is None:
            continue
        created = _first(row, *TIME_KEYS)
        entries.append(
            LogEntry(
                id=entry_id,
                recipient=str(_first(row, *NUMBER_KEYS) or ""),
                message=str(_first(row, *TEXT_KEYS) or ""),
                status=str(_first(row, *STATUS_KEYS) or "").strip().lower(),
                # `price` as other shapes name it: what this message cost (`_bulk_cost`).
                cost=_cost(_first(row, "cost", "price")),
                created_at=None if created is None else str(created),
            )
        )
    more = _more_pages(paging, page, len(rows))
    return LogsPage(entries=entries, page=page, has_more=more, rows=len(rows))


def _more_pages(paging: Mapping[str, Any], page: int, rows: int) -> bool:
    """Whether a /logs page has another after it: its last page read leniently (a
    number in any form: "2" as a string ended the walk), a `has_more` flag; with no paging
    information, while pages hold rows. Judged by the rows asked for (100), a provider
    serving 20 a page ended every walk at page 1: a text it took not found, sent twice.
    One extra request a walk, and the walks' own page caps bound a provider that ignores
    `page`."""
    last_page = _number(_first(paging, "last_page", "total_pages", "pages"))
    if last_page is not None:
        return page < last_page
    flag = paging.get("has_more")
    if isinstance(flag, str):
        flag = flag.strip().lower() in ("true", "1", "yes")
    if isinstance(flag, bool | int | float):
        return bool(flag)
    if "next_page_url" in paging:  # Laravel's paginator without its last page
        return bool(paging["next_page_url"])
    return rows > 0
