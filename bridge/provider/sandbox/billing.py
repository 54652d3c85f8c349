"""What the sandbox bills: its own GSM 03.38 tables, part counts and prices per country.

Written here from the provider's API documentation ("Message types and length": 160
septets then 153 per part, extension characters two; UCS-2 70 then 67) and the
concatenation rule it relies on (3GPP TS 23.040 9.2.3.24.1: a part holds at most 153
septets or 67 UCS-2 characters, and a character is never split in the middle: neither an
escape pair nor, as UTF-16 carries emoji, a surrogate pair), not imported
from the bridge's `text`, `phone` or `pricing` modules: the sandbox is the oracle the
bridge's estimates are checked against, so a part-count or pricing bug in the bridge
must disagree with it rather than agree with itself (tests/test_imports.py keeps these
imports out).
"""

from __future__ import annotations

from collections.abc import Mapping

# Price of one SMS part by country calling code, in the account's "points"; any other
# country costs DEFAULT_PRICE. The real price list is not published: these are the
# sandbox's, served at /pricing so a client can learn them as it would the real ones.
DEFAULT_PRICES: dict[int, float] = {1: 0.5, 33: 0.9, 44: 0.8, 49: 0.9, 961: 1.5, 971: 1.2}
DEFAULT_PRICE = 1.0

# GSM 03.38, the sandbox's own copy: the basic set (one septet) and the extension table
# (two septets: the escape, then the character). Anything else makes a text UCS-2.
GSM_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM_EXTENSION = frozenset("^{}\\[~]|€\f")
GSM_SINGLE, GSM_PER_PART = 160, 153  # septets in one SMS; per part of a split one
UCS2_SINGLE, UCS2_PER_PART = 70, 67  # UTF-16 code units likewise


def is_gsm(message: str) -> bool:
    """Can `message` go as type 1 (every character in the basic or extension table)?"""
    return all(c in GSM_BASIC or c in GSM_EXTENSION for c in message)


def sms_parts(message: str, message_type: int) -> int:
    """How many SMS the provider bills for `message` sent as `message_type`.

    Type 1 counts septets; types 2 and 4 (Arabic, billed as UCS-2) count UTF-16 code
    units, as does a type 1 text with characters outside GSM 03.38."""
    if message_type == 1 and is_gsm(message):
        return _packed([2 if c in GSM_EXTENSION else 1 for c in message], GSM_SINGLE, GSM_PER_PART)
    units = [2 if ord(c) > 0xFFFF else 1 for c in message]
    return _packed(units, UCS2_SINGLE, UCS2_PER_PART)


def _packed(costs: list[int], single: int, per_part: int) -> int:
    """Parts for characters costing `costs` units each, whole characters to a part.

    Not ceil(total / per_part): a two-unit character that would straddle a part's edge
    starts the next part, so such a part carries per_part - 1 units."""
    if sum(costs) <= single:
        return 1
    parts, room = 1, per_part
    for cost in costs:
        if cost > room:
            parts, room = parts + 1, per_part
        room -= cost
    return parts


def calling_code(digits: str, known: Mapping[int, float]) -> int | None:
    """The country calling code that starts `digits`, among those priced (prefix-free)."""
    for length in (1, 2, 3):
        if digits[:length].isdigit() and int(digits[:length]) in known:
            return int(digits[:length])
    return None


def price_of(number: str, prices: Mapping[int, float]) -> float:
    """The price of one part to `number` (E.164, with or without `+`)."""
    code = calling_code(number.lstrip("+"), prices)
    return DEFAULT_PRICE if code is None else prices[code]
