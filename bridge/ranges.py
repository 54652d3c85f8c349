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
and the answer is cached per number, so a flood of distinct numbers costs about a
millisecond each.
"""

from __future__ import annotations

import functools
import re

import phonenumbers
from phonenumbers import PhoneMetadata

COSTLY_KINDS = {
    "premium_rate": "a premium-rate number",
    "shared_cost": "a shared-cost number",
    "personal_number": "a personal number",
}
OTHER_KINDS = ("fixed_line", "mobile", "toll_free", "voip", "pager", "uan", "voicemail")
Pattern = tuple[re.Pattern[str], tuple[int, ...]]


@functools.lru_cache(maxsize=256)
def _patterns(country_code: int) -> dict[str, tuple[Pattern, ...]]:
    """Each kind's distinct (pattern, lengths) over the regions of a calling code."""
    regions = phonenumbers.region_codes_for_country_code(country_code)
    metas = [
        PhoneMetadata.metadata_for_region_or_calling_code(country_code, region)
        for region in regions
    ]
    out: dict[str, tuple[Pattern, ...]] = {}
    for kind in (*COSTLY_KINDS, *OTHER_KINDS):
        seen: dict[tuple[str, tuple[int, ...]], Pattern] = {}
        for meta in metas:
            desc = getattr(meta, kind, None) if meta is not None else None
            if meta is None or desc is None or not desc.national_number_pattern:
                continue
            general = meta.general_desc.possible_length if meta.general_desc else ()
            lengths = tuple(desc.possible_length or general or ())
            key = (desc.national_number_pattern, lengths)
            if key not in seen and lengths and lengths != (-1,):
                seen[key] = (re.compile(desc.national_number_pattern), lengths)
        out[kind] = tuple(seen.values())
    return out


def _matches(patterns: tuple[Pattern, ...], digits: str) -> bool:
    return any(len(digits) in lengths and rx.fullmatch(digits) for rx, lengths in patterns)


def _shares(patterns: tuple[Pattern, ...], prefix: str) -> bool:
    """Does some number of these patterns start with `prefix` (completions tried: the
    prefix followed by one repeated digit, to each possible length)?"""
    return any(
        length >= len(prefix) and rx.fullmatch(prefix + digit * (length - len(prefix)))
        for rx, lengths in patterns
        for length in lengths
        for digit in "0123456789"
    )


@functools.lru_cache(maxsize=4096)
def costly_range(country_code: int, national: str) -> str | None:
    """The costly kind of the range an unknown national number lies in, or None."""
    kinds = _patterns(country_code)
    for cut in range(len(national) - 1, 2, -1):  # overdialled past a known number
        known = [kind for kind in kinds if _matches(kinds[kind], national[:cut])]
        if known:
            return next((COSTLY_KINDS[k] for k in known if k in COSTLY_KINDS), None)
    for cut in range(len(national) - 1, 1, -1):  # the nearest known range, same length
        prefix = national[:cut]
        costly = [k for k in COSTLY_KINDS if _shares(kinds[k], prefix)]
        if costly:
            if any(_shares(kinds[k], prefix) for k in OTHER_KINDS):
                return None  # as near to ordinary numbers: metadata lag, let it through
            return COSTLY_KINDS[costly[0]]
        if any(_shares(kinds[k], prefix) for k in OTHER_KINDS):
            return None
    return None
