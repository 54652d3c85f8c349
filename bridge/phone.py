"""Recipients to E.164, decided by the `phonenumbers` library (pure, no I/O).

A number that is not *possible* (wrong length, no country code and no default region) is
refused with a reason. A possible number the metadata does not know as assigned is let
through unless `require_valid`, because metadata lags new ranges and refusing an on-call
phone loses alerts (the contract says so); callers log a warning for it. Not so digits
written without a + (or 00) and read as international only for want of a default region:
that reading is a guess, and an unassigned guess is far likelier a national number
missing its country code than a new range. Nor a number the library calls possible only
as a local number (5550143 in the US, dialled without its area code from a landline of
the same area): no phone is reached by it as an SMS, so it is refused, saying to write
the area code.

The library reads its metadata's patterns with `re` at every call, and the dependency is
not pinned: a release with a pattern `re` cannot compile (a construct of Java's regexes,
where the metadata is written) makes the library raise on the numbers that reach it.
What a sender then gets, by where the library failed:

- the number's facts (region, kind, validity: up to eleven patterns per region, and the
  shared calling codes' leading digits): read from the same metadata pattern by pattern
  (`bridge.phone_patterns`), in the library's own order, a pattern that is not a regex
  matching nothing (as `bridge.ranges` reads it). Every other answer is the library's,
  so one broken pattern changes the answer only for numbers of its own kind and region
  (and a broken US pattern no longer stops every Canadian number: +1 asks the US
  first). One warning per calling code names the patterns;
- reading the number at all (its national prefix, or the default region's
  international prefix): no E.164 can be had, and the sender is not at fault, so
  `PhoneDataUnavailable` (503 / SMTP 451, the sender retries) names what failed, not a
  refusal that would lose the alert for good. One warning per region or calling code.
"""

from __future__ import annotations

import functools
import logging
import re
from typing import NamedTuple

import phonenumbers
from phonenumbers import NumberParseException, PhoneMetadata, PhoneNumberType

try:  # the helpers behind the library's number_type and region_code_for_number (private)
    from phonenumbers.phonenumberutil import COUNTRY_CODE_TO_REGION_CODE, _number_type_helper
    from phonenumbers.re_util import re_compile

    _LIBRARY_HELPERS = True
except ImportError:  # pragma: no cover - a release that moved them
    _LIBRARY_HELPERS = False

from bridge import phone_automaton, phone_patterns
from bridge.errors import InputError, Unavailable

log = logging.getLogger(__name__)
if hasattr(phonenumbers, "enable_pattern_cache"):  # releases without it: re's own cache
    # The library compiles each pattern it reads at every call: through `re`'s cache, a
    # few lookups dearer than a dict's, and the ~10 patterns a new number is matched
    # against fall out of that cache when numbers of many regions arrive. Its own cache
    # keeps every metadata pattern compiled, keyed by the pattern's text (a changed
    # pattern is a new key), bounded by the metadata's few thousand patterns.
    phonenumbers.enable_pattern_cache()

_SEPARATORS = re.compile(r"[\s().\-/]")
_DIGITS = re.compile(r"\+?\d+")
_MIN_NATIONAL, _MAX_NATIONAL = 2, 17  # the library's bounds on a national number's digits
_POSSIBLE = phonenumbers.ValidationResult.IS_POSSIBLE
# Reasons a caller may reword for its senders (the SMTP listener: mail software drops a
# parenthesis and what it holds before the bridge sees it).
ONLY_DIGITS = "only digits, an optional leading +, and separators - . ( ) space"
AREA_CODE_MISSING = "the area code is missing after the country code"
_WRITE_THE_AREA_CODE = "write it with its area code, or with + and its country code"
# The library's own words ("Could not interpret numbers after plus-sign.") name its
# parser's state, not what the sender got wrong.
_PARSE_REASONS = {
    NumberParseException.INVALID_COUNTRY_CODE: "no country has that code",
    NumberParseException.NOT_A_NUMBER: "too short to be a phone number",
    NumberParseException.TOO_SHORT_AFTER_IDD: "too short after the country code",
    NumberParseException.TOO_SHORT_NSN: "too short",
    NumberParseException.TOO_LONG: "too long",
}
_REASONS = {
    phonenumbers.ValidationResult.INVALID_COUNTRY_CODE: "unknown country code",
    phonenumbers.ValidationResult.TOO_SHORT: "too short",
    phonenumbers.ValidationResult.TOO_LONG: "too long",
    phonenumbers.ValidationResult.INVALID_LENGTH: "wrong length for its country",
}


