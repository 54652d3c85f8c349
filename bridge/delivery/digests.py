"""Storm digests: held messages to one phone become one SMS when their window ends.

    +37 more: HighLatency x20, DiskFull x17

A phone that was held at `per_recipient` texts gets, `per_recipient_window` after its
first held message's time (a scheduled one's `schedule_time`: storm control counts it
then, bridge.policy.decide), one digest counting what was held by topic; each held
message then ends `suppressed` with a reason naming the digest. A held message scheduled
later waits for the digest after its own time. Nothing held is dropped silently.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Iterable

from bridge.clock import Clock
from bridge.config import LimitsConfig, ProviderConfig
from bridge.loops import LoopHealth, run_steps
from bridge.models import NewMessage
from bridge.policy.shaping import Draft, Shaper, default_topic
from bridge.store import Store
from bridge.store.api import Held

log = logging.getLogger(__name__)
SHOWN_TOPICS = 3
SHOWN_INSTANCES = 2
IDLE_WAIT = 30.0


def digest_text(topics: list[str], instances: list[str | None] | None = None) -> str:
    """`+37 more: HighLatency x20, DiskFull x17 (api-1, db-2...)`"""
    counts = Counter(topics).most_common()
    shown = ", ".join(f"{topic} x{count}" for topic, count in counts[:SHOWN_TOPICS])
    others = len(counts) - SHOWN_TOPICS
    text = f"+{len(topics)} more: {shown}" + (f", +{others} other" if others > 0 else "")
    names = list(dict.fromkeys(name for name in instances or [] if name))
    if names:
        more = "..." if len(names) > SHOWN_INSTANCES else ""
        text += f" ({', '.join(names[:SHOWN_INSTANCES])}{more})"
    return text


def _sole(values: Iterable[str | None]) -> str | None:
    """The one value all share; None when they differ (or none has one)."""
    distinct = set(values)
    return distinct.pop() if len(distinct) == 1 else None


def digest_token(held: list[Held]) -> str | None:
    """The API token a digest is counted against (`tokens.NAME.texts_per_day`).

    Held messages that all came with one token: that token. The digest is the text
    their storm still costs, so a looping token's storm keeps counting against its cap,
    and waits (or fails) once the token is over it, as its own texts would.

    Mixed tokens (or some with none, from mail or an open route): none. The digest
    speaks for every sender, so no one token's cap may hold it back (the others' alerts
    would wait with it), and giving it to the most frequent one would charge that token
    for the others' texts. The overall caps still count it, and storm control bounds it
    to one text per phone and window, so it cannot be a way around a token's cap.
    """
    return _sole(m.token for m in held)


def digest_route(held: list[Held]) -> str | None:
    """The route a digest is counted against (`routes.NAME.max_texts_per_day`), by the
    rule and for the reasons of `digest_token`: the held messages' one route, or none
    when they came through several (or some by mail or the API), so that no one route's
    cap holds back the others' alerts nor is charged for them."""
    return _sole(m.route for m in held)


class DigestWorker:
    def __init__(
        self,
        *,
        store: Store,
        clock: Clock,
        limits: LimitsConfig,
        provider: ProviderConfig,
        shaper: Shaper,
        on_created: Callable[[], None] = lambda: None,
        loops: LoopHealth | None = None,
    ) -> None:
        self.loops = loops or LoopHealth()  # its failed steps, for /metrics and /healthz
        self.store = store
        self.clock = clock
        self.sender_id = provider.sender_id  # the bridge's own texts: fixed until restart
        self.reload(limits)
        self.shaper = shaper
        self.on_created = on_created

    def reload(self, limits: LimitsConfig) -> None:
        """`limits.per_recipient_window`: when a held phone's digest is due (SIGHUP)."""
        self.window = limits.per_recipient_window

    async def run(self, stop: asyncio.Event) -> None:
        """Fold until `stop` (on a cluster's leader: bridge.delivery.cluster)."""
        await run_steps(
            self.run_once,
            name="digest worker",
            clock=self.clock,
            stop=stop,
            retry_after=IDLE_WAIT,
            health=self.loops,
        )

    async def run_once(self) -> float:
        """Send the digests that are due; return seconds until the next one is."""
        now = self.clock.now()
        pending = await self.store.held_phones()
        due = [recipient for recipient, first in pending if first + self.window <= now]
        for recipient in due:
            await self._fold(recipient, now)
        if due:
            self.on_created()
        later = [first + self.window - now for _, first in pending if first + self.window > now]
        return min([IDLE_WAIT, *later])

    async def _fold(self, recipient: str, now: float) -> int | None:
        def digest(held: list[Held]) -> NewMessage:
            draft = Draft(
                recipients=[recipient],
                text=digest_text(
                    [m.topic or default_topic(m.text) for m in held], [m.instance for m in held]
                ),
                source="digest",
                sender_id=self.sender_id,
                topic="digest",
                token=digest_token(held),
                route=digest_route(held),
            )
            # Shaped as every text is; no dedupe key: a digest is never held back as a repeat.
            return self.shaper.messages([draft])[0]._replace(dedupe_key=None)

        folded = await self.store.fold_held(
            recipient, now, digest, lambda i: f"storm control: folded into digest message {i}"
        )
        if folded is None:
            return None
        digest_id, count = folded
        log.warning("storm digest %d to %s folds %d held messages", digest_id, recipient, count)
        return digest_id
