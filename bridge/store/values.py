"""The values the store interface (`bridge.store.api`) speaks in: the policy's questions
and the store's answers at ingest, what claims, bookings and pauses return, stats, and
who owns a claim. Plain data: every backend builds them, every caller reads them.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from bridge.models import NewMessage

# -- ingest: the policy's questions and the store's answers ------------------------------


class OriginalQuestion(NamedTuple):
    """Is there a stored message with this dedupe key to this recipient since `since`?

    With `last_of` (a key prefix: the scope a key the bridge derived carries, `route@kuma:`),
    and such a message found: also the key of the newest message (not failed) to the
    recipient whose key starts with `last_of`, that scope's last word to the phone
    (`Lookups.last_words`).
    """

    dedupe_key: str
    recipient: str
    since: float
    last_of: str = ""


class StormQuestion(NamedTuple):
    """Which texts reach this recipient from `at - window` to `at + window`, and does a
    storm hold its texts at `at` (a message held whose time is from `held_since` to
    `at`)? A text's time is its `schedule_time` when it has one (when it reaches the
    phone), else when it was stored."""

    recipient: str
    at: float
    window: float
    held_since: float


class StormState(NamedTuple):
    held: bool  # messages to this recipient wait for a storm digest (see the question)
    # When each text let through to it (queued, sending, sent, delivered; no digest)
    # reaches it, within the question's span.
    times: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class IngestQuestions:
    """What policy needs to know about stored messages to decide a batch.

    A shared backend serialises on exactly these (a lock per dedupe key and recipient,
    per storm recipient) before answering, so that two instances deciding the same alert
    at the same instant cannot both let it through.
    """

    originals: Sequence[OriginalQuestion] = ()
    storms: Sequence[StormQuestion] = ()


@dataclass(frozen=True, slots=True)
class Lookups:
    """The store's answers to `IngestQuestions`, read inside the ingest transaction.

    `originals`: the first stored message (lowest `created_at`, not failed) each question
    repeats; questions without one are absent. `last_words`: for each question with
    `last_of` and an original, the key of the newest stored message (by `created_at`,
    then id; not failed) to the recipient whose key starts with `last_of`. It is never
    older than the original (which is one), so the store finds it walking the
    recipient's messages back from the newest, no further than the original.
    `storms`: an entry for every question.
    """

    originals: Mapping[OriginalQuestion, int]
    storms: Mapping[StormQuestion, StormState]
    last_words: Mapping[OriginalQuestion, str] = field(default_factory=dict)


Pending = tuple[NewMessage, float]  # a message to store, and when it arrived


class Decider(Protocol):
    """Policy as seen by the store: pure functions, no I/O, no store import."""

    def questions(self, pending: Sequence[Pending]) -> IngestQuestions:
        """What the decisions of `pending` need to know about stored messages."""
        ...

    def decide(
        self, lookups: Lookups, pending: Sequence[Pending], ids: Sequence[int]
    ) -> list[NewMessage]:
        """Each message of `pending` as it is to be stored (its state and reason), given
        the answers and the ids the messages get (`ids[i]` is `pending[i]`'s)."""
        ...


class Stored(NamedTuple):
    id: int
    message: NewMessage  # as decided and stored


# -- what some operations answer ---------------------------------------------------------


class Booking(NamedTuple):
    """One provider request booked in the persisted rate window."""

    seq: int  # increases with each booking: a reader asks for those after the last it saw
    at: float
    kind: str  # send, status, reconcile, probe, pricing; "cli:..." from `sms-bridge provider`


class Pause(NamedTuple):
    until: float  # every provider request of every instance waits until then
    reason: str  # "429 from the provider", "provider refused the key: ..."


@dataclass(frozen=True, slots=True)
class Held:
    """A message held by storm control, as a digest counts (and attributes) it."""

    id: int
    topic: str | None
    text: str
    instance: str | None
    token: str | None = None  # the [tokens.NAME] that sent it: the digest may carry it
    route: str | None = None  # the [routes.NAME] it came by: the digest may carry it


@dataclass(frozen=True, slots=True)
class MetricCounts:
    by_source_state: list[tuple[Any, ...]]  # (source, state, count)
    by_reason: list[tuple[Any, ...]]  # (state, reason kind, count): held, suppressed, failed
    # When the queued message due the longest became due (its due_at, bridge.store.totals):
    # ahead of now when every queued one waits for its time.
    oldest_due: float | None
    parts_sent: int
    cost: float


@dataclass(frozen=True, slots=True)
class StoreStats:
    """Write counters since open: their ratio is the group-commit batch size."""

    transactions: int  # transactions committed
    writes: int  # write operations committed (several may share one transaction)
    # Why the store takes no write until the process restarts (SQLite's failed sync of
    # its WAL), or None: /healthz asks for the restart.
    broken: str | None = None


# -- the interface -----------------------------------------------------------------------


# -- who claims ----------------------------------------------------------------------
DEFAULT_LEASE = 30.0  # seconds a claim holds before another instance may take it over


def instance_name(configured: str = "") -> str:
    """This process as an owner of claims: `configured` (`cluster.instance`) or, without
    one, host name and pid; and a random tag. Names alone are not unique where it
    matters: every container runs the bridge as pid 1, replicas given one `hostname:`
    (or sharing the host's network) or one `cluster.instance` (a ConfigMap every pod
    reads) were one owner, each taking the other's claims in flight for its own
    (checked in /logs and sent again: texted twice)."""
    named = configured or f"{socket.gethostname()}:{os.getpid()}"
    return f"{named}:{secrets.token_hex(3)}"


def sent_late(owner: str, provider_id: str | None) -> str:
    """The event `mark_sent` writes for a send the provider accepted on a row `owner` no
    longer held (both backends say it alike): a possible double send, in the message's
    history for the operator."""
    return (
        f"sent also by {owner} after its claim was taken over:"
        f" provider id {provider_id or 'none given'}"
    )


def not_applied(owner: str, detail: str, *, queued: bool = False) -> str:
    """The event an outcome write leaves on a message `owner` no longer held (another
    instance took its claim over, or the message already moved on): what `owner` learnt
    is kept in the message's history, its row is not rewritten. Both backends alike.
    `queued`: a decision on a queued message `owner` never claimed (a daily cap), which
    found it claimed by another instance, or moved on, in between: "no longer held"
    would say it had held it."""
    if queued:
        return f"not applied, {owner} found it no longer queued: {detail}"
    return f"not applied, {owner} no longer held it: {detail}"


def ended(state: str, reason: str | None) -> str:
    """A final state with its reason, as `not_applied` notes a `finish` it did not write."""
    return f"{state}: {reason}" if reason else str(state)


def requeued(reason: str | None) -> str:
    """A `requeue` as `not_applied` notes it."""
    return f"queued again: {reason}" if reason else "queued again"
