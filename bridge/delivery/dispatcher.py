"""The dispatcher: queued messages -> provider requests, within the rate budget.

Each step (`run_once`, arq's burst mode) claims what is due, coalesces messages with the
same text, sender and type into `/send-bulk` calls of up to `max_bulk` recipients (a lone
recipient goes through `/send`), books every request in the limiter and the store before
sending it, and records each outcome:

    success           -> sent, with the provider's id and cost
    400               -> failed with the provider's reason (a refused bulk is retried
                         one by one, so one bad number cannot sink the rest)
    2xx without ids   -> sent without a provider id (the poller matches recipient + text)
    401/404           -> queue kept, sending paused, health red, /balance probed until OK
    403               -> account not active: paused with a doubling wait; the next send is
                         the probe (/balance answers for an inactive account: no flapping)
    429               -> the whole key paused for Retry-After, else a doubling backoff
    connect fail      -> retried with exponential backoff and jitter, failed past max age
    5xx               -> checked in /logs first; if not there, retried as above
    unknown outcome   -> left in `sending` and checked against /logs before any resend;
                         if /logs cannot settle it, sent again at most
                         `provider.max_unknown_resends` times, then ended `sent` with the
                         reason "outcome unknown" (reason_kind `unknown`), admin warned

Messages found in `sending` (a crash, a read timeout) are reconciled the same way
(`bridge.delivery.reconcile`, before anything new is sent), so a restart does not text
anyone twice where the provider's /logs can tell, and never more than once more where it
cannot.
"""

from __future__ import annotations

import asyncio
import logging
import random

from bridge.clock import Clock, zone
from bridge.config import ProviderConfig
from bridge.delivery.pacing import GroupKey, group_key, hold, plan_batches
from bridge.delivery.ratelimit import SlidingWindowLimiter
from bridge.delivery.reconcile import Reconciler
from bridge.errors import (
    PermanentSendError,
    ProviderAuthError,
    ProviderError,
    ProviderInactiveError,
    RateLimitedError,
    TransientSendError,
)
from bridge.health import ProviderHealth
from bridge.loops import run_steps
from bridge.models import Message, State
from bridge.policy.budgets import BudgetGuard, day_bounds
from bridge.pricing import PriceBook
from bridge.provider.client import (
    ProviderClient,
    ProviderFailed,
    SendResult,
    TransientUnknownOutcome,
)
from bridge.schedule import for_provider
from bridge.store import Store

