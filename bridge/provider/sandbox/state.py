"""The sandbox's memory: the account (key, balance, prices, rate window), every SMS taken
and how its delivery state moves with the clock, and every request as it arrived.

Its state never touches the bridge's store: it is the far side of the provider API, and
tests read it (`entries`, `requests`) to see what really went out.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from typing import Any

from starlette.requests import Request

from bridge.clock import Clock
from bridge.config import Config
from bridge.provider.sandbox.billing import DEFAULT_PRICES, price_of, sms_parts
from bridge.provider.sandbox.faults import Fault
from bridge.provider.sandbox.shapes import VARIANTS, Shape

RATE_WINDOW = 60.0  # the documented 100 requests per minute, read as a sliding window
SCHEDULE_FORMAT = "%Y-%m-%d %H:%M:%S"


@dataclass
class SentEntry:
    message_id: int
    to: str
    message: str
    sender_id: str
    message_type: int
    parts: int
    cost: float
    created_at: float
    deliver_from: float
    fails: bool
    bulk_id: str | None = None


@dataclass
class RequestRecord:
    at: float
    method: str
    path: str
    status: int
    # How the request authenticated ("x-api-key", "bearer", both joined by "+", or "none"):
    # the sandbox accepts either, so a test of the client's auth_header reads it here.
    auth: str = "none"
    query: dict[str, str] = field(default_factory=dict)  # /logs' page, say


def auth_scheme(request: Request) -> str:
    """Which of the documented auth headers the request carried."""
    schemes = []
    if "x-api-key" in request.headers:
        schemes.append("x-api-key")
    if request.headers.get("authorization", "").lower().startswith("bearer "):
        schemes.append("bearer")
    return "+".join(schemes) or "none"


def stamp(epoch: float, tz: tzinfo = UTC) -> str:
    """A timestamp as the provider writes them (`Y-m-d H:i:s`, in its zone)."""
    return datetime.fromtimestamp(epoch, tz).strftime(SCHEDULE_FORMAT)


@dataclass
class SandboxState:
    clock: Clock
    api_key: str = "sandbox-key"
    balance: float = 1000.0
    rate_limit: int = 100
    sent_after: float = 1.0
    delivered_after: float = 3.0
    fail_share: float = 0.0
    send_retry_after: bool = True
    prices: dict[int, float] = field(default_factory=lambda: dict(DEFAULT_PRICES))
    seed: int = 0
    shape: Shape = field(default_factory=Shape)
    entries: list[SentEntry] = field(default_factory=list)
    requests: list[RequestRecord] = field(default_factory=list)
    faults: deque[Fault] = field(default_factory=deque)
    _window: deque[float] = field(default_factory=deque)
    _next_id: int = 10_000

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def price(self, number: str) -> float:
        return price_of(number, self.prices)

    def status_of(self, entry: SentEntry) -> str:
        now = self.clock.now()
        if now < entry.deliver_from + self.sent_after:
            return "pending"
        if now < entry.deliver_from + self.delivered_after:
            return "sent"
        return "failed" if entry.fails else "delivered"

    def admit(self) -> float | None:
        """Book one request in the sliding window; None if admitted, else seconds to wait."""
        now = self.clock.now()
        while self._window and self._window[0] <= now - RATE_WINDOW:
            self._window.popleft()
        if len(self._window) >= self.rate_limit:
            return self._window[0] + RATE_WINDOW - now
        self._window.append(now)
        return None

    def next_bulk_id(self) -> str:
        return f"bulk-{self._next_id}"

    def record_send(
        self,
        to: str,
        message: str,
        sender_id: str,
        message_type: int,
        deliver_from: float,
        bulk_id: str | None = None,
    ) -> SentEntry:
        parts = sms_parts(message, message_type)
        entry = SentEntry(
            message_id=self._next_id,
            to=to,
            message=message,
            sender_id=sender_id,
            message_type=message_type,
            parts=parts,
            cost=round(self.price(to) * parts, 4),
            created_at=self.clock.now(),
            deliver_from=deliver_from,
            fails=self._rng.random() < self.fail_share,
            bulk_id=bulk_id,
        )
        self._next_id += 1
        self.entries.append(entry)
        self.balance = round(self.balance - entry.cost, 4)
        return entry

    def number(self, to: str) -> str:
        """A number as this shape writes it back."""
        return to.lstrip("+") if self.shape.numbers == "plain" else to

    def to_log(self, entry: SentEntry) -> dict[str, Any]:
        when: object = (
            int(entry.created_at)
            if self.shape.times == "epoch"
            else stamp(entry.created_at, self.shape.zone)
        )
        if self.shape.log_keys == "other":
            return {
                "id": entry.message_id,
                "phone": self.number(entry.to),
                "sms": entry.message,
                "state": self.status_of(entry),
                "created": when,
                "price": entry.cost,
                "sender": entry.sender_id,
            }
        return {
            "id": entry.message_id,
            "message_id": entry.message_id,
            "to": self.number(entry.to),
            "message": entry.message,
            "sender_id": entry.sender_id,
            "message_type": entry.message_type,
            "parts": entry.parts,
            "cost": entry.cost,
            "status": self.status_of(entry),
            "created_at": when,
            "bulk_id": entry.bulk_id,
        }


def state_from_config(config: Config, clock: Clock) -> SandboxState:
    """The in-process sandbox `serve` runs when no provider.base_url is configured."""
    s = config.sandbox
    return SandboxState(
        clock=clock,
        api_key=s.api_key,
        balance=s.balance,
        sent_after=s.sent_after,
        delivered_after=s.delivered_after,
        fail_share=s.fail_share,
        rate_limit=config.provider.requests_per_minute,
        shape=VARIANTS[s.variant],
    )
