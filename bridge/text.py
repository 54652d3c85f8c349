"""SMS text arithmetic (pure): GSM 03.38 or UCS-2, the provider's message_type, parts.

GSM 7-bit: 160 septets in one SMS, 153 per part when concatenated; the extension table
(^ { } \\ [ ~ ] | € and form feed) costs two septets and an escape pair is never split.
UCS-2: 70 UTF-16 units, 67 per part; a surrogate pair is never split. (3GPP TS 23.040
9.2.3.24.1: a character is not split in the middle; a part that would end inside one
carries 152 septets or 66 units.) Budgets, cost estimates, the console's parts and the
provider's bill all rest on this count: tests/test_parts.py holds the sandbox to it.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

GSM_BASIC = (
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞ\x1bÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM_EXTENSION = "\f^{}\\[~]|€"
_GSM_BASIC_SET = frozenset(GSM_BASIC) - {"\x1b"}
_GSM_EXTENSION_SET = frozenset(GSM_EXTENSION)

TYPE_GSM = 1
TYPE_UNICODE = 2
TYPE_ARABIC = 4

GSM_SINGLE, GSM_PART = 160, 153
UCS2_SINGLE, UCS2_PART = 70, 67


_GSM_ALL = _GSM_BASIC_SET | _GSM_EXTENSION_SET


# Default_Ignorable_Code_Point (Unicode's DerivedCoreProperties.txt): what a phone draws
# as nothing at all. Zero-width spaces and joiners, direction marks, the soft hyphen,
# variation selectors, Hangul fillers, tags. Not every format character (category Cf)
# is one: the Arabic number and year signs (U+0600..U+0605, U+06DD, U+08E2) and their
# Syriac and Kaithi kin are drawn, over the digits that follow them.
_IGNORABLE = (
    "\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f"
    "\u202a-\u202e\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufff8"
    "\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0000-\U000e0fff"
)
# Control characters (Unicode category Cc: C0, DEL and C1) but the newline.
_CONTROLS = "\x00-\x09\x0b-\x1f\x7f-\x9f"
# Unicode's explicit directional embeddings, overrides and isolates (LRE RLE PDF LRO RLO,
# LRI RLI FSI PDI): mid-text, the phone drew the characters after one in another order
# than the log, the console and the API showed them ("Trojan Source", CVE-2021-42574: an
# RLO made "ok: db-1 down" read otherwise on the phone). Taken out, not balanced: a
# balanced override still reverses what it encloses. The implicit marks (LRM, RLM, ALM)
# stay: they reorder no letter, and right-to-left texts need them.
BIDI_CONTROLS = "\u202a-\u202e\u2066-\u2069"
_HAS_CONTROL = re.compile(f"[{_CONTROLS}{BIDI_CONTROLS}]")
_HAS_BIDI = re.compile(f"[{BIDI_CONTROLS}]")
# The same characters one by one: what the log escapes (bridge.ops.logs).
BIDI_CODES = (*range(0x202A, 0x202F), *range(0x2066, 0x206A))
_BIDI_TABLE = dict.fromkeys(BIDI_CODES)
# What stands for a control character in an SMS: a line break for those that end a line
# (CR, NEL), a space for those that separate (tabs, form feed, the information
# separators), nothing for the rest (BEL, ESC, NUL, backspace: noise, or a terminal's
# escape sequence, that switched a text to UCS-2 or showed as a box).
_CONTROL_TABLE = {
    **{code: None for code in [*range(0x20), *range(0x7F, 0xA0)]},
    **dict.fromkeys(map(ord, "\t\v\f\x1c\x1d\x1e\x1f"), " "),
    ord("\r"): "\n",
    0x85: "\n",
    ord("\n"): "\n",
    **_BIDI_TABLE,
}

# A terminal's escape sequence (ECMA-48: CSI, as in a CI log's colours, or a two-character
# one), taken out whole: without its ESC, "[31m" was left in the text. The 8-bit CSI
# (U+009B, C1) likewise: it alone was taken out, and "\x9b2J" left "2J". But only with
# its parameters: U+009B is also what a cp1252 mail's closing guillemet (byte 0x9B)
# becomes when its charset is mislabelled ISO-8859-15 or -2, and taken with the letter
# after it, "\x9bdaily\x8b" lost its "d"; a sequence without parameters (CSI d) is rare
# past a terminal.
#
# A control string likewise (ECMA-48 8.3.89 OSC, 8.3.27 DCS, 8.3.128 SOS, 8.3.94 PM, 8.3.2
# APC), from ESC ], ESC P, ESC X, ESC ^ or ESC _ to its string terminator (ESC \\ or
# U+009C; BEL too for OSC, as xterm ends a window title): only its opening pair was
# taken out, and "ESC ]0;deploy BEL" left "0;deploy". Whole only where it ends on the
# line it starts on (its body holds no control character): an unterminated one gives up
# its opening pair alone, as before, and never swallows the lines of an alert up to some
# later BEL; a body also ends at the next ESC, so a failed try reads to there at most.
# Not the 8-bit openers (U+0090, U+0098, U+009D..U+009F): like U+009B, they are what
# mislabelled text makes of cp1252's small tilde, "ž", "Ÿ" and UTF-8's quotes, and taken to the
# next U+009C ("œ", or the byte that ends UTF-8's opening quote) they ate its words.
_CSI_REST = r"[0-?]*[ -/]*[@-~]"  # parameters, intermediates, final
_STRING_BODY = r"[^\x00-\x1f\x9c]*"
_STRING_END = r"(?:\x1b\\|\x9c)"
_CONTROL_STRING = rf"\]{_STRING_BODY}(?:\x07|{_STRING_END})|[PX^_]{_STRING_BODY}{_STRING_END}"
ESCAPE_SEQUENCE = rf"\x1b(?:\[{_CSI_REST}|{_CONTROL_STRING}|[@-Z\\-_])|\x9b[0-?]{_CSI_REST}"
_ESCAPE_SEQUENCE = re.compile(ESCAPE_SEQUENCE)
# Blank: a whole escape sequence too, as `without_controls` takes it out (a text that
# opened with "ESC [31m" was trimmed of its ESC alone, and "[31m" went to the phone; one
# of escape sequences only passed for words, and went as an empty SMS). At an ESC the
# sequence is tried first; possessive, as no way of matching is ever worth a second try.
# The controls but ESC and CSI, which open a sequence (a newline is blank anyway).
_NOT_ESC = "\x00-\x1a\x1c-\x1f\x7f-\x9a\x9c-\x9f"
_BLANK = re.compile(f"(?:{ESCAPE_SEQUENCE}|[\x1b\x9b]|[\\s{_NOT_ESC}{_IGNORABLE}]+)*+")


def is_blank(text: str) -> bool:
    """Nothing a phone would show: white space, control characters and default-ignorable
    characters (zero-width spaces, direction marks, variation selectors). `str.strip()`
    leaves the last two, and an empty SMS was stored and sent. One definition for the
    API, the webhooks, mail and the shaper's trim (`blank_prefix`)."""
    return _BLANK.fullmatch(text) is not None


