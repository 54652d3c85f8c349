"""How a store is named in messages and logs: a PostgreSQL URL with its password hidden
(the URL is a secret for its passwords: `bridge.config.masking.url_passwords`), or the
SQLite file."""

from __future__ import annotations

import urllib.parse
from typing import TYPE_CHECKING

from bridge.config.masking import key_fingerprint
from bridge.config.parsing import URL_PASSWORD_PARAMETERS, url_passwords

if TYPE_CHECKING:
    from bridge.config import ProviderConfig, StoreConfig


def display_url(url: str) -> str:
    """`url` with the password replaced, in its user part or its query, the rest kept
    to find the server; all of it where it cannot tell the password from the rest."""
    if url_passwords(url) == [url]:  # a raw "/" in the password: `bridge:hunter/2@db-1`
        return f"{url.partition('://')[0]}://***"
    parts = urllib.parse.urlsplit(url)
    if parts.password is not None:
        # The hosts kept as written: `parts.port` raised ValueError on the several hosts
        # asyncpg and libpq take (`h1:5432,h2:5433`), a traceback out of `serve`.
        userinfo, _, hosts = parts.netloc.rpartition("@")
        parts = parts._replace(netloc=f"{userinfo.partition(':')[0]}:***@{hosts}")
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    if any(key.lower() in URL_PASSWORD_PARAMETERS for key, _ in query):
        shown = [(k, "***" if k.lower() in URL_PASSWORD_PARAMETERS else v) for k, v in query]
        parts = parts._replace(query=urllib.parse.urlencode(shown, safe="*"))
    return urllib.parse.urlunsplit(parts)


def describe(config: StoreConfig) -> str:
    """Which store: the server's URL (password hidden), or the SQLite file."""
    return display_url(config.url) if config.url else config.path


def rate_window(provider: ProviderConfig, store: StoreConfig) -> str:
    """Where this bridge paces the provider's per-key limit, said by check-config and
    at start: the window is the store's, so two bridges with one key (the fingerprint
    shows it) share the limit only when they name the same store."""
    fingerprint = key_fingerprint(provider.api_key) or "(none)"
    return (
        f"rate window: provider key {fingerprint}, {provider.requests_per_minute} requests"
        f" a minute, counted in store {describe(store)} (bridges with this key on another"
        " store are not counted: docs/cluster.md, Limits)"
    )
