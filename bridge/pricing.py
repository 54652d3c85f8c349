"""Prices per country from the provider's pricing endpoint, for cost estimates.

The pricing body is undocumented, so the parser accepts the shapes seen in the wild: a
list of entries with a country code (or dialling prefix) and a price, or an object
mapping codes to prices, with an optional default.

A price of 0 is a price: a destination the list gives at 0 is free, and texts to it
cost nothing against `budget.cost_per_day`. A destination the list leaves out (with no
default) is unknown, never free: the budget counts it at the highest price it knows.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from bridge.phone import country_code

log = logging.getLogger(__name__)
# No country has calling code 0: what a bill taught of every country (`PriceBook.billed`).
ANY_COUNTRY = 0
# How long the most a part was billed stands as the price of a part anywhere: a bill
# lower than it replaces it once it is this old (a day, as the price list is fetched
# again daily). Raised only, a price cut by the provider never lowered the estimate of
# an unpriced country, nor the count of a lone text priced by it.
BILLED_MAX_FOR = 86400.0


def _country(e164: str) -> int | None:
    try:
        return country_code(e164)
    except Exception:
        return None


def _code(value: Any) -> int | None:
    text = str(value or "").strip().lstrip("+")
    # ASCII digits only: str.isdigit() also takes "¹" (a footnote mark), which int() refuses.
    return int(text) if text.isascii() and text.isdigit() else None


def _given(entry: Mapping[str, Any], *keys: str) -> Any:
    """The first of `keys` that `entry` gives a value for (0 is a value; None and "" are
    not): `a or b` read a price of 0 as no price."""
    for key in keys:
        value = entry.get(key)
        if value is not None and value != "":
            return value
    return None


def _price(value: Any) -> float | None:
    """A price of one part, or None: a negative or non-finite one (JSON's NaN, "inf") is
    no price (a NaN summed into today's spend made every cost check false: no cap)."""
    try:
        price = None if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        return None
    return price if price is not None and math.isfinite(price) and price >= 0 else None


class PriceBook:
    """Price of one SMS part per country calling code; None when unknown."""

    def __init__(
        self, prices: Mapping[int, float] | None = None, default: float | None = None
    ) -> None:
        self.prices = dict(prices or {})
        self.default = default
        self.currency = ""  # as the price list names it ("USD", "points"); "" = not said
        # The most a part was billed (the provider's cost of a send) within
        # BILLED_MAX_FOR of the bill that said it, and when: a price where the list is
        # missing (its path is undocumented, or it failed at start).
        self.billed_max = 0.0
        self.billed_max_at = 0.0
        # What a part to each country was billed (calls to one country): its price where
        # the list has none. Priced by the most any part was billed, a 0.5 text counted
        # as the 1.5 of another country's, and failed as larger than the day's cap.
        self.billed_prices: dict[int, float] = {}

    def estimate(self, e164: str, parts: int) -> float | None:
        """What `parts` parts to `e164` cost: its country's listed price, else what it was
        billed, else the list's default; None when none of them is known."""
        code = _country(e164)
        price = self.prices.get(code) if code is not None else None
        if price is None:
            price = self.billed_prices.get(code, self.default) if code else self.default
        return None if price is None else round(price * parts, 6)

    def ceiling(self) -> float:
        """The highest price of one part anywhere (listed or billed): a safe guess where
        none is known; 0.0 when nothing above 0 is. A country's last bill counts too:
        the most a part was billed falls a day after a price cut, never below what a
        country is still billed."""
        return max(
            [
                *self.prices.values(),
                self.default or 0.0,
                self.billed_max,
                *self.billed_prices.values(),
            ]
        )

    @property
    def listed(self) -> bool:
        """Whether the ceiling is bounded by a price list (a price above 0 listed, or its
        default): the most a part was billed so far bounds only the countries billed."""
        return max([*self.prices.values(), self.default or 0.0]) > 0

    def billed(self, cost: float, sent: Sequence[tuple[str, int]], now: float) -> dict[int, float]:
        """The provider billed `cost` for `sent`, the (recipient, parts) of one call, at
        `now`; what that taught, for the store to keep (`record_billed`): the price of a
        part to its country (a call to one country), and under ANY_COUNTRY the price of a
        part (the most a part was billed, if higher, or if that is BILLED_MAX_FOR old)."""
        parts = sum(p for _, p in sent)
        if parts <= 0:
            return {}
        price = cost / parts
        learnt = {ANY_COUNTRY: price}
        countries = {_country(recipient) for recipient, _ in sent}
        if len(countries) == 1 and (code := countries.pop()) is not None:
            learnt[code] = price
        if _price(price) is not None and (
            price >= self.billed_max or now - self.billed_max_at >= BILLED_MAX_FOR
        ):
            self.billed_max, self.billed_max_at = price, now
        self.remember({c: (p, now) for c, p in learnt.items() if c != ANY_COUNTRY})
        return learnt

    def remember(self, billed: Mapping[int, tuple[float, float]]) -> None:
        """Take prices learnt from bills, each with when it was billed (kept by the store
        from before a restart and from the other instances): each country's as billed
        last; under ANY_COUNTRY, the most a part was billed, as the store keeps it
        (`record_billed`: it falls a day after a price cut, as here). With its time:
        without it, the next bill here took the most a part was billed for a day old,
        and a lower bill replaced it at once (the store kept it for the day)."""
        for code, (price, at) in billed.items():
            if _price(price) is None:
                continue
            if code == ANY_COUNTRY:
                self.billed_max, self.billed_max_at = price, at
            else:
                self.billed_prices[code] = price

    def load(self, data: Any) -> bool:
        """Replace the prices with what a pricing response says (tolerantly); whether it
        said any (an answer with none keeps the prices known)."""
        prices: dict[int, float] = {}
        default = None
        entries: Any = data
        if isinstance(data, dict):
            default = _price(data.get("default"))
            currency = data.get("currency")
            if isinstance(currency, str):
                self.currency = currency[:16]
            entries = (
                data.get("countries")
                or data.get("prices")
                or data.get("data")
                or {k: v for k, v in data.items() if k not in ("default", "currency")}
            )
        if isinstance(entries, dict):
            entries = [{"country_code": k, "price": v} for k, v in entries.items()]
        for entry in entries if isinstance(entries, list) else []:
            if not isinstance(entry, dict):
                continue
            code = _code(_given(entry, "country_code", "prefix", "dial_code", "code"))
            price = _price(_given(entry, "price", "cost", "rate"))
            if code is not None and price is not None:
                prices[code] = price
        if not prices and default is None:
            return False
        self.prices, self.default = prices, default
        log.info("price list loaded: %d countries", len(prices))
        return True
