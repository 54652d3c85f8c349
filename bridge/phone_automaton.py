"""phonenumbers' region and kind of a national number, in one walk along its digits (pure,
bounded).

The library answers `region_code_for_number` and `number_type` with `re.fullmatch` of up
to eleven patterns of a region, and for a calling code shared by several regions region
after region: ~44k instructions of a new US number, the largest part of reading one
(issue #16). Its answer depends on the number only through which of those patterns match
it whole, which regions' leading digits match its start, and its length. Here every such
pattern of a calling code becomes one automaton over digits (`bridge.digits.Matcher`; a
leading-digits pattern followed by any digits, so matching whole is matching the start):
one walk tells which match, and `bridge.phone_patterns` decides from that in the
library's order. The decision is remembered by (patterns matched, length), so a number
like one seen before pays the walk and a dict lookup.

A calling code with a pattern outside `bridge.digit_regex`'s subset, or one `re` cannot
compile, or a region whose metadata would not load, gets no automaton (`reader` is None)
and is asked of the library as before: its answer, or its failure, stays the library's.
"""

from __future__ import annotations

import functools

from bridge import phone_patterns
from bridge.digit_regex import ANY_DIGIT, Concat, Digit, Repeat, Unsupported, parse
from bridge.digits import Matcher

MAX_ANSWERS = 4096  # remembered decisions of one calling code; beyond, they start over
_ANY_DIGITS = Repeat(Digit(ANY_DIGIT), 0, None)


class Reader:
    """One calling code's patterns as one automaton, and the decisions made from it."""

    def __init__(self, code: phone_patterns.CallingCode) -> None:
        self._code = code
        whole, leading = code.patterns()
        trees = [parse(p) for p in whole]
        trees += [Concat((parse(p), _ANY_DIGITS)) for p in leading]  # re.match: a prefix
        self._matcher = Matcher(trees)
        self._whole, self._leading = whole, leading
        self._answers: dict[tuple[frozenset[int], int], tuple[str | None, int]] = {}

    @property
    def states(self) -> int:
        """The automaton's remembered states (`bridge.digits.MAX_STATES` bounds them)."""
        return self._matcher.states

    @property
    def decisions(self) -> int:
        """The remembered decisions (`MAX_ANSWERS` bounds them)."""
        return len(self._answers)

    def facts(self, national: str) -> tuple[str | None, int]:
        """(region_code_for_number, number_type) of the national significant number
        `national` (ASCII digits) of this calling code."""
        key = (self._matcher.matching(national), len(national))
        found = self._answers.get(key)
        if found is None:
            if len(self._answers) >= MAX_ANSWERS:  # bounded: an odd stream only clears it
                self._answers.clear()
            count = len(self._whole)
            matched = phone_patterns.Matched(
                frozenset(self._whole[i] for i in key[0] if i < count),
                frozenset(self._leading[i - count] for i in key[0] if i >= count),
            )
            found = self._answers[key] = self._code.facts(national, matched)
        return found


@functools.lru_cache(maxsize=256)  # more than the 215 calling codes
def reader(country_code: int) -> Reader | None:
    """`country_code`'s reader, built at its first number; None where the library must
    answer (see the module's docstring)."""
    code = phone_patterns.read(country_code)
    if code.unread or not code.read:
        return None
    try:
        return Reader(code)
    except Unsupported:  # a construct a future metadata release might ship
        return None
