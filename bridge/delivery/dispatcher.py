"""The dispatcher: queued messages -> provider requests, within the rate budget.

Each step (`run_once`, arq's burst mode) claims what is due, coalesces messages with the
same text, sender and type into `/send-bulk` calls of up to `max_bulk` recipients (a lone
recipient goes through `/send`), books every request in the rate window the store keeps
for every instance (`bridge.delivery.ratelimit`) before sending it, and hands each answer to `bridge.delivery.outcomes`, which says what it
does to the messages (sent, failed, retried, checked in /logs) and to sending.

Messages found in `sending` (a crash, a read timeout) are reconciled the same way
(`bridge.delivery.reconcile`, before anything new is sent), so a restart does not text
anyone twice where the provider's /logs can tell, and never more than once more where it
cannot.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Callable

from bridge.clock import Clock, zone
from bridge.config import ProviderConfig
from bridge.delivery.leases import renewed
from bridge.delivery.outcomes import Outcomes
from bridge.delivery.pacing import GroupKey, group_key, hold, plan_batches, text_of
from bridge.delivery.ratelimit import SlidingWindowLimiter
from bridge.delivery.reconcile import RECONCILE_DELAY, Reconciler
from bridge.errors import (
    PermanentSendError,
    ProviderAuthError,
    ProviderError,
    RateLimitedError,
    TransientSendError,
)
from bridge.health import ProviderHealth
from bridge.loops import LoopHealth, run_steps
from bridge.models import Message, State
from bridge.policy.budgets import UNKNOWABLE, BudgetGuard, Cap, day_bounds
from bridge.pricing import PriceBook
from bridge.provider.client import ProviderClient
from bridge.provider.responses import SendResult
from bridge.schedule import for_provider, held_until
from bridge.store import Store
from bridge.store.api import DEFAULT_LEASE, instance_name

log = logging.getLogger(__name__)
LEASE_SLACK = 0.5  # after another instance's lease runs out, look this much later
IDLE_WAIT = 30.0  # nothing queued: look again this often even without a wake-up
# A text held for more recipients: the queue is read again this often at most, however
# long the hold. Wake-ups before then go unanswered (each acknowledgement of its flood
# wakes us), so an alert of another text that came meanwhile waited for the hold's end:
# up to a minute with one request left in the window. Each read judges the hold again:
# with no more recipients coming, it shortens (the held text went at 46 s, not 60.5 s),
# within the limit as every send is.
HOLD_LOOK = 5.0
DUE_BATCH = 5000
PRICES_REFRESH = 86400.0  # the price list is fetched again daily: prices change
PRICES_RETRY_FIRST = 60.0  # after a failed fetch, again this much later, doubling
PRICES_RETRY_MAX = 3600.0
HOLDS_PAGE = 1000  # texts waiting for midnight read per query at start
# The event of each text waiting for midnight released (judged again by the next step).
RAISED_AT_START = "daily caps raised while the bridge was stopped: judged again at start"
PRICED_NOW = "a price is known now (today's spend was unknown): judged again"
# How often an instance that knows a price looks for texts another instance held for one
# (`release_holds`): that instance may be gone for good, and nobody watched for them.
PRICE_HOLDS_LOOK = 60.0
# Texts held again after a release whose events are read for a release elsewhere by a
# higher cap (`_mismatched`), per cap and step: a reload releases the whole day's overflow.
MISMATCH_LOOKS = 3
FOREIGN_PREFIX = "cli"  # request kinds booked by `sms-bridge provider ...` in the store


class Dispatcher:
    def __init__(
        self,
        *,
        store: Store,
        client: ProviderClient,
        limiter: SlidingWindowLimiter,
        clock: Clock,
        config: ProviderConfig,
        health: ProviderHealth,
        budget: BudgetGuard | None = None,
        prices: PriceBook | None = None,
        rng: random.Random | None = None,
        owner: str = "",
        lease: float = DEFAULT_LEASE,
        takes_over: Callable[[], bool] = lambda: True,
        loops: LoopHealth | None = None,
    ) -> None:
        self.loops = loops or LoopHealth()  # its failed steps, for /metrics and /healthz
        self._budget_loaded = False
        self._holds_judged = False  # the texts waiting for midnight, at start
        self.store = store
        self.budget = budget
        self.prices = prices
        self.client = client
        self.limiter = limiter
        self.clock = clock
        self.config = config
        self.health = health
        self.wake = asyncio.Event()
        # The stop `run` was given: a step sends batch after batch (up to DUE_BATCH texts,
        # each a request of up to the provider's timeouts), and a shutdown that waited
        # for them all outlasted any stop grace (Docker's 10 s, the unit's
        # TimeoutStopSec). Only the request under way is finished.
        self._stopping: asyncio.Event | None = None
        # Who holds this dispatcher's claims, and for how long without news of it: a
        # shared store lets another instance take over claims whose lease has passed.
        self.owner = owner or instance_name()
        self.lease = lease
        self.outcomes = Outcomes(
            owner=self.owner,
            store=store,
            limiter=limiter,
            clock=clock,
            config=config,
            health=health,
            wake=self.wake,
            budget=budget,
            rng=rng,
        )
        # When to fetch the price list (again): at once, then daily; after a failure
        # sooner, backing off (`_load_prices`). Never without a book to fill.
        self._prices_due: float | None = None if prices is None else 0.0
        self._prices_retry = PRICES_RETRY_FIRST
        self._last_call: dict[GroupKey, float] = {}  # each text's last call, for pacing
        self._held_until = 0.0  # a text held for more recipients: wake-ups wait till then
        self._price_holds_at = 0.0  # when to look for others' texts waiting for a price
        self.tz = zone(config.timezone)
        self.reconciler = Reconciler(
            store=store,
            client=client,
            limiter=limiter,
            clock=clock,
            config=config,
            tz=self.tz,
            outcomes=self.outcomes,
            wake=self.wake,
            budget=budget,
            owner=self.owner,
            lease=lease,
            takes_over=takes_over,
        )

    @property
    def balance(self) -> float | None:
        """The provider's last word on it."""
        return self.outcomes.balance

    async def load_budget(self) -> None:
        """Take the requests booked before a restart (and by other instances) into the
        window, and forget those that left every window; recall the prices bills taught."""
        await self.store.prune_requests(self.clock.now() - 2 * self.limiter.window)
        await self.limiter.sync()
        if self.budget is not None:  # the prices the bills taught before the restart
            await self.budget.recall_prices()
        await self._judge_holds_at_start()

    async def _judge_holds_at_start(self) -> None:
        """The texts waiting for midnight, judged again at start only if a cap they ran
        into was raised (or removed) while the bridge was stopped. Every start released
        them all as "changed by a reload", and held again those still over: two events
        of a reload that never was in each one's history, at every restart."""
        if self.budget is None or self._holds_judged:
            return
        now = self.clock.now()
        reasons: set[str] = set()
        before: int | None = None
        while True:  # the day's overflow at most, read once a start
            page = await self.store.query(
                state="queued", reason_kind="budget", limit=HOLDS_PAGE, before_id=before
            )
            reasons |= {m.reason or "" for m in page if m.next_attempt_at > now}
            if len(page) < HOLDS_PAGE:
                break
            before = page[-1].id
        self._holds_judged = True
        if self.budget.raised_over(reasons):
            await self._release(self.budget.judged(RAISED_AT_START, self.owner))

    # -- the loop ------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        self._stopping = self.reconciler.stopping = stop

        async def step() -> float:
            # In the loop, not before it: a store that cannot be read at start (or any
            # error) is retried, not the end of the dispatcher.
            if not self._budget_loaded:
                await self.load_budget()
                self._budget_loaded = True
            return await self.run_once()

        # Renewed only by the steps, an unknown outcome waiting for its look longer than
        # the lease (the steps sleep until then) was taken over by the leader, which looked
        # at once: past a /logs backoff, a storm's put-off look, another read of the window.
        held = self.reconciler.held
        async with renewed(
            self.store, self.clock, held, owner=self.owner, lease=self.lease, what="/logs looks"
        ):
            await run_steps(
                step,
                name="dispatcher",
                clock=self.clock,
                stop=stop,
                retry_after=5.0,
                wake=self.wake,
                health=self.loops,
            )

    async def run_once(self) -> float:
        """One step: send what is due and within budget; return seconds until the next."""
        await self.release_holds()
        now = self.clock.now()
        if now < self._held_until:
            # A text is held for more recipients. During its flood every acknowledgement
            # wakes us, and re-reading the queue on each took a third of ingest's speed
            # (bench/flood.py); what arrives meanwhile goes when the hold ends.
            return self._held_until - now
        wait = self.limiter.wait_time("send")
        if wait > 0:
            # No budget: nothing below may run (sends, probes and /logs reads all need
            # it), and every ingest wakes us, so not even a read of the store here. The
            # copy of the window can only under-count (other instances' and the CLI's
            # bookings add to it): they are read when the wait ends.
            return wait
        await self.limiter.sync()  # what every instance (and the CLI) booked since
        self._forget_quiet_texts(now)
        refused_wait = await self._wait_for_provider(now)
        if refused_wait is not None:
            return refused_wait
        wait = self.limiter.wait_time("send")
        if wait > 0:  # the CLI's requests took what was left
            return wait
        if self._prices_due is not None and now >= self._prices_due:
            await self._load_prices()
        reconcile_wait = await self.reconciler.run_once()
        # Every unknown outcome noted before was the reconciler's to look up or wait for.
        self.outcomes.unknown_since = None
        if reconcile_wait is not None:
            return reconcile_wait
        due, left, more = await self._due(now)
        kept = [m for m in due if m.id not in left]
        held, sent = math.inf, False
        for batch in plan_batches(
            await self._keep_for_later(kept, now),
            max_bulk=self.config.max_bulk,
            bulk_types=self.config.bulk_message_type,
        ):
            if self._stopping is not None and self._stopping.is_set():
                return 0.0  # the rest stays due: the next start (or instance) sends it
            wait = self.limiter.wait_time("send")
            if wait > 0:
                return wait
            key, pause = self._pace(batch)
            if pause > 0:
                held = min(held, pause)  # other texts still go now
                continue
            if key is not None:
                self._last_call[key] = self.clock.now()
            await self._send(batch)
            sent = True
            # Not the pause below said again: this send's refused key pauses the window,
            # but the status poller turns health red without a pause (its /logs read
            # refused while this call was in flight). No text goes then until a probe
            # passes: the next step asks /balance first.
            if not self.health.ready:
                self._probe_said_nothing()
                return max(0.01, self.outcomes.next_probe - self.clock.now())
            if self.limiter.paused_until > self.clock.now():
                return self.limiter.wait_time("send")
            if self._look_due(self.clock.now()):
                return 0.0  # the reconciler's turn first; the rest stays due
        if more and sent:  # what was left out is due too
            return 0.0
        if held < math.inf:  # what is held is due already: wake for the rest or the hold
            # Never the idle wait, whatever the hold: for one of IDLE_WAIT or more (one
            # request left holds a text up to the window) it found the held text due and
            # answered 0, a spin.
            return await self._hold_for_more(now, held)
        return await self._idle_wait(only_left=bool(left) and not kept)

    def _forget_quiet_texts(self, now: float) -> None:
        """A text not sent for a window is new again: no longer paced as a repeat."""
        for text in [k for k, at in self._last_call.items() if at <= now - self.limiter.window]:
            del self._last_call[text]

    async def _wait_for_provider(self, now: float) -> float | None:
        """While the provider refuses us: the wait until the next probe is due, or after
        a probe that failed; None when sending may go on (a probe that passed, too)."""
        if self.health.ready:
            return None
        if now < self.outcomes.next_probe:
            return self.outcomes.next_probe - now
        if not self.health.inactive:
            return None if await self._probe() else self.config.auth_probe_interval
        # An inactive account: the next send is the probe (see the module docstring;
        # `_probe_said_nothing` after it).
        return None

    def _probe_said_nothing(self) -> None:
        """After a send into an inactive account (the probe) whose answer said nothing of
        it (a 5xx, a timeout: a 403 put the next probe off already): the next probe waits
        the interval as after a 403. Left in the past, each step (10 ms apart) sent the
        next text into the account known to be inactive. Only after a send: set at every
        step while inactive, an idle one put off the alert that came a moment later."""
        now = self.clock.now()
        if self.health.inactive and self.outcomes.next_probe <= now:
            self.outcomes.next_probe = now + self.config.auth_probe_interval

    async def _hold_for_more(self, now: float, held: float) -> float:
        """A text is held for more recipients: wake when the hold ends, or sooner for the
        next message due, or after HOLD_LOOK; wake-ups before then are answered without
        reading the queue."""
        next_due = await self.store.next_due_after(now)
        held = min(held, HOLD_LOOK)
        held = held if next_due is None else max(0.0, min(held, next_due - now))
        held = min([held, *self._logs_look(now)])
        self._held_until = now + held
        return held

    def _look_due(self, now: float) -> bool:
        """Whether /logs has an unknown outcome to settle by now: one this step's sends
        left (RECONCILE_DELAY after it), or one the reconciler found not due yet at the
        step's start. Looked up only at the step's end, a text taken over from a dead
        instance waited for every send of a long step (four sends the provider held
        10 s each: 40 s, where its look was due 20 s after its claim)."""
        since = self.outcomes.unknown_since
        return (since is not None and since + RECONCILE_DELAY <= now) or self.reconciler.look_due(
            now
        )

    def _logs_look(self, now: float) -> list[float]:
        """The waits until the reconciler has /logs to read: for the outcomes this step
        left to it (RECONCILE_DELAY after they became unknown), and for what its last
        walk left (`Reconciler.next_look`). Without them an unknown outcome, with nothing
        else queued, was looked up at the idle wait: 25 s late."""
        since = self.outcomes.unknown_since
        looks = [] if since is None else [since + RECONCILE_DELAY]
        if (look := self.reconciler.next_look(now)) is not None:
            looks.append(look)
        return [max(0.0, at - now) for at in looks]

    async def _idle_wait(self, *, only_left: bool) -> float:
        """Nothing more to send now: the wait until something is due, /logs may answer,
        or a dead instance's claim lapses (at most IDLE_WAIT). `only_left`: every due
        message was left to an instance that knows a price (due already: not those)."""
        now = self.clock.now()
        waits = [IDLE_WAIT, *self._logs_look(now)]
        next_due = await (self.store.next_due_after(now) if only_left else self.store.next_due_at())
        if next_due is not None:
            waits.append(next_due - now)
        # A claim of a dead instance is due when its lease runs out: taken over then, not
        # at the next idle look (that took ~30 s, whatever cluster.lease said). Never less
        # than LEASE_SLACK: a lapsed claim another instance is taking over right now
        # (skipped, locked) would otherwise make this loop spin.
        # Only the instance that takes over (the cluster's leader) waits for them.
        expiry = (
            await self.store.next_lease_expiry(self.owner) if self.reconciler.takes_over() else None
        )
        if expiry is not None:
            waits.append(max(LEASE_SLACK, expiry - now + LEASE_SLACK))
        return max(0.0, min(waits))

    async def _due(self, now: float) -> tuple[list[Message], set[int], bool]:
        """What is due for this step; the ids of it left for an instance that knows a
        price (`_left_to_a_priced_instance`); whether more texts are due than were read.

        Only the texts the budget can take now: one per request left, and one more per
        text sent in the window (only those can be held for more recipients, and what is
        held takes no request). Each step while the budget is spent sends one call, and
        read 5,000 rows for it, every 0.6 s (BENCHMARKS.md, issue #16). Texts left take
        none of them: read past, as often as they fill the read. Read past once, more
        left texts than the budget's (a day's overflow released by a reload) hid every
        text queued after them, unjudged, until midnight.
        """
        wanted = max(1, self.limiter.remaining("send")) + len(self._last_call)
        texts = wanted
        while True:
            due = await self.store.due(now, DUE_BATCH, texts=texts)
            left = await self._left_to_a_priced_instance(due)
            read = {text_of(m) for m in due}
            more = len(due) == DUE_BATCH or len(read) >= texts
            kept = {text_of(m) for m in due if m.id not in left}
            if not left or not more or len(due) == DUE_BATCH or len(kept) >= wanted:
                return due, left, more
            texts += len(read - kept)  # at least the texts short: the reads end

    async def _left_to_a_priced_instance(self, due: list[Message]) -> set[int]:
        """Ids of `due` left due for an instance that knows a price: not re-read as due
        below, or this loop would spin on them (`BudgetGuard.for_a_priced_instance`)."""
        if self.budget is None:
            return set()
        return {m.id for m in await self.budget.for_a_priced_instance(due)}

    async def _keep_for_later(self, due: list[Message], now: float) -> list[Message]:
        """`due` less the scheduled messages whose time cannot go to the provider as
        `schedule_time` (bridge.schedule: one its zone shows twice, or one too near):
        each is queued again for its time, when it goes without `schedule_time`, with
        the reason in its row and its events."""
        kept = []
        for m in due:
            held = held_until(m.schedule_time, now=now, tz=self.tz)
            if held is None:
                kept.append(m)
                continue
            until, why = held
            reason = (
                f"scheduled for {m.schedule_time} UTC: {why}; kept by the bridge and sent"
                " then, without schedule_time"
            )
            late = await self.store.requeue(
                [m.id], now, owner=self.owner, at=until, reason=reason, queued=True, due=True
            )
            self.outcomes.not_held(late, reason, queued=True)
            if not late:  # queued it stays: no state change, so an event says why
                await self.store.note([m.id], reason, now)
        return kept

    async def release_holds(self) -> None:
        """After a reload raised or removed a daily cap: the texts waiting for midnight
        are due now, judged again by the next step against the caps in force (those
        still over one wait again). They waited for the next day whatever the reload
        said: an operator raising the cap during an incident still saw its alerts held."""
        if self.budget is None:
            return
        await self._release_priced()
        if not self.budget.loosened:
            return
        self.budget.loosened = False  # first: a reload during the write sets it again
        try:
            await self._release(self.budget.released_by_reload(self.owner))
        except BaseException:
            self.budget.loosened = True  # a store that failed is asked on the next step
            raise

    async def _release_priced(self) -> None:
        """Texts waiting because today's spend was unknown, judged again once a price is
        known: at once for those this instance held (or found at start), and every
        PRICE_HOLDS_LOOK for any instance's (held by one that stopped for good, they
        waited for midnight whatever the others knew). Only those: the holds of other
        caps stay as they are (released too, they were held again, an event each)."""
        budget = self.budget
        if budget is None or not budget.config.cost_per_day:
            return
        now = self.clock.now()
        look = now >= self._price_holds_at
        if budget.waiting_for_price or look:  # another instance's bill may price them
            await budget.recall_prices()
        if budget.newly_priced() or (look and budget.prices.ceiling() > 0):
            self._price_holds_at = now + PRICE_HOLDS_LOOK
            await self._release(budget.judged(PRICED_NOW, self.owner), waiting_for=UNKNOWABLE)
            budget.released_for_price()
        elif look:
            self._price_holds_at = now + PRICE_HOLDS_LOOK

    async def _release(self, why: str, *, waiting_for: str = "") -> list[int]:
        released = await self.store.release_budget_holds(
            self.clock.now(), why, waiting_for=waiting_for
        )
        if released:
            self._held_until = 0.0  # they are due now: no hold for more recipients waits
            log.info("%s: %d waiting messages", why, len(released))
        return released

    def _pace(self, batch: list[Message]) -> tuple[GroupKey | None, float]:
        """The call's text, and how long it waits for more recipients (see pacing)."""
        key = group_key(batch[0], bulk_types=self.config.bulk_message_type)
        if key is None:
            return None, 0.0
        now = self.clock.now()
        last = self._last_call.get(key)
        return key, hold(
            queued=len(batch),
            oldest_age=now - min(m.created_at for m in batch),
            since_last=None if last is None else now - last,
            remaining=self.limiter.remaining("send"),
            window=self.limiter.window,
            max_bulk=self.config.max_bulk,
        )

    # -- one request ---------------------------------------------------------------------
    async def _within_budget(self, batch: list[Message]) -> list[Message]:
        """What of `batch` the daily caps allow; the rest waits for tomorrow or fails,
        each message with the cap it ran into as its reason."""
        if self.budget is None:
            return batch
        verdict = await self.budget.check(batch)
        if not verdict.over:
            return verdict.allowed
        now = self.clock.now()
        _, tomorrow, _ = day_bounds(now)
        configured = "fail" if self.budget.config.on_exceeded == "fail" else "wait"
        by_cap: dict[Cap, list[int]] = {}
        for message, cap in zip(verdict.over, verdict.caps, strict=True):
            by_cap.setdefault(cap, []).append(message.id)
        for cap, ids in by_cap.items():
            outcome = "fail" if cap.never else configured
            reason = (
                f"larger than the daily budget ({cap.why})"
                if cap.never
                else f"daily budget reached ({cap.why})"
            )
            log.warning("%s: %d messages %s", reason, len(ids), outcome)
            if not cap.never:  # before this hold's own event is written
                mine = set(ids)
                await self._mismatched([m for m in verdict.over if m.id in mine], cap)
            if outcome == "fail":
                late = await self.store.finish(
                    [(i, State.FAILED, reason) for i in ids],
                    now,
                    owner=self.owner,
                    reason_kind="budget",
                    queued=True,  # read by `due`, never claimed
                )
                self.outcomes.not_held(late, reason, queued=True)
            else:
                waiting = f"{reason}; waiting until 00:00 UTC"
                late = await self.store.requeue(
                    ids,
                    now,
                    owner=self.owner,
                    at=tomorrow,
                    reason=waiting,
                    reason_kind="budget",
                    queued=True,
                    due=True,  # its age counts from 00:00, not from when it was stored
                )
                self.outcomes.not_held(late, waiting, queued=True)
                # The state stays queued, which leaves no event: the timeline says why
                # the message did not go (once a day at most: it is due tomorrow). Not on
                # one another instance claimed meanwhile: it goes, it does not wait.
                judged = self.budget.judged(waiting, self.owner)  # for `_mismatched` elsewhere
                await self.store.note([i for i in ids if i not in late], judged, now)
            if not cap.never:  # the day's cap did not bite: other texts go on
                await self.budget.warn(
                    cap.warning, f"sms-bridge: {reason}; further texts {outcome} until 00:00 UTC"
                )
        self.wake.set()  # the warning itself is queued: send it
        return verdict.allowed

    async def _mismatched(self, held: list[Message], cap: Cap) -> None:
        """Say so (log and metric) when a text this instance holds again by `cap` was
        released by a reload on another instance whose cap is higher: caps are each
        instance's config, and this one has not been reloaded. The text waits by this
        instance's cap: what an operator raised on one instance holds on that one only.
        A few texts held again after a release are read (their events), not every one."""
        assert self.budget is not None
        budget = self.budget
        # Held before (reason kind budget): released by a reload, a start, a price or
        # the day's end. Due at 00:00 too: held by a higher cap elsewhere till then.
        for m in [m for m in held if m.reason_kind == "budget"][:MISMATCH_LOOKS]:
            event = await budget.mismatched(m, cap, self.owner)
            if event is None:
                continue
            budget.cap_mismatch_total += 1
            log.warning(
                "caps differ between instances: message %d was released by another instance"
                " (%s) and is held again here (%s) by %s; reload every instance (SIGHUP)"
                " after changing [budget], [routes] or [tokens] caps",
                m.id,
                event,
                self.owner,
                cap.why,
            )
            return

    async def _load_prices(self) -> None:
        """The provider's price list, for cost estimates: at start, then every
        PRICES_REFRESH (prices change); after a failure or an answer with no price in
        it, again after PRICES_RETRY_FIRST, doubling up to PRICES_RETRY_MAX. Once fetched
        at start only, one failure there left the day's cost cap to guess by the most a
        part was billed for the whole uptime."""
        if self.prices is None or await self.limiter.acquire("pricing") > 0:
            return  # try again on a later step
        try:
            loaded = self.prices.load(await self.client.pricing())
            why = "" if loaded else "no price in the answer"
        except RateLimitedError as exc:
            # The key's window is full at the provider: every request waits, as after a
            # send's 429 (taken for a failed fetch alone, the step went on to send at
            # once, into the same 429, whatever Retry-After said).
            await self.limiter.rate_limited(exc.retry_after)
            loaded, why = False, str(exc)
        except ProviderError as exc:
            loaded, why = False, str(exc)
        except Exception as exc:
            # An answer the tolerant parser still could not read (its body is
            # undocumented): a failed fetch like any other. Out of the step, the fetch
            # stayed due and raised again at every step, before any send: not one text
            # went while /pricing answered so.
            log.exception("price list unreadable")
            loaded, why = False, f"unreadable answer ({type(exc).__name__})"
        now = self.clock.now()
        if loaded:
            self._prices_due, self._prices_retry = now + PRICES_REFRESH, PRICES_RETRY_FIRST
            return
        self._prices_due = now + self._prices_retry
        log.info(
            "no price list (%s): costs are estimated by the highest price known; trying"
            " again in %gs",
            why,
            self._prices_retry,
        )
        self._prices_retry = min(2 * self._prices_retry, PRICES_RETRY_MAX)

    async def _send(self, batch: list[Message]) -> None:
        batch, now = await self._claim_within_budget(batch)
        if not batch:
            return
        self.limiter.booked(now, "send")  # its stamp, moved when the call comes back
        try:
            # A call outlasting the lease (provider.timeout 10 s plus connect 5 s, against
            # a cluster.lease that may be 5 s) was looked up by its taker before the
            # provider logged it, and the text sent twice.
            ids = [m.id for m in batch]
            async with renewed(
                self.store,
                self.clock,
                ids,
                owner=self.owner,
                lease=self.lease,
                what="a send in flight",
            ):
                result = await self._call(batch, now)
        except (PermanentSendError, ProviderAuthError, TransientSendError) as exc:
            await self.outcomes.failed(batch, exc)
        else:
            await self.outcomes.succeeded(batch, result)

    async def _claim_within_budget(self, batch: list[Message]) -> tuple[list[Message], float]:
        """What of `batch` the daily caps allow, claimed, and when. With caps, the
        decision and the claim are one turn of the cluster: another instance's count of
        today's use then sees these claims (in flight counts as sent), and none spends
        the last of a cap at the same time as this one."""
        if self.budget is None or not self.budget.active:
            return await self._claim(batch)
        async with self.store.budget_turn():
            return await self._claim(await self._within_budget(batch))

    async def _claim(self, batch: list[Message]) -> tuple[list[Message], float]:
        now = self.clock.now()
        if not batch:
            return [], now
        # Booked in the claim's transaction, within the window every instance shares:
        # a full window (another instance took the room) or a pause claims nothing. The
        # clock goes in, not `now`: the store reads the booking's time once it holds a
        # connection and the rate lock (a flood's wait for the pool must not age it),
        # and moves the lease on by that wait. The time it read is the booking's.
        stamp = self.limiter.stamp()
        claimed = set(
            await self.store.claim(
                [m.id for m in batch],
                stamp,
                owner=self.owner,
                lease_until=now + self.lease,
                limit=self.limiter.booking_limit("send"),
                window=self.limiter.window,
            )
        )
        if not claimed:
            await self.limiter.sync()  # the caller's next wait_time says how long
        return [m for m in batch if m.id in claimed], stamp.at

    async def _call(self, batch: list[Message], now: float) -> SendResult:
        """One /send or /send-bulk for `batch` (one text)."""
        first = batch[0]
        if len(batch) == 1:
            return await self.client.send(
                first.recipient,
                first.text,
                sender_id=first.sender_id,
                message_type=first.message_type,
                schedule_time=for_provider(first.schedule_time, now=now, tz=self.tz),
            )
        return await self.client.send_bulk(
            [m.recipient for m in batch],
            first.text,
            sender_id=first.sender_id,
            message_type=first.message_type,
        )

    async def _probe(self) -> bool:
        """While the key is refused, one cheap /balance now and then tells when it works."""
        if await self.limiter.acquire("probe") > 0:
            return False
        self.outcomes.next_probe = self.clock.now() + self.config.auth_probe_interval
        try:
            await self.client.balance()
        except ProviderAuthError as exc:
            await self.outcomes.key_refused(exc)
            return False
        except RateLimitedError as exc:
            await self.limiter.rate_limited(exc.retry_after)
            return False
        except ProviderError as exc:
            log.info("probe inconclusive: %s", exc)
            return False
        self.limiter.answered()
        self.health.succeeded(self.clock.now())
        return True
