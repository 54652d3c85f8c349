"""The recipient firewall: which numbers the bridge may text at all, and as whom.

Every path that turns a caller's or the config's recipient into a number comes here: the
API, webhook routes, SMTP RCPT, and `check-config` for groups, route `to` and
`budget.admin`. So a number refused in one place is refused in all of them. Refused:

- a country outside `phone.allowed_countries` (ISO codes; empty = any country);
- unless `phone.allow_premium`: premium-rate, shared-cost and personal numbers (UK 070:
  they forward anywhere, at a premium), those the metadata does not know but that lie in
  such a range (`bridge.ranges`: `+4990012345678`, a 0900 number one digit long), and
  every number of the non-geographic calling codes (+800 UIFN, +808, +870 and +881 satellite, +882/+883
  international networks, +979 international premium rate), which cost far more than a
  text to a phone and are the classic toll-fraud targets. While a costly kind's pattern
  of a calling code is broken in the installed phonenumbers (`bridge.phone`), every
  number of that code the metadata does not know, as its range cannot be checked. A
  number written with its trunk 0 after the country code (`+49 0 0900...`, kept by
  the library as `+490900...`) is judged as networks dial it, without that 0, where no
  number of its code begins with 0 (`bridge.ranges.zero_leads`).

Pure, no I/O; the verdict per number is cached, as parsing is the costly part.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import phonenumbers
from phonenumbers import PhoneNumberType

from bridge.errors import InputError
from bridge.phone import NumberFacts, facts, national_number, normalise_number
from bridge.ranges import blind_costly_kinds, costly_range, zero_leads

if TYPE_CHECKING:
    from bridge.config.sections import Config

SENDER_ID_RULE = "at most 11 characters: letters, digits or spaces with a letter, or digits"
NON_GEOGRAPHIC = "001"  # phonenumbers' region for calling codes that belong to no country
_COSTLY_TYPES = {
    PhoneNumberType.PREMIUM_RATE: "a premium-rate number",
    PhoneNumberType.SHARED_COST: "a shared-cost number",
    PhoneNumberType.PERSONAL_NUMBER: "a personal number",
}


class RefusedNumber(InputError):
    """A possible number the configuration does not let the bridge text."""

    def __init__(self, number: str, why: str) -> None:
        super().__init__(number, why)

    def __str__(self) -> str:
        return f"{self.field} is refused: {self.message}"


def _country(number: NumberFacts) -> str | None:
    """The number's ISO country; for a number the metadata does not know, the calling
    code's only country, or None when the code is shared (+1, +44, +7...)."""
    if number.region:
        return str(number.region)
    regions = phonenumbers.region_codes_for_country_code(number.country_code)
    return str(regions[0]) if len(regions) == 1 else None


@functools.lru_cache(maxsize=4096)  # a few on-call numbers, checked on every message
def refusal(e164: str, allowed_countries: frozenset[str], allow_premium: bool) -> str | None:
    """Why `e164` may not be texted under these rules, or None when it may."""
    number = facts(e164)
    code = number.country_code
    if not allow_premium:
        if phonenumbers.region_code_for_country_code(code) == NON_GEOGRAPHIC:
            return (
                f"+{code} is an international network, satellite or "
                "premium code, not a country (phone.allow_premium is off)"
            )
        kind = _COSTLY_TYPES.get(number.kind)
        if kind:
            return f"{kind} (phone.allow_premium is off)"
        if not number.assigned:
            national = national_number(e164)
            if national[:1] == "0" and len(national.lstrip("0")) >= 2 and not zero_leads(code):
                # "+49 00900 ...": the library keeps one 0 (`+490900...`, in no range, so
                # it passed), and networks drop it: judged as the number they dial.
                dialled = f"+{code}{national.lstrip('0')}"
                why = refusal(dialled, allowed_countries, allow_premium)
                if why:
                    return f"dialled as networks dial it, without the 0 after +{code}, {dialled} is {why}"
            kind = costly_range(code, national)
            if kind:
                return (
                    f"not a known number, but in the range of {kind} (phone.allow_premium is off)"
                )
            # A costly pattern `re` cannot compile (a broken phonenumbers release) matches
            # nothing, so such numbers are read as unknown and costly_range cannot see
            # their range either: refuse the unknown ones rather than text a 0900 number.
            # Known numbers still go (no example number of a costly kind matches another).
            blind = blind_costly_kinds(code)  # read by costly_range just now
            if blind:
                return (
                    f"not a known number, and whether it is costly cannot be told: the phone"
                    f" metadata's {' and '.join(blind)} pattern for +{code} is broken in the"
                    " installed phonenumbers (phone.allow_premium is off)"
                )
    if allowed_countries:
        country = _country(number)
        allowed = ", ".join(sorted(allowed_countries))
        if country is None:
            shared = phonenumbers.region_codes_for_country_code(code)
            if not set(shared) <= allowed_countries:
                return (
                    f"its country cannot be told (+{code} is shared by "
                    f"{len(shared)} countries and the phone metadata does not know this "
                    f"range); phone.allowed_countries is {allowed}"
                )
        elif country not in allowed_countries:
            return f"a number in {country}, not in phone.allowed_countries ({allowed})"
    return None