class PhoneError(InputError):
    """A recipient that cannot be a phone number; `field` is the recipient as given."""

    def __init__(self, recipient: str, why: str) -> None:
        super().__init__(recipient, why)

    def __str__(self) -> str:
        return f"{self.field!r} is not a possible phone number: {self.message}"


class PhoneDataUnavailable(Unavailable):
    """The phonenumbers library failed on its own metadata while reading a recipient."""

    def __init__(self, recipient: str, where: str, failure: Exception) -> None:
        super().__init__(
            f"{recipient!r} cannot be read now: the phone metadata of {where} is broken"
            f" in the installed phonenumbers {phonenumbers.__version__}"
            f" ({type(failure).__name__}: {failure})"
        )


# The regions and calling codes already warned about. Process-wide on purpose: the
# warning is about the installed library's metadata, which every bridge in the process
# shares (as it shares the readings in `_facts`, `normalise_number` and `ranges`), and
# `serve` runs one bridge.
# Bounded: keys are configured regions and calling codes the library lists (~700 at
# most), never a recipient's text. Tests that break the metadata clear it
# (tests.helpers.forget_the_metadata).
_warned: set[str] = set()


def _warn_once(where: str, message: str, *args: object) -> None:
    if where not in _warned:
        _warned.add(where)
        log.warning(message, *args)


def _calling_code(digits: str) -> int | None:
    """The calling code `+digits` starts with: codes are prefix-free (ITU-T E.164)."""
    for end in (1, 2, 3):
        if digits[:end].isdigit() and int(digits[:end]) in phonenumbers.COUNTRY_CODE_TO_REGION_CODE:
            return int(digits[:end])
    return None


def _unavailable(
    text: str, digits: str, region: str | None, exc: Exception
) -> PhoneDataUnavailable:
    """PhoneDataUnavailable for what the library raised other than a parse error (re.error,
    or whatever a malformed metadata entry causes), warned of once per region or code."""
    code = _calling_code(digits.lstrip("+")) if region is None else None
    where = region or (f"+{code}" if code else "the number's calling code")
    _warn_once(
        where,
        "phonenumbers fails reading numbers of %s (%s: %s): they are answered 503 / 451"
        " until phonenumbers is downgraded or fixed",
        where,
        type(exc).__name__,
        exc,
    )
    return PhoneDataUnavailable(text, where, exc)


def _compact(text: str) -> str:
    """`text` without separators, its digits ASCII: Arabic-Indic or fullwidth digits and a
    fullwidth + are what an Arabic or Japanese keyboard types. The library reads them,
    but the 00 and 0 prefixes are looked for here: ٠٠١٢٠٢... (00 1 202...) was read as
    +00 1 202..., "no country has that code". Anything else is left for `_DIGITS`."""
    compact = _SEPARATORS.sub("", text)
    if compact.isascii():
        return compact
    return "".join("+" if c == "\uff0b" else str(int(c)) if c.isdecimal() else c for c in compact)


def _candidates(compact: str, default_region: str | None) -> list[tuple[str, str | None]]:
    """The readings of `compact` to try, most likely first: (digits as parsed, region)."""
    if compact.startswith("+"):
        return [(compact, None)]
    if compact.startswith("00"):
        return [("+" + compact[2:], None)]
    if default_region:
        if compact.startswith("0"):
            return [(compact, default_region)]
        return [(compact, default_region), ("+" + compact, None)]
    return [("+" + compact, None)]


# What the plain reading asks of the metadata that depends on the calling code alone,
# asked once: a new number paid ~25k instructions for these lookups, a third of reading
# it (issue #16). Bounded: the calling code by at most three ASCII digits (1,110 keys),
# the others by the ~215 codes (and the national number's 2 to 17 lengths).
_CODE_UNSEEN = -1
_plain_codes: dict[str, int | None] = {}  # "+" and digits' first three -> _calling_code
_plain_metadata: dict[int, PhoneMetadata] = {}  # a calling code -> its main region's
_plain_lengths: dict[tuple[int, int], int] = {}  # (calling code, length) -> ValidationResult


def _plain_code(digits: str) -> int | None:
    """`_calling_code(digits[1:])` for `+` and ASCII digits, remembered by the first
    three digits, all it reads (no calling code starts with 0)."""
    lead = digits[1:4]
    found = _plain_codes.get(lead, _CODE_UNSEEN)
    if found == _CODE_UNSEEN:
        found = _plain_codes[lead] = _calling_code(lead) if lead[0] != "0" else None
    return found


