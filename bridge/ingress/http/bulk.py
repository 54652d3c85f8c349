"""Cancelling every waiting (queued or held) message a filter selects, at once: the
console's "Cancel all" (`POST /ui/queued/cancel`, `/ui/held/cancel`) and the API's
`POST /api/v1/messages/cancel` run this one operation, so a phone's storm is cancelled
alike from a browser and from a script, with the same reasons and events.

Each message is failed as a single cancel fails it ("cancelled by NAME", an event of
its own). What the dispatcher has claimed (`sending`) is never cancelled: the provider
may have it. Those are counted, so the caller learns how many will still go.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from bridge.errors import HttpError, InputError
from bridge.ingress.http.filters import route_filter
from bridge.models import State
from bridge.phone import PhoneError, normalise_number
from bridge.store import Store

CANCEL_BATCH = 500  # messages cancelled per store write
MAX_CANCEL_ROUNDS = 100  # bounded: a flood still arriving is not chased for ever
IN_FLIGHT_COUNTED = 500  # `sending` messages counted at most (the dispatcher's claims)
# Held first: a digest folded from held texts while they are cancelled is a new queued
# text, which the queued pass after it finds (queued first, it went out).
WAITING = (str(State.HELD), str(State.QUEUED))
# What `POST /api/v1/messages/cancel` takes: the list's names for the same filters.
SELECTORS = ("recipient", "route", "q")
FIELDS = (*SELECTORS, "state")
MAX_FILTER_CHARS = 5000


@dataclass(frozen=True, slots=True)
class Waiting:
    """Which waiting messages: in `states`, to `number` (a whole E.164 number), of
    `route`, holding `text` (any case, anywhere); None selects on nothing."""

    states: tuple[str, ...] = WAITING
    number: str | None = None
    route: str | None = None
    text: str | None = None


@dataclass(frozen=True, slots=True)
class Cancelled:
    """`cancelled` changed to failed; `in_flight` selected but in `sending` (at most
    IN_FLIGHT_COUNTED counted, besides those `taken`); `in_flight_more`: more were in
    `sending` than counted (`in_flight` is a floor, not the count); `more`: messages may
    be left; `gone`: found waiting, but no longer waiting at the write (the dispatcher
    claims queued texts between the read and the write) and not in `sending` either:
    sent or ended since (a held one folded into its phone's digest, or ended: none goes
    back to queued). `taken`: found queued, no longer at the write, and in `sending` now
    (of `in_flight`). Each message counted once: those taken and still sending were in
    `gone` and `in_flight` both, and a note that said both counted them twice."""

    cancelled: int
    in_flight: int
    more: bool
    gone: int = 0
    taken: int = 0
    in_flight_more: bool = False


def phone_number(written: str, field: str = "recipient") -> str:
    """The phone `written` names, as stored (+CC...). Not looked up as written: a NUL in
    it was a 500 on PostgreSQL (its text holds none), "nothing cancelled" on SQLite, and
    `+1 202 555 0144` cancelled nothing of +12025550144's."""
    try:
        return normalise_number(written)
    except PhoneError as exc:
        raise InputError(field, f"{exc}, with its calling code") from exc


async def cancel_waiting(
    store: Store, wanted: Waiting, now: Callable[[], float], *, by: str
) -> Cancelled:
    """Cancel what `wanted` selects, `by` naming who asked (in each reason and event)."""
    cancelled, more, gone = set[int](), False, set[int]()
    for state in wanted.states:
        done, left, missed = await _cancel_in(store, state, wanted, now, by)
        cancelled, more, gone = cancelled | done, more or left, gone | missed
    counted, cut = await _in_flight(store, wanted)
    taken = gone & counted
    if cut:  # those past the bound were not read: one taken there is no more gone
        taken |= await _sending(store, gone - counted)
    in_flight = len(counted | taken)
    return Cancelled(
        len(cancelled), in_flight, more, len(gone - taken), len(taken), in_flight_more=cut
    )


