"""What each answer of the provider does to the messages of a call, and to sending:

    success           -> sent, with the provider's id and cost; the balance it reports
                         checked against `budget.low_balance`
    400               -> failed with the provider's reason (a refused bulk is retried
                         one by one, so one bad number cannot sink the rest)
    2xx without ids   -> sent without a provider id (the poller matches recipient + text)
    401/404           -> queue kept, sending paused, health red, /balance probed until OK
    403               -> account not active: paused with a doubling wait; the next send is
                         the probe (/balance answers for an inactive account: no flapping)
    account refused   -> any answer whose words say the account cannot send (a 402 or 400
                         "Insufficient balance", a 200 "Invalid API key", "account
                         suspended"): as a 403, health says why, the admins warned once a
                         day; a 4xx or 2xx refusal naming a transient cause (rate limit,
                         try again) is retried as a 5xx is, other refusals fail the text
    429               -> the whole key paused for Retry-After, else a doubling backoff
    connect fail      -> retried with exponential backoff and jitter, failed past max age
    5xx               -> checked in /logs first; if not there, retried as above
    unknown outcome   -> left in `sending` and checked against /logs before any resend;
                         if /logs cannot settle it, sent again at most
                         `provider.max_unknown_resends` times, then ended `sent` with the
                         reason "outcome unknown" (reason_kind `unknown`), admin warned

The dispatcher hands every answer here; the reconciler shares the key refusals and the
retry policy, so a message retried after /logs waits as a fresh failure would.
"""

from __future__ import annotations

import asyncio
import logging
import random

from bridge.clock import Clock
from bridge.config import ProviderConfig
from bridge.delivery.ratelimit import SlidingWindowLimiter
from bridge.errors import (
    PermanentSendError,
    ProviderAccountError,
    ProviderAuthError,
    ProviderError,
    ProviderInactiveError,
    RateLimitedError,
    TransientSendError,
)
from bridge.health import ProviderHealth
from bridge.models import Message, State
from bridge.policy.budgets import BudgetGuard
from bridge.provider.client import ProviderFailed, SendResult, TransientUnknownOutcome
from bridge.store import Store

log = logging.getLogger(__name__)
MAX_DOUBLINGS = 64  # of the backoff: more only overflows a float


