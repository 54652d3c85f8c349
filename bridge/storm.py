"""Storm digests: held messages to one phone become one SMS when their window ends.

    +37 more: HighLatency x20, DiskFull x17

A phone that was held at `per_recipient` texts gets, `per_recipient_window` after its
first held message, one digest counting what was held by topic; each held message then
ends `suppressed` with a reason naming the digest. Nothing held is dropped silently.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import Counter
from collections.abc import Callable

from sqlite_utils import Database

from bridge.clock import Clock
from bridge.loops import run_steps
from bridge.models import State
from bridge.shaping import Draft, Shaper, default_topic
from bridge.store import Store

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


class DigestWorker:
    def __init__(
        self,
        *,
        store: Store,
        clock: Clock,
        window: float,
        sender_id: str,
        shaper: Shaper,
        on_created: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.window = window
        self.sender_id = sender_id
        self.shaper = shaper
        self.on_created = on_created

    async def run(self, stop: asyncio.Event) -> None:
        await run_steps(
            self.run_once, name="digest worker", clock=self.clock, stop=stop, retry_after=IDLE_WAIT
        )

    async def run_once(self) -> float:
        """Send the digests that are due; return seconds until the next one is."""
        now = self.clock.now()
        pending = await self.store.read(
            lambda c: c.execute(
                "SELECT recipient, min(created_at) FROM messages WHERE state = 'held'"
                " GROUP BY recipient"
            ).fetchall()
        )
        due = [recipient for recipient, first in pending if first + self.window <= now]
        for recipient in due:
            await self.store.write(functools.partial(self._fold, recipient=recipient, now=now))
        if due:
            self.on_created()
        later = [first + self.window - now for _, first in pending if first + self.window > now]
        return min([IDLE_WAIT, *later])

    def _fold(self, db: Database, *, recipient: str, now: float) -> int | None:
        held = db.execute(
            "SELECT id, topic, text, instance FROM messages WHERE recipient = ?"
            " AND state = 'held'"
            " ORDER BY id",
            (recipient,),
        ).fetchall()
        if not held:
            return None
        topics = [row[1] or default_topic(row[2]) for row in held]
        instances = [row[3] for row in held]
        draft = Draft(
            recipients=[recipient],
            text=digest_text(topics, instances),
            source="digest",
            sender_id=self.sender_id,
            topic="digest",
        )
        # Shaped as every text is; no dedupe key: a digest is never held back as a repeat.
        digest = self.shaper.messages([draft])[0]._replace(dedupe_key=None)
        [digest_id] = Store.insert_messages(
            db,
            [digest],
            now,
        )
        db.execute(
            "UPDATE messages SET state = ?, reason = ?, updated_at = ? WHERE recipient = ?"
            " AND state = 'held' AND id <= ?",
            (
                str(State.SUPPRESSED),
                f"storm control: folded into digest message {digest_id}",
                now,
                recipient,
                held[-1][0],
            ),
        )
        log.warning("storm digest %d to %s folds %d held messages", digest_id, recipient, len(held))
        return digest_id
