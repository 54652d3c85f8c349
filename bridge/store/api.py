"""The store as an interface of operations: what the bridge asks of its storage.

Every caller outside `bridge.store` (ingress, policy, delivery, ops, the CLI) speaks to
the store only through these operations, never through a connection, so a backend
(SQLite embedded, PostgreSQL shared by a cluster) is one implementation of `Store` and
nothing above it changes. `bridge.store.open_store` picks the implementation from config.

Guarantees every implementation keeps:
- An operation that writes returns only once its change is durable (committed and
  flushed as the backend does it: SQLite a commit, then an fdatasync of its WAL,
  PostgreSQL a committed transaction): the caller may acknowledge (SMTP 250, HTTP 202)
  right after.
- Each operation is atomic: all of its change or none of it.
- A storage failure raises `bridge.errors.StoreUnavailable` (nothing was changed; but
  for SQLite's failed sync of its WAL, after which what the sync covered may or may not
  be on disk and the store takes no more writes until the bridge restarts: a caller
  that retries meets its first attempt in the dedupe window, if it was kept); any
  other exception comes from a caller's function (a decider, a digest builder) and leaves
  nothing changed either.
- Every state change of a message leaves a row in its event log (`events`).
- Times are epoch seconds from the caller's clock (`bridge.clock`), never the backend's:
  tests drive time by hand, and a cluster's instances agree through NTP as they must for
  the provider's window anyway.

Cluster notes (for a shared backend; SQLite, one process, may ignore them): `claim`
carries an owner and a lease; `unsettled` hands back the owner's own unsettled messages
and those whose lease has passed; `ingest` and `queue_once` must decide under a lock on
what they ask about (see `IngestQuestions`); `book_request` counts and books in one
atomic step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from bridge.models import Message, NewMessage, State
from bridge.store.values import (
    DEFAULT_LEASE,
    Booking,
    Decider,
    Held,
    IngestQuestions,
    Lookups,
    MetricCounts,
    OriginalQuestion,
    Pause,
    Pending,
    Stored,
    StoreStats,
    StormQuestion,
    StormState,
    instance_name,
)
from bridge.store.window import Stamp


class Lifecycle(Protocol):
    async def open(self) -> None:
        """Connect and make the schema usable; raise StoreUnavailable (unreachable, not
        writable, a schema this build does not know) with a message that says which.
        SQLite applies its migrations here (embedded: nobody else would)."""
        ...

    async def migrate(self) -> list[str]:
        """Apply the migrations this build knows and the store lacks (after `open`);
        the names applied, [] when up to date. Safe to run twice or concurrently. A
        backend that migrates at `open` (SQLite) reports what that open applied."""
        ...

    async def close(self) -> None:
        """Wait for the writes under way, then release connections and threads."""
        ...

    def stats(self) -> StoreStats:
        """Write counters, read without I/O (for /metrics)."""
        ...

    async def heartbeat(self, now: float) -> None:
        """A real, durable write (readiness probe): fails as ingest would (full disk,
        lost server), where an empty transaction would still pass."""
        ...


class IngestOperations(Protocol):
    async def ingest(self, pending: Sequence[Pending], decider: Decider) -> list[Stored]:
        """Decide and insert `pending` in one transaction; durable on return.

        Inside that transaction the store reserves ids, asks `decider.questions`,
        answers them (`Lookups`), calls `decider.decide` and inserts what it returns. The
        decision sees every message committed before and none committed after it: two
        concurrent ingests never both miss each other (SQLite: one writer; a cluster:
        locks on the questions). An implementation may decide several concurrent
        `ingest` calls in one transaction (group commit): it then passes their messages
        in call order to one `decide`, as if they had come in one call.
        """
        ...

    async def queue_once(self, messages: Sequence[NewMessage], now: float) -> bool:
        """Insert `messages` as given unless a stored message has their (first message's)
        dedupe key, in one transaction; whether it inserted (a warning once a day)."""
        ...

    async def held_phones(self) -> list[tuple[str, float]]:
        """Each recipient with held messages, and the earliest time one of them was to
        reach it: its `schedule_time` if it has one, else its `created_at`."""
        ...

    async def fold_held(
        self,
        recipient: str,
        now: float,
        digest: Callable[[list[Held]], NewMessage],
        reason: Callable[[int], str],
    ) -> tuple[int, int] | None:
        """In one transaction: the recipient's held messages (oldest first) whose time
        (as `held_phones`) is not after `now` become one queued digest built by `digest`
        (a pure function), each ends `suppressed` with `reason(digest_id)`; one
        scheduled for later waits for a digest after its time. (digest id, how many folded), or None
        when none was held (and nothing is written)."""
        ...


class DeliveryOperations(Protocol):
    async def due(self, now: float, limit: int, *, texts: int | None = None) -> list[Message]:
        """Queued messages due at `now`, oldest due first: candidates, not yet claimed.
        Of the oldest `limit`; with `texts`, only those of their first `texts` texts
        (text, sender, type): `bridge.store.due`."""
        ...

    async def next_due_at(self) -> float | None:
        """When the earliest queued message is due; None when nothing is queued."""
        ...

    async def next_due_after(self, after: float) -> float | None:
        """When the first queued message not yet due at `after` becomes due (the pacer
        holds messages that are due already, so `next_due_at` would not move)."""
        ...

    async def claim(
        self,
        ids: Sequence[int],
        now: Stamp,
        *,
        owner: str,
        lease_until: float,
        request_kind: str = "send",
        limit: int | None = None,
        window: float = 0.0,
    ) -> list[int]:
        """queued -> sending for those of `ids` still queued (attempts + 1, claimed_at =
        now), and one provider request of `request_kind` booked, in one transaction; the
        ids claimed, in the order asked. Two claims of one id never both get it (a
        cluster: row locks, SKIP LOCKED). `owner` holds them until `lease_until`; past it
        another instance may take them over through `unsettled`. With `limit`, booked as
        `book_request` books: a pause or a full window claims and books nothing ([]), nor
        does a claim that gets no id (no request will be made). `now` may be the caller's
        clock, read once the store holds the connection and the rate lock: the claim's
        and the booking's time, `lease_until` moved on by the time the wait took."""
        ...

    async def unsettled(
        self, now: float, *, owner: str, lease_until: float, take_over: bool = True
    ) -> list[Message]:
        """Messages in `sending` this owner must settle (look for in /logs): its own,
        and, with `take_over` (the leader), those whose owner's lease passed before
        `now`, which it takes over (lease renewed to `lease_until`, in the same
        transaction). One process (SQLite): every message in `sending`."""
        ...

    async def renew(self, ids: Sequence[int], *, owner: str, lease_until: float) -> None:
        """Those of `ids` that `owner` still holds in `sending` are held until
        `lease_until`: a provider call that outlasts the lease must not be taken over
        and resent while it is in flight. One process (SQLite): nothing to do."""
        ...

    async def next_lease_expiry(self, owner: str) -> float | None:
        """When the first claim of another owner runs out, so an idle instance wakes to
        take it over then (a dead instance tells no one). None: no such claim (SQLite:
        one process, never)."""
        ...

    # The outcomes of a send (mark_sent, finish, requeue, note_unknown, resend_unknown,
    # settle_unknown) take the `owner` whose claim the send was made under, and write
    # only rows that owner still holds: `sending` under its claim (mark_sent also a row
    # back in `queued`, which nobody holds: the send happened, no resend). A row another
    # instance took over (a lapsed lease: a frozen process, a clock behind), put back in
    # the queue, or already in a later state, is theirs: it is not rewritten (its
    # schedule, reason and attempt count included), and what the late owner learnt (a
    # send, a refusal, a retry, an unknown outcome) is kept as an event on the message
    # (`not_applied`, `sent_late`). finish and requeue with `queued=True` are decisions on
    # queued rows the caller never claimed (a daily cap): they write rows still `queued`
    # and note the others alike. Each returns the ids that got such an event, for the
    # caller to log as a warning. SQLite (one process): every claim is the owner's; the
    # state rule is the same.
    async def mark_sent(
        self, results: Iterable[tuple[int, str | None, float | None]], now: float, *, owner: str
    ) -> list[int]:
        """(id, provider message id, cost) -> sent at `now`, reason cleared, for the rows
        still in `sending` under `owner`'s claim, or back in `queued` (nobody holds them:
        the send happened, so no resend). A send the provider accepted is a fact, but a
        row another instance took over (a lapsed lease), or already past `sending`
        (sent, delivered, failed), is theirs: it is left as it is, and gets an event
        (`sent_late`) naming `owner` and the provider id, unless it already carries that
        id (the taker found this very send in /logs). The ids that got that event, in
        the order given: possible double sends, for the caller to log. SQLite (one
        process): every claim is `owner`'s; the state rule is the same."""
        ...

    async def note_unknown(
        self, ids: Sequence[int], now: float, reason: str, kind: str, *, owner: str
    ) -> list[int]:
        """A send whose outcome /logs must settle: stays `sending`, with why and how,
        and updated_at = `now`, when it became unknown (the reconciler looks in /logs
        RECONCILE_DELAY after it); only rows `owner` still holds in `sending` (the rule
        above; the ids noted)."""
        ...

    async def resend_unknown(
        self, ids: Sequence[int], now: float, reason: str, *, owner: str
    ) -> list[int]:
        """`owner`'s sending rows -> queued, due now, no longer claimed, counting one
        resend of an unsettled outcome; the ids noted instead (the rule above)."""
        ...

    async def settle_unknown(
        self, ids: Sequence[int], now: float, reason: str, *, owner: str
    ) -> list[int]:
        """`owner`'s sending rows -> sent without provider id, reason kind `unknown`: the
        last word; the ids noted instead (the rule above)."""
        ...

    async def requeue(
        self,
        ids: Sequence[int],
        now: float,
        *,
        owner: str,
        at: float,
        reason: str | None,
        refund_attempt: bool = False,
        solo: bool | None = None,
        reason_kind: str | None = None,
        queued: bool = False,
        due: bool = False,
    ) -> list[int]:
        """`owner`'s sending rows (with `queued`: queued rows; the rule above) -> queued,
        due at `at`, no longer claimed by anyone; `refund_attempt` when the send never
        really ran (its claim's attempt; a row no longer held keeps its count); `solo` /
        `reason_kind` replace the stored ones when given; with `due`, `at` is also when
        it becomes due (its `due_at`: a daily cap's hold or its schedule kept by the
        bridge; never a retry's backoff). The ids noted instead."""
        ...

    async def finish(
        self,
        updates: Iterable[tuple[int, State, str | None]],
        now: float,
        *,
        owner: str,
        reason_kind: str | None = None,
        queued: bool = False,
    ) -> list[int]:
        """Final states (failed) with their reasons, as `owner` decided them (a refusal,
        a retry given up; with `queued`, a daily cap met before any claim), for the rows
        it may write (the rule above: its own `sending` claims, or with `queued` rows
        still `queued`); the ids noted instead."""
        ...

    async def record_status(
        self, updates: Iterable[tuple[int, State, str | None]], now: float
    ) -> None:
        """The provider's delivery reports (the status poller): `sent` -> delivered or
        failed, with their reasons. Only rows still `sent`: a report is about a text the
        provider took, whoever sent it, and a row already reported keeps its state."""
        ...

    async def awaiting_status(
        self,
        *,
        since: float,
        limit: int,
        scheduled_after: str = "",
        after: tuple[float, int] = (0.0, 0),
    ) -> list[Message]:
        """`sent` messages sent after `since`, or scheduled (UTC text) after
        `scheduled_after`, oldest first (by sent_at, then id), with or without a provider
        id; only those after `after` (a sent_at and id) in that order."""
        ...

    async def known_provider_ids(self, provider_ids: Sequence[str]) -> set[str]:
        """Which of these provider ids a stored message already carries."""
        ...

    async def sent_without_id(
        self, recipients: Sequence[str], *, since: float, until: float
    ) -> list[Message]:
        """`sent` messages to one of `recipients` that the provider took without naming
        an id (not those ended "outcome unknown"), sent between `since` and `until`,
        oldest first: their /logs entries are not free for reconciliation to take."""
        ...

    async def sent_after(self, message: Message) -> int:
        """How many messages reached the provider after `message` (its /logs position):
        later `sent_at`, or the same one and a higher id."""
        ...

    async def set_provider_ids(self, rows: Iterable[tuple[int, str]]) -> None:
        """(id, provider id) for sent messages that had none (matched in /logs)."""
        ...


class RateWindow(Protocol):
    """The provider's sliding request window, persisted so that a restart (or another
    process, or in a cluster another instance) counts what was already spent."""

    async def record_request(self, at: float, kind: str) -> None:
        """Book one request unconditionally (the caller's limiter allowed it)."""
        ...

    async def book_request(self, at: Stamp, kind: str, *, limit: int, window: float) -> float:
        """Atomically: if no pause is in force at `at` and fewer than `limit` requests
        are booked in (at - window, at], book this one and return 0.0; else book nothing
        and return the seconds until the pause ends or the oldest of them leaves the
        window (`bridge.store.window.wait_to_book`). A cluster does it under one lock per
        API key, so N instances never book more than `limit` together. `at` may be the
        caller's clock, read once the store holds what the booking waited for."""
        ...

    async def restamp_request(self, at: float, kind: str, to: float) -> None:
        """Move one booking of `kind` stamped `at` to `to` (later): its call came back
        then. The provider counts a request when it arrives, after the booking; stamped
        when its call returned or failed, it stays in the window until the provider's
        count has dropped it. Two bookings alike (time and kind) are interchangeable:
        either moves. None left at `at` (pruned, or moved already): nothing."""
        ...

    async def request_rows(
        self, since: float, kind_prefix: str = "", after: int = 0
    ) -> list[Booking]:
        """Bookings at or after `since` (strictly after), kinds starting with
        `kind_prefix`, `seq` greater than `after`; oldest first."""
        ...

    async def prune_requests(self, before: float) -> None:
        """Forget bookings at or before `before` (they left every window)."""
        ...

    async def pause_requests(self, until: float, reason: str) -> None:
        """Every instance's bookings wait until `until` (a 429, a refused key); the
        later of two pauses holds. Durable: a restart honours it too."""
        ...

    async def requests_paused_until(self, now: float) -> Pause | None:
        """The pause in force at `now` (until > now) and why; None when there is none."""
        ...


class BilledPrices(Protocol):
    """What the provider's bills said a part costs, kept across restarts and shared by
    every instance (`bridge.pricing.PriceBook.billed`): where no price list is known,
    the cost cap prices a country by them."""

    async def billed_prices(self) -> dict[int, tuple[float, float]]:
        """The price of a part last billed per country calling code, and when; under 0
        (no country has it), the most any part was billed, and when (it falls a day
        after: the PriceBook recalling it needs that time too)."""
        ...

    async def record_billed(self, prices: Mapping[int, float], now: float) -> None:
        """Keep a bill's prices: each country's replaces the one before (prices change);
        0's (the most any part was billed) is raised by a higher bill, and replaced by
        any bill once it is `pricing.BILLED_MAX_FOR` (a day) old: a price cut lowers it."""
        ...


class Queries(Protocol):
    """What the API, the console, budgets and metrics read, and the operator's actions."""

    async def get(self, message_id: int) -> Message | None: ...

    async def in_state(self, ids: Sequence[int], state: str) -> set[int]:
        """Those of `ids` in `state` now, read at once (not a `get` each)."""
        ...

    async def events(self, message_id: int) -> list[dict[str, Any]]:
        """The message's event log, oldest first: at, state, attempts, detail."""
        ...

    async def query(
        self,
        *,
        state: str | None = None,
        limit: int = 100,
        before_id: int | None = None,
        reason_kind: str | None = None,
        route: str | None = None,
        source: str | None = None,
        recipient: str | None = None,
        text: str | None = None,
        number: str | None = None,
        since: float | None = None,
        not_reason_kind: str | None = None,
    ) -> list[Message]:
        """Newest first; `recipient` and `text` match anywhere in the field, any case,
        taken literally (no wildcards). `number` is one whole recipient, looked up through
        `messages_recipient` and so newest by creation time (`before_id` continues after
        that message in the same order): a substring search reads the table newest first
        until the page is full, ~150 ms on a million messages for a rare number.
        `reason_kind` "other" (models.OTHER_REASON) is what `counts_by_reason` counts so:
        held, suppressed and failed messages with no kind recorded. `since`: created at
        or after it; `not_reason_kind`: any reason kind but that one (none too), as the
        console's delivery figures leave out the cancelled (`FAILED_NOT_CANCELLED`)."""
        ...

    async def recent_failures(self, limit: int) -> list[Message]:
        """Failed messages, the latest failure first (`updated_at`: a failed message
        changes no more until retried), then the newest id. Cancelled ones are left out,
        as `overview`'s delivery answers leave them out: an operator's act, not a
        delivery that failed."""
        ...

    async def counts(self) -> dict[str, int]:
        """Stored messages by state (states with none are absent); from running totals
        (bridge.store.totals), not a count of every row."""
        ...

    async def counts_by_reason(self) -> dict[str, dict[str, int]]:
        """{state: {reason kind or "other": count}} for held, suppressed and failed."""
        ...

    async def counts_for_metrics(self) -> MetricCounts: ...

    async def spent_since(
        self, since: float, exclude_source: str
    ) -> tuple[float, list[tuple[str, int]]]:
        """Cost of what was sent since `since` (the provider's cost, else the estimate),
        and the (recipient, parts) of the sent rows with neither, for the caller to price.
        Texts in flight (`sending`) count as sent, whenever claimed: another instance's
        call under way spends the same day's budget, and its send is stamped today.
        A text of an unknown outcome sent again counts once for every attempt (the
        provider may have billed each: its answer was lost, not its bill), from its
        latest claim today, whatever it ended as."""
        ...

    async def used_since(
        self,
        since: float,
        exclude_source: str,
        route: str | None = None,
        *,
        token: str | None = None,
    ) -> tuple[int, int]:
        """Texts and parts sent since `since`, of one route and/or one API token if given;
        in flight counts as sent, as in `spent_since`. The parts of a text of an unknown
        outcome sent again count once for every attempt, as its cost does; the text once."""
        ...

    async def retry(
        self, ids: Sequence[int] | None, now: float, *, by: str | None = None
    ) -> list[int]:
        """failed -> queued, due now, sent alone (these ids, or every failed one when
        None); `by` names who asked, in the event log. The ids changed."""
        ...

    async def release_budget_holds(
        self, now: float, detail: str, *, waiting_for: str = ""
    ) -> list[int]:
        """Messages waiting for the next day's caps (queued, reason kind `budget`, due
        later) due at `now`, to be judged again (a reload changed the caps), each with an
        event saying `detail`; the ids changed. With `waiting_for`, only those whose
        reason holds it (a price known now frees what waited for one, not what waits for
        another cap: released, those were held again, an event each, at every price)."""
        ...

    async def cancel(self, ids: Sequence[int], now: float, *, by: str) -> list[int]:
        """queued or held -> failed, "cancelled by BY"; the ids changed. A message in
        `sending` is never cancelled: the provider may have it."""
        ...

    async def note(self, ids: Sequence[int], detail: str, now: float) -> None:
        """An event row per message that changes no state (who did what)."""
        ...

    async def activity(self, since: float, bucket: float) -> dict[str, dict[int, int]]:
        """Per `bucket` seconds since `since`: provider requests by kind, and under
        "messages" the messages sent."""
        ...

    async def overview(self, *, now: float, day_start: float, since: float) -> dict[str, Any]:
        """Queue age, delivery answers since `since`, the day's sends and spend."""
        ...

    async def held_storms(self) -> list[dict[str, Any]]:
        """Recipients with held messages: recipient, held, first_at; oldest first."""
        ...

    async def queued_piles(self, scan: int, minimum: int) -> list[dict[str, Any]]:
        """Recipients with `minimum` or more of the `scan` queued messages due first:
        recipient, queued (of those `scan`); most first. Bounded by `scan` (the
        messages_due index), not a count of every queued row: a provider paused for an
        hour leaves a queue the overview would read on every refresh."""
        ...

    async def route_last_messages(self, routes: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The newest stored message of each of `routes` that has one: route, id, state,
        created_at. Asked per route (an index), not of every message ever stored."""
        ...

    async def mentioned_by(self, message_id: int, limit: int = 200) -> list[dict[str, Any]]:
        """Suppressed messages whose reason names this one as "message N": duplicates
        and what a digest folded; not a loop's, whose reason quotes a mail's header."""
        ...

    async def purge(self, before: float) -> int:
        """Retention: delete messages created before `before` that reached their end
        (sent, delivered, failed, suppressed), with their events; how many."""
        ...

    async def upkeep(self) -> None:
        """The store's own bookkeeping, hourly on the leader whatever `store.retention`
        says: PostgreSQL folds the running totals of server connections that are gone
        into one row per key (left, they grow with every reconnection for months)."""
        ...


class Leadership(Protocol):
    """One role (the singletons: status polling, digests, retention, takeovers) held by
    one instance of a cluster at a time. Driven by the caller every few seconds."""

    async def check(self) -> bool:
        """Take the role if nobody holds it, or confirm it is still held: True while this
        instance leads. Never raises for a lost store: an instance that cannot confirm
        does not lead (another may take over)."""
        ...

    async def resign(self) -> None:
        """Give the role up (shutdown): another instance may take it at once."""
        ...


class WorkWatch(Protocol):
    """Hears that another instance made messages due (PostgreSQL: LISTEN / NOTIFY)."""

    async def check(self) -> bool:
        """Listen if not listening yet (again, after the connection dropped): True while
        listening. A (re)start calls the wake-up once: what was said meanwhile is lost."""
        ...

    async def close(self) -> None: ...


class Coordination(Protocol):
    """What several instances on one store agree through it. One process (SQLite): it
    always leads and nobody else makes work."""

    def leadership(self, role: str, *, holder: str) -> Leadership:
        """The role `role` as `holder` (this instance's name, for the logs) would hold it;
        nothing is taken before the first `check`."""
        ...

    def watch_work(self, wake: Callable[[], None]) -> WorkWatch:
        """Call `wake` when another instance stores messages that are due now (ingest,
        warnings, digests, retries); nothing is connected before the first `check`."""
        ...

    def budget_turn(self) -> AbstractAsyncContextManager[None]:
        """Held around the daily caps' decision and the claim that follows it: one
        instance of the cluster at a time, so that two instances counting today's use
        at once cannot both spend the last of a cap. Raises StoreUnavailable if the
        turn cannot be had (the dispatcher's step then fails and is retried)."""
        ...


class Store(
    Lifecycle,
    IngestOperations,
    DeliveryOperations,
    RateWindow,
    BilledPrices,
    Queries,
    Coordination,
    Protocol,
):
    """Everything the bridge asks of its storage; see the module docstring."""


__all__ = [
    "DEFAULT_LEASE",
    "BilledPrices",
    "Booking",
    "Coordination",
    "Decider",
    "DeliveryOperations",
    "Held",
    "IngestOperations",
    "IngestQuestions",
    "Leadership",
    "Lifecycle",
    "Lookups",
    "MetricCounts",
    "OriginalQuestion",
    "Pause",
    "Pending",
    "Queries",
    "RateWindow",
    "Store",
    "StoreStats",
    "Stored",
    "StormQuestion",
    "StormState",
    "WorkWatch",
    "instance_name",
]
