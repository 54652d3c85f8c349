"""Policy applied inside the ingest transaction: what is stored as queued or suppressed.

It runs in the store's writer thread, inside the same transaction as the insert, so two
concurrent duplicates cannot both slip through.
"""

from __future__ import annotations

import dataclasses

from sqlite_utils import Database

from bridge.models import NewMessage, State
from bridge.store import Store


def apply_dedupe(
    db: Database, messages: list[NewMessage], *, now: float, window: float
) -> list[NewMessage]:
    """A message whose key and recipient match one stored within `window` is suppressed."""
    decided: list[NewMessage] = []
    seen: dict[tuple[str, str], int] = {}
    for m in messages:
        if m.dedupe_key is None or m.state != State.QUEUED:
            decided.append(m)
            continue
        original = Store.find_duplicate(db, m.recipient, m.dedupe_key, now - window)
        if original is None and (m.dedupe_key, m.recipient) in seen:
            decided.append(
                dataclasses.replace(
                    m,
                    state=State.SUPPRESSED,
                    reason="duplicate of another recipient entry in the same request",
                )
            )
            continue
        if original is not None:
            decided.append(
                dataclasses.replace(
                    m,
                    state=State.SUPPRESSED,
                    reason=f"duplicate of message {original} (dedupe key {m.dedupe_key!r})",
                )
            )
            continue
        seen[(m.dedupe_key, m.recipient)] = 1
        decided.append(m)
    return decided
