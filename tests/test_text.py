"""SMS text arithmetic checked against an independent reference encoder (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import tests.properties  # noqa: F401  (the suite's Hypothesis profile)
from bridge.text import (
    GSM_BASIC,
    GSM_EXTENSION,
    TRANSLITERATION,
    count_parts,
    is_gsm,
    message_type,
    shape,
    split_parts,
    transliterate,
    truncate_to_parts,
)

# The reference alphabet, written out apart from bridge/text.py from 3GPP TS 23.038
# section 6.2.1 (the GSM 7-bit default alphabet), one row of the table per line as code
# points, septet 0x00 first. A wrong or missing character in the module's table then
# disagrees with this one instead of agreeing with itself.
REFERENCE_BASIC = "".join(
    map(
        chr,
        [
            *(0x40, 0xA3, 0x24, 0xA5, 0xE8, 0xE9, 0xF9, 0xEC, 0xF2, 0xC7, 0x0A, 0xD8, 0xF8),
            *(0x0D, 0xC5, 0xE5, 0x394, 0x5F, 0x3A6, 0x393, 0x39B, 0x3A9, 0x3A0, 0x3A8, 0x3A3),
            *(0x398, 0x39E),  # 0x1B, the escape to the extension table, is not a character
            *(0xC6, 0xE6, 0xDF, 0xC9, 0x20, 0x21, 0x22, 0x23, 0xA4),
            *range(0x25, 0x40),  # % & ' ( ) * + , - . / 0-9 : ; < = > ?
            0xA1,
            *range(0x41, 0x5B),  # A-Z
            *(0xC4, 0xD6, 0xD1, 0xDC, 0xA7, 0xBF),
            *range(0x61, 0x7B),  # a-z
            *(0xE4, 0xF6, 0xF1, 0xFC, 0xE0),
        ],
    )
)
# The extension table: each costs two septets (escape, then its code).
REFERENCE_EXTENSION = "".join(
    map(chr, (0x0C, 0x5E, 0x7B, 0x7D, 0x5C, 0x5B, 0x7E, 0x5D, 0x7C, 0x20AC))
)


def test_the_module_table_is_the_standard_one() -> None:
    assert len(REFERENCE_BASIC) == 127 and len(set(REFERENCE_BASIC)) == 127
    assert set(GSM_BASIC) - {"\x1b"} == set(REFERENCE_BASIC)
    assert set(GSM_EXTENSION) == set(REFERENCE_EXTENSION)


def reference_parts(text: str) -> int:
    """Encode for real (GSM septets with escapes, or UTF-16-BE), then pack whole characters."""
    if all(c in REFERENCE_BASIC or c in REFERENCE_EXTENSION for c in text):
        tokens = [[0x1B, ord(c)] if c in REFERENCE_EXTENSION else [ord(c)] for c in text]
        single, per_part = 160, 153
    else:
        raw = text.encode("utf-16-be")
        tokens = [list(c.encode("utf-16-be")[::2]) for c in text]  # 1 or 2 code units each
        assert sum(len(t) for t in tokens) * 2 == len(raw)
        single, per_part = 70, 67
    total = sum(len(t) for t in tokens)
    if total <= single:
        return 1
    parts, room = 1, per_part
    for token in tokens:
        if len(token) > room:
            parts, room = parts + 1, per_part
        room -= len(token)
    return parts


alphabet = st.sampled_from(
    [
        *list(REFERENCE_BASIC + REFERENCE_EXTENSION),
        "é",
        "ü",
        "☃",
        "😀",
        "ش",
        "\u2019",
        "\u2013",
        "\u2026",
        "\xa0",
        "€",
        "{",
    ]
)
texts = st.text(alphabet=alphabet, max_size=700) | st.text(max_size=400)


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("a" * 160, 1),
        ("a" * 161, 2),
        ("a" * 306, 2),
        ("a" * 307, 3),
        ("€" * 80, 1),  # two septets each
        ("€" * 81, 2),
        ("a" * 159 + "€", 2),  # 161 septets: the escape pair is not split
        ("é" * 70, 1),  # é is GSM; ł is not
        ("ł" * 70, 1),
        ("ł" * 71, 2),
        ("ł" * 134, 2),
        ("ł" * 135, 3),
    ],
)
def test_part_count_at_the_boundaries(text: str, parts: int) -> None:
    assert reference_parts(text) == parts
    assert count_parts(text) == parts


@given(texts)
def test_part_count_matches_reference(text: str) -> None:
    assert count_parts(text) == reference_parts(text)
    assert "".join(split_parts(text)) == text


@given(texts, st.integers(min_value=1, max_value=5))
@example("a" * 152 + "€" + "a" * 300, 2)  # an escape pair at part 1's edge
@example("ł" * 66 + "😀" + "ł" * 200, 2)  # a surrogate pair at part 1's edge
def test_truncation_never_exceeds_max_parts(text: str, max_parts: int) -> None:
    cut = truncate_to_parts(text, max_parts)
    assert count_parts(cut) <= max_parts
    if count_parts(text) <= max_parts:
        assert cut == text


@given(
    st.text(alphabet=st.sampled_from([*"ab \n"]), min_size=1).filter(str.strip),
    st.text(alphabet=st.sampled_from([*"ab €", "ł", "😀"]), min_size=1),
    st.integers(min_value=1, max_value=4),
)
def test_a_text_gsm_past_its_cut_is_cut_as_gsm(head: str, tail: str, max_parts: int) -> None:
    """A long log with one checkmark or emoji at its end was cut as UCS-2: 67 units a
    part instead of 153 septets, less than half its words for the same parts."""
    text = head * (1 + (max_parts * 160) // len(head)) + tail
    cut = truncate_to_parts(text, max_parts)
    assert count_parts(cut) <= max_parts
    assert is_gsm(cut) and cut.endswith("...")
    assert len(cut) > max_parts * 70  # more than UCS-2 parts could hold


@given(st.text(alphabet=st.sampled_from(list(REFERENCE_BASIC + REFERENCE_EXTENSION))))
def test_gsm_text_stays_type_1(text: str) -> None:
    assert message_type(text) == 1
    assert message_type(transliterate(text)) == 1


@given(st.text(alphabet=st.sampled_from([*"abc `'-. ", *TRANSLITERATION, "é", "😀"])))
def test_transliteration_replaces_every_look_alike(text: str) -> None:
    out = transliterate(text)
    assert not any(ch in out for ch in TRANSLITERATION)
    assert out == "".join(TRANSLITERATION.get(ch, ch) for ch in text)


def test_transliteration_only_maps_to_gsm() -> None:
    assert all(is_gsm(value) for value in TRANSLITERATION.values())
    assert shape(transliterate("It\u2019s \u201cdone\u201d \u2013 really\u2026")).message_type == 1


def test_surrogate_pairs_and_escapes_are_never_split() -> None:
    emoji = "😀" * 40  # 80 UTF-16 units: each part holds 33 whole pairs (66 units)
    assert [len(p) for p in split_parts(emoji)] == [33, 7]
    escapes = "€" * 100
    assert [len(p) for p in split_parts(escapes)] == [76, 24]
    assert message_type("مرحبا", arabic_type=4) == 4
