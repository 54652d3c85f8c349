"""Finding our messages in the provider's /logs, however the provider writes them.

The shape of a /logs entry is not documented: numbers may come back with or without `+`,
with `00`, or national; texts with their whitespace changed or cut short; timestamps in
the provider's own time zone. Reconciliation (did an unknown outcome go out?) and the
status poller (which entry is this id-less message?) both match through `LogMatcher`, so
one tolerant rule decides everywhere: an entry is a message's only if created no earlier
than the message went (less CLOCK_SKEW), and entries of one recipient and text go to our
messages in time order, the oldest entry to the oldest message. Pure functions, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, tzinfo
from typing import Generic, Protocol, TypeVar

_NOT_DIGITS = re.compile(r"\D")
SUFFIX_DIGITS = 7  # a national number keeps at least this many of the E.164 digits
MIN_TRUNCATED = 20  # a cut text must keep this much (or all of ours) to count as ours
_ELLIPSES = ("...", "…")
# Epoch seconds or milliseconds as digits: nine or more (eight would be a `Ymd` date).
_EPOCH = re.compile(r"[0-9]{9,}(\.[0-9]+)?")
_STAMP_FORMATS = ("%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M", "%d/%m/%Y %H:%M:%S")
CLOCK_SKEW = 120.0  # tolerance between our clock and the provider's timestamps


def number_digits(value: object) -> str:
    """The international digits of a number as the provider may write it (no national)."""
    text = str(value).strip()
    digits = _NOT_DIGITS.sub("", text)
    if not text.startswith("+") and digits.startswith("00"):
        digits = digits[2:]
    return digits


def same_number(ours: str, theirs: object) -> bool:
    """`ours` is E.164; `theirs` with `+`, `00`, digits only, separators, or national."""
    mine = number_digits(ours)
    text = str(theirs).strip()
    other = number_digits(text)
    if other == mine:
        return True
    # National form ("0XX..."): the trunk 0 dropped, the rest ends our number.
    national = other[1:] if other.startswith("0") and not text.startswith("+") else ""
    return len(national) >= SUFFIX_DIGITS and mine.endswith(national)


def _squash(text: str) -> str:
    return " ".join(text.split())


def same_text(ours: str, theirs: object) -> bool:
    """Equal after whitespace is collapsed, or a truncation of ours long enough to tell."""
    mine, other = _squash(ours), _squash(str(theirs))
    if mine == other:
        return True
    for ellipsis in _ELLIPSES:
        other = other.removesuffix(ellipsis).rstrip()
    return bool(other) and len(other) >= min(len(mine), MIN_TRUNCATED) and mine.startswith(other)


def provider_time(value: object, tz: tzinfo) -> float | None:
    """A provider timestamp as epoch seconds: epoch numbers, ISO 8601 with an offset, or
    a naive `Y-m-d H:i:s` read in the provider's zone `tz`."""
    if value is None or isinstance(value, bool):
        return None
    text = str(value).strip()
    if isinstance(value, int | float) or _EPOCH.fullmatch(text):
        # A number, or one written as text (the entries' fields are read as text):
        # "1800000000" is no date any format reads, and unread it let an older entry
        # pass for the send being reconciled.
        seconds = float(text)
        return seconds / (1000 if seconds > 1e11 else 1)  # milliseconds, if that large
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        when = None
        for fmt in _STAMP_FORMATS:
            try:
                when = datetime.strptime(text[:19], fmt)
                break
            except ValueError:
                continue
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=tz)
    return when.timestamp()


def provider_date(epoch: float, tz: tzinfo) -> str:
    """`Y-m-d` of `epoch` in the provider's zone (for /logs' `date_from`)."""
    return datetime.fromtimestamp(epoch, tz).strftime("%Y-%m-%d")


class Sent(Protocol):
    @property
    def recipient(self) -> str: ...
    @property
    def text(self) -> str: ...


M = TypeVar("M", bound=Sent)
E = TypeVar("E")


def _no_time(message: object) -> float | None:
    return None


class LogMatcher(Generic[M]):
    """Our messages indexed by the tail of their number; each matches one entry at most.

    Given oldest first, with `since(m)` when each went (its claim, or its send), if known.
    An entry goes to the oldest waiting message it can be: an entry created more than
    CLOCK_SKEW before a message went is an earlier text, not that one.
    """

    def __init__(
        self,
        messages: Iterable[M],
        *,
        since: Callable[[M], float | None] = _no_time,
    ) -> None:
        self._since = since
        self._order: dict[int, int] = {}  # id(m) -> its place, oldest first
        self._by_tail: dict[str, list[M]] = {}
        for index, m in enumerate(messages):
            self._order[id(m)] = index
            self._by_tail.setdefault(number_digits(m.recipient)[-SUFFIX_DIGITS:], []).append(m)

    def __bool__(self) -> bool:
        return any(self._by_tail.values())

    def remaining(self) -> list[M]:
        return [m for group in self._by_tail.values() for m in group]

    def take(self, recipient: object, text: object, created: float | None = None) -> M | None:
        """The oldest waiting message this entry (created at `created`, if known) can be,
        removed from the waiting; else None."""
        group = self._by_tail.get(number_digits(recipient)[-SUFFIX_DIGITS:])
        if not group:
            return None
        for index, m in enumerate(group):
            went = self._since(m)
            if created is not None and went is not None and created < went - CLOCK_SKEW:
                continue  # before this one went: an earlier text
            if same_number(m.recipient, recipient) and same_text(m.text, text):
                return group.pop(index)
        return None

    def in_time_order(
        self,
        taken: Sequence[tuple[E, object, object, float | None, M]],
    ) -> list[tuple[E, M]]:
        """The entries taken in a walk of /logs (newest first, as read: each entry with
        its recipient, text and creation time, and the message `take` gave it) paired
        again the oldest entry to the oldest message.

        Read newest first, an entry went to the oldest message waiting: of two sends of
        one text to one phone, the newest entry to the oldest send, their ids and states
        swapped. Paired again from the oldest entry up, each to the oldest message it can
        be (the same set of entries and messages), the order they went in decides.
        """
        messages = sorted((m for *_, m in taken), key=lambda m: self._order.get(id(m), 0))
        again: LogMatcher[M] = LogMatcher(messages, since=self._since)
        pairs: list[tuple[E, M]] = []
        for entry, recipient, text, created, _ in reversed(taken):
            m = again.take(recipient, text, created)
            if m is not None:
                pairs.append((entry, m))
        return pairs
