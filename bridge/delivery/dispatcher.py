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

Messages found in `sending` (a crash, a read timeout) are reconciled the same way, so a
restart does not text anyone twice where the provider's /logs can tell, and never more
than once more where it cannot.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence

from bridge.clock import Clock, zone
from bridge.config import ProviderConfig
from bridge.delivery.ratelimit import SlidingWindowLimiter
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
from bridge.provider.logmatch import LogMatcher, provider_date, provider_time
from bridge.schedule import for_provider
from bridge.store import Store
from bridge.text import TYPE_GSM

log = logging.getLogger(__name__)
IDLE_WAIT = 30.0  # nothing queued: look again this often even without a wake-up
RECONCILE_DELAY = 5.0  # let the provider's /logs catch up before looking there
RECONCILE_MAX_PAGES = 10
CLOCK_SKEW = 120.0  # tolerance between our clock and the provider's timestamps
DUE_BATCH = 5000
LOGS_TRIES = 3  # /logs failing this often in a row: the outcomes waiting on it stay unknown
FOREIGN_PREFIX = "cli"  # request kinds booked by `sms-bridge provider ...` in the store


def batch_key(m: Message) -> tuple[str, str, int] | None:
    """Messages sharing this key may go in one bulk call; None: must go alone."""
    if m.solo or m.schedule_time:
        return None
    return (m.text, m.sender_id, m.message_type)


