"""SMS text arithmetic checked against an independent reference encoder (hypothesis)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

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


def reference_parts(text: str) -> int:
    """Encode for real (GSM septets with escapes, or UTF-16-BE), then pack whole characters."""
    basic = set(GSM_BASIC) - {"\x1b"}
    if all(c in basic or c in GSM_EXTENSION for c in text):
        tokens = [[0x1B, ord(c)] if c in GSM_EXTENSION else [ord(c)] for c in text]
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
        *list(GSM_BASIC.replace("\x1b", "") + GSM_EXTENSION),
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


@given(texts)
def test_part_count_matches_reference(text: str) -> None:
    assert count_parts(text) == reference_parts(text)
    assert "".join(split_parts(text)) == text


@given(texts, st.integers(min_value=1, max_value=5))
def test_truncation_never_exceeds_max_parts(text: str, max_parts: int) -> None:
    cut = truncate_to_parts(text, max_parts)
    assert count_parts(cut) <= max_parts
    if count_parts(text) <= max_parts:
        assert cut == text


@given(st.text(alphabet=st.sampled_from(list(GSM_BASIC.replace("\x1b", "") + GSM_EXTENSION))))
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
