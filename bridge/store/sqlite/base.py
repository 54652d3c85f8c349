"""What the SQLite store's parts share: the engine they run their jobs on."""

from __future__ import annotations

from bridge.store.sqlite.engine import Engine


class EngineBound:
    """A part of `SqliteStore`: its operations run as jobs on `self.engine`."""

    engine: Engine
