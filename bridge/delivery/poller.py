"""The delivery-status poller: `sent` -> `delivered` or `failed`, from the provider's /logs.

The provider has no delivery callback, and /logs costs requests out of the same budget
as sending, so the poller takes at most `status.budget_share` of it and stops asking
about a message after `status.give_up_after` (it then stays `sent`, its last known state);
a scheduled message is asked about until `give_up_after` past its scheduled time. A
message the provider took without giving an id is found by recipient and text (the same
tolerant matching as reconciliation), and keeps the id found. Repeats of one text to one
phone get their entries in time order, the oldest entry to the oldest send, over every
entry the walk read that can be one of them (`LogMatcher.pairs`): /logs lists the
newest first, and settled as read the newest entry went to the oldest send (their ids
and states swapped), and an older entry, too old for the newer send, to none. A walk
that has found them all still reads on until entries older than any of them went (less
CLOCK_SKEW): an older entry changes which entry is whose. Nothing is paired from a walk
cut short (the page cap, the budget, an error): the next round goes on with it from the
page where it stopped, with what it collected (`_Walk`), and pairs once it is whole.
Each round starting over, an id-less send whose walk ended a page past a round's last
(a backlog of phones off above it) was never paired.

A round reads at most `MAX_PAGES_PER_ROUND` pages, from the page of the newest message
waiting. When the waiting span more pages than that (a bulk of 1000, the phone of one of
its last recipients off), the next round goes on from the page where this one stopped,
down to the page after the oldest's, then starts again at the newest: every waiting
message's page is read once a sweep. Starting each round at the newest never reached
the oldest while a newer one waited (up to `give_up_after`). A round tracks at most
`MAX_TRACKED_PER_ROUND` waiting messages, the oldest first; once a sweep has read theirs,
the next tracks the ones after them, and after the newest the oldest again: every
waiting message is looked for in turn, however many never get a final state. A page that could not be
read (a 429, after its Retry-After; a 5xx) is where the next round starts. Entries only
ever move to later pages (/logs is newest first), so resuming skips nothing.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from bridge.clock import Clock, zone
from bridge.config import ProviderConfig, StatusConfig
from bridge.delivery.ratelimit import SlidingWindowLimiter
from bridge.errors import (
    ProviderAccountError,
    ProviderAuthError,
    ProviderError,
    ProviderInactiveError,
    RateLimitedError,
)
from bridge.health import ProviderHealth
from bridge.loops import LoopHealth, Stopped, run_steps, unless_stopped
from bridge.models import Message, State
from bridge.provider.client import MAX_LOGS_PER_PAGE, ProviderClient
from bridge.provider.logmatch import Candidate, LogMatcher, provider_date, provider_time
from bridge.provider.responses import REASON_CHARS, LogEntry, status_kind
from bridge.schedule import STORED_FORMAT
from bridge.store import Store

log = logging.getLogger(__name__)
FINAL_PROVIDER_STATES = {"delivered": State.DELIVERED, "failed": State.FAILED}  # status_kind's
# A message whose entry shows a status neither final nor in flight (`status_kind`
# "unknown"): asked about again after a minute, then doubling up to 15 minutes. At the
# poll interval, one such text read /logs 12 times a minute for `give_up_after` (48 h).
UNKNOWN_STATUS_FIRST = 60.0
UNKNOWN_STATUS_MAX = 900.0
MAX_PAGES_PER_ROUND = 5
# Oldest first; more could not be matched in one round of MAX_PAGES_PER_ROUND pages anyway.
MAX_TRACKED_PER_ROUND = 500
START = (0.0, 0)  # track from the oldest waiting


def _went(m: Message) -> float | None:
    """When a sent message went: its claim or its send, the earlier (`sent_at` is when
    the answer came, after the provider logged it)."""
    if m.claimed_at is None or m.sent_at is None:
        return m.sent_at if m.claimed_at is None else m.claimed_at
    return min(m.claimed_at, m.sent_at)


@dataclass(frozen=True)
class _Walk:
    """The id-less messages' walk over /logs that a round left before it was whole, for
    the next to go on with: the entries it collected, the messages it pairs (`members`),
    when it began, and the page it goes on from.

    A message that went after it began is left to the next walk: its entry is above the
    page it goes on from, never read by this one. One that joins it otherwise (tracked
    once older ones are done, or committed by another instance late) is counted, so
    that it holds its entry among theirs in time order, but not paired by it: its
    entry can be on a page read before it joined, not collected, and an older entry of
    its text then taken for its own."""

    candidates: list[Candidate[LogEntry]]
    members: frozenset[int]
    began: float
    page: int


def _reads_on(id_less: LogMatcher[Message, LogEntry], earliest: float | None) -> bool:
    """Whether entries older than `earliest` (a page's oldest) can still change the
    id-less messages' pairing: one could be created after an id-less message went (less
    CLOCK_SKEW, `LogMatcher.reach`), paired or not: stopped once each had an entry, the
    newest entries were paired among them, and an older one of theirs never read."""
    if earliest is None:
        return bool(id_less.remaining())
    for m in [*id_less.remaining(), *(m for _, m in id_less.pairs())]:
        reach = id_less.reach(m)
        if reach is None or earliest >= reach:
            return True
    return False


class StatusPoller:
    def __init__(
        self,
        *,
        store: Store,
        client: ProviderClient,
        limiter: SlidingWindowLimiter,
        clock: Clock,
        config: StatusConfig,
        provider: ProviderConfig,
        health: ProviderHealth,
        loops: LoopHealth | None = None,
    ) -> None:
        self.loops = loops or LoopHealth()  # its failed steps, for /metrics and /healthz
        self.tz = zone(provider.timezone)  # the provider's /logs dates; fixed until restart
        self.store = store
        self.client = client
        self.limiter = limiter
        self.clock = clock
        self.config = config
        self.health = health
        # The page the next round starts from when the last one stopped at its page cap
        # (or its budget) with messages still to find; 0: from the newest again.
        self._resume_page = 0
        # Which waiting messages a round tracks: those after this (sent_at, id), oldest
        # first (see the module docstring).
        self._track_after = START
        self._walk: _Walk | None = None  # the id-less walk a round left unfinished
        # Messages whose entry showed an unknown status: (when to ask again, the gap).
        self._parked: dict[int, tuple[float, float]] = {}
        self._seen_unknown: dict[int, str] = {}  # this round's: message id -> status
        # The rows a /logs page holds: as asked (100) until a provider serves fewer on a
        # page that has more after it. The pages skipped to reach the oldest waiting are
        # counted in them: counted in 100s, a provider serving 20 had them skipped past.
        self._page_rows = MAX_LOGS_PER_PAGE
        self._stopping: asyncio.Event | None = None  # `run`'s: it cuts a /logs read short

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until `stop` (on a cluster's leader: bridge.delivery.cluster)."""
        self._stopping = stop
        await run_steps(
            self.run_once,
            name="status poller",
            clock=self.clock,
            stop=stop,
            retry_after=self.config.poll_interval,
            health=self.loops,
        )

    async def run_once(self) -> float:
        """One round over /logs; returns seconds until the next round."""
        now = self.clock.now()
        tracked = await self._tracked(now)
        waiting = self._unparked(tracked, now)
        self.limiter.status_demand = bool(waiting)
        if not waiting:
            self._resume_page = 0
            if tracked:
                return self._all_parked(tracked, now)
        if not waiting or not self.health.ready:
            return self.config.poll_interval
        await self.limiter.sync()  # the window as every instance booked it
        by_id = {m.provider_message_id: m for m in waiting if m.provider_message_id}
        oldest = min(m.sent_at or now for m in waiting)
        date_from = provider_date(oldest - 86400, self.tz)
        # /logs is newest first. The tracked messages are the oldest waiting, so skip the
        # pages that hold what we sent after them (less one page of slack for entries
        # from other clients of the same account), instead of rereading the newest.
        newest = max(waiting, key=lambda m: (m.sent_at or now, m.id))
        first_page = max(1, await self.store.sent_after(newest) // self._page_rows)
        # The page after the oldest's (the same slack), or at least a round's worth: a
        # sweep covers them all, a round at a time (see the module docstring).
        oldest_waiting = min(waiting, key=lambda m: (m.sent_at or now, m.id))
        deepest = max(
            first_page + MAX_PAGES_PER_ROUND - 1,
            await self.store.sent_after(oldest_waiting) // self._page_rows + 2,
        )
        # A walk left unfinished goes on unless this round starts above where it stopped
        # (the sweep starting over), past `deepest` too (below). Further down, the pages
        # skipped hold only entries newer than every waiting message (`first_page`).
        walk, self._walk = self._walk, None
        start = first_page
        if first_page < self._resume_page <= max(deepest, walk.page if walk else 0):
            start = self._resume_page
        if walk is not None and start < walk.page:
            walk = None
        began = now if walk is None else walk.began
        # Oldest first by when they went, as the pairing reads them; not those that went
        # after the walk began (`_Walk`).
        id_less: LogMatcher[Message, LogEntry] = LogMatcher(
            sorted(
                (m for m in waiting if not m.provider_message_id and (_went(m) or now) <= began),
                key=lambda m: (_went(m) or now, m.id),
            ),
            since=_went,
        )
        members = frozenset(m.id for m in id_less.messages()) if walk is None else walk.members
        if walk is not None:
            await self._go_on_with(walk, id_less)
        # The matcher collects the entries that can be the id-less messages': paired in
        # time order once the walk has read its pages (`LogMatcher.pairs`).
        updates: list[tuple[int, State, str | None]] = []
        found_ids: list[tuple[int, str]] = []
        # Whether the walk read as deep as an id-less message's entry can be: paired
        # before, on a round a budget, an error or the page cap cut short, a send took a
        # newer repeat's entry (its own on a page not read), kept its id for good, and
        # the repeat, its entry known, was "not found" by the reconciler and sent again.
        id_less_read = False
        for page in range(start, start + MAX_PAGES_PER_ROUND):
            # Past the oldest's page only while the id-less walk is not whole: an id-less
            # send right after a burst (a bulk, another client's) has a page's worth of
            # entries within CLOCK_SKEW below its own; stopped at `deepest` and started
            # over, it was never paired.
            if page > deepest and (id_less_read or not id_less.messages()):
                break
            self._resume_page = 0  # from the newest again, unless said below
            if await self.limiter.acquire("status") > 0:
                self._resume_page = page  # nothing read: this page first, next round
                break
            try:
                read = self.client.logs(page=page, per_page=MAX_LOGS_PER_PAGE, date_from=date_from)
                logs = await unless_stopped(read, self._stopping)
            except Stopped:  # a stop, or the lead lost: nothing read, this page first
                self._resume_page = page
                break
            except ProviderError as exc:
                # Nothing read: this page first, next round. From the newest again, a
                # 429 whenever the sweep got this deep kept it from the oldest for good.
                self._resume_page = page
                await self._failed(exc)
                break
            self.limiter.answered()
            if logs.has_more and 0 < logs.rows < self._page_rows:
                self._page_rows = logs.rows
            earliest = await self._match_page(logs.entries, by_id, id_less, updates)
            id_less_read = not logs.has_more or not _reads_on(id_less, earliest)
            if (not by_id and id_less_read) or not logs.has_more:
                break
            # Unless a later page of this round reaches the end of /logs or finds them
            # all, the next round goes on from the next page: starting at the newest
            # again would never reach the oldest while a newer message waits.
            self._resume_page = page + 1
        walking = not id_less_read and bool(id_less.messages())
        self._end_round(tracked, deepest, walking)  # parked too: the next 500 after them
        if walking and self._resume_page:
            self._walk = _Walk(id_less.candidates(), members, began, self._resume_page)
        for entry, m in id_less.pairs() if id_less_read else []:
            if m.id in members:
                found_ids.append((m.id, entry.id))
                self._final_state(entry, m, updates)
        if found_ids:
            await self.store.set_provider_ids(found_ids)
        if updates:
            await self.store.record_status(updates, self.clock.now())
        await self._park_unknown()
        return max(self.config.poll_interval, self.limiter.wait_time("status"))

    def _unparked(self, tracked: list[Message], now: float) -> list[Message]:
        """Of the tracked messages, those to ask about now: not parked by an unknown
        status (`_park_unknown`), or parked and due again. The parked of messages that
        no longer wait (settled, given up) are forgotten once every waiting one is seen."""
        if self._track_after == START and len(tracked) < MAX_TRACKED_PER_ROUND:
            ids = {m.id for m in tracked}
            self._parked = {i: at for i, at in self._parked.items() if i in ids}
        return [m for m in tracked if self._parked.get(m.id, (0.0, 0.0))[0] <= now]

    def _all_parked(self, tracked: list[Message], now: float) -> float:
        """Every tracked message is parked: no /logs read until the first is due again,
        and the next round tracks those after them if these were as many as a round
        tracks (500 parked kept every newer message from being asked about)."""
        if len(tracked) == MAX_TRACKED_PER_ROUND:
            self._track_after = max((m.sent_at or 0.0, m.id) for m in tracked)
            return self.config.poll_interval
        due = min(self._parked[m.id][0] for m in tracked)
        return max(self.config.poll_interval, due - now)

    async def _park_unknown(self) -> None:
        """Park the messages whose entry showed an unknown status this round: asked about
        again a gap later, the gap doubling (UNKNOWN_STATUS_FIRST to _MAX). Not final:
        the provider may still report one. Noted in the message's events when first seen."""
        seen, self._seen_unknown = self._seen_unknown, {}
        now = self.clock.now()
        first: dict[str, list[int]] = {}
        for message_id, status in seen.items():
            _, gap = self._parked.get(message_id, (0.0, 0.0))
            if not gap:
                first.setdefault(status, []).append(message_id)
            gap = min(UNKNOWN_STATUS_MAX, 2 * gap) if gap else UNKNOWN_STATUS_FIRST
            self._parked[message_id] = (now + gap, gap)
        for status, ids in first.items():
            log.info("provider reports status %r for messages %s: not final", status, ids)
            await self.store.note(
                ids,
                f"provider reports status {status!r}, not one the bridge knows: still sent,"
                f" asked about less often (up to every {UNKNOWN_STATUS_MAX:g}s)",
                now,
            )

    async def _tracked(self, now: float) -> list[Message]:
        """The messages this round tracks: those waiting for a final state after the
        last round's, or from the oldest again once past the newest."""
        horizon = now - self.config.give_up_after
        scheduled_after = datetime.fromtimestamp(horizon, UTC).strftime(STORED_FORMAT)
        waiting = await self.store.awaiting_status(
            since=horizon,
            limit=MAX_TRACKED_PER_ROUND,
            scheduled_after=scheduled_after,
            after=self._track_after,
        )
        if not waiting and self._track_after != START:  # past the newest: the oldest again
            self._track_after, self._resume_page = START, 0
            waiting = await self.store.awaiting_status(
                since=horizon, limit=MAX_TRACKED_PER_ROUND, scheduled_after=scheduled_after
            )
        return waiting

    async def _go_on_with(self, walk: _Walk, id_less: LogMatcher[Message, LogEntry]) -> None:
        """Offer the walk's entries again, less those recorded since as some message's (the
        reconciler's, say: a text it found in /logs)."""
        known = await self.store.known_provider_ids([entry.id for entry, *_ in walk.candidates])
        id_less.offer_all(one for one in walk.candidates if one[0].id not in known)

    async def _match_page(
        self,
        entries: list[LogEntry],
        by_id: dict[str, Message],
        id_less: LogMatcher[Message, LogEntry],
        updates: list[tuple[int, State, str | None]],
    ) -> float | None:
        """Match one page of /logs to the tracked messages: the final states of those
        with an id (taken out of `by_id`) into `updates`, the entries that can be the
        id-less ones' collected in `id_less` (paired in time order at the round's end).
        Returns when the page's oldest entry was created."""
        earliest: float | None = None
        looking = bool(id_less.remaining() or id_less.candidates())
        known = await self.store.known_provider_ids([e.id for e in entries]) if looking else set()
        # One set for the round: /logs may shift between two pages (new sends push
        # entries on), and an entry read twice must not be taken for two repeats.
        known.update(entry.id for entry, *_ in id_less.candidates())
        for entry in entries:
            created = provider_time(entry.created_at, self.tz)
            if created is not None:
                earliest = created if earliest is None else min(earliest, created)
            m = by_id.pop(entry.id, None)
            if m is not None:
                self._final_state(entry, m, updates)
            elif (
                looking
                and entry.id not in known
                and id_less.offer(entry, entry.recipient, entry.message, created)
            ):
                known.add(entry.id)
        return earliest

    def _final_state(
        self, entry: LogEntry, m: Message, updates: list[tuple[int, State, str | None]]
    ) -> None:
        """`m`'s state from its entry: final ones into `updates` (a failure with the
        provider's word: "undelivered", "expired"); an unknown status noted to park it."""
        kind = status_kind(entry.status)
        if kind in FINAL_PROVIDER_STATES:
            reason = None if kind == "delivered" else f"provider reports {entry.status}"
            updates.append(
                (m.id, FINAL_PROVIDER_STATES[kind], reason[:REASON_CHARS] if reason else None)
            )
        if kind == "unknown":
            self._seen_unknown[m.id] = entry.status[:REASON_CHARS]
        else:
            self._parked.pop(m.id, None)

    def _end_round(self, waiting: list[Message], deepest: int, walking: bool) -> None:
        """Where the next round starts: from the newest page again once the sweep read
        the oldest's (and the id-less walk is whole: not `walking`), and then with the
        messages waiting after these."""
        if self._resume_page > deepest and not walking:
            self._resume_page = 0  # the sweep read the oldest's page
        if self._resume_page == 0:
            # Swept: the next round tracks the waiting after these, if these were as many
            # as a round tracks, else the oldest again. Tracking only the oldest kept
            # every newer message from being matched while 500 waited (phones off, a
            # network that never reports): their states unread for `give_up_after`.
            last = max((m.sent_at or 0.0, m.id) for m in waiting)
            self._track_after = last if len(waiting) == MAX_TRACKED_PER_ROUND else START

    async def _failed(self, exc: ProviderError) -> None:
        """A /logs read that failed: a 429 pauses every request (Retry-After, else a
        doubling backoff: `wait_time` then says when to go on), a refused key turns
        health red; anything else (a 404 from /logs included) waits for the next round."""
        if isinstance(exc, RateLimitedError):
            await self.limiter.rate_limited(exc.retry_after)
        elif isinstance(exc, ProviderAuthError):
            inactive = isinstance(exc, ProviderInactiveError)
            account = isinstance(exc, ProviderAccountError)
            self.health.auth_failed(str(exc), self.clock.now(), inactive=inactive, account=account)
        else:
            log.info("status poll failed: %s", exc)