log = logging.getLogger(__name__)
IDLE_WAIT = 30.0  # nothing queued: look again this often even without a wake-up
DUE_BATCH = 5000
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
        low_balance: float = 0.0,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.budget = budget
        self.prices = prices
        self.low_balance = low_balance
        self.balance: float | None = None  # the provider's last word on it
        self.client = client
        self.limiter = limiter
        self.clock = clock
        self.config = config
        self.health = health
        self.rng = rng or random.Random()
        self.wake = asyncio.Event()
        self._next_probe = 0.0
        self._prices_loaded = prices is None
        self._inactive_strikes = 0  # 403s in a row: the wait before the next try doubles
        self._foreign_rowid = 0  # last request booked by another process already counted
        self._last_call: dict[GroupKey, float] = {}  # each text's last call, for pacing
        self.tz = zone(config.timezone)
        self.reconciler = Reconciler(
            store=store,
            client=client,
            limiter=limiter,
            clock=clock,
            config=config,
            tz=self.tz,
            outcomes=self,
            wake=self.wake,
            budget=budget,
        )

    async def load_budget(self) -> None:
        """Take the requests booked before a restart into the window."""
        now = self.clock.now()
        await self.store.prune_requests(now - 2 * self.limiter.window)
        rows = await self.store.request_rows(now - self.limiter.window)
        self.limiter.load((at, kind) for _, at, kind in rows)
        self._foreign_rowid = max((rowid for rowid, _, _ in rows), default=0)

    async def _count_foreign(self) -> None:
        """Requests another process (the CLI) booked since we looked: same window."""
        rows = await self.store.request_rows(
            self.clock.now() - self.limiter.window, FOREIGN_PREFIX, self._foreign_rowid
        )
        if rows:
            self.limiter.load((at, kind) for _, at, kind in rows)
            self._foreign_rowid = max(rowid for rowid, _, _ in rows)

    # -- the loop ------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        await self.load_budget()
        await run_steps(
            self.run_once,
            name="dispatcher",
            clock=self.clock,
            stop=stop,
            retry_after=5.0,
            wake=self.wake,
        )

    async def run_once(self) -> float:
        """One step: send what is due and within budget; return seconds until the next."""
        now = self.clock.now()
        await self._count_foreign()
        for text in [k for k, at in self._last_call.items() if at <= now - self.limiter.window]:
            del self._last_call[text]  # a text not sent for a window is new again
        if not self.health.ready:
            if now < self._next_probe:
                return self._next_probe - now
            # An inactive account: the next send is the probe (see the module docstring).
            if not self.health.inactive and not await self._probe():
                return self.config.auth_probe_interval
        wait = self.limiter.wait_time("send")
        if wait > 0:  # no budget: do not even read the queue (ingest wakes us often)
            return wait
        if not self._prices_loaded:
            await self._load_prices()
        reconcile_wait = await self.reconciler.run_once()
        if reconcile_wait is not None:
            return reconcile_wait
        due = await self.store.due(now, DUE_BATCH)
        held, sent = IDLE_WAIT, False
        for batch in plan_batches(
            due, max_bulk=self.config.max_bulk, bulk_types=self.config.bulk_message_type
        ):
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
            if not self.health.ready:
                return max(0.01, self._next_probe - self.clock.now())
            if self.limiter.paused_until > self.clock.now():
                return self.limiter.wait_time("send")
        if len(due) == DUE_BATCH and sent:
            return 0.0
        if held < IDLE_WAIT:  # what is held is due already: wake for the rest or the hold
            next_due = await self.store.next_due_after(now)
            return held if next_due is None else max(0.0, min(held, next_due - now))
        next_due = await self.store.next_due_at()
        if next_due is None:
            return IDLE_WAIT
        return max(0.0, min(IDLE_WAIT, next_due - self.clock.now()))

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
        """What of `batch` the daily caps allow; the rest waits for tomorrow or fails."""
        if self.budget is None:
            return batch
        verdict = await self.budget.check(batch)
        if verdict.over:
            now = self.clock.now()
            _, tomorrow, _ = day_bounds(now)
            ids = [m.id for m in verdict.over]
            reason = f"daily budget reached ({verdict.reason})"
            log.warning(
                "%s: %d messages %s",
                reason,
                len(ids),
                "fail" if self.budget.config.on_exceeded == "fail" else "wait",
            )
            if self.budget.config.on_exceeded == "fail":
                await self.store.finish(
                    [(i, State.FAILED, reason) for i in ids], now, reason_kind="budget"
                )
            else:
                await self.store.requeue(
                    ids,
                    now,
                    at=tomorrow,
                    reason=f"{reason}; waiting until 00:00 UTC",
                    reason_kind="budget",
                )
            await self.budget.warn(
                "cap",
                f"sms-bridge: {reason}; further texts "
                f"{'fail' if self.budget.config.on_exceeded == 'fail' else 'wait'}"
                " until 00:00 UTC",
            )
            self.wake.set()  # the warning itself is queued: send it
        return verdict.allowed

    async def _load_prices(self) -> None:
        """The provider's price list, once per start, for cost estimates."""
        if self.prices is None or self.limiter.wait_time("send") > 0:
            return  # try again on a later step
        self._prices_loaded = True
        now = self.clock.now()
        self.limiter.book(now, "pricing")
        await self.store.record_request(now, "pricing")
        try:
            self.prices.load(await self.client.pricing())
        except ProviderError as exc:
            log.info("no price list (%s): costs are not estimated", exc)

    async def _check_balance(self, balance: float | None) -> None:
        if balance is None:
            return
        self.balance = balance
        if self.low_balance and balance < self.low_balance and self.budget is not None:
            await self.budget.warn(
                "low-balance",
                f"sms-bridge: provider balance {balance:g} is below {self.low_balance:g}",
            )
            self.wake.set()

    async def _send(self, batch: list[Message]) -> None:
        batch = await self._within_budget(batch)
        if not batch:
            return
        now = self.clock.now()
        self.limiter.book(now, "send")
        claimed = set(await self.store.claim([m.id for m in batch], now, "send"))
        batch = [m for m in batch if m.id in claimed]
        if not batch:
            return
        first = batch[0]
        ids = [m.id for m in batch]
        try:
            if len(batch) == 1:
                result = await self.client.send(
                    first.recipient,
                    first.text,
                    sender_id=first.sender_id,
                    message_type=first.message_type,
                    schedule_time=for_provider(first.schedule_time, now=now, tz=self.tz),
                )
            else:
                result = await self.client.send_bulk(
                    [m.recipient for m in batch],
                    first.text,
                    sender_id=first.sender_id,
                    message_type=first.message_type,
                )
        except PermanentSendError as exc:
            await self._refused(batch, exc)
        except ProviderAuthError as exc:
            self.key_refused(exc)
            what = (
                "provider says the account is not active"
                if isinstance(exc, ProviderInactiveError)
                else "provider refused the key"
            )
            await self.store.requeue(
                ids,
                self.clock.now(),
                at=self.clock.now(),
                reason=f"waiting: {what} ({exc})",
                refund_attempt=True,
            )
        except RateLimitedError as exc:
            pause = self.limiter.rate_limited(exc.retry_after)
            log.warning("provider answered 429: pausing all requests for %.1fs", pause)
            await self.store.requeue(
                ids,
                self.clock.now(),
                at=self.clock.now() + pause,
                reason=f"rate limited by the provider ({exc})",
                refund_attempt=True,
            )
        except TransientUnknownOutcome as exc:
            log.warning("outcome of request for %s unknown (%s): checking /logs first", ids, exc)
            self.limiter.answered()
            await self.store.note_unknown(
                ids, f"outcome unknown, checking the provider's logs: {exc}", "unknown"
            )
        except ProviderFailed as exc:
            # It says it failed; /logs still decides, a 5xx is not proof of nothing sent.
            self.limiter.answered()
            await self.store.note_unknown(
                ids, f"provider error, checking its logs before a retry: {exc}", "provider-error"
            )
        except TransientSendError as exc:
            await self.retry_later(batch, exc)
        else:
            self.limiter.answered()
            self._inactive_strikes = 0
            self.health.succeeded(self.clock.now())
            await self.store.mark_sent(_sent_rows(batch, result), self.clock.now())
            await self._check_balance(result.balance)

    async def _refused(self, batch: list[Message], exc: ProviderError) -> None:
        now = self.clock.now()
        if len(batch) > 1:
            log.warning(
                "bulk call refused (%s): sending its %d messages one by one", exc, len(batch)
            )
            await self.store.requeue(
                [m.id for m in batch],
                now,
                at=now,
                solo=True,
                reason=f"bulk refused, retrying one by one: {exc.reason}",
                refund_attempt=True,
            )
            return
        await self.store.finish(
            [(batch[0].id, State.FAILED, f"provider refused: {exc.reason}")], now
        )

    def key_refused(self, exc: ProviderAuthError) -> float:
        """401/403/404: health red; seconds until the next try (403: doubling)."""
        now = self.clock.now()
        inactive = isinstance(exc, ProviderInactiveError)
        self.health.auth_failed(str(exc), now, inactive=inactive)
        wait = self.config.auth_probe_interval
        if inactive:
            self._inactive_strikes += 1
            wait = min(self.config.backoff_max, wait * 2 ** (self._inactive_strikes - 1))
        self._next_probe = now + wait
        return wait

    async def retry_later(self, batch: list[Message], exc: TransientSendError) -> None:
        now = self.clock.now()
        retry, give_up = [], []
        for m in batch:
            delay = max(self.backoff(m.attempts + 1), exc.retry_after or 0.0)
            if now + delay - m.created_at > self.config.retry_max_age:
                give_up.append(
                    (m.id, State.FAILED, f"gave up after {m.attempts + 1} attempts: {exc}")
                )
            else:
                retry.append((m.id, delay))
        if give_up:
            await self.store.finish(give_up, now)
        for message_id, delay in retry:
            await self.store.requeue([message_id], now, at=now + delay, reason=f"retrying: {exc}")

    def backoff(self, attempts: int) -> float:
        base = min(self.config.backoff_max, self.config.backoff_initial * 2 ** max(0, attempts - 1))
        return base * (0.5 + 0.5 * self.rng.random())

    async def _probe(self) -> bool:
        """While the key is refused, one cheap /balance now and then tells when it works."""
        if self.limiter.wait_time("send") > 0:
            return False
        now = self.clock.now()
        self.limiter.book(now, "probe")
        await self.store.record_request(now, "probe")
        self._next_probe = now + self.config.auth_probe_interval
        try:
            await self.client.balance()
        except ProviderAuthError as exc:
            self.key_refused(exc)
            return False
        except RateLimitedError as exc:
            self.limiter.rate_limited(exc.retry_after)
            return False
        except ProviderError as exc:
            log.info("probe inconclusive: %s", exc)
            return False
        self.limiter.answered()
        self.health.succeeded(self.clock.now())
        return True


def _sent_rows(
    batch: list[Message], result: SendResult
) -> list[tuple[int, str | None, float | None]]:
    """Each message's own id, or none (never the batch id: the poller could not match it)."""
    share = None if result.cost is None else round(result.cost / len(batch), 6)
    return [(m.id, result.message_ids.get(m.recipient), share) for m in batch]
