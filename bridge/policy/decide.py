"""Policy applied inside the ingest transaction: stored as queued, suppressed or held.

It runs in the store's writer thread, in the same transaction as the inserts, for every
ingest of that transaction at once (two lookups, whatever the number of messages), and
decides each message as if the ones before it were already stored: two concurrent
duplicates cannot both slip through, and a storm is counted exactly.

- Deduplication: the same dedupe key (explicit: `dedupe_key`, Message-ID and content,
  GitHub body hash, alert fingerprints and status; otherwise the normalised text) to the
  same recipient within the window -> `suppressed`, naming the original. Every key
  carries its scope (`dedupe_scope`): keys from the API, a route or mail never meet.
- Storm control: more than `per_recipient` texts to one phone within the window ->
  `held`; the digest worker (`bridge.delivery.digests`) later folds held messages into one SMS.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from sqlite_utils import Database

from bridge.config import Config
from bridge.models import NewMessage, State
from bridge.store import queries

_WORDS = re.compile(r"\s+")
# GitHub signs no timestamp, so a captured body can be replayed at any time; its key is
# the body's hash, and no genuine event repeats a body, so a long window costs nothing.
SIGNED_REPLAY_WINDOW = 7 * 86400.0


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
            route_windows={
                name: _route_window(r.format, r.dedupe_window, config.dedupe.window)
                for name, r in config.routes.items()
            },
        )

    def window_for(self, route: str | None) -> float:
        window = self.route_windows.get(route or "", -1.0)
        return self.dedupe_window if window < 0 else window


def _route_window(route_format: str, window: float, default: float) -> float:
    """A route's own window, else the default; a GitHub route's default is at least a week
    (SIGNED_REPLAY_WINDOW), unless dedupe is off altogether."""
    if window >= 0:
        return window
    if route_format == "github" and default > 0:
        return max(default, SIGNED_REPLAY_WINDOW)
    return default


def dedupe_scope(kind: str, name: str | None = None) -> str:
    """Where dedupe keys come from: `api`, `api@TOKEN`, `route@NAME`, `mail`.

    Ingest puts the scope before every key (`scoped_key`), so an API caller's
    `"github:deliv-77"` is `api:github:deliv-77` and can never match route `gh`'s
    delivery, `route@gh:github:...`. A name cannot hold `:` (escaped), so no scope ends
    inside another's key.
    """
    if name is None:
        return kind
    return f"{kind}@{name.replace('%', '%25').replace(':', '%3A')}"


def scoped_key(scope: str, key: str) -> str:
    return f"{scope}:{key}"


def content_hash(*parts: str | bytes) -> str:
    """A short digest of some content, for keys that must change when it does."""
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8", "surrogatepass") if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "big") + data)  # lengths: no ambiguous joins
    return digest.hexdigest()[:32]


def text_key(text: str) -> str:
    """A dedupe key for messages without one: case and spacing do not make news."""
    normalised = _WORDS.sub(" ", text).strip().casefold()
    return "text:" + hashlib.sha256(normalised.encode()).hexdigest()[:24]


@dataclass
class _Batch:
    """What the decisions of one transaction see: the stored rows and the batch so far."""

    rules: Rules
    originals: dict[tuple[str, str, float], int]  # (key, recipient, since) -> stored id
    storms: dict[tuple[str, float], tuple[bool, int]]  # (recipient, since) -> stored state
    # (key, phone) -> [(id, arrival)] of this batch, oldest first
    earlier: dict[tuple[str, str], list[tuple[int, float]]] = field(default_factory=dict)
    held: set[str] = field(default_factory=set)  # phones held within this batch
    let_through: dict[str, list[float]] = field(default_factory=dict)  # phone -> arrivals

    def original(self, message: NewMessage, since: float) -> int | None:
        key = message.dedupe_key or ""
        stored = self.originals.get((key, message.recipient, since))
        if stored is not None:
            return stored
        repeats = self.earlier.get((key, message.recipient), [])
        return next((i for i, at in repeats if at >= since), None)

    def storming(self, message: NewMessage, now: float) -> bool:
        since = now - self.rules.per_recipient_window
        held, recent = self.storms.get((message.recipient, since), (False, 0))
        recent += sum(1 for at in self.let_through.get(message.recipient, []) if at >= since)
        return held or message.recipient in self.held or recent >= self.rules.per_recipient

    def record(self, message: NewMessage, message_id: int, now: float) -> None:
        pair = (message.dedupe_key or "", message.recipient)
        self.earlier.setdefault(pair, []).append((message_id, now))
        if message.state == State.HELD:
            self.held.add(message.recipient)
        elif message.state == State.QUEUED:
            self.let_through.setdefault(message.recipient, []).append(now)


def decide_all(
    db: Database, pending: Sequence[tuple[NewMessage, float]], *, first_id: int, rules: Rules
) -> list[NewMessage]:
    """The state each message is stored in (with the reason when not `queued`).

    `pending` are (message, arrival time) in order, to be inserted with ids `first_id`,
    `first_id + 1`, ...; each decision sees the stored rows and the messages before it,
    exactly as if they had been decided and inserted one at a time.
    """
    keyed = [
        (m if m.dedupe_key else m._replace(dedupe_key=text_key(m.text)), now) for m, now in pending
    ]
    queued = [(m, now) for m, now in keyed if m.state == State.QUEUED]
    lookups = {
        (m.dedupe_key or "", m.recipient, now - window)
        for m, now in queued
        if (window := rules.window_for(m.route)) > 0
    }
    phones = (
        {(m.recipient, now - rules.per_recipient_window) for m, now in queued}
        if rules.per_recipient
        else set()
    )
    batch = _Batch(
        rules=rules,
        originals=queries.stored_originals(db, sorted(lookups)),
        storms=queries.stored_storms(db, sorted(phones)),
    )
    out = []
    for offset, (message, now) in enumerate(keyed):
        decided = _decide(message, now, batch)
        batch.record(decided, first_id + offset, now)
        out.append(decided)
    return out


def _decide(message: NewMessage, now: float, batch: _Batch) -> NewMessage:
    if message.state != State.QUEUED:
        return message
    rules = batch.rules
    window = rules.window_for(message.route)
    original = batch.original(message, now - window) if window > 0 else None
    if original is not None:
        return message._replace(
            state=State.SUPPRESSED,
            reason_kind="duplicate",
            reason=f"duplicate of message {original} within {window:g}s",
        )
    if rules.per_recipient and batch.storming(message, now):
        return message._replace(
            state=State.HELD,
            reason_kind="storm",
            reason=(
                f"storm control: over {rules.per_recipient} texts in "
                f"{rules.per_recipient_window:g}s to this phone; held for the digest"
            ),
        )
    return message
