"""Reconciliation: settle messages left in `sending` against the provider's /logs.

A crash, a read timeout or a 5xx leaves a message whose fate the provider knows and we
do not. Before anything is sent again, the provider's /logs is read (newest first, from
a little before the oldest claim) and each entry matched by recipient and text, to a
message claimed no later than the entry was created (less CLOCK_SKEW). Entries of one
recipient and text go to our messages in time order, the oldest entry to the oldest,
counting our earlier sends to that recipient the provider took without naming an id:
their entries are theirs, not free for a repeat of the text that never reached it. Every
entry that can be one of them is collected over the walk and paired at its end (or where
it stops), never as read: newest first, the newest entry went to the oldest earlier send,
and the oldest, too old for the repeat, to nothing; the repeat was resent.
/logs is read RECONCILE_DELAY after the outcome became unknown (the answer, or the
timeout), so the provider has logged a request it took slowly; for a text a crash left
mid-call (no answer ever noted), after the claim, the call's timeouts and that delay:

    found in /logs           -> sent, with the provider's id and cost
    5xx, not in /logs        -> retried with the dispatcher's backoff
    unknown, not in /logs    -> sent again, at most `provider.max_unknown_resends`
                                times; then ended `sent`, "outcome unknown", admin warned
    an entry that is it, or  -> (an id-less send to its number /logs may not show yet:
    a send of its text made     the look waits for /logs, YOUNG_SENDS_PATIENCE at most,
    with it: /logs cannot       for an alert storm) neither sent again nor recorded
    tell which yet              sent: looked at again RECONCILE_DELAY on, the wait
                                doubling up to `backoff_max` while it stays so;
                                "outcome unknown", not sent again, after `retry_max_age`
    walk stopped early       -> (more than RECONCILE_MAX_PAGES pages to read, as a bulk of
                                1000 with texts after it; no budget; a 429) what was found
                                recorded, the next step goes on from that page
    /logs unreadable         -> asked again with the dispatcher's backoff (new texts go
                                meanwhile) for `provider.retry_max_age` from the claim
                                (or this reconciler's first look, if later), then as
                                "not in /logs"; a /logs answering 404 (a plan without
                                it) after LOGS_TRIES reads

An unreadable /logs says nothing about the sends: a provider down behind its gateway
answers 502/503 pages to /send and /logs alike, and taking the failed reads for "not
there" spent the resend on the outage and ended the text `sent`, "outcome unknown",
never sent, some 30 seconds into it.

Every /logs page is one request out of the same rate window as the sends.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import tzinfo

from bridge.clock import Clock
from bridge.config import ProviderConfig
from bridge.delivery.leases import renewed
from bridge.delivery.outcomes import MAX_DOUBLINGS, Outcomes
from bridge.delivery.ratelimit import SlidingWindowLimiter
from bridge.errors import (
    ProviderAuthError,
    ProviderError,
    RateLimitedError,
    TransientSendError,
)
from bridge.loops import Stopped, unless_stopped
from bridge.models import Message, State
from bridge.policy.budgets import BudgetGuard
from bridge.provider import logmatch
from bridge.provider.client import ProviderClient
from bridge.provider.logmatch import (
    CLOCK_SKEW,
    SUFFIX_DIGITS,
    LogMatcher,
    number_digits,
    provider_date,
    provider_time,
    same_number,
    same_text,
)
from bridge.provider.responses import LogEntry
from bridge.store import Store

log = logging.getLogger(__name__)
RECONCILE_DELAY = 5.0  # let the provider's /logs catch up before looking there
# How long past its first look a look waits for /logs to show the id-less sends to its
# number (`_after_young_sends`): a storm to one phone sends them closer than that.
YOUNG_SENDS_PATIENCE = 3 * RECONCILE_DELAY
RECONCILE_MAX_PAGES = 10
LOGS_TRIES = 3  # /logs answering 404 this often in a row: it is not there, decide without it
# What `note_unknown` writes on a send whose answer (or timeout) left /logs to settle it.
UNKNOWN_KINDS = ("unknown", "provider-error")


Matcher = LogMatcher[Message, LogEntry]
Candidate = logmatch.Candidate[LogEntry]


def _first_page_of(m: Message, carried: _Carried) -> int:
    """The first page the carried walk read an entry for `m`'s number on (any text: an
    entry fits a longer text it begins), or a large page if none."""
    found = [
        carried.pages.get(entry.id, 1)
        for entry, recipient, *_ in carried.candidates
        if same_number(m.recipient, recipient)
    ]
    return min(found, default=sys.maxsize)


@dataclass(frozen=True)
class _Carried:
    """What a walk cut by its page cap had collected, and where: the next walk goes on
    from where it stopped with them, not from the first page an entry of a text was read
    on (to pair them all again), which stopped at the same cap for good when more than
    the cap lay between a repeat's entry and an earlier send's. `until`: the sends of
    ours it counted (`sent_without_id`); later ones' entries are on pages it skips.
    `young`: those of them /logs might not show yet when it began (`_unsure`)."""

    candidates: list[Candidate]
    pages: dict[str | None, int]
    until: float
    young: frozenset[int]


Found = tuple[int, str | None, float | None]  # (id, provider id, cost): `record_sent`


def _went(m: Message) -> float | None:
    """When a message went to the provider: its claim if unsettled; else its claim or its
    send, the earlier (`sent_at` is when the answer came, after the provider logged it:
    a send answered slowly could not take its own entry)."""
    if m.state == State.SENDING or m.sent_at is None:
        return m.claimed_at
    return m.sent_at if m.claimed_at is None else min(m.claimed_at, m.sent_at)


def _waiting(matcher: Matcher) -> list[Message]:
    """The messages being looked for that the entries collected, paired in time order,
    leave without one; our earlier sends without an id left out (not looked for)."""
    return [m for m in matcher.remaining() if m.state == State.SENDING]


def _new_matcher(messages: list[Message]) -> Matcher:
    """Messages oldest first, our sends the provider answered taking entries first."""
    return LogMatcher(messages, since=_went, answered=lambda m: m.state == State.SENT)


def _unsure(matcher: Matcher, missing: list[Message], young: frozenset[int]) -> list[Message]:
    """Of `missing`, those an entry collected would show if our sends `young` (made less
    than RECONCILE_DELAY before the look: /logs may not show them yet) held none: that
    entry is one of theirs, or the one looked for with one of theirs not shown yet.
    Counted as holding theirs, a send /logs did not show yet took the looked-for text's
    entry (sent again: a second SMS); counted as holding none, the looked-for text took
    a young send's (recorded sent, never sent)."""
    if not young or not missing:
        return []
    without = _new_matcher([m for m in matcher.messages() if m.id not in young])
    without.offer_all(matcher.candidates())
    shown = {m.id for _, m in without.pairs()}
    return [m for m in missing if m.id in shown]


