"""The store: every message, its events and the provider's rate window, behind one
interface of operations (`bridge.store.api.Store`).

Nothing outside this package speaks SQL or holds a connection; `open_store` picks the
backend from the `[store]` config section: SQLite at `store.path` (the embedded
default, `bridge.store.sqlite`) unless `store.url` names a shared server.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import shlex
import sys
import urllib.parse
import urllib.request
from typing import TYPE_CHECKING

from bridge.errors import ConfigError
from bridge.store.api import Store
from bridge.store.names import describe, display_url, rate_window

if TYPE_CHECKING:
    from pathlib import Path

    from bridge.config import StoreConfig
    from bridge.store.copy import CopySummary

__all__ = [
    "Store",
    "copy_into_postgres",
    "describe",
    "display_url",
    "migrate_store",
    "open_store",
    "rate_window",
    "serving",
]


def serving(config: StoreConfig) -> contextlib.AbstractContextManager[None]:
    """Held by `serve` while it runs: on SQLite, the store's one serve (a second is
    refused: `bridge.store.sqlite.serving`); a PostgreSQL store takes any number."""
    if config.url:
        return contextlib.nullcontext()
    from bridge.store.sqlite.serving import only_serve

    return only_serve(config.path)


def open_store(config: StoreConfig, *, migrating: bool = False) -> Store:
    """The store `config` names, not yet opened (`await store.open()`, then `close()`).

    `migrating`: for `sms-bridge migrate`, whose `open()` must accept a database with
    no schema or an older one (`serve`'s refuses them); SQLite migrates at open anyway.
    """
    if config.url:  # only postgresql:// passes config validation
        try:
            from bridge.store.postgres.store import PostgresStore
        except ImportError as exc:  # asyncpg is the optional extra
            needs = f"the PostgreSQL store needs {postgres_extra(exc)}"
            raise ConfigError([("store.url", needs)]) from exc
        return PostgresStore(config.url, migrating=migrating)
    from bridge.store.sqlite import SqliteStore  # the embedded default

    return SqliteStore(config.path)


async def migrate_store(config: StoreConfig) -> list[str]:
    """`sms-bridge migrate`: create or upgrade the schema; the migrations applied.

    SQLite migrates whenever it opens (one process: nobody else would); PostgreSQL only
    here, so that instances of an older release are never upgraded under their feet.
    """
    store = open_store(config, migrating=True)
    await store.open()
    try:
        return await store.migrate()
    finally:
        await store.close()


async def copy_into_postgres(source: str | Path, url: str, *, replace: bool) -> CopySummary:
    """`sms-bridge store copy`: the SQLite store at `source` into PostgreSQL at `url`
    (see `bridge.store.copy`); loaded here only, as the PostgreSQL driver is an extra."""
    try:
        from bridge.store.copy import copy_sqlite_to_postgres
        from bridge.store.postgres.load import load  # noqa: F401  (the driver is there)
    except ImportError as exc:
        needs = f"copying into PostgreSQL needs {postgres_extra(exc)}"
        raise ConfigError([("store.url", needs)]) from exc
    return await copy_sqlite_to_postgres(source, url, replace=replace)


def postgres_extra(exc: ImportError) -> str:
    """What is missing, and the command that installs it into the Python that runs this
    bridge: the unit's venv (`/opt/sms-bridge/venv`) is not the shell's `pip`, and an
    install from a checkout is reinstalled from that checkout, editable if it was."""
    python = shlex.quote(sys.executable)
    try:
        origin = json.loads(
            importlib.metadata.distribution("sms-bridge").read_text("direct_url.json") or "{}"
        )
    except (importlib.metadata.PackageNotFoundError, ValueError):
        origin = {}
    url = urllib.parse.urlsplit(origin.get("url", ""))
    if url.scheme == "file" and "dir_info" in origin:  # installed from a checkout
        editable = "-e " if origin["dir_info"].get("editable") else ""
        target = urllib.request.url2pathname(url.path) + "[postgres]"
        install = f"{python} -m pip install {editable}{shlex.quote(target)}"
    else:
        install = f"{python} -m pip install 'sms-bridge[postgres]'"
    return f"its extra (asyncpg), which {sys.executable} lacks: {install} ({exc})"
