"""The one ingest path: SMTP and HTTP both end here.

`Ingestor.submit` shapes each draft (bridge.policy.shaping: type, parts), then the
store decides (with the policy's `Rules`) and inserts them in one transaction, which a
store may share with every other submit queued for it (SQLite's group commit: one
lookup and one insert for all of them), and it returns only once that is durable. The
caller acknowledges after it returns, never before; a StoreUnavailable means "tell the
sender to retry". The dispatcher is woken, never called: delivery is not the request's job.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import islice

from bridge.clock import Clock
from bridge.errors import StoreBusy, StoreUnavailable
from bridge.models import NewMessage, State
from bridge.policy.decide import Rules
from bridge.policy.shaping import Draft, Shaper
from bridge.store import Store

log = logging.getLogger(__name__)
MAX_PENDING_INGESTS = 2000  # beyond this the bridge answers 503 / 451, not an unbounded queue


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
        shaper: Shaper,
        on_stored: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.rules = rules
        self.shaper = shaper
        self.on_stored = on_stored
        self.pending = 0
        self.refused = 0  # submits answered "retry later" (503 / 451): the store's fault

    def reload(self, rules: Rules) -> None:
        """Dedupe windows and storm limits for the next ingest (SIGHUP). The shaper is
        shared with budget warnings and digests and is reloaded on its own."""
        self.rules = rules

    def preview(self, drafts: Sequence[Draft]) -> list[NewMessage]:
        """What `submit` would store, before policy: texts cut and shaped, costs
        estimated. Stores nothing (the console's route preview)."""
        return self.shaper.messages(drafts)

    async def submit(self, drafts: Sequence[Draft]) -> list[Accepted]:
        if self.pending >= MAX_PENDING_INGESTS:
            self.refused += 1
            # Busy: refused for now, passes when tried again, and its words (ours) name
            # nothing a sender may not read.
            raise StoreBusy("overloaded: too many messages waiting for the store")
        messages = self.shaper.messages(drafts)
        self.pending += 1
        try:
            now = self.clock.now()
            stored = await self.store.ingest([(m, now) for m in messages], self.rules)
        except StoreUnavailable:
            self.refused += 1
            raise
        finally:
            self.pending -= 1
        accepted = [Accepted(i, m.recipient, m.state, m.reason) for i, m in stored]
        await self._note(drafts, accepted, now)
        if any(a.state in (State.QUEUED, State.HELD) for a in accepted):
            self.on_stored()
        return accepted

    async def _note(self, drafts: Sequence[Draft], accepted: list[Accepted], now: float) -> None:
        """Each draft's note as an event of its rows (one row per recipient, in order),
        before the dispatcher is woken: the message's page tells the operator what the
        log alone told. The rows are stored already, so a store that fails here costs
        the note, never the message (a sender told to retry would text it twice)."""
        if not any(draft.note for draft in drafts):
            return  # nearly every submit
        notes: dict[str, list[int]] = {}
        rows = iter(accepted)
        for draft in drafts:
            ids = [row.id for row in islice(rows, len(draft.recipients))]
            if draft.note:
                notes.setdefault(_storable(draft.note), []).extend(ids)
        for note, ids in notes.items():
            try:
                await self.store.note(ids, note, now)
            except Exception as exc:  # anything: the rows are committed, a 500 would lie
                log.warning("messages %s stored, but not their note (%s): %s", ids, note, exc)


def _storable(note: str) -> str:
    """`note` as both stores hold it: it may quote what a template looked up (a name
    made of a payload's value), so without NUL, which PostgreSQL refuses, and with a
    lone surrogate, which UTF-8 cannot encode, written as its escape."""
    return note.replace("\x00", "").encode("utf-8", "backslashreplace").decode("utf-8")
