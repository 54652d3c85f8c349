"""Policy applied inside the ingest transaction: stored as queued, suppressed or held.

Pure functions over what the store answers: `Rules` is the store's `Decider`. The store
(`Store.ingest`) asks `Rules.questions` what to look up, answers them inside the ingest
transaction, and `Rules.decide` decides every message of that transaction at once,
each as if the ones before it were already stored: two concurrent duplicates cannot
both slip through, and a storm is counted exactly. No I/O here, no store import beyond
the interface's vocabulary.

- Deduplication: the same dedupe key (explicit: `dedupe_key`, a mail's content and Date slot (`slotted_key`),
  GitHub body hash, alert fingerprints and status; otherwise the normalised text) to the
  same recipient within the window -> `suppressed`, naming the original. Every key
  carries its scope (`dedupe_scope`): keys from the API, a route or mail never meet.
  A key the bridge derives from a text (`text_key`: a legacy Grafana alert, a generic
  route without `dedupe_path`, an API send without `dedupe_key`, a mail without
  headers) or from a mail's content and Date slot cannot tell a retry from a flap:
  ALERTING, OK, ALERTING has the first text's key again. So such a repeat is a
  duplicate only while its key is still its scope's last word to the phone
  (`last_word_scope`); once another text of that scope reached the phone, it is news.
  A sender's own key (API `dedupe_key`, a route's `dedupe_path`, GitHub/GitLab ids,
  alert fingerprints with their episode's start, a Message-ID) says "the same event"
  and keeps the plain rule.
- Storm control: more than `per_recipient` texts to one phone within the window ->
  `held`; the digest worker (`bridge.delivery.digests`) later folds held messages into one SMS.
  A text counts when it reaches the phone: a scheduled one at its `schedule_time`, not
  when it arrives (ten reminders for tomorrow 09:00 neither trip today's limit nor pass
  tomorrow's uncounted: the ones over the limit are held then, for a digest after their
  time), any other when it arrives. A text is held when some window of the phone's
  texts around its time, itself counted, would pass the limit, or when a storm holds the
  phone's texts at its time.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from bridge.config import Config, route_dedupe_window
from bridge.models import NewMessage, State
from bridge.schedule import scheduled_epoch
from bridge.store.api import (
    IngestQuestions,
    Lookups,
    OriginalQuestion,
    Pending,
    StormQuestion,
    StormState,
)

# A key `slotted_key` made: the time slot it was made in, at its end.
_SLOTTED = re.compile(r"@slot(\d+):(-?\d+)$")
_TEXT = "text:"
_TEXT_KEY_CHARS = len(_TEXT) + 24  # `text_key`'s
# The start of a mail's content-and-Date key after its scope (`mail_dedupe_key`), and
# the scopes mail keys carry.
_MAIL_SLOTTED, _MAIL_SCOPES = "sent:", ("mail:", "mail@")


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
                name: route_dedupe_window(r, config.dedupe.window)
                for name, r in config.routes.items()
            },
        )

    def window_for(self, route: str | None) -> float:
        window = self.route_windows.get(route or "", -1.0)
        return self.dedupe_window if window < 0 else window

    def storm_question(self, message: NewMessage, now: float) -> StormQuestion:
        """What storm control asks the store about `message`, arriving at `now`: the
        texts around its time, and whether a storm holds the phone then (any held
        message up to now for a text that goes now; one held within the window before
        it for a text scheduled later: today's storm does not hold tomorrow's text)."""
        at = reaches_phone(message, now)
        window = self.per_recipient_window
        return StormQuestion(message.recipient, at, window, at - window if at > now else 0.0)

    # -- the store's Decider -------------------------------------------------------------
    def questions(self, pending: Sequence[Pending]) -> IngestQuestions:
        """The stored originals and storm counts the decisions of `pending` need."""
        queued = [(m, now) for m, now in _keyed(pending) if m.state == State.QUEUED]
        originals = {
            OriginalQuestion(key, m.recipient, now - window, last_word_scope(m.dedupe_key or ""))
            for m, now in queued
            if (window := self.window_for(m.route)) > 0
            for key in repeated_keys(m.dedupe_key or "")
        }
        storms = {self.storm_question(m, now) for m, now in queued} if self.per_recipient else set()
        return IngestQuestions(originals=sorted(originals), storms=sorted(storms))

    def decide(
        self, lookups: Lookups, pending: Sequence[Pending], ids: Sequence[int]
    ) -> list[NewMessage]:
        """The state each message is stored in (with the reason when not `queued`).

        `pending` are (message, arrival time) in order, to be inserted with `ids`; each
        decision sees the stored rows and the messages before it, exactly as if they had
        been decided and inserted one at a time.
        """
        batch = _Batch(
            rules=self,
            originals=lookups.originals,
            storms=lookups.storms,
            last_words=lookups.last_words,
        )
        out = []
        for message_id, (message, now) in zip(ids, _keyed(pending), strict=True):
            decided = _decide(message, now, batch)
            batch.record(decided, message_id, now)
            out.append(decided)
        return out


def reaches_phone(message: NewMessage, now: float) -> float:
    """When `message`, arriving at `now`, reaches its phone: its schedule, else now."""
    scheduled = scheduled_epoch(message.schedule_time)
    return now if scheduled is None else max(now, scheduled)


def crowded(times: Sequence[float], at: float, window: float, limit: int) -> bool:
    """Would a text at `at` make some window of `window` seconds holding it hold more
    than `limit` texts, with the others' `times`? Any such window, moved later until it
    starts at a text (one of those before `at`, or this one), holds as many or more:
    those are the only ones to look at."""
    starts = [at, *(t for t in times if at - window <= t <= at)]
    return any(sum(1 for t in times if s <= t <= s + window) >= limit for s in starts)


def _keyed(pending: Sequence[Pending]) -> Sequence[Pending]:
    """Every message with a dedupe key (ingest shapes one for each; this covers the rest)."""
    if all(m.dedupe_key for m, _ in pending):
        return pending
    return [
        (m if m.dedupe_key else m._replace(dedupe_key=text_key(m.text)), now) for m, now in pending
    ]


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


def slotted_key(base: str, at: float, slot: int) -> str:
    """`base` in the time slot of `slot` seconds that holds `at` (an epoch): a message
    with such a key repeats one stored with `base` in the same or a neighbouring slot,
    so within `slot` seconds of it always, and never beyond twice that."""
    return f"{base}@slot{slot}:{math.floor(at / slot)}"


def repeated_keys(key: str) -> tuple[str, ...]:
    """The stored keys a message with `key` repeats: itself, and for a `slotted_key` the
    same in the slots either side (a slot's edge must not part a retry from its first)."""
    found = _SLOTTED.search(key)
    if found is None:
        return (key,)
    base, slot, index = key[: found.start()], found.group(1), int(found.group(2))
    return (key, f"{base}@slot{slot}:{index - 1}", f"{base}@slot{slot}:{index + 1}")


def text_key(text: str) -> str:
    """A dedupe key for messages without one: case and spacing do not make news."""
    # Each run of white space as one space, none at the ends: what `re.sub(r"\s+", " ")`
    # and `strip()` made, as both `\s` and `str.split` take str.isspace's characters, at
    # a tenth of the instructions (a regex sub builds a list of pieces; ~3 % of the loop's
    # work on a distinct alert, BENCHMARKS.md, issue #16).
    normalised = " ".join(text.split()).casefold()
    return _TEXT + hashlib.sha256(normalised.encode()).hexdigest()[:24]


def last_word_scope(key: str) -> str:
    """For a key the bridge derived (a scoped `text_key`, a mail's content and Date
    slot), its scope's prefix (`route@kuma:`): a repeat of it is a duplicate only while
    its key is that scope's last word to the phone. "" for any other key: a sender's own
    says what is the same event itself (an alert's carries its episode's start, so its
    flap is news already), and a scheduled text's (its key holds its time after an `@`):
    a reminder's retry must meet its first whatever was scheduled between them, as what a
    phone shows last is not the order they were sent in."""
    # String tests, no regular expression: this runs for every message of every ingest
    # (issue #16). A scope holds no `:` (`dedupe_scope`), so the first ends it.
    colon = key.find(":")
    if colon <= 0:
        return ""  # unscoped: no scope to speak for
    rest = key[colon + 1 :]
    if len(rest) == _TEXT_KEY_CHARS and rest.startswith(_TEXT):
        return key[: colon + 1]
    if key.startswith(_MAIL_SCOPES) and rest.startswith(_MAIL_SLOTTED) and rest.count("@") == 1:
        return key[: colon + 1]  # the one `@` is its slot's: not scheduled
    return ""


@dataclass
class _Batch:
    """What the decisions of one transaction see: the stored rows and the batch so far."""

    rules: Rules
    originals: Mapping[OriginalQuestion, int]  # (key, recipient, since, _) -> stored id
    storms: Mapping[StormQuestion, StormState]  # (recipient, at, ...) -> stored state
    last_words: Mapping[OriginalQuestion, str]  # -> the stored last word of its scope
    # (key, phone) -> [(id, arrival)] of this batch, oldest first
    earlier: dict[tuple[str, str], list[tuple[int, float]]] = field(default_factory=dict)
    # (scope prefix, phone) -> the key of this batch's newest message from that scope to
    # the phone: its last word there once this batch is stored
    said: dict[tuple[str, str], str] = field(default_factory=dict)
    # phone -> when its texts held / let through within this batch reach it
    held: dict[str, list[float]] = field(default_factory=dict)
    let_through: dict[str, list[float]] = field(default_factory=dict)

    def original(self, message: NewMessage, since: float) -> int | None:
        scope = last_word_scope(message.dedupe_key or "")
        keys = repeated_keys(message.dedupe_key or "")
        for key in keys:
            question = OriginalQuestion(key, message.recipient, since, scope)
            found = self.originals.get(question)
            if found is None:
                repeats = self.earlier.get((key, message.recipient), [])
                found = next((i for i, at in repeats if at >= since), None)
            if found is None:
                continue
            if not scope:
                return found
            # The scope's last word to the phone: this batch's, else the store's (known
            # whenever an original is: this batch's own original is one of its words).
            said = self.said.get((scope, message.recipient))
            last = self.last_words.get(question) if said is None else said
            # Not the same key, or one of its slots: another text reached the phone since.
            return found if last in keys else None
        return None

    def storming(self, message: NewMessage, now: float) -> bool:
        question = self.rules.storm_question(message, now)
        _, at, window, held_since = question
        held, stored = self.storms.get(question, (False, ()))
        phone = message.recipient
        held = held or any(held_since <= t <= at for t in self.held.get(phone, []))
        near = [t for t in self.let_through.get(phone, []) if at - window <= t <= at + window]
        return held or crowded([*stored, *near], at, window, self.rules.per_recipient)

    def record(self, message: NewMessage, message_id: int, now: float) -> None:
        pair = (message.dedupe_key or "", message.recipient)
        self.earlier.setdefault(pair, []).append((message_id, now))
        if message.state != State.FAILED:  # a failed text never reached the phone
            # Every key of a scope is its word, whether derived or the sender's own.
            colon = pair[0].find(":")
            self.said[(pair[0][: colon + 1], message.recipient)] = pair[0]
        if message.state == State.HELD:
            self.held.setdefault(message.recipient, []).append(reaches_phone(message, now))
        elif message.state == State.QUEUED:
            self.let_through.setdefault(message.recipient, []).append(reaches_phone(message, now))


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
