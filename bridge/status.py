"""The delivery-status poller: `sent` -> `delivered` or `failed`, from the provider's /logs.

The provider has no delivery callback, and /logs costs requests out of the same budget
as sending, so the poller takes at most `status.budget_share` of it and stops asking
about a message after `status.give_up_after` (it then stays `sent`, its last known state).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

from bridge.clock import Clock
from bridge.config import StatusConfig
from bridge.errors import ProviderAuthError, ProviderError, RateLimitedError
from bridge.health import ProviderHealth
from bridge.loops import run_steps
from bridge.models import State
from bridge.provider.client import MAX_LOGS_PER_PAGE, ProviderClient
from bridge.ratelimit import SlidingWindowLimiter
from bridge.store import Store

log = logging.getLogger(__name__)
FINAL_PROVIDER_STATES = {"delivered": State.DELIVERED, "failed": State.FAILED}
MAX_PAGES_PER_ROUND = 5
# Oldest first; more could not be matched in one round of MAX_PAGES_PER_ROUND pages anyway.
MAX_TRACKED_PER_ROUND = 500


class StatusPoller:
    def __init__(
        self,
        *,
        store: Store,
        client: ProviderClient,
        limiter: SlidingWindowLimiter,
        clock: Clock,
        config: StatusConfig,
        health: ProviderHealth,
    ) -> None:
        self.store = store
        self.client = client
        self.limiter = limiter
        self.clock = clock
        self.config = config
        self.health = health

    async def run(self, stop: asyncio.Event) -> None:
        await run_steps(
            self.run_once,
            name="status poller",
            clock=self.clock,
            stop=stop,
            retry_after=self.config.poll_interval,
        )

    async def run_once(self) -> float:
        """One round over /logs; returns seconds until the next round."""
        now = self.clock.now()
        waiting = await self.store.awaiting_status(
            since=now - self.config.give_up_after, limit=MAX_TRACKED_PER_ROUND
        )
        self.limiter.status_demand = bool(waiting)
        if not waiting or not self.health.ready:
            return self.config.poll_interval
        by_id = {m.provider_message_id: m for m in waiting}
        oldest = min(m.sent_at or now for m in waiting)
        date_from = datetime.fromtimestamp(oldest - 86400, UTC).strftime("%Y-%m-%d")
        # /logs is newest first. The tracked messages are the oldest waiting, so skip the
        # pages that hold what we sent after them (less one page of slack for entries
        # from other clients of the same account), instead of rereading the newest.
        newest = max(waiting, key=lambda m: (m.sent_at or now, m.id))
        after = await self.store.sent_after(newest)
        first_page = max(1, after // MAX_LOGS_PER_PAGE)
        updates = []
        for page in range(first_page, first_page + MAX_PAGES_PER_ROUND):
            wait = self.limiter.wait_time("status")
            if wait > 0:
                break
            at = self.clock.now()
            self.limiter.book(at, "status")
            await self.store.record_request(at, "status")
            try:
                logs = await self.client.logs(
                    page=page, per_page=MAX_LOGS_PER_PAGE, date_from=date_from
                )
            except RateLimitedError as exc:
                self.limiter.pause(
                    self.clock.now() + (exc.retry_after or self.config.poll_interval)
                )
                break
            except ProviderAuthError as exc:
                self.health.auth_failed(str(exc), self.clock.now())
                break
            except ProviderError as exc:
                log.info("status poll failed: %s", exc)
                break
            for entry in logs.entries:
                m = by_id.pop(entry.id, None)
                if m is not None and entry.status in FINAL_PROVIDER_STATES:
                    reason = None if entry.status == "delivered" else "provider reports failed"
                    updates.append((m.id, FINAL_PROVIDER_STATES[entry.status], reason))
            if not by_id or not logs.has_more:
                break
        if updates:
            await self.store.finish(updates, self.clock.now())
        return max(self.config.poll_interval, self.limiter.wait_time("status"))