def plan_batches(due: Sequence[Message], *, max_bulk: int, bulk_types: bool) -> list[list[Message]]:
    """Group due messages into requests, oldest first, bulk only where the API allows."""
    groups: dict[tuple[str, str, int], list[Message]] = {}
    batches: list[list[Message]] = []
    for m in due:
        key = batch_key(m)
        if key is None or (m.message_type != TYPE_GSM and not bulk_types):
            batches.append([m])
            continue
        group = groups.setdefault(key, [])
        if not group:
            batches.append(group)
        group.append(m)
        if len(group) == max_bulk:
            del groups[key]
    return batches


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
        self._logs_failures = 0
        self._foreign_rowid = 0  # last request booked by another process already counted
        self.tz = zone(config.timezone)

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
        wait = self.limiter.wait_time("send")
        if wait > 0:
            # No budget: nothing below may run (sends, probes and /logs reads all need
            # it), and every ingest wakes us, so not even a read of the store here. The
            # CLI's requests can only lengthen the wait; they are counted when it ends.
            return wait
        await self._count_foreign()
        if not self.health.ready:
            if now < self._next_probe:
                return self._next_probe - now
            # An inactive account: the next send is the probe (see the module docstring).
            if not self.health.inactive and not await self._probe():
                return self.config.auth_probe_interval
        wait = self.limiter.wait_time("send")
        if wait > 0:  # the CLI's requests took what was left
            return wait
        if not self._prices_loaded:
            await self._load_prices()
        reconcile_wait = await self._reconcile()
        if reconcile_wait is not None:
            return reconcile_wait
        due = await self.store.due(now, DUE_BATCH)
        for batch in plan_batches(
            due, max_bulk=self.config.max_bulk, bulk_types=self.config.bulk_message_type
        ):
            wait = self.limiter.wait_time("send")
            if wait > 0:
                return wait
            await self._send(batch)
            if not self.health.ready:
                return max(0.01, self._next_probe - self.clock.now())
            if self.limiter.paused_until > self.clock.now():
                return self.limiter.wait_time("send")
        if len(due) == DUE_BATCH:
            return 0.0
        next_due = await self.store.next_due_at()
        if next_due is None:
            return IDLE_WAIT
        return max(0.0, min(IDLE_WAIT, next_due - self.clock.now()))

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
            self._key_refused(exc)
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
            await self._retry_later(batch, exc)
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

    def _key_refused(self, exc: ProviderAuthError) -> float:
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

    async def _retry_later(self, batch: list[Message], exc: TransientSendError) -> None:
        now = self.clock.now()
        retry, give_up = [], []
        for m in batch:
            delay = max(self._backoff(m.attempts + 1), exc.retry_after or 0.0)
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

    def _backoff(self, attempts: int) -> float:
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
            self._key_refused(exc)
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

    # -- reconciliation ------------------------------------------------------------------
    async def _reconcile(self) -> float | None:
        """Settle messages left in `sending` by a crash or an unknown outcome.

        Returns a wait when it needs more time or budget before sending anything new.
        """
        stale = await self.store.in_state(State.SENDING)
        if not stale:
            return None
        now = self.clock.now()
        ready = [m for m in stale if (m.claimed_at or 0) + RECONCILE_DELAY <= now]
        if not ready:
            return min((m.claimed_at or 0) + RECONCILE_DELAY for m in stale) - now
        oldest = min(m.claimed_at or now for m in ready)
        matcher = LogMatcher(ready)
        found: list[tuple[int, str | None, float | None]] = []
        date_from = provider_date(oldest - CLOCK_SKEW, self.tz)
        page = 1
        while matcher and page <= RECONCILE_MAX_PAGES:
            wait = self.limiter.wait_time("send")
            if wait > 0:
                return wait
            at = self.clock.now()
            self.limiter.book(at, "reconcile")
            await self.store.record_request(at, "reconcile")
            try:
                logs = await self.client.logs(page=page, date_from=date_from)
            except ProviderAuthError as exc:
                return self._key_refused(exc)
            except RateLimitedError as exc:
                self.limiter.rate_limited(exc.retry_after)
                return self.limiter.wait_time("send")
            except ProviderError as exc:
                self._logs_failures += 1
                if self._logs_failures < LOGS_TRIES:
                    log.warning("cannot read /logs to reconcile %d messages: %s", len(ready), exc)
                    return self._backoff(self._logs_failures + 1)
                log.error("/logs unreadable %d times (%s): outcomes stay unknown", LOGS_TRIES, exc)
                break
            self._logs_failures = 0
            self.limiter.answered()
            older_seen = False
            known = await self.store.known_provider_ids([e.id for e in logs.entries])
            for entry in logs.entries:
                created = provider_time(entry.created_at, self.tz)
                if created is not None and created < oldest - CLOCK_SKEW:
                    older_seen = True  # before our request: an earlier text, not this one
                    continue
                if entry.id in known:
                    continue
                m = matcher.take(entry.recipient, entry.message)
                if m is not None:
                    found.append((m.id, entry.id, entry.cost))
                    known.add(entry.id)
            if not logs.has_more or older_seen:
                break
            page += 1
        self._logs_failures = 0
        if found:
            log.info("reconciled %d messages the provider had already accepted", len(found))
            await self.store.mark_sent(found, self.clock.now())
        await self._not_found(matcher.remaining())
        return None

    async def _not_found(self, missing: list[Message]) -> None:
        """/logs did not show these: retry a provider error; resend an unknown outcome
        at most `max_unknown_resends` times, then end it `sent`, "outcome unknown"."""
        if not missing:
            return
        now = self.clock.now()
        errors = [m for m in missing if m.reason_kind == "provider-error"]
        if errors:
            await self._retry_later(
                errors, TransientSendError("provider error, and not in its logs")
            )
        unknown = [m for m in missing if m.reason_kind != "provider-error"]
        cap = self.config.max_unknown_resends
        again = [m.id for m in unknown if m.unknown_resends < cap]
        if again:
            log.warning("%d messages not found in the provider's logs: sending again", len(again))
            await self.store.resend_unknown(
                again,
                now,
                f"outcome unknown and not in the provider's logs: resent (at most {cap})",
            )
        given_up = [m.id for m in unknown if m.unknown_resends >= cap]
        if given_up:
            log.error(
                "outcome of %d messages unknown after %d resends: not sent again (%s)",
                len(given_up),
                cap,
                given_up[:20],
            )
            await self.store.settle_unknown(
                given_up,
                now,
                f"outcome unknown: sent {cap + 1} times, the provider's answers and logs"
                " never said whether it went; not sent again",
            )
            if self.budget is not None and await self.budget.warn(
                "unknown-outcome",
                f"sms-bridge: {len(given_up)} texts have an unknown outcome (the provider"
                " did not say whether they went); see messages in state sent, reason"
                " 'outcome unknown'",
            ):
                self.wake.set()


def _sent_rows(
    batch: list[Message], result: SendResult
) -> list[tuple[int, str | None, float | None]]:
    """Each message's own id, or none (never the batch id: the poller could not match it)."""
    share = None if result.cost is None else round(result.cost / len(batch), 6)
    return [(m.id, result.message_ids.get(m.recipient), share) for m in batch]
