"""Configuration: TOML file + `SMS_BRIDGE_<SECTION>_<KEY>` environment -> frozen dataclasses.

Everything is checked once, at start; `load_config` raises one `ConfigError` listing every
problem with its key path, so `serve` exits 1 before it opens a port. Secrets may be given
as `<key>_file` naming a file to read (systemd credentials, Docker secrets).

One concern per module, imported in this order (each only from those before it):

- `sections`: the dataclasses, one per TOML section, and each key's default;
- `parsing`: one value at a time (durations, listen addresses, env strings, mail rules);
- `recipients`: the one resolver of numbers, groups and mailboxes every path uses;
- `exposure`: protected mode, and what a reload applies (`as_reloaded`);
- `validate`: the checks across keys, every problem by key;
- `loader`: `load_config` (file, environment, secret files);
- `masking`: secrets masked, from `secret=True` fields alone;
- `live`: the live view the HTTP side reads per request.

Callers import from `bridge.config`; the names below are its interface.
"""

from __future__ import annotations

from bridge.config.exposure import (
    RESTART_ONLY,
    as_reloaded,
    is_loopback_host,
    protection_problems,
)
from bridge.config.live import LiveConfig
from bridge.config.loader import config_path_from, load_config, route_env_prefix
from bridge.config.masking import (
    exposed_secrets,
    inline_secrets,
    key_fingerprint,
    masked,
    secret_env_files,
    secret_files,
    secret_values,
)
from bridge.config.parsing import file_problem, parse_duration, parse_listen, store_file_problem
from bridge.config.recipients import Recipients
from bridge.config.sections import (
    COMPOSE_MODES,
    DEFAULT_HTTP_LISTEN,
    DEFAULT_SMTP_LISTEN,
    DEFAULT_STORE_PATH,
    ENV_PREFIX,
    MAKE_SECRET,
    MAKE_SMTP_PASSWORD,
    MAX_REQUESTS_PER_MINUTE,
    MIN_SECRET_CHARS,
    MIN_SMTP_PASSWORD_CHARS,
    ROUTE_FORMATS,
    SANDBOX_VARIANTS,
    SCOPES,
    SECTIONS,
    SIGNED_FORMATS,
    BudgetConfig,
    Config,
    DedupeConfig,
    HttpConfig,
    LimitsConfig,
    LogConfig,
    MailRule,
    PhoneConfig,
    ProviderConfig,
    RouteConfig,
    SandboxConfig,
    SmtpConfig,
    StatusConfig,
    StoreConfig,
    TokenConfig,
    route_dedupe_window,
)
from bridge.config.validate import purge_problem, store_url_problem
from bridge.errors import ConfigError

__all__ = [
    "COMPOSE_MODES",
    "DEFAULT_HTTP_LISTEN",
    "DEFAULT_SMTP_LISTEN",
    "DEFAULT_STORE_PATH",
    "ENV_PREFIX",
    "MAKE_SECRET",
    "MAKE_SMTP_PASSWORD",
    "MAX_REQUESTS_PER_MINUTE",
    "MIN_SECRET_CHARS",
    "MIN_SMTP_PASSWORD_CHARS",
    "RESTART_ONLY",
    "ROUTE_FORMATS",
    "SANDBOX_VARIANTS",
    "SCOPES",
    "SECTIONS",
    "SIGNED_FORMATS",
    "BudgetConfig",
    "Config",
    "ConfigError",
    "DedupeConfig",
    "HttpConfig",
    "LimitsConfig",
    "LiveConfig",
    "LogConfig",
    "MailRule",
    "PhoneConfig",
    "ProviderConfig",
    "Recipients",
    "RouteConfig",
    "SandboxConfig",
    "SmtpConfig",
    "StatusConfig",
    "StoreConfig",
    "TokenConfig",
    "as_reloaded",
    "config_path_from",
    "exposed_secrets",
    "file_problem",
    "inline_secrets",
    "is_loopback_host",
    "key_fingerprint",
    "load_config",
    "masked",
    "parse_duration",
    "parse_listen",
    "protection_problems",
    "purge_problem",
    "route_dedupe_window",
    "route_env_prefix",
    "secret_env_files",
    "secret_files",
    "secret_values",
    "store_file_problem",
    "store_url_problem",
]