def blank_prefix(text: str) -> int:
    """How many of `text`'s first characters are blank (as `is_blank` judges)."""
    match = _BLANK.match(text)
    return match.end() if match else 0


def without_controls(text: str) -> str:
    """`text` as a phone should get it: CR LF, CR and NEL as a line break, tabs and the
    other separating controls as a space, a terminal's escape sequences, every other
    control character and the explicit bidi controls (BIDI_CONTROLS) taken out."""
    if not _HAS_CONTROL.search(text):
        return text  # the common case, without a table lookup per character
    if "\x1b" in text or "\x9b" in text:
        text = _ESCAPE_SEQUENCE.sub("", text)
    return text.replace("\r\n", "\n").translate(_CONTROL_TABLE)


def without_bidi(text: str) -> str:
    """`text` without the explicit bidi controls (BIDI_CONTROLS), and nothing else taken
    out: for what a message carries besides its text (a topic, an instance, a dedupe key,
    a note naming a payload's field), which the console, the log, the API and a digest's
    text show. Only the text went through `without_controls`, and an RLO in an alert's
    name or host reordered the console's row and the log's line."""
    return text.translate(_BIDI_TABLE) if _HAS_BIDI.search(text) else text


def is_gsm(text: str) -> bool:
    return _GSM_ALL.issuperset(text)


def gsm_septets(ch: str) -> int:
    return 2 if ch in _GSM_EXTENSION_SET else 1


def _is_arabic(text: str) -> bool:
    return any("ARABIC" in unicodedata.name(ch, "") for ch in text)


def message_type(text: str, *, arabic_type: int = TYPE_UNICODE) -> int:
    """1 for GSM text; else `arabic_type` for text with Arabic script, else 2."""
    if is_gsm(text):
        return TYPE_GSM
    return arabic_type if _is_arabic(text) else TYPE_UNICODE


def _units(text: str, gsm: bool) -> list[int]:
    """Cost of each character: septets for GSM, UTF-16 code units for UCS-2."""
    if gsm:
        return [gsm_septets(ch) for ch in text]
    return [2 if ord(ch) > 0xFFFF else 1 for ch in text]


def split_parts(text: str, *, gsm: bool | None = None) -> list[str]:
    """The text as the handset receives it: one string per SMS part."""
    if gsm is None:
        gsm = is_gsm(text)
    single, per_part = (GSM_SINGLE, GSM_PART) if gsm else (UCS2_SINGLE, UCS2_PART)
    if _total_units(text, gsm) <= single:
        return [text]
    units = _units(text, gsm)
    parts: list[str] = []
    start, used = 0, 0
    for index, cost in enumerate(units):
        if used + cost > per_part:
            parts.append(text[start:index])
            start, used = index, 0
        used += cost
    parts.append(text[start:])
    return parts


def _total_units(text: str, gsm: bool) -> int:
    if gsm:
        return len(text) + sum(map(text.count, GSM_EXTENSION))
    return len(text.encode("utf-16-le")) // 2