async def _in_flight(store: Store, wanted: Waiting) -> tuple[set[int], bool]:
    """The ids of the selected messages the dispatcher has claimed, at most
    IN_FLIGHT_COUNTED of them, and whether there were more: queued ones it took (a held
    one goes into a digest, never to `sending` as itself). Read after the cancel: one
    claimed while it ran is here too."""
    if str(State.QUEUED) not in wanted.states:
        return set(), False
    # One past the bound: a count that stopped there says so ("500" of 800 read as 500).
    sending = await store.query(
        state=str(State.SENDING),
        number=wanted.number,
        route=wanted.route,
        text=wanted.text,
        limit=IN_FLIGHT_COUNTED + 1,
    )
    return {m.id for m in sending[:IN_FLIGHT_COUNTED]}, len(sending) > IN_FLIGHT_COUNTED


async def _sending(store: Store, ids: set[int]) -> set[int]:
    """Those of `ids` in `sending` now: the ones a cancel found that were claimed before
    its write, looked up only when the count's read stopped short. A read per
    CANCEL_BATCH of them: one per id was a query per text the dispatcher took, up to
    CANCEL_BATCH * MAX_CANCEL_ROUNDS of them in one request."""
    wanted = sorted(ids)
    taken = set[int]()
    for start in range(0, len(wanted), CANCEL_BATCH):
        taken |= await store.in_state(wanted[start : start + CANCEL_BATCH], str(State.SENDING))
    return taken


async def _cancel_in(
    store: Store, state: str, wanted: Waiting, now: Callable[[], float], by: str
) -> tuple[set[int], bool, set[int]]:
    """(the ids cancelled, whether messages may be left after the last round, the ids
    found that had left the state before the write) of one state."""
    cancelled, gone = set[int](), set[int]()
    for _ in range(MAX_CANCEL_ROUNDS):
        found = await store.query(
            state=state,
            number=wanted.number,
            route=wanted.route,
            text=wanted.text,
            limit=CANCEL_BATCH,
        )
        done = set(await store.cancel([m.id for m in found], now(), by=by))
        missed = {m.id for m in found} - done
        # Ids, not sums, and the last round's word on each: a text one round missed
        # (claimed, then put back to queued by a failed send) or cancelled (then retried
        # by an operator) is found again by a later one. It was counted in both, or
        # cancelled twice, or cancelled and in flight.
        cancelled = (cancelled - missed) | done
        gone = (gone - done) | missed
        # Fewer than found: the dispatcher took some meanwhile (a queued one it claims
        # is the provider's now); the next round finds what is left. A full round it
        # took whole is no end: it stopped there, "more": false, with a storm behind it.
        if len(found) < CANCEL_BATCH:
            return cancelled, False, gone
    return cancelled, True, gone


async def read_waiting(body: Any, routes: Collection[str], store: Store) -> Waiting:
    """What a `POST /api/v1/messages/cancel` body selects; a 400 naming the field for
    anything that cannot select what was meant. No filter at all is refused: every
    waiting message of every phone is not cancelled on an empty or misspelt body."""
    if not isinstance(body, dict):
        raise HttpError(400, "body must be a JSON object", "body")
    for key in body:
        if key not in FIELDS:
            raise HttpError(400, f"unknown field {key!r}: one of {', '.join(FIELDS)}", key)
    given = {key: _text(body, key) for key in FIELDS}
    if not any(given[key] for key in SELECTORS):
        raise HttpError(
            400,
            "give 'recipient', 'route' or 'q' (one or more): every waiting message at once"
            " is not cancelled on a body that selects none",
            "body",
        )
    state = given["state"]
    if state is not None and state not in WAITING:
        raise HttpError(
            400,
            f"'state' {state!r} is not a waiting state: queued or held (absent: both);"
            " a message in another state cannot be cancelled",
            "state",
        )
    recipient = given["recipient"]
    return Waiting(
        states=(state,) if state else WAITING,
        number=phone_number(recipient) if recipient else None,
        route=await route_filter(given["route"], routes, store),
        text=given["q"],
    )


def _text(body: dict[str, Any], key: str) -> str | None:
    """`body[key]`: a string with something in it, or None when absent or null."""
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise HttpError(400, f"'{key}' must be a string", key)
    if not value.strip():
        raise HttpError(400, f"'{key}' is empty: leave it out to select on it not at all", key)
    if "\x00" in value:  # PostgreSQL's text holds none: a search for one was a 500
        raise HttpError(400, f"'{key}' holds a NUL character", key)
    if len(value) > MAX_FILTER_CHARS:
        raise HttpError(400, f"'{key}' is longer than {MAX_FILTER_CHARS} characters", key)
    return value
