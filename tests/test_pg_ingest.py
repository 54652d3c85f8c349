"""Group commit on PostgreSQL (bridge.store.postgres.ingest): every call gets a
transaction, however the event loop interleaves its arrival with the end of the ones
under way."""

from __future__ import annotations

import asyncio

from bridge.models import NewMessage, State
from bridge.policy.decide import Rules
from bridge.store.api import Stored
from bridge.store.postgres.ingest import _Call
from bridge.store.postgres.store import PostgresStore

RULES = Rules(dedupe_window=600.0)


def alert(n: int) -> NewMessage:
    return NewMessage(f"+1202555014{n}", f"alert {n}", "http", "SMS", 1, 1)


class CommitsReturnTogether(PostgresStore):
    """Each transaction's answer held until `together` is set: the commits of every
    transaction under way then come back in one turn of the event loop, as they do when
    the server answers them in one batch of reads (a flood)."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.together = asyncio.Event()
        self.committed: asyncio.Queue[None] = asyncio.Queue()  # one per transaction held

    async def _ingest_group(self, group: list[_Call]) -> list[list[Stored]]:
        done = await super()._ingest_group(group)
        self.committed.put_nowait(None)
        await self.together.wait()
        return done


async def test_an_ingest_arriving_as_every_transaction_ends_is_stored(postgres_url: str) -> None:
    """A call that arrived in the turn where the last transactions under way ended was
    left waiting: they had left their loop, yet still counted as running until their
    done callbacks ran, so it started none of its own. Its sender had no answer (and the
    message no row) until some later ingest came to start one: after a flood, the last
    alert hung for as long as the next one took to come."""
    store = CommitsReturnTogether(postgres_url)
    await store.open()
    try:
        under_way = []
        for n in range(store.MAX_FLUSHERS):  # one transaction each, all at once
            under_way.append(asyncio.create_task(store.ingest([(alert(n), 1.0)], RULES)))
            # Until a transaction of its own took it and committed (a hang fails here).
            async with asyncio.timeout(10):
                await store.committed.get()
        store.together.set()
        await asyncio.sleep(0)  # the transactions end their loops; now this arrives
        async with asyncio.timeout(10):  # the store's own bound; it never came
            [late] = await store.ingest([(alert(9), 2.0)], RULES)
        assert late.message.state == State.QUEUED
        assert [s.message.state for [s] in await asyncio.gather(*under_way)] == [
            State.QUEUED
        ] * store.MAX_FLUSHERS
        assert await store.counts() == {"queued": store.MAX_FLUSHERS + 1}
    finally:
        await store.close()
