"""The row a new message is inserted as, the same for every backend: the columns an
insert sets (the rest keep their defaults) and a message's values in that order. Each
backend writes its own statement around them."""

from __future__ import annotations

from typing import Any

from bridge.models import NewMessage
from bridge.schedule import scheduled_epoch

INSERTED = (
    *("id", "recipient", "text", "source", "sender_id", "message_type", "parts", "route"),
    *("dedupe_key", "schedule_time", "state", "reason", "created_at", "updated_at"),
    *("next_attempt_at", "topic", "reason_kind", "estimated_cost", "instance", "token"),
    "due_at",
)


def row(message_id: int, m: NewMessage, now: float) -> tuple[Any, ...]:
    """`m` stored as message `message_id`, created (and due) at `now`: its `due_at` the
    later of `now` and its schedule time."""
    return (
        message_id,
        m.recipient,
        m.text,
        m.source,
        m.sender_id,
        m.message_type,
        m.parts,
        m.route,
        m.dedupe_key,
        m.schedule_time,
        str(m.state),
        m.reason,
        now,
        now,
        now,
        m.topic,
        m.reason_kind,
        m.estimated_cost,
        m.instance,
        m.token,
        max(now, scheduled_epoch(m.schedule_time) or 0.0),
    )
