"""How a store is named in messages and logs: a PostgreSQL URL with its password hidden
(the URL is a secret as a whole in the config; this is the part worth showing), or the
SQLite file."""

from __future__ import annotations

import urllib.parse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bridge.config import StoreConfig


def display_url(url: str) -> str:
    """`url` with the password replaced, the rest kept to find the server."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname or ''}"
    netloc += f":{parts.port}" if parts.port else ""
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def describe(config: StoreConfig) -> str:
    """Which store: the server's URL (password hidden), or the SQLite file."""
    return display_url(config.url) if config.url else config.path
