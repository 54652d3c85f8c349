"""Bytes in a declared, wrong or missing charset -> the most plausible text (pure, no I/O).

Legacy boxes label their mail wrongly: UTF-8 bytes declared GB2312, us-ascii or
iso-8859-1, raw cp1252 bytes in a Subject with no charset at all. The reading chosen:

1. bytes that are valid UTF-8 beyond ASCII are UTF-8, whatever the label says: legacy
   text that is valid multi-byte UTF-8 by chance is vanishingly rare, while UTF-8 under a
   stale label is common (only UTF-16/32, UTF-7 and ISO-2022 labels, which are not
   ASCII-compatible, are believed first);
2. else the declared charset, when it decodes cleanly (no error, no U+FFFD);
3. else charset-normalizer's least messy reading, or cp1252's where it is as clean (the
   detector is unsure between cp1250 and cp1252 on short Latin text, and cp1252 is what
   Windows boxes send);
4. else UTF-8 with each undecodable byte as "?" (U+FFFD would turn the SMS into UCS-2
   and show a box on the handset).
"""

from __future__ import annotations

import codecs

import charset_normalizer
from charset_normalizer.md import mess_ratio

# Labels whose bytes are not an ASCII superset: believed before the UTF-8 check.
_NON_ASCII_LABELS = ("utf_16", "utf_32", "utf_7", "iso2022")


# Labels mail software writes that Python's codecs do not know, as the WHATWG Encoding
# Standard reads them: RFC 1556's -i/-e for Hebrew and Arabic (the usual label of Hebrew
# mail), Outlook's windows-874 for Thai, Microsoft's windows-31j, old x- spellings.
# Unknown, each fell to the detector, which reads a short Hebrew text as Cyrillic.
_LABELS = {
    "iso-8859-8-i": "iso8859_8",
    "iso-8859-8-e": "iso8859_8",
    "csiso88598i": "iso8859_8",
    "csiso88598e": "iso8859_8",
    "iso-8859-6-i": "iso8859_6",
    "iso-8859-6-e": "iso8859_6",
    "csiso88596i": "iso8859_6",
    "csiso88596e": "iso8859_6",
    "windows-874": "cp874",
    "windows-31j": "cp932",
    "x-sjis": "shift_jis",
    "x-euc-jp": "euc_jp",
    "x-gbk": "gbk",
    "gb_2312-80": "gb2312",
    "x-x-big5": "big5",
    "cn-big5": "big5",
    "ks_c_5601-1989": "cp949",
    "x-mac-roman": "mac_roman",
    "x-mac-cyrillic": "mac_cyrillic",
    "x-mac-ukrainian": "mac_cyrillic",
    "x-cp1250": "cp1250",
    "x-cp1251": "cp1251",
    "dos-866": "cp866",
    "unicode-1-1-utf-8": "utf_8",
    "x-unicode20utf8": "utf_8",
}


def _codec(label: str | None) -> str | None:
    if not label:
        return None
    name = label.strip().strip('"')
    name = _LABELS.get(name.lower(), name)
    try:
        return codecs.lookup(name).name.replace("-", "_")
    except (LookupError, ValueError):  # unknown or malformed label: no declared reading
        return None


def _strict(data: bytes, codec: str, cut: bool = False) -> str | None:
    """`data` decoded without any error or U+FFFD, else None. With `cut` (the bytes were
    read up to a bound), a multi-byte character cut at the very end is dropped rather
    than failing it all."""
    try:
        text = data.decode(codec)
    except UnicodeDecodeError as exc:
        if not cut or exc.reason != "unexpected end of data" or exc.start < len(data) - 4:
            return None
        try:
            text = data[: exc.start].decode(codec)
        except UnicodeDecodeError:
            return None
    except (LookupError, ValueError):
        return None
    return None if "\ufffd" in text else text


def _detected(data: bytes) -> str | None:
    """charset-normalizer's least messy reading, or cp1252's if it is as clean: the
    detector, unsure on a few bytes of Latin text, says cp1250 or lists no cp1252 at all,
    and cp1252 is what Windows boxes send."""
    try:
        matches = list(charset_normalizer.from_bytes(data))
    except Exception:  # the detector on hostile input: fall back to a plain reading
        matches = []
    least = min((m.chaos for m in matches), default=1.0)
    legacy = _strict(data, "cp1252")
    if legacy is not None and mess_ratio(legacy, 1.0) <= least:
        return legacy
    return next((str(m) for m in matches if m.chaos == least), None)


def decode_best(data: bytes, declared: str | None = None, *, cut: bool = False) -> str:
    """The most plausible text of `data` given its (possibly wrong or absent) label;
    `cut` says the bytes end at a bound, perhaps inside a character."""
    codec = _codec(declared)
    if codec == "iso8859_1":  # as browsers read it (WHATWG): C1 bytes are cp1252's € ' " ...
        codec = "cp1252" if _strict(data, "cp1252") is not None else codec
    declared_text = _strict(data, codec, cut) if codec else None
    if declared_text is not None and (
        data.isascii() or codec == "utf_8" or (codec or "").startswith(_NON_ASCII_LABELS)
    ):
        return declared_text  # nothing to second-guess (and no second decode of UTF-8)
    if data.isascii():
        return data.decode("ascii")
    utf8 = _strict(data, "utf_8", cut)
    if utf8 is not None:
        return utf8
    if declared_text is not None:
        return declared_text
    detected = _detected(data)
    if detected is not None and "\ufffd" not in detected:
        return detected
    return data.decode("utf-8", errors="replace").replace("\ufffd", "?")
