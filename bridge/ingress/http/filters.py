"""The message list's filters, read alike by the API (`GET /api/v1/messages`) and the
console's list (`/ui/messages`, and its `.json`): the same query gets the same messages
or the same 400 on both.

An empty parameter (`?limit=`, `?route=`: what an HTML form sends for an empty field)
is one not given, on both. A value that cannot select anything meant is a 400 naming
the field: a 200 listing every message, or none, reads as an answer to what was asked.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from starlette.datastructures import QueryParams

from bridge.errors import HttpError
from bridge.ingress.http.bodies import check_query, known, page_size, query_int
from bridge.models import OTHER_REASON, REASON_KINDS, SOURCES, Message, State
from bridge.store import Store

STATES = tuple(str(s) for s in State)
# What a list takes: a name misspelt (`?stat=failed`) was ignored, and every message
# listed with a 200 to a script that asked for the failed ones.
PARAMETERS = (
    "state",
    "status",
    "reason",
    "not_reason",
    "route",
    "source",
    "recipient",
    "q",
    "since",
    "limit",
    "before",
)
# A cache-buster (`?_=1700000000`): what jQuery's `cache: false` and many dashboards
# add to every GET so no cache answers it. It selects nothing and is ignored; any other
# unknown name stays a 400.
CACHE_BUSTER = "_"


@dataclass(frozen=True)
class ListQuery:
    """A list's page and filters as read; `recipient` is the text searched for."""

    limit: int
    before: int | None
    state: str | None
    reason_kind: str | None
    not_reason_kind: str | None
    route: str | None
    source: str | None
    recipient: str | None
    text: str | None
    since: float | None

    async def page(
        self, store: Store, *, limit: int, recipient: str | None, number: str | None = None
    ) -> list[Message]:
        """The messages these filters and the cursor select (the API and the console alike:
        a filter one of them forgot would list what the other refuses to)."""
        return await store.query(
            state=self.state,
            number=number,
            recipient=recipient,
            reason_kind=self.reason_kind,
            not_reason_kind=self.not_reason_kind,
            route=self.route,
            source=self.source,
            text=self.text,
            since=self.since,
            before_id=self.before,
            limit=limit,
        )


async def read_list_query(
    query: QueryParams,
    *,
    default_limit: int,
    max_limit: int,
    routes: Collection[str],
    store: Store,
) -> ListQuery:
    """The list's parameters, each checked (a 400 naming the first one wrong)."""
    check_query(query)
    for name in query:
        if name not in PARAMETERS and name != CACHE_BUSTER:
            raise HttpError(
                400, f"unknown parameter {name!r}: one of {', '.join(PARAMETERS)}", name
            )
    state, status = given(query, "state"), given(query, "status")
    if state and status and state != status:
        raise HttpError(400, "'state' and 'status' are one filter: give one", "status")
    reasons = (*REASON_KINDS, OTHER_REASON)
    return ListQuery(
        limit=page_size(given(query, "limit"), default=default_limit, maximum=max_limit),
        before=query_int(given(query, "before"), "before", minimum=1),  # ids start at 1
        state=known(query, "state" if state else "status", STATES),
        reason_kind=known(query, "reason", reasons),
        not_reason_kind=known(query, "not_reason", REASON_KINDS),
        route=await route_filter(given(query, "route"), routes, store),
        source=known(query, "source", SOURCES),
        recipient=recipient_part(given(query, "recipient")),
        text=given(query, "q"),
        since=since_filter(given(query, "since")),
    )


_URL_PLUS = re.compile(r" ([0-9]{2}:?[0-9]{2})$")


def given(query: Mapping[str, str], key: str) -> str | None:
    """The parameter `key`, None when absent or empty."""
    return query.get(key) or None


def recipient_part(raw: str | None) -> str | None:
    """What a recipient filter searches for: the text without its spaces and leading
    `+` (in a URL, `?recipient=+1202...` arrives as " 1202..."). Given but nothing
    else (`?recipient=+`), a 400: searching for "" listed every message."""
    if not raw:
        return None
    part = raw.strip().lstrip("+ ")
    if not part:
        raise HttpError(
            400,
            "'recipient' has nothing to search for: give a number or some of its digits"
            " (a '+' in a URL is written %2B)",
            "recipient",
        )
    return part


async def route_filter(raw: str | None, configured: Collection[str], store: Store) -> str | None:
    """A route to list the messages of: one configured, or one removed from the config
    whose messages are still stored (what an operator looks up after removing it).
    Any other name is a 400 listing the configured ones, not an empty list."""
    if raw is None or raw in configured:
        return raw
    if await store.query(route=raw, limit=1):
        return raw
    names = ", ".join(sorted(configured)) or "none configured"
    raise HttpError(
        400,
        f"unknown route {raw!r}: neither configured ({names}) nor carried by a stored message",
        "route",
    )


def since_filter(raw: str | None) -> float | None:
    """`since`: messages created at or after this time, ISO 8601 as the API writes its
    times (`2027-01-15T08:00:00.000+00:00`, or `Z`); epoch seconds, None when not given."""
    if raw is None:
        return None
    try:
        # A `+00:00` typed into a URL arrives as " 00:00".
        when = datetime.fromisoformat(_URL_PLUS.sub(r"+\1", raw))
    except ValueError as exc:
        raise HttpError(
            400, f"'since' must be an ISO 8601 time such as 2027-01-15T08:00:00Z: {exc}", "since"
        ) from exc
    if when.tzinfo is None:
        # A time without its zone is a different instant on every server: not guessed.
        raise HttpError(
            400,
            f"'since' {raw!r} has no time zone: add Z for UTC or an offset, as in"
            f" {when.isoformat(timespec='seconds')}Z or {when.isoformat(timespec='seconds')}"
            "+02:00",
            "since",
        )
    try:
        # The time in UTC, as every answer writes it back: one before the year 1 or
        # after 9999 there (0001-01-01T00:00:00+14:00) could not be written, and the
        # console's pages answered 500.
        when.astimezone(UTC)
    except OverflowError:
        raise HttpError(
            400, f"'since' {raw!r} is outside the years 1 to 9999 in UTC", "since"
        ) from None
    return when.timestamp()
