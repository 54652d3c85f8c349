"""One `serve` per SQLite store, enforced.

The embedded store's `serve` believes it is the only one: it leads every singleton, and
its reconciler takes every message in `sending` for one its own crash left (SQLite has
no owners nor leases). A second `serve` on the same file (a unit started twice, a
container scaled to two on one volume, a new release started before the old stopped)
would poll and purge twice, and take the other's sends in flight for crash leftovers:
after a few seconds it looks for them in the provider's /logs, and sends again what is
not there yet. So `serve` holds an exclusive lock on a file beside the store for as long
as it runs (the kernel frees it when the process ends, however it ends); a second one
is refused at start with the reason. The CLI's commands (`messages`, `provider`,
`purge`) open the store beside a running `serve`, as before: they take no such lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from bridge.errors import StoreUnavailable


def lock_path(path: str) -> str:
    """The lock beside the store's real file: two serves naming it by different paths (a
    symlink to it or to its directory, `./` or not) hold one lock."""
    return f"{os.path.realpath(path)}.serve-lock"


@contextlib.contextmanager
def only_serve(path: str) -> Iterator[None]:
    """Hold the store at `path` for this `serve` until the block ends; StoreUnavailable
    if another process holds it."""
    name = lock_path(path)
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)  # as the store's open does
        fd = os.open(name, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StoreUnavailable(f"cannot create {name}: {exc.strerror or exc}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreUnavailable(
                f"another `sms-bridge serve` is running on {path} (it holds {name}): one"
                " serve per SQLite store; stop it first (several instances need PostgreSQL:"
                " docs/cluster.md)"
            ) from None
        yield
    finally:
        os.close(fd)  # and with it the lock
