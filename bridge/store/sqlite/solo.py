"""Coordination of one process (`bridge.store.api.Coordination` on SQLite): the embedded
store has one `serve`, so it always leads and nobody else makes work to be woken for.
"""

from __future__ import annotations


class SoleLeader:
    """Always leads: one process on one file."""

    async def check(self) -> bool:
        return True

    async def resign(self) -> None:
        return None


class NoOtherWork:
    """Nobody else stores messages: the ingest in this process wakes its dispatcher."""

    async def check(self) -> bool:
        return False

    async def close(self) -> None:
        return None