def _plain_possible(number: phonenumbers.PhoneNumber, digits: str) -> int:
    """`phonenumbers.is_possible_number_with_reason` of the plain reading of `digits`:
    the library reads the calling code's possible lengths, so the answer depends on the
    code and the national number's length only (`digits`' own, given the code)."""
    key = (int(number.country_code or 0), len(digits))
    found = _plain_lengths.get(key)
    if found is None:
        found = _plain_lengths[key] = phonenumbers.is_possible_number_with_reason(number)
    return found


def _international(digits: str) -> phonenumbers.PhoneNumber | None:
    """`phonenumbers.parse(digits, None)` for `+` and digits when its answer is plain:
    the calling code, then a national number of 2 to 17 digits, not starting with 0
    and without the national prefix its country's metadata strips (both left to the
    library); None where the library must read it.

    The library reads such a number through a dozen regular expressions written for
    what people type (~8 us, half a new number's cost); machines write E.164.
    `test_firewall` holds the answers equal to the library's over every calling code.
    """
    plain = digits[:1] == "+" and digits[1:].isdigit() and len(digits) > 3
    if not (_LIBRARY_HELPERS and plain and digits.isascii()):
        return None  # other digits (Arabic-Indic...) the library maps to ASCII first
    code = _plain_code(digits)
    if code is None:
        return None
    national = digits[1 + len(str(code)) :]
    if not _MIN_NATIONAL <= len(national) <= _MAX_NATIONAL or national[0] == "0":
        return None
    metadata = _plain_metadata.get(code)
    if metadata is None:
        region = phonenumbers.region_code_for_country_code(code)
        metadata = PhoneMetadata.metadata_for_region_or_calling_code(code, region)
        if metadata is None:
            return None
        _plain_metadata[code] = metadata  # the library's own object: patched in place
    prefix = metadata.national_prefix_for_parsing
    if prefix and re_compile(prefix).match(national):
        return None
    return phonenumbers.PhoneNumber(country_code=code, national_number=int(national))


def _parse_possible(text: str, default_region: str | None) -> tuple[str, NumberFacts]:
    """The E.164 form of `text` and its facts, or PhoneError (PhoneDataUnavailable)."""
    compact = _compact(text)
    if not compact or not _DIGITS.fullmatch(compact):
        raise PhoneError(text, ONLY_DIGITS)
    if default_region and compact.startswith("00"):
        dialled = _dialled_from(text, compact, default_region)
        if dialled is not None:
            try:
                written = _first_possible(text, compact, default_region)
            except PhoneError:
                return dialled
            return _dialled_or_written(text, default_region, dialled, written)
    return _first_possible(text, compact, default_region)


def _dialled_from(text: str, compact: str, region: str) -> tuple[str, NumberFacts] | None:
    """`compact` as dialled in `region`, when the library reads the region's own
    international prefix off it and finds a possible number; else None.

    Not every region's prefix is 00: Australia's is 0011, Korea's 001, 002, 008... (a
    carrier each). Read as 00 and a country code, 0011 65 9876 5432 (Singapore, dialled
    from Australia) was +1 659 876 5432 in Alabama, and Korea's 008 1 202... Japan.
    """
    try:
        number = phonenumbers.parse(compact, region, keep_raw_input=True)
        if number.country_code_source != phonenumbers.CountryCodeSource.FROM_NUMBER_WITH_IDD:
            return None  # the region's prefix is not 00...: read as 00 and a country code
        if phonenumbers.is_possible_number_with_reason(number) != _POSSIBLE:
            return None  # local-only too: 001 555 0143 from GB is no phone (see below)
        e164 = str(phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164))
    except NumberParseException:
        return None
    except Exception as exc:  # not the number's fault: the library's metadata
        raise _unavailable(text, compact, region, exc) from exc
    return e164, _facts.get(e164) or _learn(e164, number)


def _dialled_or_written(
    text: str,
    region: str,
    dialled: tuple[str, NumberFacts],
    written: tuple[str, NumberFacts],
) -> tuple[str, NumberFacts]:
    """Of the two readings of 00... in a region whose prefix it also starts with, the one
    that is an assigned number; when both are (or neither), which the sender meant cannot
    be told, and a guess texts a stranger: refused, saying how to write it."""
    if written[0] == dialled[0] or (written[1].assigned and not dialled[1].assigned):
        return written
    if dialled[1].assigned and not written[1].assigned:
        return dialled
    raise PhoneError(
        text,
        f"dialled from {region} it is {dialled[0]}, but 00 and a country code make it"
        f" {written[0]}: write it with + and its country code",
    )


