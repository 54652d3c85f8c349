"""Which kind of range a number the phone metadata does not know lies in (pure, cached).

`phonenumbers.number_type` answers only for valid numbers, so a possible but unassigned
number passed the premium check: `+4990012345678` (German 0900 premium, one digit too
many) and any number in an unlisted block of a premium prefix. Two readings, both from
the metadata's own patterns:

- overdialled: a network connects a known number and ignores digits past it, so a
  number whose leading digits are a costly number is that costly number;
- nearest range: the longest leading digits the number shares with any number of a
  known range (the range's patterns, completed with a repeated digit). When the costly
  ranges share more of them than any other kind, the number sits in a costly block.

Costly kinds: premium rate, shared cost and personal numbers (UK 070, a toll-fraud
classic). Patterns are deduplicated per calling code (the 25 NANP regions share theirs)
and each kind's become one automaton over digits (`bridge.digits`), run once along the
number: a request naming 100 new unknown numbers cost ~2.3 s of event loop on a loaded
machine when each cut asked `re` once per pattern, length and digit (BENCHMARKS.md).

A pattern the automata cannot hold (a construct outside `bridge.digit_regex`'s subset,
which a future phonenumbers release could ship: the dependency is not pinned) is read
with `re` as before them, alone, next to its kind's automaton (`_Kind`); one warning per
calling code says so.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Sequence

import phonenumbers
from phonenumbers import PhoneMetadata

from bridge.digit_regex import DIGITS, Unsupported, parse
from bridge.digits import Automaton

log = logging.getLogger(__name__)

COSTLY_KINDS = {
    "premium_rate": "a premium-rate number",
    "shared_cost": "a shared-cost number",
    "personal_number": "a personal number",
}
OTHER_KINDS = ("fixed_line", "mobile", "toll_free", "voip", "pager", "uan", "voicemail")


def kind_patterns(country_code: int) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """Each kind's distinct (pattern, lengths) over the regions of a calling code."""
    regions = phonenumbers.region_codes_for_country_code(country_code)
    metas = [
        PhoneMetadata.metadata_for_region_or_calling_code(country_code, region)
        for region in regions
    ]
    out: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    for kind in (*COSTLY_KINDS, *OTHER_KINDS):
        seen: dict[tuple[str, tuple[int, ...]], None] = {}  # ordered, deduplicated
        for meta in metas:
            desc = getattr(meta, kind, None) if meta is not None else None
            if meta is None or desc is None or not desc.national_number_pattern:
                continue
            general = meta.general_desc.possible_length if meta.general_desc else ()
            lengths = tuple(desc.possible_length or general or ())
            if lengths and lengths != (-1,):
                seen[(desc.national_number_pattern, lengths)] = None
        out[kind] = list(seen)
    return out


class _Kind:
    """One kind's patterns: those the automaton holds, and the few it cannot, asked with
    `re.fullmatch` per cut, length and digit: the reading the automata replaced.

    Why `re` and not a refusal: the answer is then the same one the automata would give
    (the test's oracle is this very reading), so a metadata release with a new construct
    neither refuses every unknown number of the calling code (alerts to on-call phones in
    new ranges would be lost) nor lets its premium ranges through (toll fraud). Its cost
    is the old one (0.1-0.6 ms a pattern for a 15-digit number, by its possible lengths),
    paid for those patterns only, and once per number: `costly_range` is cached.
    """

    def __init__(
        self,
        automaton: Automaton,
        patterns: Sequence[tuple[str, tuple[int, ...]]],
    ) -> None:
        self._automaton = automaton
        self._patterns: list[tuple[re.Pattern[str], tuple[int, ...]]] = []
        self.blind = False  # a pattern of this kind is no regex: its numbers go unseen
        for pattern, lengths in patterns:
            try:
                self._patterns.append((re.compile(pattern), lengths))
            except re.error as exc:  # phonenumbers could not use it either: it matches nothing
                self.blind = True
                log.warning(
                    "phone metadata pattern %.60r is not a regex (%s): ignored", pattern, exc
                )

    def _whole(self, prefix: str) -> bool:
        return any(len(prefix) in ls and rx.fullmatch(prefix) for rx, ls in self._patterns)

    def _completes(self, prefix: str) -> bool:
        return any(
            rx.fullmatch(prefix + digit * (n - len(prefix)))
            for rx, ls in self._patterns
            for n in ls
            if n >= len(prefix)
            for digit in DIGITS
        )

    def answers(self, number: str) -> list[tuple[bool, bool]]:
        """(whole, completes) for `number[:c]`, c from 0 to len(number): see Automaton."""
        fast = self._automaton.answers(number)
        if not self._patterns:
            return fast
        return [
            (whole or self._whole(number[:cut]), completes or self._completes(number[:cut]))
            for cut, (whole, completes) in enumerate(fast)
        ]


@functools.lru_cache(maxsize=256)  # more than the 215 calling codes: one warning each
def _automata(country_code: int) -> dict[str, _Kind]:
    """Each kind's reader (its automaton, and `re` for what that cannot hold), built at
    the calling code's first use."""
    kinds, unread = {}, []
    for kind, found in kind_patterns(country_code).items():
        trees, by_re = [], []
        for pattern, lengths in found:
            try:
                trees.append((parse(pattern), lengths))
            except Unsupported as exc:
                by_re.append((pattern, lengths))
                unread.append(f"{kind}: {exc}")
        kinds[kind] = _Kind(Automaton(trees), by_re)
    if unread:
        log.warning(
            "phone metadata for +%d: %d pattern(s) read with re, not as automata (range"
            " checks of its unknown numbers are slower); first: %s",
            country_code,
            len(unread),
            unread[0],
        )
    return kinds


def blind_costly_kinds(country_code: int) -> list[str]:
    """The costly kinds with a pattern `re` cannot compile for this calling code (a
    broken phonenumbers release): neither the library nor `costly_range` can tell its
    numbers, so the firewall refuses the code's unknown ones."""
    kinds = _automata(country_code)
    return sorted(kind for kind in COSTLY_KINDS if kinds[kind].blind)


@functools.lru_cache(maxsize=256)
def zero_leads(country_code: int) -> bool:
    """Can a number of this calling code begin with 0 (Italy's, Côte d'Ivoire's)? Where
    none can, a 0 after the country code is a trunk prefix written in twice ("+49 0
    0900..."): the library keeps it (E.164 `+490900...`), and networks drop it."""
    return any(kind.answers("0")[1][1] for kind in _automata(country_code).values())


@functools.lru_cache(maxsize=4096)
def costly_range(country_code: int, national: str) -> str | None:
    """The costly kind of the range an unknown national number lies in, or None."""
    kinds = _automata(country_code)
    # For each kind and cut: (a whole number of the kind, completed by a repeated digit)
    at = {kind: automaton.answers(national) for kind, automaton in kinds.items()}
    for cut in range(len(national) - 1, 2, -1):  # overdialled past a known number
        known = [kind for kind in kinds if at[kind][cut][0]]
        if known:
            return next((COSTLY_KINDS[k] for k in known if k in COSTLY_KINDS), None)
    for cut in range(len(national) - 1, 1, -1):  # the nearest known range, same length
        costly = [k for k in COSTLY_KINDS if at[k][cut][1]]
        ordinary = any(at[k][cut][1] for k in OTHER_KINDS)
        if costly:
            # as near to ordinary numbers: metadata lag, let it through
            return None if ordinary else COSTLY_KINDS[costly[0]]
        if ordinary:
            return None
    return None
