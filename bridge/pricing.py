"""Prices per country from the provider's pricing endpoint, for cost estimates.

The pricing body is undocumented, so the parser accepts the shapes seen in the wild: a
list of entries with a country code (or dialling prefix) and a price, or an object
mapping codes to prices, with an optional default.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from bridge.phone import country_code

log = logging.getLogger(__name__)


def _code(value: Any) -> int | None:
    text = str(value or "").strip().lstrip("+")
    return int(text) if text.isdigit() else None


def _price(value: Any) -> float | None:
    try:
        return None if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        return None


class PriceBook:
    """Price of one SMS part per country calling code; None when unknown."""

    def __init__(
        self, prices: Mapping[int, float] | None = None, default: float | None = None
    ) -> None:
        self.prices = dict(prices or {})
        self.default = default
        self.currency = ""  # as the price list names it ("USD", "points"); "" = not said
        # The most a part was billed (the provider's cost of a send): a price where the
        # list is missing (its path is undocumented, or it failed at start).
        self.billed_max = 0.0

    def estimate(self, e164: str, parts: int) -> float | None:
        try:
            price = self.prices.get(country_code(e164), self.default)
        except Exception:
            price = self.default
        return None if price is None else round(price * parts, 6)

    def ceiling(self) -> float:
        """The highest price of one part anywhere (listed or billed): a safe guess where
        none is known; 0.0 when nothing is (`known`)."""
        return max([*self.prices.values(), self.default or 0.0, self.billed_max])

    @property
    def known(self) -> bool:
        """Whether any price is known: listed, or learnt from a bill."""
        return bool(self.prices) or self.default is not None or self.billed_max > 0

    def billed(self, cost: float, parts: int) -> None:
        """The provider billed `cost` for `parts` parts (one call's answer)."""
        if parts > 0:
            self.billed_max = max(self.billed_max, cost / parts)

    def load(self, data: Any) -> None:
        """Replace the prices with what a pricing response says (tolerantly)."""
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
            code = _code(
                entry.get("country_code")
                or entry.get("prefix")
                or entry.get("dial_code")
                or entry.get("code")
            )
            price = _price(entry.get("price") or entry.get("cost") or entry.get("rate"))
            if code is not None and price is not None:
                prices[code] = price
        if prices or default is not None:
            self.prices, self.default = prices, default
            log.info("price list loaded: %d countries", len(prices))