def _first_possible(text: str, compact: str, default_region: str | None) -> tuple[str, NumberFacts]:
    """The first reading of `_candidates` that is a possible number (an assigned one
    before one the metadata does not know), or PhoneError saying why none is."""
    first_reason = "not a possible number"
    candidates = _candidates(compact, default_region)
    written_international = compact.startswith(("+", "00"))
    unassigned: tuple[str, NumberFacts] | None = None
    for digits, region in candidates:
        try:
            plain = _international(digits) if region is None else None
            number = plain or phonenumbers.parse(digits, region)
            result = (
                _plain_possible(number, digits)
                if plain is not None
                else phonenumbers.is_possible_number_with_reason(number)
            )
            # A plain reading's E.164 is the digits it read: `+`, the code, the national
            # number without a leading 0 (the library's formatting: ~1 % of an alert).
            e164 = (
                digits
                if plain is not None
                else str(phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164))
            )
        except NumberParseException as exc:
            first_reason = _PARSE_REASONS.get(exc.error_type, first_reason)
            continue
        except Exception as exc:  # not the number's fault: the library's metadata
            raise _unavailable(text, digits, region, exc) from exc
        # The library's "possible" for 7 US digits is what a landline of the same area
        # dials, never a number an SMS reaches (read as +1 555 0143, it went out): not
        # possible here, with its country code as without (+1(202)555-0143 reaches the
        # bridge as +1555-0143 once a mail library took `(202)` for a comment).
        local_only = result == phonenumbers.ValidationResult.IS_POSSIBLE_LOCAL_ONLY
        if result == _POSSIBLE:
            # the next questions come at once (the firewall's); assigned is is_valid_number
            known = _facts.get(e164) or _learn(e164, number)
            if known.assigned:
                return e164, known
            if region is not None or written_international:
                # As written (with its country code, or national in the configured
                # region): metadata lags new ranges, so a possible number goes out.
                unassigned = unassigned or (e164, known)
            elif unassigned is None:
                # Digits without + read as a country code only by guess: 2025550143 (a
                # US number without its 1) is +20, Egypt, in no assigned range. Texting
                # that guess costs money and pages nobody.
                first_reason = (
                    f"without a + it reads as +{compact}, which is no assigned number:"
                    " write it with + and its country code (+1 202..., +44 20...)"
                    + ("" if default_region else ", or set phone.default_region")
                )
                continue
        if digits == candidates[0][0]:
            first_reason = (
                f"a local number only ({len(str(number.national_number))} digits): "
                + (AREA_CODE_MISSING if written_international else _WRITE_THE_AREA_CODE)
                if local_only
                else _REASONS.get(result, "not a possible number")
            )
    if unassigned is not None:
        return unassigned
    if not default_region and not written_international and len(compact) < 8:
        first_reason += " (no country code, and no default region is configured)"
    raise PhoneError(text, first_reason)


@functools.lru_cache(maxsize=4096)  # on-call numbers repeat; parsing is the costly part
def normalise_number(
    text: str, *, default_region: str | None = None, require_valid: bool = False
) -> str:
    """One recipient as written by a person or a machine -> `+CCNNNN`, or PhoneError."""
    e164, known = _parse_possible(text.strip(), default_region)
    if require_valid and not known.assigned:
        raise PhoneError(text, "not an assigned number (phone.require_valid is on)")
    return e164


class NumberFacts(NamedTuple):
    """What the bridge asks the metadata about a normalised number."""

    country_code: int
    region: str | None  # phonenumbers.region_code_for_number: None when no range matches
    kind: int  # phonenumbers.number_type (a PhoneNumberType)
    assigned: bool  # phonenumbers.is_valid_number


FACTS_CACHE_SIZE = 4096  # on-call numbers repeat; a new one costs ~20 us more
_facts: dict[str, NumberFacts] = {}


def facts(e164: str) -> NumberFacts:
    """The firewall's, the warning's and the price list's questions about `e164`, learnt
    from the parse that normalised it. Asked one by one (parse, region, type, validity),
    a number new to the caches was parsed five times and its region looked up three:
    ~140 us per message when alerts go to many phones. Held to the library's own
    answers by a test."""
    known = _facts.get(e164)
    return known if known is not None else _learn(e164, None)


