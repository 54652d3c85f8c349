"""The SQLite implementation of the store (`bridge.store.api.Store`): the only code
that speaks to SQLite (tests/test_imports.py holds everything else to that)."""

from bridge.store.sqlite.store import SqliteStore

__all__ = ["SqliteStore"]