def count_parts(text: str) -> int:
    gsm = is_gsm(text)
    single = GSM_SINGLE if gsm else UCS2_SINGLE
    # No character costs more than two units in either alphabet: short texts skip counting.
    if len(text) * 2 <= single or _total_units(text, gsm) <= single:
        return 1  # the common case, without walking the text in Python
    return len(split_parts(text, gsm=gsm))


@dataclass(frozen=True, slots=True)
class Shape:
    """What a text costs: its message_type and the number of SMS parts."""

    message_type: int
    parts: int


def shape(text: str, *, arabic_type: int = TYPE_UNICODE) -> Shape:
    return Shape(message_type(text, arabic_type=arabic_type), count_parts(text))


def _capacity(parts: int, gsm: bool) -> int:
    single, per_part = (GSM_SINGLE, GSM_PART) if gsm else (UCS2_SINGLE, UCS2_PART)
    return single if parts == 1 else parts * per_part


def truncate_to_parts(text: str, max_parts: int) -> str:
    """Cut `text` to fit `max_parts` SMS parts, at a word boundary, with an ellipsis.

    The ellipsis is "..." for GSM text (U+2026 would switch the whole text to UCS-2). A
    text that is GSM up to past the cut is cut as GSM: what is left is GSM.
    """
    if count_parts(text) <= max_parts:
        return text
    gsm = is_gsm(text)
    if not gsm:
        head = _gsm_head(text)
        if len(head) >= _capacity(max_parts, False) - 1:
            # Every character a UCS-2 cut would keep is GSM (a log with a checkmark at
            # its end): only its ellipsis made it UCS-2. Cut as GSM, before the first
            # other character: 153 septets a part instead of 67 units. Not only when the
            # head outlasts the GSM cut: one 158 septets long went as 65 characters.
            text, gsm = head, True
    ellipsis = "..." if gsm else "…"
    budget = _capacity(max_parts, gsm) - sum(_units(ellipsis, gsm))
    used, cut = 0, 0
    for index, cost in enumerate(_units(text, gsm)):
        if used + cost > budget:
            break
        used += cost
        cut = index + 1
    # The budget counts units; a pair that would straddle a part's edge starts the next
    # part (152 septets or 66 units in that one), so a cut that fills every part can
    # still need one more: give back a character per such edge.
    while cut > 0 and count_parts(text[:cut] + ellipsis) > max_parts:
        cut -= 1
    cut = _whole_flags(text, cut)
    head = text[:cut]
    boundary = max(head.rfind(" "), head.rfind("\n"))
    if boundary > cut * 0.8:  # a word boundary near the end: do not chop a word
        head = head[:boundary]
    return head.rstrip() + ellipsis


def _whole_flags(text: str, cut: int) -> int:
    """`cut`, one earlier if it falls between the two regional indicators of a flag (🇺🇸
    is U+1F1FA U+1F1F8, paired from the start of a run of them): a text of flags cut at
    max_parts ended in half a flag, a lone letter in a box on the phone."""
    start = cut
    while start > 0 and _REGIONAL_A <= text[start - 1] <= _REGIONAL_Z:
        start -= 1
    return cut - 1 if (cut - start) % 2 else cut


_REGIONAL_A, _REGIONAL_Z = "\U0001f1e6", "\U0001f1ff"  # regional indicator symbols A to Z


def _gsm_head(text: str) -> str:
    """`text` up to its first character outside GSM 03.38."""
    for index, ch in enumerate(text):
        if ch not in _GSM_ALL:
            return text[:index]
    return text


# Look-alikes that switch a whole text to UCS-2 (2 to 3 times the parts) for no gain.
TRANSLITERATION = {
    **dict.fromkeys("\u2018\u2019\u201a\u201b\u2032\u00b4\u0060", "'"),
    **dict.fromkeys("\u201c\u201d\u201e\u201f\u2033\u00ab\u00bb", '"'),
    **dict.fromkeys("\u2010\u2011\u2012\u2013\u2014\u2015\u2212", "-"),
    **dict.fromkeys(
        "\u00a0\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009"
        "\u200a\u202f\u205f\u3000",
        " ",
    ),
    **dict.fromkeys("\u200b\u200c\u200d\u2060\ufeff\u00ad", ""),
    "\u2026": "...",
    "\u2022": "*",
    "\u00b7": "*",
    "\u00d7": "x",
    "\u2044": "/",
    "\u02c6": "^",
    "\u02dc": "~",
    "\u2039": "<",
    "\u203a": ">",
}
_TRANSLATE = str.maketrans(TRANSLITERATION)
_ASCII_LOOK_ALIKES = [ch for ch in TRANSLITERATION if ch.isascii()]  # the backtick


def transliterate(text: str) -> str:
    """Replace typographic look-alikes with their GSM 03.38 equivalents."""
    if text.isascii() and not any(ch in text for ch in _ASCII_LOOK_ALIKES):
        return text  # the common case, without a table lookup per character
    return text.translate(_TRANSLATE)