@dataclass(frozen=True, slots=True)
class Firewall:
    """The phone rules in force (bridge.config.recipients.Recipients holds the one in use)."""

    default_region: str | None = None
    require_valid: bool = False
    allowed_countries: frozenset[str] = frozenset()
    allow_premium: bool = False

    @classmethod
    def from_config(cls, config: Config) -> Firewall:
        return _from_phone(
            config.phone.default_region,
            config.phone.require_valid,
            tuple(config.phone.allowed_countries),
            config.phone.allow_premium,
        )

    def check(self, e164: str) -> None:
        """RefusedNumber unless `e164` (already normalised) may be texted."""
        why = refusal(e164, self.allowed_countries, self.allow_premium)
        if why:
            raise RefusedNumber(e164, why)

    def number(self, text: str, *, region: str | None = None) -> str:
        """One recipient as written -> E.164; PhoneError if impossible, RefusedNumber if
        not allowed. `region` (an SMTP domain's) wins over `phone.default_region`."""
        e164 = normalise_number(
            text, default_region=region or self.default_region, require_valid=self.require_valid
        )
        self.check(e164)
        return e164


@functools.lru_cache(maxsize=16)  # one per config in force: not rebuilt per request
def _from_phone(
    default_region: str, require_valid: bool, countries: tuple[str, ...], allow_premium: bool
) -> Firewall:
    return Firewall(
        default_region=default_region or None,
        require_valid=require_valid,
        allowed_countries=frozenset(c.upper() for c in countries),
        allow_premium=allow_premium,
    )


def cap_recipients(targets: list[str], limit: int, field: str = "to") -> None:
    """A request names at most `limit` recipients (a group counts once: the owner made it)."""
    if limit and len(targets) > limit:
        raise InputError(
            field,
            f"{len(targets)} recipients in one request; at most {limit} (http.max_recipients)",
        )


@functools.lru_cache(maxsize=256)  # checked on every message; senders are few
def valid_sender_id(sender_id: str) -> bool:
    """What the provider takes (its API documentation): at most 11 characters, either a name
    of letters, digits and spaces with a letter, or a number with an optional +."""
    if not 1 <= len(sender_id) <= 11:
        return False
    if re.fullmatch(r"\+?\d+", sender_id):
        return True
    return bool(re.fullmatch(r"[A-Za-z0-9 ]+", sender_id) and re.search(r"[A-Za-z]", sender_id))


def sender_id_for(config: Config, requested: str | None) -> str:
    """The sender id a caller asked for, if it may have it; else InputError naming it.

    Only `provider.sender_id` and `provider.allowed_sender_ids` may be asked for: a caller
    choosing any name ("PAYPAL") would phish from the owner's account.
    """
    provider = config.provider
    if not requested or requested == provider.sender_id:
        return provider.sender_id
    if not valid_sender_id(requested):
        raise InputError("sender_id", f"{requested!r} is not a sender id: {SENDER_ID_RULE}")
    if requested not in provider.allowed_sender_ids:
        allowed = [provider.sender_id, *provider.allowed_sender_ids]
        raise InputError(
            "sender_id",
            f"{requested!r} is not an allowed sender id (allowed: {', '.join(allowed)};"
            " provider.allowed_sender_ids)",
        )
    return requested
