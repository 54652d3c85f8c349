"""The store: every message, its events and the provider's rate window, behind one
interface of operations (`bridge.store.api.Store`).

Nothing outside this package speaks SQL or holds a connection; `open_store` picks the
backend from the `[store]` config section: SQLite at `store.path` (the embedded
default, `bridge.store.sqlite`) unless `store.url` names a shared server.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bridge.errors import ConfigError
from bridge.store.api import Store

if TYPE_CHECKING:
    from bridge.config import StoreConfig

__all__ = ["Store", "open_store"]


def open_store(config: StoreConfig) -> Store:
    """The store `config` names, not yet opened (`await store.open()`, then `close()`)."""
    if config.url:
        # Only postgresql:// passes config validation; this build has no driver for it.
        raise ConfigError([("store.url", "PostgreSQL store not available in this build")])
    from bridge.store.sqlite import SqliteStore  # the embedded default

    return SqliteStore(config.path)
