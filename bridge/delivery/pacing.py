"""Which due messages share a provider call, and when a call of one text waits for more.

Pure decisions, no I/O: the dispatcher asks them with what the queue and the rate
window say.

Grouping: messages with the same text, sender and type go in one `/send-bulk` call of up
to `max_bulk` distinct recipients (a second message to one phone goes in a later call);
scheduled, solo (a refused bulk retried one by one) and, unless the provider takes
`message_type` on bulk calls, non-GSM messages go alone.

Pacing: a flood of one text (a mail or hook per phone) arrives a few recipients at a
time. Sent as it comes, it spends the 100 requests of the window in seconds on calls of a
few recipients each, and the rest of the flood then waits for the window to turn (51 s
after the last acknowledgement, measured on 3,000 messages). So a call of one text that
was sent recently, while more of it keeps arriving, waits: the calls of one text are
spaced by at least `window / remaining`, what is left of the window spread evenly over a
whole window. A backlog of one text then never empties the window by itself (the spacing
grows as the budget shrinks, and a window later every booking has expired), each call
carries what arrived in the spacing, and the last recipients go at most one spacing
(~0.6 s at a full budget, ~1.2 s in a steady flood) after the last arrival.

Never held: the first call of a text (an idle alert goes at once), a full call, a text
whose arrivals would not add one recipient in the wait (a trickle is not a flood), a
message that must go alone. A hold never passes the spacing, so never a window.
"""

from __future__ import annotations

from collections.abc import Sequence

from bridge.models import Message
from bridge.text import TYPE_GSM

GroupKey = tuple[str, str, int]
MIN_SPAN = 0.001  # seconds: arrivals counted over at least this, so a rate stays finite


def text_of(m: Message) -> GroupKey:
    """Its text, sender and type: what its calls share (`bridge.store.due` reads by it)."""
    return (m.text, m.sender_id, m.message_type)


def group_key(m: Message, *, bulk_types: bool) -> GroupKey | None:
    """Messages sharing this key may go in one bulk call; None: must go alone."""
    if m.solo or m.schedule_time or (m.message_type != TYPE_GSM and not bulk_types):
        return None
    return text_of(m)


def plan_batches(due: Sequence[Message], *, max_bulk: int, bulk_types: bool) -> list[list[Message]]:
    """Group due messages into requests, oldest first, bulk only where the API allows.

    A call never names one recipient twice: the bulk answer is undocumented, and the
    bridge reads its ids by recipient, so two messages to one phone in one call got the
    same id (one of them then never learnt its delivery state), and a provider that
    merges repeated numbers would text once for two messages marked sent. A repeat goes
    in the next call of its text (the call after that for a third, and so on).
    """
    calls: dict[GroupKey, list[list[Message]]] = {}  # each text's calls, in order
    after: dict[tuple[GroupKey, str], int] = {}  # (text, phone) -> first call without it
    batches: list[list[Message]] = []
    for m in due:
        key = group_key(m, bulk_types=bulk_types)
        if key is None:
            batches.append([m])
            continue
        texts = calls.setdefault(key, [])
        index = after.get((key, m.recipient), 0)
        while index < len(texts) and len(texts[index]) >= max_bulk:
            index += 1
        if index == len(texts):
            texts.append([])
            batches.append(texts[index])
        texts[index].append(m)
        after[key, m.recipient] = index + 1
    return batches


def hold(
    *,
    queued: int,
    oldest_age: float,
    since_last: float | None,
    remaining: int,
    window: float,
    max_bulk: int,
) -> float:
    """Seconds the next call of one text should wait for more recipients; 0: send now.

    `queued`: its recipients due now (this call's); `oldest_age`: how long the oldest of
    them has waited; `since_last`: seconds since the last call of this text, None if
    none in the window; `remaining`: requests the window still allows; `window`: its
    length; `max_bulk`: recipients per call at most.
    """
    if queued >= max_bulk or since_last is None or remaining <= 0:
        return 0.0  # full, first of its text, or no budget (the limiter's wait rules)
    wait = window / remaining - since_last
    if wait <= 0:
        return 0.0
    # Arrivals over the span they came in: since the last call, or since the oldest
    # arrived when it predates that call (the rest of a full call).
    rate = queued / max(since_last, oldest_age, MIN_SPAN)
    if rate * wait < 1:
        return 0.0  # waiting would not bring one more recipient
    fill = (max_bulk - queued) / rate  # when the call would be full at this rate
    return min(wait, fill)
