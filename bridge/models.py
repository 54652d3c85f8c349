"""The message model and its states.

(ingest) -> held -> suppressed          (storm control: folded into a digest message)
queued -> sending -> sent -> delivered
   ^         |         \\-> failed      (the provider's /logs says so)
   \\---------/ retry
queued/sending -> failed                (permanent, with a reason)
(ingest) -> suppressed                   (duplicate or loop, with a reason)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, NamedTuple

from bridge.schedule import scheduled_epoch

MAX_ROW_ID = 2**63 - 1  # SQLite's INTEGER: a larger id cannot even be bound


class State(StrEnum):
    HELD = "held"  # storm control: waiting to be folded into a digest
    QUEUED = "queued"
    SENDING = "sending"
    SENT = "sent"
    DELIVERED = "delivered"
    FAILED = "failed"
    SUPPRESSED = "suppressed"


FINAL_STATES = frozenset({State.DELIVERED, State.FAILED, State.SUPPRESSED})
# Where a message came from (`source`): the ingresses, storm digests, budget warnings.
SOURCES = ("http", "hook", "smtp", "console", "digest", "budget")
# A message's `token` for mail from an SMTP login: `smtp:LOGIN` (no token name holds a `:`).
SMTP_SENDER = "smtp:"
# Why a message is held, suppressed, failed or sent without an answer (`reason_kind`).
REASON_KINDS = ("duplicate", "storm", "loop", "budget", "unknown", "provider-error", "cancelled")
# What /api/v1/stats counts a held, suppressed or failed message without a kind as.
OTHER_REASON = "other"


class NewMessage(NamedTuple):
    """A normalised message from any ingress, before it is stored.

    A named tuple rather than a frozen dataclass: as immutable, and built and copied
    (`_replace`, for each message policy suppresses or holds) several times faster, which
    shows on the ingest path.
    """

    recipient: str
    text: str
    source: str
    sender_id: str
    message_type: int
    parts: int
    route: str | None = None
    dedupe_key: str | None = None
    schedule_time: str | None = None
    state: State = State.QUEUED
    reason: str | None = None
    reason_kind: str | None = None  # duplicate | storm | loop | budget
    topic: str | None = None  # what a digest counts this message as
    estimated_cost: float | None = None
    instance: str | None = None  # what a digest names besides the topic (a host...)
    token: str | None = None  # the [tokens.NAME] that sent it (its name, never the secret)


@dataclass(frozen=True, slots=True)
class Message:
    id: int
    recipient: str
    text: str
    source: str
    sender_id: str
    message_type: int
    parts: int
    route: str | None
    dedupe_key: str | None
    schedule_time: str | None
    state: State
    reason: str | None
    attempts: int
    provider_message_id: str | None
    cost: float | None
    created_at: float
    updated_at: float
    next_attempt_at: float
    claimed_at: float | None
    sent_at: float | None
    solo: bool
    topic: str | None
    reason_kind: str | None
    estimated_cost: float | None
    instance: str | None
    unknown_resends: int = 0
    token: str | None = None  # the [tokens.NAME] that sent it: its daily cap counts it
    # When it became due: stored, its schedule time, or the end of the daily cap's hold
    # it waited for; a retry's backoff and a claim leave it (its age counts from it).
    due_at: float = 0.0

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Message:
        values = {name: row[name] for name in cls.__dataclass_fields__}
        values["state"] = State(values["state"])
        values["solo"] = bool(values["solo"])
        if values["due_at"] is None:  # a row not written by ingest (a raw insert)
            values["due_at"] = values["created_at"]
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["state"] = str(self.state)
        out.pop("solo")
        out.pop("claimed_at")
        out.pop("due_at")  # the queue's own bookkeeping, not in the API
        for key in ("created_at", "updated_at", "next_attempt_at", "sent_at"):
            out[key] = iso_time(out[key])
        # Stored in UTC without a zone (the provider's format): written bare, it read as
        # the provider.timezone time the sender gave, hours off outside UTC.
        scheduled = scheduled_epoch(self.schedule_time)
        if scheduled is not None:
            out["schedule_time"] = iso_time(scheduled)
        out["last_error"] = self.reason if self.state != State.DELIVERED else None
        return out


def events_json(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A message's events (the store's rows) as the API writes them: `at` as every time."""
    return [{**e, "at": iso_time(e["at"])} for e in events]


def iso_time(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")
