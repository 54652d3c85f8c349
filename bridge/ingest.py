"""The one ingest path: SMTP and HTTP both end here.

`Ingestor.submit` shapes each draft (message type, parts), then policy and insert run in
the writer's next transaction, together with every other submit queued for it (one
lookup and one insert for all of them), and it returns only once that is durable. The
caller acknowledges after it returns, never before; a StoreUnavailable means "tell the
sender to retry". The dispatcher is woken, never called: delivery is not the request's job.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlite_utils import Database

from bridge.clock import Clock
from bridge.errors import StoreUnavailable
from bridge.models import NewMessage, State
from bridge.phone import is_assigned
from bridge.policy import Rules, decide_all, scoped_key, text_key
from bridge.pricing import PriceBook
from bridge.store import Store
from bridge.text import Shape, shape, transliterate, truncate_to_parts

log = logging.getLogger(__name__)
MAX_PENDING_INGESTS = 2000
TOPIC_CHARS = 32  # beyond this the bridge answers 503 / 451, not an unbounded queue


@functools.lru_cache(maxsize=1024)  # alert texts repeat, in a storm above all
def _prepared(
    text: str, replace_look_alikes: bool, max_parts: int, arabic_type: int
) -> tuple[str, Shape, str]:
    """The text as stored (look-alikes replaced, cut to `max_parts`), its shape, and the
    dedupe key it has when its sender gives none."""
    if replace_look_alikes:
        text = transliterate(text)
    text = truncate_to_parts(text, max_parts)
    return text, shape(text, arabic_type=arabic_type), text_key(text)


@dataclass(frozen=True, slots=True)
class Draft:
    """One text to one or more already-resolved E.164 recipients (Firewall.resolve)."""

    recipients: Sequence[str]
    text: str
    source: str
    sender_id: str
    route: str | None = None
    dedupe_key: str | None = None
    schedule_time: str | None = None
    suppressed_reason: str | None = None  # e.g. an auto-reply: stored, never sent
    topic: str | None = None  # what a storm digest counts it as; default: its first line
    instance: str | None = None  # what a storm digest names besides (a host, a pod)
    scope: str | None = None  # where dedupe keys come from (policy.dedupe_scope); default: source


@dataclass(frozen=True, slots=True)
class Accepted:
    id: int
    recipient: str
    state: State
    reason: str | None


class Ingestor:
    def __init__(
        self,
        *,
        store: Store,
        clock: Clock,
        rules: Rules,
        max_parts: int = 3,
        transliterate: bool = True,
        arabic_type: int = 2,
        prices: PriceBook | None = None,
        on_stored: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.rules = rules
        self.max_parts = max_parts
        self.transliterate = transliterate
        self.arabic_type = arabic_type
        self.prices = prices or PriceBook()
        self.on_stored = on_stored
        self.pending = 0

    def _messages(self, drafts: Sequence[Draft]) -> list[NewMessage]:
        out = []
        for draft in drafts:
            text, form, text_dedupe_key = _prepared(
                draft.text, self.transliterate, self.max_parts, self.arabic_type
            )
            topic = draft.topic or text.split("\n", 1)[0][:TOPIC_CHARS]
            dedupe_key = scoped_key(
                draft.scope or draft.source, draft.dedupe_key or text_dedupe_key
            )
            for recipient in draft.recipients:
                if not is_assigned(recipient):
                    log.warning(
                        "%s is possible but not a known assigned number; sending anyway", recipient
                    )
                out.append(
                    NewMessage(
                        recipient=recipient,
                        text=text,
                        source=draft.source,
                        sender_id=draft.sender_id,
                        message_type=form.message_type,
                        parts=form.parts,
                        route=draft.route,
                        dedupe_key=dedupe_key,
                        schedule_time=draft.schedule_time,
                        state=State.SUPPRESSED if draft.suppressed_reason else State.QUEUED,
                        reason=draft.suppressed_reason,
                        reason_kind="loop" if draft.suppressed_reason else None,
                        topic=topic,
                        instance=draft.instance,
                        estimated_cost=self.prices.estimate(recipient, form.parts),
                    )
                )
        return out

    def preview(self, drafts: Sequence[Draft]) -> list[NewMessage]:
        """What `submit` would store, before policy: texts cut and shaped, costs
        estimated. Stores nothing (the console's route preview)."""
        return self._messages(drafts)

    async def submit(self, drafts: Sequence[Draft]) -> list[Accepted]:
        if self.pending >= MAX_PENDING_INGESTS:
            raise StoreUnavailable("overloaded: too many messages waiting for the store")
        messages = self._messages(drafts)
        self.pending += 1
        try:
            accepted: list[Accepted] = await self.store.write_batched(
                self._store, (messages, self.clock.now())
            )
        finally:
            self.pending -= 1
        if any(a.state in (State.QUEUED, State.HELD) for a in accepted):
            self.on_stored()
        return accepted

    def _store(
        self, db: Database, submits: list[tuple[list[NewMessage], float]]
    ) -> list[list[Accepted]]:
        """Every submit queued for one transaction: decided and inserted together."""
        pending = [(message, now) for messages, now in submits for message in messages]
        first_id = Store.next_message_id(db)
        decided = decide_all(db, pending, first_id=first_id, rules=self.rules)
        ids = Store.insert_messages(db, decided, [now for _, now in pending], first_id=first_id)
        accepted = iter(
            Accepted(i, m.recipient, m.state, m.reason) for i, m in zip(ids, decided, strict=True)
        )
        return [[next(accepted) for _ in messages] for messages, _ in submits]
