"""Claims kept while this instance works on them.

A claim holds for `cluster.lease`; past it the leader's sweep takes the message over and
looks it up in /logs. Whatever this instance does with a claim that may outlast the
lease (a provider call in flight, a walk of /logs deciding unknown outcomes, an unknown
outcome waiting for its look) renews it every third of the lease meanwhile: taken over,
a call in flight was looked up before the provider logged it and sent twice, and a slow
walk was done twice (another instance's reads out of the same rate window) with its own
decision dropped as no longer held. An instance that dies stops renewing, so its claims
still pass on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence

from bridge.clock import Clock
from bridge.errors import StoreUnavailable
from bridge.store import Store

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def renewed(
    store: Store,
    clock: Clock,
    ids: Sequence[int] | Callable[[], Sequence[int]],
    *,
    owner: str,
    lease: float,
    what: str,
) -> AsyncIterator[None]:
    """`owner`'s claims on `ids` (or on what `ids()` says at each renewal) renewed every
    third of `lease` while the block runs (`what` names them in the log). One process
    (SQLite): `renew` does nothing."""
    held = ids if callable(ids) else (lambda: ids)
    renewing = asyncio.create_task(_renew(store, clock, held, owner, lease, what))
    try:
        yield
    finally:
        renewing.cancel()


async def _renew(
    store: Store,
    clock: Clock,
    held: Callable[[], Sequence[int]],
    owner: str,
    lease: float,
    what: str,
) -> None:
    while True:
        await clock.sleep(lease / 3)
        if not (ids := list(held())):
            continue
        try:
            await store.renew(ids, owner=owner, lease_until=clock.now() + lease)
        except StoreUnavailable as exc:  # the work goes on; the lease may run out
            log.warning("claims of %s not renewed: %s", what, exc)
        except Exception:
            # Any other error too: ending the renewals here let the lease lapse while
            # the work went on, and another instance take the text over and send it
            # again. The next renewal may well go through.
            log.exception("claims of %s not renewed; trying again", what)
