"""Finding our messages in the provider's /logs, however the provider writes them.

The shape of a /logs entry is not documented: numbers may come back with or without `+`,
with `00`, or national; texts with their whitespace changed or cut short; timestamps in
the provider's own time zone. Reconciliation (did an unknown outcome go out?) and the
status poller (which entry is this id-less message?) both match through `LogMatcher`, so
one tolerant rule decides everywhere: an entry is a message's only if created no earlier
than the message went (less CLOCK_SKEW), and entries of one recipient and text go to our
messages in time order, the oldest entry to the oldest message, once every entry that
can be one of them is read (never as read: /logs is newest first). Pure functions, no
I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
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
# An entry collected (`LogMatcher.candidates`): with its recipient, text and creation.
Candidate = tuple[E, object, object, float | None]


def _no_time(message: object) -> float | None:
    return None


class LogMatcher(Generic[M, E]):
    """Our messages indexed by the tail of their number, and the /logs entries that can
    be theirs; each message is paired with one entry at most, each entry with one.

    Given oldest first, with `since(m)` when each went (its claim, or its send), if known.
    An entry created more than CLOCK_SKEW before a message went is an earlier text, not
    that one. Entries are only collected as read (`offer`, newest first), never settled
    while reading: `pairs` gives the oldest entry to the oldest message it can be, over
    every entry collected. Settled as read, the newest entry went to the oldest message
    it could be, and the older entries then fitted only newer messages, too old for them:
    of two id-less sends and a timed-out repeat of one text, the repeat was "not found"
    and sent again (a second SMS), and the poller swapped ids and states.
    """

    def __init__(
        self,
        messages: Iterable[M],
        *,
        since: Callable[[M], float | None] = _no_time,
        answered: Callable[[M], bool] = lambda m: False,
    ) -> None:
        self._since = since
        # Messages the provider answered for (sent without an id): each has an entry for
        # sure, where one whose outcome is unknown may have none. They take theirs first.
        self._answered = answered
        self._messages = list(messages)  # oldest first
        self._by_tail: dict[str, list[M]] = {}
        for m in self._messages:
            self._by_tail.setdefault(_tail(m.recipient), []).append(m)
        self._entries: list[Candidate[E]] = []  # as read
        self._pairs: list[tuple[E, M]] | None = None  # `pairs`, until another entry

    def __bool__(self) -> bool:
        """Whether a message is left without an entry (`remaining`)."""
        return bool(self.remaining())

    def _fits(self, m: M, recipient: object, text: object, created: float | None) -> bool:
        went = self._since(m)
        if created is not None and went is not None and created < went - CLOCK_SKEW:
            return False  # before this one went: an earlier text
        return same_number(m.recipient, recipient) and same_text(m.text, text)

    def offer(self, entry: E, recipient: object, text: object, created: float | None) -> bool:
        """Collect an entry read (newest first; created at `created`, if known) if it
        can be one of the messages; nothing is paired yet (`pairs`)."""
        group = self._by_tail.get(_tail(recipient), [])
        if not any(self._fits(m, recipient, text, created) for m in group):
            return False
        self._entries.append((entry, recipient, text, created))
        self._pairs = None
        return True

    def offer_all(self, collected: Iterable[Candidate[E]]) -> list[E]:
        """Offer what another matcher collected (`candidates`: a walk cut short, gone on
        with by the next); returns the entries taken."""
        return [one[0] for one in collected if self.offer(*one)]

    def candidates(self) -> list[Candidate[E]]:
        """The entries collected, as read: each with its recipient, text and creation."""
        return list(self._entries)

    def pairs(self) -> list[tuple[E, M]]:
        """Every entry collected, the oldest first, paired with the oldest message it
        can be that no older entry was: of one recipient and text, the order they went
        in decides, the messages the provider answered for (`answered`) before the
        others. A message paired stays paired as more (older) entries are read; which of
        the repeats' entries it gets may change."""
        if self._pairs is None:
            # The answered messages first: of an unknown outcome that never reached the
            # provider and a send it answered later, both can be the one entry, and
            # in time order alone the unknown one took it (recorded sent, never sent).
            # At worst, two that both went swap their entries' ids.
            oldest_first = list(reversed(range(len(self._entries))))
            first = self._pair(oldest_first, self._answered)
            left = [i for i in oldest_first if i not in first]
            paired = {**first, **self._pair(left, lambda m: not self._answered(m))}
            self._pairs = [(self._entries[i][0], paired[i]) for i in oldest_first if i in paired]
        return self._pairs

    def _pair(self, indices: list[int], among: Callable[[M], bool]) -> dict[int, M]:
        """The entries at `indices` (oldest first), each to the oldest message of `among`
        it can be that no older one was."""
        free = {tail: [m for m in group if among(m)] for tail, group in self._by_tail.items()}
        pairs: dict[int, M] = {}
        for i in indices:
            _, recipient, text, created = self._entries[i]
            group = free.get(_tail(recipient), [])
            for index, m in enumerate(group):
                if self._fits(m, recipient, text, created):
                    pairs[i] = group.pop(index)
                    break
        return pairs

    def messages(self) -> list[M]:
        """Every message, oldest first."""
        return list(self._messages)

    def remaining(self) -> list[M]:
        """The messages `pairs` leaves without an entry, oldest first."""
        paired = {id(m) for _, m in self.pairs()}
        return [m for m in self._messages if id(m) not in paired]

    def reach(self, m: M) -> float | None:
        """How old an entry that bears on `m` can be: created no earlier than it, less
        CLOCK_SKEW, or than any message to its recipient that went before it (older
        entries go to those first, and theirs can then be the one left for `m`). Any
        text: an entry fits a message whose text it begins (`same_text`), so one of
        `m`'s entries can go to a message of a longer text, whose own entry is older;
        asked of our two texts alone, the walk stopped short of it and `m` was sent
        again. None: a time unknown, every entry may."""
        oldest = self._since(m)
        for other in self._by_tail.get(_tail(m.recipient), []):
            went = self._since(other)
            if other is m or not same_number(m.recipient, other.recipient):
                continue
            if went is None:
                return None
            if oldest is not None and went < oldest:
                oldest = went
        return None if oldest is None else oldest - CLOCK_SKEW


def _tail(recipient: object) -> str:
    return number_digits(recipient)[-SUFFIX_DIGITS:]