class Outcomes:
    def __init__(
        self,
        *,
        store: Store,
        owner: str,
        limiter: SlidingWindowLimiter,
        clock: Clock,
        config: ProviderConfig,
        health: ProviderHealth,
        wake: asyncio.Event,
        budget: BudgetGuard | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.owner = owner  # whose claims the sends were made under (`record_sent`)
        self.limiter = limiter
        self.clock = clock
        self.config = config
        self.health = health
        self.wake = wake
        self.budget = budget
        self.rng = rng or random.Random()
        self.balance: float | None = None  # the provider's last word on it
        self.next_probe = 0.0  # while the key is refused: when to try it again
        self._inactive_strikes = 0  # 403s in a row: the wait before the next try doubles
        # When the first of the sends left to /logs since the reconciler last looked
        # became unknown: it may look RECONCILE_DELAY after it, the dispatcher wakes then.
        self.unknown_since: float | None = None

    async def succeeded(self, batch: list[Message], result: SendResult) -> None:
        self.limiter.answered()
        self._inactive_strikes = 0
        now = self.clock.now()
        self.health.succeeded(now)
        unnamed = _unnamed(batch, result)
        unknown_ids = {m.id for m in unnamed}
        taken = [m for m in batch if m.id not in unknown_ids]
        await self.record_sent(_sent_rows(taken, result))
        if self.budget is not None and result.cost is not None and taken:
            await self.budget.billed(result.cost, [(m.recipient, m.parts) for m in taken])
        if unnamed:
            # An answer naming recipients by id names those it took: the others may have
            # been refused (or written so we cannot tell them). Recorded `sent` without an
            # id, one never found in /logs stayed `sent` for good, no SMS gone.
            ids = sorted(unknown_ids)
            log.warning("provider's answer named no id for %s: checking /logs", ids)
            unknown = "outcome unknown: the provider's answer named the others, not this one"
            late = await self.store.note_unknown(ids, now, unknown, "unknown", owner=self.owner)
            self.not_held(late, unknown)
            self._left_to_logs(now)
        await self._check_balance(result.balance)

    def _left_to_logs(self, now: float) -> None:
        """Note sends whose outcome /logs settles (`unknown_since`): from `now`, when
        their outcome became unknown, as the reconciler counts (`Reconciler.look_at`)."""
        since = self.unknown_since
        self.unknown_since = now if since is None else min(since, now)

    async def record_sent(self, rows: list[tuple[int, str | None, float | None]]) -> None:
        """What the provider accepted (a call's answer, or found in /logs), as sent.

        The claims were this instance's when the call was made, but a lease that lapsed
        meanwhile (a frozen process, a clock running behind) may have let another
        instance take a message over, or even send it and have it delivered. The store
        keeps that instance's row and records this send on it as an event; the log names
        them, as a possible double send."""
        late = await self.store.mark_sent(rows, self.clock.now(), owner=self.owner)
        if late:
            pids = {i: pid for i, pid, _ in rows}
            log.warning(
                "messages %s were also sent by this instance (%s) after their claims were"
                " taken over (provider ids %s): possibly texted twice; not marked sent again",
                late,
                self.owner,
                [pids[i] for i in late],
            )

    def not_held(self, late: list[int], what: str, *, queued: bool = False) -> None:
        """Warn of messages an outcome of this instance's was not written to: another
        instance took them over (a lapsed lease) or they moved on; the store noted
        `what` in their events instead (bridge.store.api: the rule). `queued`: a
        decision on queued messages this instance never claimed (a daily cap), which
        another claimed, or which moved on, in between."""
        if late:
            when = (
                f"no longer queued when this instance ({self.owner}) decided"
                if queued
                else f"no longer held by this instance ({self.owner}) when it learnt"
            )
            log.warning(
                "messages %s were %s: %s; left as they are, noted in their events",
                late,
                when,
                what,
            )

    async def failed(self, batch: list[Message], exc: ProviderError) -> None:
        """A call's error, read by its class (most specific first)."""
        ids = [m.id for m in batch]
        now = self.clock.now()
        if isinstance(exc, TransientSendError) and (exc.status is None or exc.status >= 500):
            self.health.unanswered(now)
        match exc:
            case PermanentSendError():
                await self._refused(batch, exc)
            case ProviderAuthError():
                await self.key_refused(exc)
                what = (
                    "provider says the account cannot send"
                    if isinstance(exc, ProviderAccountError)
                    else "provider says the account is not active"
                    if isinstance(exc, ProviderInactiveError)
                    else "provider refused the key"
                )
                waiting = f"waiting: {what} ({exc})"
                self.not_held(
                    await self.store.requeue(
                        ids, now, owner=self.owner, at=now, reason=waiting, refund_attempt=True
                    ),
                    waiting,
                )
            case RateLimitedError():
                pause = await self.limiter.rate_limited(exc.retry_after)
                log.warning("provider answered 429: pausing all requests for %.1fs", pause)
                limited = f"rate limited by the provider ({exc})"
                late = await self.store.requeue(
                    ids, now, owner=self.owner, at=now + pause, reason=limited, refund_attempt=True
                )
                self.not_held(late, limited)
            case TransientUnknownOutcome():
                log.warning(
                    "outcome of request for %s unknown (%s): checking /logs first", ids, exc
                )
                self.limiter.answered()
                unknown = f"outcome unknown, checking the provider's logs: {exc}"
                late = await self.store.note_unknown(ids, now, unknown, "unknown", owner=self.owner)
                self.not_held(late, unknown)
                self._left_to_logs(now)
            case ProviderFailed():
                # It says it failed; /logs still decides, a 5xx is not proof of nothing sent.
                self.limiter.answered()
                error = f"provider error, checking its logs before a retry: {exc}"
                late = await self.store.note_unknown(
                    ids, now, error, "provider-error", owner=self.owner
                )
                self.not_held(late, error)
                self._left_to_logs(now)
            case TransientSendError():
                await self.retry_later(batch, exc)
            case _:
                raise exc

    async def _check_balance(self, balance: float | None) -> None:
        if balance is None:
            return
        self.balance = balance
        if self.budget is None:
            return
        low = self.budget.config.low_balance  # the budget's, so a reload moves it
        if low and balance < low:
            await self.budget.warn(
                "low-balance", f"sms-bridge: provider balance {balance:g} is below {low:g}"
            )
            self.wake.set()

    async def _refused(self, batch: list[Message], exc: ProviderError) -> None:
        now = self.clock.now()
        if len(batch) > 1:
            log.warning(
                "bulk call refused (%s): sending its %d messages one by one", exc, len(batch)
            )
            solo = f"bulk refused, retrying one by one: {exc.reason}"
            late = await self.store.requeue(
                [m.id for m in batch],
                now,
                owner=self.owner,
                at=now,
                solo=True,
                reason=solo,
                refund_attempt=True,
            )
            self.not_held(late, solo)
            return
        reason = f"provider refused: {exc.reason}"
        late = await self.store.finish([(batch[0].id, State.FAILED, reason)], now, owner=self.owner)
        self.not_held(late, reason)

    async def key_refused(self, exc: ProviderAuthError) -> float:
        """401/403/404: health red, every instance paused until the next try (403:
        doubling); the seconds until then."""
        now = self.clock.now()
        inactive = isinstance(exc, ProviderInactiveError)
        account = isinstance(exc, ProviderAccountError)
        self.health.auth_failed(str(exc), now, inactive=inactive, account=account)
        if account and self.budget is not None:
            # Once a day (`warn`); queued, it goes with the rest once the account sends.
            # Only the provider's words say why: a 200 said so was otherwise a green
            # /readyz and texts failing one by one.
            await self.budget.warn(
                "provider-account",
                f"sms-bridge: the provider says the account cannot send ({exc.reason[:100]});"
                " texts wait until it sends again",
            )
        wait = self.config.auth_probe_interval
        if inactive:
            self._inactive_strikes += 1
            doubled = min(self.config.backoff_max, wait * 2 ** (self._inactive_strikes - 1))
            # never under the probe's interval: a backoff_max of 0 sent back to back
            wait = max(wait, doubled)
        self.next_probe = now + wait
        # The key is the cluster's: the other instances wait too, rather than each
        # spending a request to learn it (the probe, or the next send, goes at the end).
        await self.limiter.pause(self.next_probe, f"provider refused the key: {exc}")
        return wait

    async def retry_later(self, batch: list[Message], exc: TransientSendError) -> None:
        now = self.clock.now()
        retry, give_up = [], []
        for m in batch:
            delay = max(self.backoff(m.attempts + 1), exc.retry_after or 0.0)
            # Its age from when it was due: one the bridge kept for its schedule_time
            # (bridge.schedule) was failed at its first 5xx, stored months before; one
            # a daily cap held until 00:00 at its first 5xx after it, held for hours.
            if now + delay - m.due_at > self.config.retry_max_age:
                give_up.append(
                    (m.id, State.FAILED, f"gave up after {m.attempts + 1} attempts: {exc}")
                )
            else:
                retry.append((m.id, delay))
        if give_up:
            late = await self.store.finish(give_up, now, owner=self.owner)
            self.not_held(late, f"failed, gave up: {exc}")
        for message_id, delay in retry:
            late = await self.store.requeue(
                [message_id], now, owner=self.owner, at=now + delay, reason=f"retrying: {exc}"
            )
            self.not_held(late, f"retrying: {exc}")

    def backoff(self, attempts: int) -> float:
        # The exponent capped: past 1024 doublings the float overflowed (OverflowError out
        # of the dispatcher's step, ending `serve`), and /logs failing for days counts
        # that many reads. 2**64 is past any backoff_max already.
        doublings = min(max(0, attempts - 1), MAX_DOUBLINGS)
        base = min(self.config.backoff_max, self.config.backoff_initial * 2**doublings)
        return base * (0.5 + 0.5 * self.rng.random())


def _unnamed(batch: list[Message], result: SendResult) -> list[Message]:
    """The messages of a call whose answer gave recipients' ids but none of theirs."""
    if not result.message_ids:  # no ids at all (a batch id, a count): all taken alike
        return []
    named = result.message_ids.keys() | result.shared  # an id shared: taken, no id of its own
    return [m for m in batch if m.recipient not in named]


def _sent_rows(
    batch: list[Message], result: SendResult
) -> list[tuple[int, str | None, float | None]]:
    """Each message's own id, or none (never the batch id: the poller could not match it)."""
    share = None if result.cost is None else round(result.cost / len(batch), 6)
    return [(m.id, result.message_ids.get(m.recipient), share) for m in batch]
