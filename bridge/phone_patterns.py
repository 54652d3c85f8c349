"""phonenumbers' region and type of a number, read from its metadata pattern by pattern.

For when the library itself fails on a number (`bridge.phone`): it compiles its
metadata's patterns at every call, and one that `re` cannot compile (a Java construct a
release of the unpinned dependency might ship) makes it raise for every number that
reaches that pattern. Here each pattern is compiled on its own; one that does not
compile, or an entry that cannot be read, matches nothing (phonenumbers could not use it
either; `bridge.ranges` reads such a pattern the same way) and is named in `unread`.
Otherwise the answers are the library's: the same questions in the same order
(`_number_type_helper`, `_region_code_for_number_from_list`), held to its answers by a
test over every example number of the metadata. Pure; one reading per calling code.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import NamedTuple

import phonenumbers
from phonenumbers import PhoneMetadata, PhoneNumberType

# The library asks the kinds in this order and the first that matches wins (the same
# number can match several patterns); then fixed line and mobile.
_KINDS = (
    ("premium_rate", PhoneNumberType.PREMIUM_RATE),
    ("toll_free", PhoneNumberType.TOLL_FREE),
    ("shared_cost", PhoneNumberType.SHARED_COST),
    ("voip", PhoneNumberType.VOIP),
    ("personal_number", PhoneNumberType.PERSONAL_NUMBER),
    ("pager", PhoneNumberType.PAGER),
    ("uan", PhoneNumberType.UAN),
    ("voicemail", PhoneNumberType.VOICEMAIL),
)


class Unread(NamedTuple):
    """A pattern (or a whole region's metadata: `what` is empty) that matches nothing."""

    region: str
    what: str  # premium_rate, leading_digits...
    error: str

    def __str__(self) -> str:
        return (
            f"{self.region} {self.what}: {self.error}"
            if self.what
            else f"{self.region}: {self.error}"
        )


class Matched(NamedTuple):
    """The patterns an automaton found matching a number (`bridge.phone_automaton`), by
    their text: those that match it whole, and the leading digits that match its start."""

    whole: frozenset[str]
    leading: frozenset[str]


class _Desc(NamedTuple):
    pattern: re.Pattern[str] | None  # None: no pattern, or none `re` reads: matches nothing
    lengths: tuple[int, ...]

    def matches(self, national: str, matched: Matched | None) -> bool:
        """The library's _is_number_matching_desc: the lengths, then the whole pattern."""
        if self.pattern is None or (self.lengths and len(national) not in self.lengths):
            return False
        if matched is not None:
            return self.pattern.pattern in matched.whole
        return self.pattern.fullmatch(national) is not None


_NOTHING = _Desc(None, ())


@dataclass(frozen=True, slots=True)
class _Region:
    by_leading: bool  # the metadata has leading digits: the region claims numbers by them
    leading: re.Pattern[str] | None
    general: _Desc
    kinds: tuple[tuple[_Desc, int], ...]  # _KINDS, read
    fixed_line: _Desc
    mobile: _Desc
    same_fixed_and_mobile: bool

    def kind(self, national: str, matched: Matched | None) -> int:
        if not self.general.matches(national, matched):
            return PhoneNumberType.UNKNOWN
        for desc, kind in self.kinds:
            if desc.matches(national, matched):
                return kind
        if self.fixed_line.matches(national, matched):
            if self.same_fixed_and_mobile or self.mobile.matches(national, matched):
                return PhoneNumberType.FIXED_LINE_OR_MOBILE
            return PhoneNumberType.FIXED_LINE
        if not self.same_fixed_and_mobile and self.mobile.matches(national, matched):
            return PhoneNumberType.MOBILE
        return PhoneNumberType.UNKNOWN

    def claims(self, national: str, matched: Matched | None) -> bool:
        """Whether a number of a shared calling code is this region's."""
        if not self.by_leading:
            return self.kind(national, matched) != PhoneNumberType.UNKNOWN
        if self.leading is None:
            return False
        if matched is not None:
            return self.leading.pattern in matched.leading
        return self.leading.match(national) is not None

    def patterns(self) -> list[str]:
        """The texts of the national number patterns `kind` reads (`re` compiled them)."""
        descs = (self.general, *(desc for desc, _ in self.kinds), self.fixed_line, self.mobile)
        return [desc.pattern.pattern for desc in descs if desc.pattern is not None]


def _read_region(code: int, name: str, unread: list[Unread]) -> _Region | None:
    try:
        meta = PhoneMetadata.metadata_for_region_or_calling_code(code, name)
    except Exception as exc:  # the region's metadata module itself would not load
        unread.append(Unread(name, "", f"{type(exc).__name__}: {exc}"))
        return None
    if meta is None:
        return None

    def compiled(what: str, pattern: str | None) -> re.Pattern[str] | None:
        try:
            return re.compile(pattern) if pattern else None
        except Exception as exc:  # re.error; TypeError for a pattern that is no string
            unread.append(Unread(name, what, str(exc)))
            return None

    def desc(kind: str) -> _Desc:
        found = getattr(meta, kind, None)
        if found is None:
            return _NOTHING
        lengths = tuple(found.possible_length or ())
        return _Desc(compiled(kind, found.national_number_pattern), lengths)

    return _Region(
        by_leading=meta.leading_digits is not None,
        leading=compiled("leading_digits", meta.leading_digits),
        general=desc("general_desc"),
        kinds=tuple((desc(kind), value) for kind, value in _KINDS),
        fixed_line=desc("fixed_line"),
        mobile=desc("mobile"),
        same_fixed_and_mobile=bool(meta.same_mobile_and_fixed_line_pattern),
    )


@dataclass(frozen=True, slots=True)
class CallingCode:
    """A calling code's regions, read; `unread` names what matches nothing, and why."""

    regions: tuple[str, ...]  # the library's order: the main country first
    read: dict[str, _Region]
    unread: tuple[Unread, ...]

    def facts(self, national: str, matched: Matched | None = None) -> tuple[str | None, int]:
        """(phonenumbers.region_code_for_number, phonenumbers.number_type) of the number
        with this calling code and national significant number; with `matched`, which
        patterns match it is taken from there, not asked of `re`."""
        region: str | None = self.regions[0] if len(self.regions) == 1 else None
        if region is None:
            region = next((n for n in self.regions if self._claims(n, national, matched)), None)
        reader = self.read.get(region) if region else None
        return region, reader.kind(national, matched) if reader else PhoneNumberType.UNKNOWN

    def _claims(self, region: str, national: str, matched: Matched | None) -> bool:
        reader = self.read.get(region)
        return reader is not None and reader.claims(national, matched)

    def patterns(self) -> tuple[list[str], list[str]]:
        """The distinct texts of the patterns `facts` reads: those matched whole, and the
        leading digits matched at the start (read only where regions share the code)."""
        whole = dict.fromkeys(p for region in self.read.values() for p in region.patterns())
        shared = len(self.regions) > 1
        leading = dict.fromkeys(
            region.leading.pattern
            for region in self.read.values()
            if shared and region.by_leading and region.leading is not None
        )
        return list(whole), list(leading)


@functools.lru_cache(maxsize=256)  # more than the 215 calling codes
def read(code: int) -> CallingCode:
    """`code`'s metadata, each pattern compiled on its own."""
    unread: list[Unread] = []
    names = tuple(phonenumbers.region_codes_for_country_code(code))
    regions = {name: _read_region(code, name, unread) for name in names}
    found = {name: region for name, region in regions.items() if region is not None}
    return CallingCode(names, found, tuple(unread))
