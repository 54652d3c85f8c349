"""Policy applied inside the ingest transaction: stored as queued, suppressed or held.

It runs in the store's writer thread, one message at a time, in the same transaction as
the inserts, so two concurrent duplicates cannot both slip through and a storm is counted
exactly.

- Deduplication: the same dedupe key (explicit: `dedupe_key`, Message-ID, delivery id,
  alert fingerprints and status; otherwise the normalised text) to the same recipient
  within the window -> `suppressed`, naming the original.
- Storm control: more than `per_recipient` texts to one phone within the window ->
  `held`; the digest worker (`bridge.storm`) later folds held messages into one SMS.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from sqlite_utils import Database

from bridge.config import Config
from bridge.models import NewMessage, State

_WORDS = re.compile(r"\s+")


@dataclass(frozen=True, slots=True)
class Rules:
    dedupe_window: float
    per_recipient: int = 0  # 0: no storm control
    per_recipient_window: float = 600.0
    route_windows: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Config) -> Rules:
        return cls(
            dedupe_window=config.dedupe.window,
            per_recipient=config.limits.per_recipient,
            per_recipient_window=config.limits.per_recipient_window,
            route_windows={name: r.dedupe_window for name, r in config.routes.items()},
        )

    def window_for(self, route: str | None) -> float:
        window = self.route_windows.get(route or "", -1.0)
        return self.dedupe_window if window < 0 else window


def text_key(text: str) -> str:
    """A dedupe key for messages without one: case and spacing do not make news."""
    normalised = _WORDS.sub(" ", text).strip().casefold()
    return "text:" + hashlib.sha256(normalised.encode()).hexdigest()[:24]


def _duplicate_of(db: Database, recipient: str, key: str, since: float) -> int | None:
    row = db.execute(
        "SELECT id FROM messages WHERE dedupe_key = ? AND dedupe_key IS NOT NULL"
        # Ordered as the index is: the first hit answers, however many repeats are stored.
        " AND recipient = ? AND created_at >= ? AND state != 'failed'"
        " ORDER BY created_at LIMIT 1",
        (key, recipient, since),
    ).fetchone()
    return None if row is None else int(row[0])


def _storming(db: Database, recipient: str, rules: Rules, now: float) -> bool:
    held = db.execute(
        "SELECT 1 FROM messages WHERE recipient = ? AND state = 'held' LIMIT 1", (recipient,)
    ).fetchone()
    if held:  # a digest is pending: join it rather than overtake it
        return True
    sent = db.execute(
        "SELECT count(*) FROM messages WHERE recipient = ? AND created_at >= ?"
        " AND state IN ('queued', 'sending', 'sent', 'delivered') AND source != 'digest'",
        (recipient, now - rules.per_recipient_window),
    ).fetchone()[0]
    return int(sent) >= rules.per_recipient


def decide(db: Database, message: NewMessage, *, now: float, rules: Rules) -> NewMessage:
    """The state this message is stored in, with the reason when it is not `queued`."""
    key = message.dedupe_key or text_key(message.text)
    message = dataclasses.replace(message, dedupe_key=key)
    if message.state != State.QUEUED:
        return message
    window = rules.window_for(message.route)
    if window > 0:
        original = _duplicate_of(db, message.recipient, key, now - window)
        if original is not None:
            return dataclasses.replace(
                message,
                state=State.SUPPRESSED,
                reason_kind="duplicate",
                reason=f"duplicate of message {original} within {window:g}s",
            )
    if rules.per_recipient and _storming(db, message.recipient, rules, now):
        return dataclasses.replace(
            message,
            state=State.HELD,
            reason_kind="storm",
            reason=(
                f"storm control: over {rules.per_recipient} texts in "
                f"{rules.per_recipient_window:g}s to this phone; held for the digest"
            ),
        )
    return message
