"""Bytes under a wrong, missing or right charset label -> the text they are."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tests.properties  # noqa: F401  (the suite's Hypothesis profile)
from bridge.ingress.charsets import decode_best

CYRILLIC = "Сервер db-2 недоступен, диск заполнен на 97 процентов"


@pytest.mark.parametrize(
    ("data", "declared", "expected"),
    [
        # UTF-8 under a stale label: the bytes win
        ("服务器 db-2 磁盘已满".encode(), "GB2312", "服务器 db-2 磁盘已满"),
        ("Temperatur über 40 °C".encode(), "us-ascii", "Temperatur über 40 °C"),
        ("Sauvegarde échouée".encode(), "iso-8859-1", "Sauvegarde échouée"),
        ("Ошибка".encode(), "koi8-r", "Ошибка"),
        # no label at all: UTF-8, else the detector, a tie going to cp1252
        ("Formação Verão".encode("cp1252"), None, "Formação Verão"),
        ("Notificação: falha no servidor".encode("cp1252"), None, "Notificação: falha no servidor"),
        (CYRILLIC.encode("cp1251"), None, CYRILLIC),
        # an unknown label is no label
        ("café".encode("cp1252"), "x-klingon", "café"),
        # a right label is believed
        ("Sauvegarde échouée".encode("iso-8859-1"), "iso-8859-1", "Sauvegarde échouée"),
        ("あいうえお".encode("shift_jis"), "Shift_JIS", "あいうえお"),
        ("대부분의".encode("euc-kr"), "euc-kr", "대부분의"),
        ("まみむめも".encode("iso-2022-jp"), "iso-2022-jp", "まみむめも"),  # 7-bit
        ("disk".encode("utf-16"), "utf-16", "disk"),  # ASCII in UTF-16 is valid UTF-8 too
        (CYRILLIC.encode("koi8-r"), "koi8-r", CYRILLIC),
        # labels mail software writes that Python's codecs do not know
        ("השרת נפל".encode("iso-8859-8"), "iso-8859-8-i", "השרת נפל"),
        ("เซิร์ฟเวอร์ล่ม".encode("cp874"), "windows-874", "เซิร์ฟเวอร์ล่ม"),
        ("サーバー停止".encode("cp932"), "Windows-31J", "サーバー停止"),
        (CYRILLIC.encode("mac_cyrillic"), "x-mac-cyrillic", CYRILLIC),
        # iso-8859-1 read as browsers do (cp1252): 0x80 is the euro sign, not a control
        (b"Budget \x80 4,850 \x96 97%", "iso-8859-1", "Budget € 4,850 \u2013 97%"),
        ("plain ascii", None, "plain ascii"),
    ],
)
def test_best_reading(data: bytes | str, declared: str | None, expected: str) -> None:
    raw = data.encode() if isinstance(data, str) else data
    assert decode_best(raw, declared) == expected


def test_a_body_cut_inside_a_character_is_still_utf8() -> None:
    cut = "Grüß".encode()[:-1]  # ends with the first of the two bytes of "ß"
    assert decode_best(cut, "utf-8", cut=True) == "Grü"
    assert decode_best(cut, None, cut=True) == "Grü"


def test_undecodable_junk_becomes_question_marks_not_replacement_characters() -> None:
    text = decode_best(b"disk \xff\xfe\xfd full", "utf-8")
    assert "\ufffd" not in text and text.startswith("disk ") and text.endswith(" full")


@settings(max_examples=300)
@given(
    st.binary(max_size=600),
    st.sampled_from([None, "utf-8", "gb2312", "us-ascii", "bogus", "idna", "punycode", "utf-16"]),
)
def test_never_raises_never_yields_a_replacement_character(data: bytes, label: str | None) -> None:
    text = decode_best(data, label)
    assert isinstance(text, str) and "\ufffd" not in text