def national_number(e164: str) -> str:
    """The national significant number of a normalised number: E.164 is the calling code
    and it (phonenumbers.national_significant_number, without parsing again)."""
    return e164[1 + len(str(facts(e164).country_code)) :]


def _learn(e164: str, number: phonenumbers.PhoneNumber | None) -> NumberFacts:
    if number is not None and number.italian_leading_zero:
        # Read as written, a 0 after the code stays part of the number ("+358 0353..."
        # keeps it, region None); read from its E.164 form the library takes it for a
        # trunk prefix (+358 353..., a Finnish fixed line). The facts are the E.164's.
        number = None
    try:
        if number is None:
            number = phonenumbers.parse(e164, None)
        code = int(number.country_code or 0)
        region, kind = _region_and_kind(number)
    except NumberParseException:
        raise
    except Exception as exc:  # its metadata failed it: read the patterns one by one
        found_code = _calling_code(e164[1:])
        if found_code is None:
            raise
        code, reading = found_code, phone_patterns.read(found_code)
        _warn_once(
            f"facts of +{code}",
            "phonenumbers fails on numbers of +%d (%s: %s): their region and kind are read"
            " pattern by pattern; %s",
            code,
            type(exc).__name__,
            exc,
            "not regexes, so matching nothing: " + "; ".join(map(str, reading.unread))
            if reading.unread
            else "every pattern reads",
        )
        region, kind = reading.facts(e164[1 + len(str(code)) :])
    found = NumberFacts(
        country_code=code,
        region=region,
        kind=kind,
        # is_valid_number is number_type != UNKNOWN for the number's own region (the
        # only region whose calling code matches); the test checks it over many numbers.
        assigned=kind != PhoneNumberType.UNKNOWN,
    )
    if len(_facts) >= FACTS_CACHE_SIZE:  # bounded: many new numbers only clear it
        _facts.clear()
    _facts[e164] = found
    return found


def _region_and_kind(number: phonenumbers.PhoneNumber) -> tuple[str | None, int]:
    """`phonenumbers.region_code_for_number` and `number_type`, from one reading.

    Asked one after the other, the library finds the region twice (number_type asks
    region_code_for_number again), and for a calling code shared by several regions it
    finds the region by validating the number against each region's patterns in turn: a
    US number was matched against the US patterns three times, 10 us of the 23 a new
    number costs (a Jamaican or British one ~30 us). Here the same steps in the same
    order through the library's own helpers, the kind kept from the validation that
    found the region; `test_firewall` holds the answers to the two public calls.
    Where every pattern of the calling code is one `bridge.phone_automaton` holds (all
    of the installed metadata's), one walk along the digits answers instead, without
    the library's `re` call per pattern and region (`test_phone_automaton`).
    """
    if not _LIBRARY_HELPERS:  # a release that moved them: the public calls
        return phonenumbers.region_code_for_number(number), phonenumbers.number_type(number)
    code = int(number.country_code or 0)
    regions = COUNTRY_CODE_TO_REGION_CODE.get(code)
    if regions is None:
        return None, PhoneNumberType.UNKNOWN
    national = phonenumbers.national_significant_number(number)
    automaton = phone_automaton.reader(code)
    if automaton is not None:  # the same answers without the library's `re` calls
        return automaton.facts(national)
    region: str | None = None
    kind: int | None = None
    if len(regions) == 1:
        region = regions[0]
    else:  # the library's _region_code_for_number_from_list
        for candidate in regions:
            metadata = PhoneMetadata.metadata_for_region(candidate.upper(), None)
            if metadata is None:
                continue
            if metadata.leading_digits is not None:
                if re_compile(metadata.leading_digits).match(national):
                    region = candidate
                    break
            elif (found := _number_type_helper(national, metadata)) != PhoneNumberType.UNKNOWN:
                region, kind = candidate, found
                break
    if kind is None:
        metadata = PhoneMetadata.metadata_for_region_or_calling_code(code, region)  # type: ignore[arg-type]
        kind = (
            PhoneNumberType.UNKNOWN if metadata is None else _number_type_helper(national, metadata)
        )
    return region, kind


def is_assigned(e164: str) -> bool:
    """Whether the metadata knows the number's range as assigned (for warnings only)."""
    return facts(e164).assigned


def country_code(e164: str) -> int:  # called for every message's cost estimate
    return facts(e164).country_code