def _missing(matcher: Matcher, found: list[Found]) -> list[Message]:
    """The messages being looked for that the entries collected, paired in time order,
    do not show."""
    done = {message_id for message_id, *_ in found}
    return [m for m in matcher.remaining() if m.state == State.SENDING and m.id not in done]


class Reconciler:
    def __init__(
        self,
        *,
        store: Store,
        client: ProviderClient,
        limiter: SlidingWindowLimiter,
        clock: Clock,
        config: ProviderConfig,
        tz: tzinfo,
        outcomes: Outcomes,
        wake: asyncio.Event,
        budget: BudgetGuard | None = None,
        owner: str,
        lease: float,
        takes_over: Callable[[], bool] = lambda: True,
    ) -> None:
        self.store = store
        self.client = client
        self.limiter = limiter
        self.clock = clock
        self.config = config
        self.tz = tz
        self.outcomes = outcomes
        self.wake = wake
        self.budget = budget
        self._logs_failures = 0
        self.logs_retry_at = 0.0  # /logs failed: when to ask it again (the dispatcher wakes)
        # This reconciler's first step: a text claimed before it (a stop, a takeover) has
        # waited for /logs since then at most, not since its claim (`_wait_for_logs`).
        self._first_look: float | None = None
        self._cut_short = False  # the last walk stopped at its page cap: more to read now
        self._not_ready: float | None = None  # when the first one left not ready may be
        # When to look again for texts a look could not tell from a young send (`_unsure`),
        # and how many looks could not so far (the wait doubles: `_next_unsure_look`).
        self._look_again: dict[int, float] = {}
        self._unsure_looks: dict[int, int] = {}
        # The dispatcher's stop (`Dispatcher.run`): it cuts a /logs read short.
        self.stopping: asyncio.Event | None = None
        # A walk stopped before its end: the page each message it left goes on from.
        self._resume: dict[int, int] = {}
        # What a walk cut by its page cap collected, for the next to go on with (`_Carried`).
        self._carried: _Carried | None = None
        self.owner, self.lease = owner, lease  # whose claims this settles (and takes over)
        self.takes_over = takes_over  # whether it takes over others' (the leader's sweep)
        # The claims in `sending` the last step held: the dispatcher renews them between
        # steps (`held`).
        self._held: list[int] = []

    async def run_once(self) -> float | None:
        """Settle messages left in `sending` by a crash or an unknown outcome.

        Returns a wait when it needs more time or budget before sending anything new
        (the window full, a 429, a refused key); None when new texts may go, a look not
        due yet included (`next_look` says when the dispatcher wakes for it).
        """
        now = self.clock.now()
        if self._first_look is None:
            self._first_look = now
        self._cut_short = False
        self._not_ready = None
        stale = await self.store.unsettled(
            now, owner=self.owner, lease_until=now + self.lease, take_over=self.takes_over()
        )
        self._held = [m.id for m in stale]
        if not stale:
            # Nothing waits for /logs: a retry time a failed read set is spent (its texts
            # left `sending` meanwhile, by another instance or an operator). Kept, it was
            # due for good, and every step of sends ended after one call (`look_due`).
            self.logs_retry_at = 0.0
            return None
        # Held while they are decided: a walk of slow or many /logs pages (ten, each up to
        # the call's timeouts) outlasted the lease, the leader took them over and read
        # /logs for them again, and this walk's decision was dropped as no longer held.
        ids, lease = [m.id for m in stale], self.lease
        async with renewed(
            self.store, self.clock, ids, owner=self.owner, lease=lease, what="a walk"
        ):
            return await self._settle(stale, now)

    async def _settle(self, stale: list[Message], now: float) -> float | None:
        """`run_once` for the messages in `sending` this owner holds, `stale`."""
        looks = {m.id: max(self.look_at(m), self._look_again.get(m.id, 0.0)) for m in stale}
        self._look_again = {i: at for i, at in self._look_again.items() if i in looks}
        self._unsure_looks = {i: n for i, n in self._unsure_looks.items() if i in looks}
        ready = [m for m in stale if looks[m.id] <= now]
        # The rest is looked up at its own time (`next_look`): at the idle wait, a text
        # taken over from a dead instance waited 30 s more once another was settled.
        self._not_ready = min((at for at in looks.values() if at > now), default=None)
        if not ready:
            # New texts go meanwhile; the dispatcher wakes for the look (`next_look`).
            # Answered as a wait, every new alert waited for it: up to the 20 s a text
            # left mid-call by a crash waits after its claim, at a restart.
            return None
        if now < self.logs_retry_at:
            return None  # /logs failed: these wait for it, new texts go meanwhile
        ready, young = await self._after_young_sends(ready, now)
        if not ready:
            return None
        oldest = min(m.claimed_at or now for m in ready)
        # Where the last walk stopped, for the messages it left; from page 1 for those
        # that joined since (newer, or taken over): their entries are read there, and
        # the walk then skips to where the others' can be. Restarted at page 1 for all
        # as soon as one joined, a deep walk under a steady trickle of unknown outcomes
        # (one a minute in an outage) reread its first pages at every step.
        start = {m.id: self._resume.get(m.id, 1) for m in ready}
        self._resume = {}
        carried, self._carried = self._carried, None
        if carried is not None and min(start.values()) == 1:
            # A message joined (new, or taken over): read from the first page, and for
            # the carried ones again from where their entries were, not with them. Left
            # at the page the cut walk stopped at, their entries on the pages the walk
            # then skips to were lost: "not found", a text the provider had sent again.
            for m in ready:
                start[m.id] = min(start[m.id], _first_page_of(m, carried))
            carried = None
        until = now if carried is None else carried.until
        young = young if carried is None else carried.young  # as when the walk began
        matcher = await self._matcher(ready, oldest, until)
        # The matcher collects the entries that can be the messages' over the walk:
        # paired in time order when the walk ends or stops (`_found`).
        pages: dict[str | None, int] = {}  # where each collected entry was read
        if carried is not None:
            await self._go_on_with(carried, matcher, pages)
        # From the oldest any of them went, our earlier sends included: their entries
        # are read too, or the oldest entries went to the repeat.
        # Every message, paired or not: a send paired with a carried entry for now still
        # has its own entry to be read (left out, a send at 23:59 fell off the date).
        first_went = min((_went(m) or now for m in matcher.messages()), default=oldest)
        date_from = provider_date(min(oldest, first_went) - CLOCK_SKEW, self.tz)
        page, reads = min(start.values()), 0
        while _waiting(matcher) and reads < RECONCILE_MAX_PAGES:
            wait = await self.limiter.acquire("reconcile")
            if wait > 0:
                await self._stop_at(page, matcher, pages, start)
                return wait
            try:
                read = self.client.logs(page=page, date_from=date_from)
                logs = await unless_stopped(read, self.stopping)
            except Stopped:  # they stay `sending`: the next start reads /logs for them
                await self._stop_at(page, matcher, pages, start)
                return 0.0
            except ProviderAuthError as exc:
                await self._stop_at(page, matcher, pages, start)
                return await self.outcomes.key_refused(exc)
            except RateLimitedError as exc:
                await self._stop_at(page, matcher, pages, start)
                await self.limiter.rate_limited(exc.retry_after)
                return self.limiter.wait_time("send")
            except ProviderError as exc:
                self._logs_failures += 1
                if exc.status == 404 and self._logs_failures >= LOGS_TRIES:
                    log.error("/logs answered 404 %d times: outcomes stay unknown", LOGS_TRIES)
                    break
                await self._wait_for_logs(exc, now, page, matcher, pages, start)
                return None
            self._logs_failures = 0
            self.logs_retry_at = 0.0
            self.limiter.answered()
            reads += 1
            earliest = await self._match_page(logs.entries, matcher)
            pages.update((e.id, page) for e, *_ in matcher.candidates() if e.id not in pages)
            # The pages still worth reading for each message left without an entry: from
            # where its entry can be, until entries older than its request, or than an
            # earlier send of its text that takes older entries first (`reach`; newest
            # first: not further). A message paired stays so as more entries are read.
            wanted = [
                start[m.id]
                for m in _waiting(matcher)
                if earliest is None or (reach := matcher.reach(m)) is None or earliest >= reach
            ]
            if not logs.has_more or not wanted:
                break
            page = max(page + 1, min(wanted))
        else:
            if _waiting(matcher):
                # The page cap, not the end of what they could be in: not "not found". A
                # bulk of 1000 with texts after it spans more than the cap, and its
                # oldest recipients were texted again.
                self._logs_failures = 0
                await self._stop_at(page, matcher, pages, start)
                # Going on from `page` with what it collected, not back to pair them all
                # again (`_Carried`); what the pairing so far found is recorded above.
                missing = _missing(matcher, self._found(matcher))
                self._resume = {m.id: max(page, start[m.id]) for m in missing}
                self._carried = _Carried(matcher.candidates(), dict(pages), until, young)
                self._cut_short = True  # sends go first; the walk goes on at the next step
                return None
        self._logs_failures = 0
        found = self._found(matcher)
        if found:
            log.info("reconciled %d messages the provider had already accepted", len(found))
            await self._record(found)
        missing = _missing(matcher, found)
        unsure = {m.id for m in _unsure(matcher, missing, young)}
        await self._not_found([m for m in missing if m.id not in unsure])
        await self._look_again_later([m for m in missing if m.id in unsure], now)
        return None

    def held(self) -> list[int]:
        """The claims in `sending` this reconciler held at its last step, waiting for a
        look (or in one): the dispatcher's loop renews them while it sleeps, a look put
        off longer than the lease (a /logs backoff, a storm's unsure look, the 20 s a
        crash's text waits) included. Ids decided since are no longer `sending` under
        this owner: a renewal passes them by."""
        return self._held

    def look_at(self, message: Message) -> float:
        """When /logs may be read for a message in `sending`: RECONCILE_DELAY after its
        outcome became unknown (an answer or a timeout noted it: `note_unknown` wrote
        updated_at then), else after the longest its call could have lasted (a crash
        mid-call: no answer ever noted). Counted from the claim, a read timeout's text
        (unknown `timeout` after it) was looked up at once, before a slow provider had
        logged the request it was still working on: not found, sent again, texted twice."""
        if message.reason_kind in UNKNOWN_KINDS:
            return message.updated_at + RECONCILE_DELAY
        call = self.config.connect_timeout + self.config.timeout
        return (message.claimed_at or 0.0) + call + RECONCILE_DELAY

    def next_look(self, now: float) -> float | None:
        """When the next step has /logs to read for what this one left, for the
        dispatcher's wait (None: nothing, or only what `run_once` returned a wait for):
        at once after a walk cut short by its page cap, which otherwise went on at the
        idle wait, 30 s a cap's worth of pages; when /logs may be asked again after it
        failed; when the first message this step found not ready yet may be looked up."""
        if self._cut_short:
            return now
        looks = [at for at in (self.logs_retry_at, self._not_ready) if at is not None and at > now]
        return min(looks, default=None)

    def look_due(self, now: float) -> bool:
        """Whether a look this step found not due yet, or a /logs read put off after it
        failed, is due by `now`: the dispatcher ends a step of sends for it, which at a
        slow provider's pace (or a hundred texts) lasted long past it. Not a walk cut
        short by its page cap: sends go first there."""
        return any(at is not None and 0 < at <= now for at in (self.logs_retry_at, self._not_ready))

    async def _after_young_sends(
        self, ready: list[Message], now: float
    ) -> tuple[list[Message], frozenset[int]]:
        """`ready` less the texts to a number that an id-less send went to less than
        RECONCILE_DELAY ago (new texts go while a look waits): /logs may not show that
        send yet, and our sends take their entries first, so it took the entry of the
        text looked for, "not found" and sent again. Those are looked up once /logs has
        caught up with it (`next_look`), or YOUNG_SENDS_PATIENCE past their first look:
        alerts to one phone closer than RECONCILE_DELAY (a storm, from a provider that
        never names ids) put it off for as long as they came. Returned with the ready:
        the sends /logs may not show yet, for `_unsure`."""
        young = await self.store.sent_without_id(
            sorted({m.recipient for m in ready}), since=now - RECONCILE_DELAY, until=now
        )
        caught_up: dict[str, float] = {}
        for sent in young:
            at = (sent.sent_at or now) + RECONCILE_DELAY
            if at > now:
                caught_up[sent.recipient] = max(at, caught_up.get(sent.recipient, at))
        held = {
            m.id: min(caught_up[m.recipient], self.look_at(m) + YOUNG_SENDS_PATIENCE)
            for m in ready
            if m.recipient in caught_up and now < self.look_at(m) + YOUNG_SENDS_PATIENCE
        }
        self._wake_at(list(held.values()))
        pending = frozenset(s.id for s in young if s.recipient in caught_up)
        return [m for m in ready if m.id not in held], pending

    def _wake_at(self, looks: list[float]) -> None:
        """Texts left for a later look: the dispatcher wakes for the first (`next_look`)."""
        if looks:
            self._not_ready = min([*looks, *([self._not_ready] if self._not_ready else [])])

    def _overdue(self, messages: list[Message], now: float) -> list[Message]:
        """Those of `messages` that have waited for /logs to settle them `retry_max_age`:
        since their claim, or since this reconciler's first look if later (counted from
        the claim, a text left `sending` by a stop longer than that was decided at the
        first look after the restart)."""
        return [m for m in messages if self._overdue_at(m, now) <= now]

    def _overdue_at(self, message: Message, now: float) -> float:
        """When `message` will have waited for /logs `retry_max_age` (`_overdue`)."""
        since = self._first_look if self._first_look is not None else now
        return max(message.claimed_at or now, since) + self.config.retry_max_age

    async def _look_again_later(self, unsure: list[Message], now: float) -> None:
        """Texts whose entry /logs may show, or may be a young send's (`_unsure`): neither
        sent again (a second SMS, if it went) nor recorded sent (never sent, if it did
        not), but looked up again once those sends show (`_next_unsure_look`). Still so
        after `retry_max_age` (a storm of their very text that long), they end `sent`,
        "outcome unknown", not sent again: an entry of their text beyond every send we
        settled is in /logs, so the phone got that text, theirs or the same one again."""
        overdue = {m.id for m in self._overdue(unsure, now)}
        later = [m for m in unsure if m.id not in overdue]
        for m in later:
            self._look_again[m.id] = self._next_unsure_look(m, now)
        self._wake_at([self._look_again[m.id] for m in later])
        if overdue:
            await self._settle_unknown(
                sorted(overdue),
                "outcome unknown: its text is in the provider's logs, but as this or as an"
                " alert sent with it the logs never told; not sent again",
                "among alerts of its text",
            )

    def _next_unsure_look(self, message: Message, now: float) -> float:
        """When to look again for a text a look could not tell from a young send:
        RECONCILE_DELAY on, doubling with each look that could not, up to
        `backoff_max`; never past when it is overdue (it ends then, not sent again). At
        RECONCILE_DELAY each time, a storm of its text with /logs lagging read /logs
        every 5 s for as long as it lasted, up to `retry_max_age`: 196 requests in a
        10-minute storm (a fifth of the window every send shares). Looked up late once
        the storm ends, a text that never went is sent late; its phone had that text
        then (the entry that left it unsure is of its text, to its number)."""
        looks = self._unsure_looks.get(message.id, 0)
        self._unsure_looks[message.id] = looks + 1
        doubled = RECONCILE_DELAY * 2 ** min(looks, MAX_DOUBLINGS)
        wait = max(RECONCILE_DELAY, min(self.config.backoff_max, doubled))
        return max(now, min(now + wait, self._overdue_at(message, now)))

    async def _go_on_with(
        self, carried: _Carried, matcher: Matcher, pages: dict[str | None, int]
    ) -> None:
        """Offer a walk what the last one collected before its page cap, less entries
        recorded since as some message's (the stop records what it found)."""
        ids = [entry.id for entry, *_ in carried.candidates]
        known = await self.store.known_provider_ids(ids)
        free = [one for one in carried.candidates if one[0].id not in known]
        for entry in matcher.offer_all(free):
            pages[entry.id] = carried.pages.get(entry.id, 1)

    async def _matcher(self, ready: list[Message], oldest: float, until: float) -> Matcher:
        """The messages to look for, with our earlier sends that the provider took without
        naming an id to the same recipients: their entries are not free to take.

        Only ids already stored were excluded, so a repeat of an id-less send (another
        dedupe key, one text) that never reached the provider took the earlier one's
        entry, and was recorded sent, then delivered. Each entry of a recipient and text
        now goes to the oldest message it can be (sent or claimed no later than the entry,
        less CLOCK_SKEW), our sends without an id first (each has an entry for sure; the
        text looked for may have none): what is left of them is the text looked for.
        """
        # Up to now (`until`, unless a walk goes on), not the newest claim: a send of the
        # text made while these waited for their look (new texts go meanwhile) has its
        # entry too.
        earlier = await self.store.sent_without_id(
            sorted({m.recipient for m in ready}), since=oldest - 2 * CLOCK_SKEW, until=until
        )
        return _new_matcher(sorted([*ready, *earlier], key=lambda m: (_went(m) or until, m.id)))

    def _found(self, matcher: Matcher) -> list[Found]:
        """What the entries collected show, paired in time order (`LogMatcher.pairs`):
        the messages being looked for that the provider took, with its id and cost."""
        return [
            (m.id, entry.id, entry.cost) for entry, m in matcher.pairs() if m.state == State.SENDING
        ]

    async def _match_page(self, entries: list[LogEntry], matcher: Matcher) -> float | None:
        """Collect the entries of one page of /logs that can be the messages in `matcher`
        (paired when the walk ends or stops); returns when the page's oldest entry was
        created."""
        earliest: float | None = None  # the oldest entry on the page
        known = await self.store.known_provider_ids([e.id for e in entries])
        # One set for the walk: /logs may shift between two pages (new sends push entries
        # on), and an entry read twice must not be taken for two repeats.
        known.update(entry.id for entry, *_ in matcher.candidates())
        for entry in entries:
            created = provider_time(entry.created_at, self.tz)
            if created is not None:
                earliest = created if earliest is None else min(earliest, created)
            if entry.id in known:
                continue
            if matcher.offer(entry, entry.recipient, entry.message, created):
                known.add(entry.id)
        return earliest

    def _resume_at(
        self,
        page: int,
        missing: list[Message],
        candidates: list[Candidate],
        pages: dict[str | None, int],
        start: dict[int, int],
    ) -> dict[int, int]:
        """Where a walk stopped before its end goes on for each message it left: from
        `page`, or from where its entry can be if further (entries only move to later
        pages, so resuming skips none); from the first page an entry of its recipient and
        text was collected on, if earlier: the next walk pairs them in time order again."""
        by_tail: dict[str, list[Candidate]] = {}  # a bulk's thousand: not each against each
        for one in candidates:
            by_tail.setdefault(number_digits(one[1])[-SUFFIX_DIGITS:], []).append(one)
        resume = {}
        for m in missing:
            at = max(page, start[m.id])
            for entry, recipient, text, *_ in by_tail.get(m.recipient[-SUFFIX_DIGITS:], []):
                if same_number(m.recipient, recipient) and same_text(m.text, text):
                    at = min(at, pages.get(entry.id, at))
            resume[m.id] = at
        return resume

    async def _wait_for_logs(
        self,
        exc: ProviderError,
        now: float,
        page: int,
        matcher: Matcher,
        pages: dict[str | None, int],
        start: dict[int, int],
    ) -> None:
        """/logs failed mid-walk: what the pages read found is recorded, what has waited
        for /logs too long is decided without it, and the rest waits for it to answer."""
        # What the pages read showed is settled now (dropped, it stayed `sending`
        # and was resent once overdue: a second SMS of a text the provider had).
        found = self._found(matcher)
        if found:
            await self._record(found)
        # Only what has waited for /logs as long as a retry may last is decided
        # without it (`_overdue`); the rest waits for /logs to answer.
        missing = _missing(matcher, found)
        overdue = self._overdue(missing, now)
        # The rest goes on from this page when /logs answers again (from page 1,
        # a 503 deep in a bulk's pages sent the walk back over what it had read).
        waits = [m for m in missing if m not in overdue]
        self._resume = self._resume_at(page, waits, matcher.candidates(), pages, start)
        # The backoff paces the reads for what waits. With every one decided here nothing
        # does: an outcome that comes after is looked up at its `look_at`,
        # not at the backoff (up to backoff_max: a resend's look, and the next resend of
        # an alert the provider never got, put off as long). The count of failed reads
        # stays: should that look fail too, its backoff goes on from it.
        self.logs_retry_at = (
            now + self.outcomes.backoff(self._logs_failures + 1) if self._resume else 0.0
        )
        log.warning("cannot read /logs to reconcile %d messages: %s", len(missing), exc)
        if overdue:
            patience = self.config.retry_max_age
            log.error("/logs unreadable for %.0fs (%s): outcomes stay unknown", patience, exc)
            await self._not_found(overdue)

    async def _stop_at(
        self,
        page: int,
        matcher: Matcher,
        pages: dict[str | None, int],
        start: dict[int, int],
    ) -> None:
        """A walk stopped before its end (the page cap, no budget, a 429): what it found
        is recorded, and the next step goes on from `page` for the rest, or from where
        one's entry can be if that is further (entries only move to later pages, so
        resuming skips none); messages that join them meanwhile start at page 1."""
        found = self._found(matcher)
        if found:
            log.info("reconciled %d messages the provider had already accepted", len(found))
            await self._record(found)
        missing = _missing(matcher, found)
        self._resume = self._resume_at(page, missing, matcher.candidates(), pages, start)

    async def _record(self, found: list[Found]) -> None:
        """Record `found` as sent, less the entries another instance recorded meanwhile
        for a text of its own: its walk and this one read the entry before either
        recorded it (each counts only its own texts, not the other's still `sending`),
        and both took it, one text recorded sent that never went. Those stay `sending`,
        neither decided nor missing: the next step looks again, that entry known.
        (A read just before the other's write still races it; the window is that short,
        not a walk's pages.)"""
        known = await self.store.known_provider_ids([pid for _, pid, _ in found if pid])
        if mine := [one for one in found if one[1] not in known]:
            await self.outcomes.record_sent(mine)

    async def _not_found(self, missing: list[Message]) -> None:
        """/logs did not show these: retry a provider error; resend an unknown outcome
        at most `max_unknown_resends` times, then end it `sent`, "outcome unknown"."""
        if not missing:
            return
        now = self.clock.now()
        errors = [m for m in missing if m.reason_kind == "provider-error"]
        if errors:
            await self.outcomes.retry_later(
                errors, TransientSendError("provider error, and not in its logs")
            )
        unknown = [m for m in missing if m.reason_kind != "provider-error"]
        cap = self.config.max_unknown_resends
        again = [m.id for m in unknown if m.unknown_resends < cap]
        # Logged and warned of from the store's answer: rows another instance took over
        # meanwhile are its to resend or settle (and to warn of); here not_held says them.
        if again:
            resent = f"outcome unknown and not in the provider's logs: resent (at most {cap})"
            late = await self.store.resend_unknown(again, now, resent, owner=self.owner)
            self.outcomes.not_held(late, resent)
            if len(late) < len(again):
                log.warning(
                    "%d messages not found in the provider's logs: sending again",
                    len(again) - len(late),
                )
        given_up = [m.id for m in unknown if m.unknown_resends >= cap]
        if given_up:
            await self._settle_unknown(
                given_up,
                f"outcome unknown: sent {cap + 1} times, the provider's answers and logs"
                " never said whether it went; not sent again",
                f"after {cap} resends",
            )

    async def _settle_unknown(self, ids: list[int], settled: str, why: str) -> None:
        """End these `sent`, "outcome unknown" (`settled` says why, `why` in the log), not
        sent again; the admin is warned."""
        late = await self.store.settle_unknown(ids, self.clock.now(), settled, owner=self.owner)
        self.outcomes.not_held(late, settled)
        given_up = [i for i in ids if i not in late]
        if given_up:
            log.error(
                "outcome of %d messages unknown %s: not sent again (%s)",
                len(given_up),
                why,
                given_up[:20],
            )
            if self.budget is not None and await self.budget.warn(
                "unknown-outcome",
                f"sms-bridge: {len(given_up)} texts have an unknown outcome (the provider"
                " did not say whether they went); see messages in state sent, reason"
                " 'outcome unknown'",
            ):
                self.wake.set()
