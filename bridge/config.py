"""Configuration: TOML file + `SMS_BRIDGE_<SECTION>_<KEY>` environment -> frozen dataclasses.

Everything is checked once, at start; `load_config` raises one `ConfigError` listing every
problem with its key path, so `serve` exits 1 before it opens a port. Secrets may be given
as `<key>_file` naming a file to read (systemd credentials, Docker secrets).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
import urllib.parse
import zoneinfo
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import phonenumbers

from bridge.errors import ConfigError, InputError
from bridge.firewall import SENDER_ID_RULE, Firewall, valid_sender_id

ENV_PREFIX = "SMS_BRIDGE_"
DEFAULT_SMTP_LISTEN = "127.0.0.1:2525"
DEFAULT_HTTP_LISTEN = "127.0.0.1:8080"
DEFAULT_STORE_PATH = "sms-bridge.db"
ONE_MIB = 1024 * 1024
ROUTE_FORMATS = ("alertmanager", "grafana", "github", "gitlab", "generic")
SIGNED_FORMATS = ("grafana", "github", "gitlab")  # the formats that check routes.NAME.secret
GROUP_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def _opt(default: Any, kind: str = "", secret: bool = False) -> Any:
    """A config key: its default and how to read it from a string (the environment)."""
    if isinstance(default, dict):
        return field(
            default_factory=lambda: dict(default), metadata={"kind": "table", "secret": secret}
        )
    if isinstance(default, list | tuple):
        return field(default=tuple(default), metadata={"kind": kind or "list", "secret": secret})
    return field(default=default, metadata={"kind": kind, "secret": secret})


@dataclass(frozen=True, slots=True)
class MailRule:
    """`[[smtp.rules]]`: for mail from a sender or with a subject, which lines to text.

    The first rule whose `sender` and `subject` both match (an absent one matches all)
    applies; `bridge.ingress.mailrules` does the picking.
    """

    name: str = ""  # shown in logs and check-config
    sender: tuple[str, ...] = ()  # globs on the From address or MAIL FROM, any matches
    subject: str = ""  # regular expression searched in the subject (case-insensitive)
    keep: tuple[str, ...] = ()  # regexes: only body lines matching one are kept
    drop: tuple[str, ...] = ()  # regexes: body lines matching one are dropped
    first_line_matching: str = ""  # regex: the first body line matching it goes first
    max_lines: int = 0  # body lines kept at most; 0 = all
    compose: str = ""  # subject | body | subject_body | template; "" = smtp.compose
    template: str = ""  # Jinja2 as smtp.template, for compose = "template"


MAIL_RULE_KEYS = {f.name for f in dataclasses.fields(MailRule)}
COMPOSE_MODES = ("subject", "body", "subject_body", "template")


def _regex_problem(pattern: str) -> str | None:
    try:
        re.compile(pattern)
    except re.error as exc:
        return f"{pattern!r} is not a regular expression: {exc}"
    return None


def _mail_rule(index: int, table: object) -> MailRule:
    """One `[[smtp.rules]]` table, checked; ValueError names the rule and the key."""
    where = f"[{index}]"
    if not isinstance(table, dict):
        raise ValueError(f"{where}: expected a table")
    unknown = sorted(set(table) - MAIL_RULE_KEYS)
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown key")
    values: dict[str, Any] = {}
    for key, value in table.items():
        default = getattr(MailRule(), key)
        if isinstance(default, tuple):
            value = [value] if isinstance(value, str) else value
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{where}.{key}: expected a list of strings")
            value = tuple(value)
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{where}.{key}: expected an integer, 0 or more")
        elif not isinstance(value, str):
            raise ValueError(f"{where}.{key}: expected a string")
        values[key] = value
    rule = MailRule(**values)
    if not rule.sender and not rule.subject:
        raise ValueError(f"{where}: a rule needs sender or subject to match on")
    for key in ("subject", "first_line_matching", "keep", "drop"):
        patterns = getattr(rule, key)
        for pattern in (patterns,) if isinstance(patterns, str) else patterns:
            if pattern and (why := _regex_problem(pattern)):
                raise ValueError(f"{where}.{key}: {why}")
    if rule.compose and rule.compose not in COMPOSE_MODES:
        raise ValueError(f"{where}.compose: must be {', '.join(COMPOSE_MODES)}")
    if rule.compose == "template" and not rule.template:
        raise ValueError(f'{where}.template: required when compose = "template"')
    return rule


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    listen: str = _opt(DEFAULT_SMTP_LISTEN)
    domains: tuple[str, ...] = _opt(["sms.localhost"])
    hostname: str = _opt("")
    max_message_bytes: int = _opt(ONE_MIB)
    max_recipients: int = _opt(100)
    idle_timeout: float = _opt(300.0, "duration")
    default_region: str = _opt("")
    regions: Mapping[str, str] = _opt({})  # domain -> region for national numbers
    allowed_networks: tuple[str, ...] = _opt([])  # CIDRs; empty: any client
    allowed_senders: tuple[str, ...] = _opt([])  # MAIL FROM patterns (fnmatch); empty: any
    require_auth: bool = _opt(False)
    auth_allow_plaintext: bool = _opt(False)
    users: Mapping[str, str] = _opt({}, secret=True)  # login -> password
    tls_cert: str = _opt("")
    tls_key: str = _opt("")
    tls_listen: str = _opt("")  # implicit TLS (port 465 style); needs tls_cert
    compose: str = _opt("subject_body")  # subject | body | subject_body | template
    template: str = _opt("")
    sender_id: str = _opt("")  # "" -> provider.sender_id
    rules: tuple[MailRule, ...] = _opt([], "rules")  # [[smtp.rules]]: per-sender line picks
    max_sessions: int = _opt(100)  # open SMTP sessions in all; beyond: 421 at connect
    max_sessions_per_client: int = _opt(25)  # from one address (a relay: Postfix opens 20)
    max_mails_per_session: int = _opt(1000)  # MAIL and DATA commands in one session
    max_commands: int = _opt(20)  # each other command (NOOP, EHLO, AUTH...) per session
    max_mime_depth: int = _opt(20)  # deeper parts are not read
    max_mime_parts: int = _opt(100)  # parts past this are not read
    parse_timeout: float = _opt(5.0, "duration")  # a mail not parsed by then: 554


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_parts: int = _opt(3)  # longer texts are cut at a word boundary with an ellipsis
    transliterate: bool = _opt(True)  # curly quotes, dashes, ... -> GSM look-alikes
    per_recipient: int = _opt(0)  # texts per phone per window; beyond: held for a digest
    per_recipient_window: float = _opt(600.0, "duration")


@dataclass(frozen=True, slots=True)
class BudgetConfig:
    texts_per_day: int = _opt(0)  # 0 = no cap; days are UTC
    parts_per_day: int = _opt(0)
    on_exceeded: str = _opt("wait")  # wait (until the next day) | fail
    admin: tuple[str, ...] = _opt([])  # numbers or groups warned once a day
    low_balance: float = _opt(0.0)  # warn the admin when the balance falls below
    cost_per_day: float = _opt(0.0)  # estimated spend per UTC day, provider's currency; 0 = no cap


@dataclass(frozen=True, slots=True)
class HttpConfig:
    listen: str = _opt(DEFAULT_HTTP_LISTEN)
    max_body_bytes: int = _opt(ONE_MIB)
    max_recipients: int = _opt(100)  # recipients one API or hook request may name; 0 = no cap
    max_concurrency: int = _opt(100)  # open connections and requests; beyond: 503
    max_header_bytes: int = _opt(16384)  # request line and headers; beyond: 431
    header_timeout: float = _opt(10.0, "duration")  # to send the request line and headers
    keep_alive_timeout: float = _opt(5.0, "duration")  # idle between requests
    body_timeout: float = _opt(30.0, "duration")  # to send the whole body; beyond: 408
    # Host header values served (names, "*.example.org", "*"); [] = the listen host,
    # localhost, 127.0.0.1 and [::1] (any IP literal when listening on a wildcard).
    allowed_hosts: tuple[str, ...] = _opt([])
    trusted_proxies: tuple[str, ...] = _opt([])  # CIDRs whose X-Forwarded-* is believed
    tls_cert: str = _opt("")  # PEM files: HTTPS on http.listen
    tls_key: str = _opt("")


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    base_url: str = _opt("")
    api_key: str = _opt("", secret=True)
    auth_header: str = _opt("x-api-key")  # x-api-key | bearer
    sender_id: str = _opt("SMS")
    requests_per_minute: int = _opt(100)
    timeout: float = _opt(10.0, "duration")
    connect_timeout: float = _opt(5.0, "duration")
    pricing_path: str = _opt("/pricing")
    account_path: str = _opt("/account")
    calculate_path: str = _opt("/calculate")
    bulk_message_type: bool = _opt(False)
    max_bulk: int = _opt(1000)
    retry_max_age: float = _opt(3600.0, "duration")
    backoff_initial: float = _opt(5.0, "duration")
    backoff_max: float = _opt(600.0, "duration")
    auth_probe_interval: float = _opt(30.0, "duration")
    arabic_type: int = _opt(2)  # message_type for Arabic script: 2 (Unicode) or 4
    allowed_sender_ids: tuple[str, ...] = _opt([])  # callers may ask for; [] = only sender_id
    max_unknown_resends: int = _opt(1)  # resends after an outcome /logs cannot settle
    timezone: str = _opt("UTC")  # the provider's zone: schedule_time, /logs timestamps


@dataclass(frozen=True, slots=True)
class StatusConfig:
    poll_interval: float = _opt(5.0, "duration")
    budget_share: float = _opt(0.10)
    give_up_after: float = _opt(172800.0, "duration")


@dataclass(frozen=True, slots=True)
class StoreConfig:
    path: str = _opt(DEFAULT_STORE_PATH)
    # "postgresql://user@host/db": a store shared by a cluster; "" = SQLite at `path`.
    # Secret: a URL may carry a password.
    url: str = _opt("", secret=True)
    retention: float = _opt(2592000.0, "duration")  # final messages older are purged; 0 = keep


@dataclass(frozen=True, slots=True)
class PhoneConfig:
    require_valid: bool = _opt(False)
    default_region: str = _opt("")
    allowed_countries: tuple[str, ...] = _opt([])  # ISO 3166 codes; [] = any country
    allow_premium: bool = _opt(False)  # premium, shared-cost, international-network numbers


@dataclass(frozen=True, slots=True)
class DedupeConfig:
    window: float = _opt(600.0, "duration")


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """Several `serve` on one PostgreSQL store (store.url): who this one is, and how long
    its claims hold when it stops answering. Unused with SQLite (one process)."""

    instance: str = _opt("")  # unique per running instance; "" = host name and pid
    lease: float = _opt(30.0, "duration")  # another instance takes a claim over after it


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = _opt("info")
    format: str = _opt("human")  # human | json


@dataclass(frozen=True, slots=True)
class SandboxConfig:
    """The in-process sandbox provider used when `provider.base_url` is empty."""

    api_key: str = _opt("sandbox-key", secret=True)
    balance: float = _opt(1000.0)
    sent_after: float = _opt(1.0, "duration")
    delivered_after: float = _opt(3.0, "duration")
    fail_share: float = _opt(0.0)
    variant: str = _opt("documented")  # answer shapes: see bridge.provider.sandbox.VARIANTS


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """`[routes.NAME]`: one webhook endpoint, `POST /hooks/NAME`."""

    name: str = ""
    format: str = _opt("generic")  # alertmanager | grafana | github | gitlab | generic
    to: tuple[str, ...] = _opt([])  # numbers or group names
    token: str = _opt("", secret=True)  # "Authorization: Bearer TOKEN" required when set
    username: str = _opt("")  # HTTP basic auth, with password
    password: str = _opt("", secret=True)
    secret: str = _opt("", secret=True)  # github/grafana HMAC key; gitlab X-Gitlab-Token
    template: str = _opt("")  # Jinja2 text of the SMS; "" = the format's default
    allowed_networks: tuple[str, ...] = _opt([])  # client CIDRs; [] = any
    allow_query_to: bool = _opt(False)  # may ?to=NUMBER add recipients
    signature_header: str = _opt("X-Grafana-Alerting-Signature")  # grafana
    timestamp_header: str = _opt("")  # grafana: signs "timestamp:body" when set
    max_timestamp_skew: float = _opt(300.0, "duration")
    match: Mapping[str, str] = _opt({})  # alertmanager/grafana: label = value, all must hold
    conclusions: tuple[str, ...] = _opt([])  # github/gitlab: [] = failures only
    branches: tuple[str, ...] = _opt([])  # github/gitlab: [] = every branch
    to_path: str = _opt("to")  # generic: dotted path of extra recipients
    text_path: str = _opt("message")  # generic: dotted path of the text
    dedupe_path: str = _opt("")  # generic: dotted path of a dedupe key
    sender_id: str = _opt("")  # "" = provider.sender_id
    dedupe_window: float = _opt(-1.0, "duration")  # -1 = dedupe.window
    max_texts_per_day: int = _opt(0)  # 0 = no cap for this route
    allow_payload_to: bool = _opt(False)  # may the payload's to_path and ?to= add recipients
    public: bool = _opt(False)  # no authentication, knowingly (protected mode allows it)


SCOPES = ("send", "read", "admin", "metrics")
MIN_TOKEN_CHARS = 16


@dataclass(frozen=True, slots=True)
class TokenConfig:
    """`[tokens.NAME]`: an API token and what it may do (`Authorization: Bearer TOKEN`)."""

    name: str = ""
    token: str = _opt("", secret=True)
    scopes: tuple[str, ...] = _opt([])  # send | read | admin | metrics


@dataclass(frozen=True, slots=True)
class Config:
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    provider: ProviderConfig = field(default_factory=ProviderConfig)
    status: StatusConfig = field(default_factory=StatusConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    phone: PhoneConfig = field(default_factory=PhoneConfig)
    dedupe: DedupeConfig = field(default_factory=DedupeConfig)
    log: LogConfig = field(default_factory=LogConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    routes: Mapping[str, RouteConfig] = field(default_factory=dict)
    tokens: Mapping[str, TokenConfig] = field(default_factory=dict)
    source: str = "built-in defaults"

    @property
    def uses_sandbox(self) -> bool:
        return not self.provider.base_url


SECTIONS: dict[str, type] = {
    "smtp": SmtpConfig,
    "http": HttpConfig,
    "provider": ProviderConfig,
    "status": StatusConfig,
    "store": StoreConfig,
    "cluster": ClusterConfig,
    "phone": PhoneConfig,
    "dedupe": DedupeConfig,
    "log": LogConfig,
    "sandbox": SandboxConfig,
    "limits": LimitsConfig,
    "budget": BudgetConfig,
}


class LiveConfig:
    """The config in force; SIGHUP swaps `current` for a newly checked one.

    Request handlers read `current` once per request, so a reload never changes the
    rules under a request that is being handled and never drops a connection.
    """

    def __init__(self, config: Config) -> None:
        self.current = config


def parse_duration(value: object) -> float:
    """`30s`, `10m`, `1.5h`, `2d`, `250ms` or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s or 10m")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("must not be negative")
        return float(value)
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError(f"{value!r} is not a duration such as 30s, 10m, 2h or 1d")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def parse_listen(value: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not host:port")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host:
        raise ValueError(f"{value!r} has no host")
    return host, int(port)


def _from_env_text(text: str, kind: str, default: object) -> object:
    """Turn an environment string into the type of the key it overrides."""
    if kind == "table":  # name=value,name2=value2
        pairs = [part.split("=", 1) for part in text.split(",") if part.strip()]
        if any(len(p) != 2 for p in pairs):
            raise ValueError("expected name=value pairs separated by commas")
        return {k.strip(): v.strip() for k, v in pairs}
    if kind == "rules":  # a TOML array of inline tables
        return tomllib.loads(f"v = {text}")["v"]
    if kind == "list":
        if text.strip().startswith("["):
            return tomllib.loads(f"v = {text}")["v"]
        return [part.strip() for part in text.split(",") if part.strip()]
    if kind == "duration":
        return text
    if isinstance(default, bool):
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{text!r} is not a boolean (true/false)")
    if isinstance(default, int):
        return int(text)
    if isinstance(default, float):
        return float(text)
    return text


def _coerce(value: object, kind: str, default: object) -> object:
    """Check a TOML value against the key's type; raise ValueError saying what was expected."""
    if kind == "duration":
        return parse_duration(value)
    if kind == "rules":
        if not isinstance(value, list):
            raise ValueError("expected an array of tables [[smtp.rules]]")
        return tuple(_mail_rule(index, table) for index, table in enumerate(value))
    if kind == "table":
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise ValueError('expected a table of name = "text"')
        return {
            k.removesuffix("_file"): _read_secret_file(v) if k.endswith("_file") else v
            for k, v in value.items()
        }
    if kind == "list":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ValueError("expected a list of strings")
        return tuple(value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError("expected true or false")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("expected an integer")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError("expected a number")
        return float(value)
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return value


def _read_secret_file(path: str) -> str:
    return Path(path).read_text(encoding="utf-8").strip()


class _Loader:
    """Collects problems instead of stopping at the first one."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[tuple[str, str]] = []

    def problem(self, key: str, why: str) -> None:
        self.problems.append((key, why))

    def section(
        self,
        name: str,
        cls: type,
        raw: object,
        *,
        env: bool = True,
        env_prefix: str | None = None,
        fixed: dict[str, Any] | None = None,
    ) -> Any:
        fixed = fixed or {}
        if not isinstance(raw, dict):
            self.problem(name, "expected a table")
            raw = {}
        values: dict[str, object] = {}
        known = {f.name: f for f in dataclasses.fields(cls) if f.name not in fixed}
        for key in raw:
            base = key.removesuffix("_file")
            if key not in known and not (key.endswith("_file") and base in known):
                self.problem(f"{name}.{key}", "unknown key")
        for fname, spec in known.items():
            kind = spec.metadata.get("kind", "")
            prefix = f"{ENV_PREFIX}{name.upper()}_" if env_prefix is None else env_prefix
            env_name = f"{prefix}{fname.upper()}" if env else "\0"
            value: object = dataclasses.MISSING
            origin = f"{name}.{fname}"
            try:
                if env_name in self.env:
                    origin = env_name
                    value = _from_env_text(self.env[env_name], kind, spec.default)
                elif f"{env_name}_FILE" in self.env:
                    origin = f"{env_name}_FILE"
                    value = _read_secret_file(self.env[f"{env_name}_FILE"])
                elif fname in raw:
                    value = raw[fname]
                elif f"{fname}_file" in raw:
                    origin = f"{name}.{fname}_file"
                    file_name = raw[f"{fname}_file"]
                    if not isinstance(file_name, str):
                        raise ValueError("expected a file path")
                    value = _read_secret_file(file_name)
                if value is not dataclasses.MISSING:
                    values[fname] = _coerce(value, kind, spec.default)
            except (ValueError, tomllib.TOMLDecodeError) as exc:
                self.problem(origin, str(exc))
            except OSError as exc:
                self.problem(origin, f"cannot read secret file: {exc.strerror or exc}")
        return cls(**values, **fixed)

    def groups(self, raw: object) -> dict[str, tuple[str, ...]]:
        if not isinstance(raw, dict):
            self.problem("groups", "expected a table of name = [numbers]")
            raw = {}
        raw = dict(raw)
        for env_name, text in self.env.items():
            if env_name.startswith(f"{ENV_PREFIX}GROUPS_"):
                raw[env_name.removeprefix(f"{ENV_PREFIX}GROUPS_").lower()] = _from_env_text(
                    text, "list", ()
                )
        groups: dict[str, tuple[str, ...]] = {}
        for name, members in raw.items():
            key = f"groups.{name}"
            if not GROUP_NAME.match(name):
                self.problem(key, "a group name starts with a letter: letters, digits, _ . -")
                continue
            if isinstance(members, str):
                members = [members]
            if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
                self.problem(key, "expected a list of phone numbers")
                continue
            groups[name] = tuple(members)
        return groups

    def routes(self, raw: object) -> dict[str, RouteConfig]:
        if not isinstance(raw, dict):
            self.problem("routes", "expected tables [routes.NAME]")
            return {}
        routes: dict[str, RouteConfig] = {}
        for name, table in raw.items():
            if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
                self.problem(f"routes.{name}", "a route name is letters, digits, _ . - only")
                continue
            route = self.section(
                f"routes.{name}",
                RouteConfig,
                table,
                env_prefix=route_env_prefix(name),
                fixed={"name": name},
            )
            if route.format not in ROUTE_FORMATS:
                self.problem(f"routes.{name}.format", f"must be one of {', '.join(ROUTE_FORMATS)}")
            routes[name] = route
        self._unused_route_env(routes)
        return routes

    def _unused_route_env(self, routes: Mapping[str, RouteConfig]) -> None:
        """An override that names no route or no key is a typo: say so, never ignore it."""
        keys = {f.name.upper() for f in dataclasses.fields(RouteConfig) if f.name != "name"}
        for env_name in self.env:
            if not env_name.startswith(f"{ENV_PREFIX}ROUTES_"):
                continue
            rests = [
                env_name.removeprefix(route_env_prefix(name))
                for name in routes
                if env_name.startswith(route_env_prefix(name))
            ]
            if any(rest.removesuffix("_FILE") in keys for rest in rests):
                continue
            if rests:
                self.problem(env_name, "no such route key (see config.example.toml)")
            else:
                known = ", ".join(sorted(routes)) or "none"
                self.problem(
                    env_name,
                    "names no route in the config file (routes: "
                    f"{known}); the environment overrides a route's keys, it cannot add a route",
                )

    def tokens(self, raw: object) -> dict[str, TokenConfig]:
        if not isinstance(raw, dict):
            self.problem("tokens", "expected tables [tokens.NAME]")
            return {}
        raw = self._tokens_from_env({k: v for k, v in raw.items()})
        tokens: dict[str, TokenConfig] = {}
        for name, table in raw.items():
            if not GROUP_NAME.match(name):
                self.problem(
                    f"tokens.{name}", "a token name starts with a letter: letters, digits, _ . -"
                )
                continue
            tokens[name] = self.section(
                f"tokens.{name}", TokenConfig, table, env=False, fixed={"name": name}
            )
        return tokens

    def _tokens_from_env(self, raw: dict[str, Any]) -> dict[str, Any]:
        """`SMS_BRIDGE_TOKENS_<NAME>_TOKEN[_FILE]` and `..._SCOPES`: tokens for containers
        configured by environment and secrets alone. The environment wins over the file."""
        pattern = re.compile(rf"{ENV_PREFIX}TOKENS_(.+)_(TOKEN_FILE|TOKEN|SCOPES)")
        for env_name, text in sorted(self.env.items()):
            match = pattern.fullmatch(env_name)
            if not match:
                continue
            name, key = match.group(1).lower(), match.group(2).lower()
            table = raw.get(name)
            table = dict(table) if isinstance(table, dict) else {}
            if key == "scopes":
                table["scopes"] = _from_env_text(text, "list", ())
            else:  # token and token_file replace each other
                table.pop("token_file" if key == "token" else "token", None)
                table[key] = text
            raw[name] = table
        return raw


def route_env_prefix(name: str) -> str:
    """`SMS_BRIDGE_ROUTES_<NAME>_`: the name upper-cased, `-` and `.` as `_`."""
    return f"{ENV_PREFIX}ROUTES_{re.sub(r'[.-]', '_', name).upper()}_"


def _validate(config: Config, loader: _Loader) -> None:
    problem = loader.problem
    for key, listen in (("smtp.listen", config.smtp.listen), ("http.listen", config.http.listen)):
        if listen:
            try:
                parse_listen(listen)
            except ValueError as exc:
                problem(key, str(exc))
    smtp = config.smtp
    if smtp.tls_listen:
        try:
            parse_listen(smtp.tls_listen)
        except ValueError as exc:
            problem("smtp.tls_listen", str(exc))
    if bool(smtp.tls_cert) != bool(smtp.tls_key):
        problem("smtp.tls_cert", "tls_cert and tls_key go together")
    for key in ("tls_cert", "tls_key"):
        if getattr(smtp, key) and not Path(getattr(smtp, key)).is_file():
            problem(f"smtp.{key}", f"no such file: {getattr(smtp, key)}")
    if smtp.tls_listen and not smtp.tls_cert:
        problem("smtp.tls_listen", "implicit TLS needs smtp.tls_cert and smtp.tls_key")
    if smtp.require_auth and not smtp.users:
        problem("smtp.require_auth", "no [smtp.users] to authenticate")
    if smtp.require_auth and not smtp.tls_cert and not smtp.auth_allow_plaintext:
        problem("smtp.require_auth", "AUTH needs TLS (smtp.tls_cert) or smtp.auth_allow_plaintext")
    for index, net in enumerate(smtp.allowed_networks):
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            problem(f"smtp.allowed_networks[{index}]", f"{net!r} is not an address or CIDR network")
    if smtp.compose not in ("subject", "body", "subject_body", "template"):
        problem("smtp.compose", "must be subject, body, subject_body or template")
    if smtp.compose == "template" and not smtp.template:
        problem("smtp.template", 'required when smtp.compose = "template"')
    if smtp.sender_id and not valid_sender_id(smtp.sender_id):
        problem("smtp.sender_id", SENDER_ID_RULE)
    for region_key, region in [
        ("smtp.default_region", smtp.default_region),
        ("phone.default_region", config.phone.default_region),
        *((f"smtp.regions.{d}", r) for d, r in smtp.regions.items()),
    ]:
        if region and region.upper() not in phonenumbers.SUPPORTED_REGIONS:
            problem(region_key, f"{region!r} is not a region code such as US, GB or DE")
    if config.provider.arabic_type not in (2, 4):
        problem("provider.arabic_type", "must be 2 (Unicode) or 4 (the provider's Arabic type)")
    if config.limits.per_recipient < 0:
        problem("limits.per_recipient", "must be 0 (off) or more")
    b = config.budget
    if b.on_exceeded not in ("wait", "fail"):
        problem("budget.on_exceeded", "must be wait or fail")
    if b.texts_per_day < 0 or b.parts_per_day < 0:
        problem("budget.texts_per_day", "caps must be 0 (off) or more")
    _validate_listener_limits(config, problem)
    if not 1 <= config.limits.max_parts <= 10:
        problem("limits.max_parts", "must be between 1 and 10")
    if config.smtp.listen and not config.smtp.domains:
        problem("smtp.domains", "at least one domain is needed while SMTP is on")
    if config.store.url and not re.match(r"^postgres(ql)?://\S*$", config.store.url):
        problem("store.url", "must be a postgresql:// URL, or empty for SQLite at store.path")
    if not 5 <= config.cluster.lease <= 3600:
        # Shorter than a send's timeout would hand live sends to another instance.
        problem("cluster.lease", "must be between 5s and 1h")
    p = config.provider
    if p.base_url and not re.match(r"^https?://[^/\s]+", p.base_url):
        problem("provider.base_url", "must be an http:// or https:// URL, or empty for the sandbox")
    if p.auth_header not in ("x-api-key", "bearer"):
        problem("provider.auth_header", "must be x-api-key or bearer")
    if p.base_url and not p.api_key:
        problem("provider.api_key", "required when provider.base_url is set")
    if not 1 <= p.requests_per_minute <= 100_000:
        problem("provider.requests_per_minute", "must be between 1 and 100000")
    if not 1 <= p.max_bulk <= 1000:
        problem("provider.max_bulk", "must be between 1 and 1000 (the provider's bulk limit)")
    if not valid_sender_id(p.sender_id):
        problem("provider.sender_id", SENDER_ID_RULE)
    for key in ("pricing_path", "account_path", "calculate_path"):
        if not getattr(p, key).startswith("/"):
            problem(f"provider.{key}", "must start with /")
    if not 0 < config.status.budget_share <= 1:
        problem("status.budget_share", "must be above 0 and at most 1")
    if not 0 <= config.sandbox.fail_share <= 1:
        problem("sandbox.fail_share", "must be between 0 and 1")
    _validate_provider_extras(config, problem)
    if config.log.level.lower() not in ("debug", "info", "warning", "error"):
        problem("log.level", "must be debug, info, warning or error")
    if config.log.format not in ("human", "json"):
        problem("log.format", "must be human or json")
    for name, route in config.routes.items():
        key = f"routes.{name}"
        if bool(route.username) != bool(route.password):
            problem(f"{key}.username", "username and password go together (basic auth)")
        if route.format in ("github", "gitlab") and not route.secret:
            problem(f"{key}.secret", f"{route.format} webhooks must be authenticated by a secret")
        if not route.to and not route.allow_payload_to and not route.allow_query_to:
            problem(
                f"{key}.to",
                "no recipients: set to = [numbers or groups] (or allow_payload_to = true)",
            )
        if route.sender_id and not valid_sender_id(route.sender_id):
            problem(f"{key}.sender_id", SENDER_ID_RULE)
        for index, net in enumerate(route.allowed_networks):
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                problem(f"{key}.allowed_networks[{index}]", f"{net!r} is not a CIDR network")
    _validate_recipients(config, problem)


def _validate_recipients(config: Config, problem: Callable[[str, str], None]) -> None:
    """Phone rules, and every number the config names passes the same firewall as a
    caller's: a config that texts a refused number is a config error, not a surprise."""
    phone = config.phone
    for index, country in enumerate(phone.allowed_countries):
        if country.upper() not in phonenumbers.SUPPORTED_REGIONS:
            problem(
                f"phone.allowed_countries[{index}]", f"{country!r} is not an ISO code such as US"
            )
    if config.http.max_recipients < 0:
        problem("http.max_recipients", "must be 0 (no cap) or more")
    if config.budget.cost_per_day < 0:
        problem("budget.cost_per_day", "must be 0 (no cap) or more")
    for index, sender_id in enumerate(config.provider.allowed_sender_ids):
        if not valid_sender_id(sender_id):
            problem(f"provider.allowed_sender_ids[{index}]", SENDER_ID_RULE)
    firewall = Firewall.from_config(config)
    for name, members in config.groups.items():
        for index, member in enumerate(members):
            try:
                firewall.number(member)
            except InputError as exc:
                problem(f"groups.{name}[{index}]", str(exc))
    named = [("budget.admin", config.budget.admin)] + [
        (f"routes.{name}.to", route.to) for name, route in config.routes.items()
    ]
    for key, targets in named:
        for index, target in enumerate(targets):
            if target in config.groups:
                continue  # its members are checked above
            try:
                firewall.number(target)
            except InputError as exc:
                problem(f"{key}[{index}]", f"neither a group nor an allowed number: {exc}")


def _validate_tokens(config: Config, problem: Callable[[str, str], None]) -> None:
    seen: dict[str, str] = {}
    for name, spec in config.tokens.items():
        key = f"tokens.{name}"
        if len(spec.token) < MIN_TOKEN_CHARS:
            problem(
                f"{key}.token",
                f"at least {MIN_TOKEN_CHARS} characters (e.g. from `openssl rand -hex 24`)",
            )
        elif spec.token in seen:
            problem(f"{key}.token", f"the same token as tokens.{seen[spec.token]}")
        else:
            seen[spec.token] = name
        if not spec.scopes:
            problem(f"{key}.scopes", f"at least one of {', '.join(SCOPES)}")
        for scope in spec.scopes:
            if scope not in SCOPES:
                problem(f"{key}.scopes", f"{scope!r} is not one of {', '.join(SCOPES)}")


# The sandbox's answer shapes by name (bridge.provider.sandbox.VARIANTS, which checks it
# matches): named here so config, below the provider, never imports the sandbox.
SANDBOX_VARIANTS = (
    "documented",
    "plain-numbers",
    "other-keys",
    "batch-only",
    "count-only",
    "local-time",
    "created-201",
    "strict",
    "stand-in",
)


def _validate_provider_extras(config: Config, problem: Callable[[str, str], None]) -> None:
    """Keys of the provider-shape work (issue 17), kept apart for easy merging."""
    if not 0 <= config.provider.max_unknown_resends <= 5:
        problem("provider.max_unknown_resends", "must be between 0 and 5")
    try:
        zoneinfo.ZoneInfo(config.provider.timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        problem("provider.timezone", f"{config.provider.timezone!r} is not an IANA time zone")
    if config.sandbox.variant not in SANDBOX_VARIANTS:
        problem("sandbox.variant", f"must be one of {', '.join(sorted(SANDBOX_VARIANTS))}")


def _validate_listener_limits(config: Config, problem: Callable[[str, str], None]) -> None:
    """Connection, command and parse limits: each at least 1 (or above 0 for times)."""
    for section, keys in (
        (
            "smtp",
            (
                "max_sessions",
                "max_sessions_per_client",
                "max_mails_per_session",
                "max_commands",
                "max_mime_depth",
                "max_mime_parts",
                "parse_timeout",
            ),
        ),
        (
            "http",
            (
                "max_concurrency",
                "max_header_bytes",
                "header_timeout",
                "keep_alive_timeout",
                "body_timeout",
            ),
        ),
    ):
        for key in keys:
            if getattr(getattr(config, section), key) <= 0:
                problem(f"{section}.{key}", "must be above 0")
    if config.http.max_header_bytes < 1024:
        problem("http.max_header_bytes", "must be at least 1024")


def is_loopback_host(host: str) -> bool:
    """`localhost`, 127.0.0.0/8 or ::1: reachable from this machine only."""
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost":  # not *.localhost: only some resolvers keep those on loopback
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _listen_host(listen: str) -> str | None:
    try:
        return parse_listen(listen)[0] if listen else None
    except ValueError:
        return None  # reported by _validate


def _restricts(networks: tuple[str, ...]) -> bool:
    """Does this allowlist leave someone out? `0.0.0.0/0` or `::/0` admit everyone."""
    try:
        return bool(networks) and all(
            ipaddress.ip_network(n, strict=False).prefixlen > 0 for n in networks
        )
    except ValueError:
        return True  # the bad entry is reported by _validate


def _validate_http(config: Config, problem: Callable[[str, str], None]) -> None:
    http = config.http
    for index, net in enumerate(http.trusted_proxies):
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            problem(f"http.trusted_proxies[{index}]", f"{net!r} is not an address or CIDR network")
    for index, host in enumerate(http.allowed_hosts):
        if not re.fullmatch(r"\*|(\*\.)?[A-Za-z0-9_.:\[\]-]+", host):
            problem(
                f"http.allowed_hosts[{index}]",
                f"{host!r} is not a host name, an address, '*.example.org' or '*'",
            )
    if bool(http.tls_cert) != bool(http.tls_key):
        problem("http.tls_cert", "tls_cert and tls_key go together")
    for key in ("tls_cert", "tls_key"):
        if getattr(http, key) and not Path(getattr(http, key)).is_file():
            problem(f"http.{key}", f"no such file: {getattr(http, key)}")


# What a reload cannot change under a running bridge: listeners, the store, the provider,
# logging. A section name alone means the whole section.
RESTART_ONLY: dict[str, tuple[str, ...]] = {
    "smtp": ("listen", "tls_listen"),
    "http": ("listen", "trusted_proxies", "tls_cert", "tls_key"),
    "store": (),
    "cluster": (),
    "provider": (),
    "sandbox": (),
    "status": (),
    "log": (),
}


def as_reloaded(new: Config, running: Config) -> tuple[Config, list[str]]:
    """`new` as a reload applies it: every RESTART_ONLY key keeps its running value.

    Returns that config and the keys whose new value waits for a restart. Checks made
    on it (protected mode) judge what will really run: a file that drops the provider
    and a route's credentials at once must not open the route while the provider that
    is still running keeps sending.
    """
    sections: dict[str, Any] = {}
    waiting: list[str] = []
    for name, keys in RESTART_ONLY.items():
        before, after = getattr(running, name), getattr(new, name)
        if not keys:
            sections[name] = before
            waiting += [name] if before != after else []
            continue
        kept = {key: getattr(before, key) for key in keys}
        sections[name] = dataclasses.replace(after, **kept)
        waiting += [f"{name}.{key}" for key in keys if getattr(after, key) != kept[key]]
    return dataclasses.replace(new, **sections), waiting


def protection_problems(config: Config) -> list[tuple[str, str]]:
    """What protected mode refuses in `config` (see `_validate_protected`)."""
    problems: list[tuple[str, str]] = []
    _validate_protected(config, lambda key, why: problems.append((key, why)))
    return problems


def _validate_protected(config: Config, problem: Callable[[str, str], None]) -> None:
    """Protected mode: with a real provider, nothing reachable from the network is open.

    Every SMS costs the owner money, so a listener that other machines can reach must
    know who is calling. The sandbox sends nothing and stays open, so the two-command
    start in the README keeps working.
    """
    base_url = config.provider.base_url
    if not base_url:
        return
    host = urllib.parse.urlsplit(base_url).hostname or ""
    if not base_url.startswith("https://") and not is_loopback_host(host):
        problem(
            "provider.base_url",
            "must be https:// unless its host is loopback: the API key would cross the "
            "network in clear text",
        )
    real = "while provider.base_url is set (a real provider: every SMS costs money)"
    http_host = _listen_host(config.http.listen)
    # A loopback listener that trusts a proxy, or serves names other than loopback's, is
    # reachable from the network through that proxy: it needs tokens all the same.
    proxied = [
        key
        for key, hosts in (
            ("http.trusted_proxies", config.http.trusted_proxies),
            (
                "http.allowed_hosts",
                [h for h in config.http.allowed_hosts if not is_loopback_host(h)],
            ),
        )
        if hosts
    ]
    if http_host is not None and not config.tokens:
        if not is_loopback_host(http_host):
            problem(
                "http.listen",
                f"{config.http.listen} is reachable from the network but no [tokens.NAME] is "
                f"configured {real}: add a token, or listen on 127.0.0.1",
            )
        elif proxied:
            problem(
                proxied[0],
                f"a proxy makes {config.http.listen} reachable from the network but no "
                f"[tokens.NAME] is configured {real}: add a token",
            )
    smtp = config.smtp
    if not smtp.require_auth and not _restricts(smtp.allowed_networks):
        for key in ("smtp.listen", "smtp.tls_listen"):
            listen = getattr(smtp, key.removeprefix("smtp."))
            smtp_host = _listen_host(listen)
            if smtp_host is not None and not is_loopback_host(smtp_host):
                problem(
                    key,
                    f"{listen} is reachable from the network with neither smtp.require_auth "
                    f"nor smtp.allowed_networks {real}",
                )
    if http_host is None:
        return  # no HTTP listener: the routes cannot be reached
    for name, route in config.routes.items():
        if route.public:
            continue
        signed = route.secret and route.format in SIGNED_FORMATS  # others never check it
        if not (route.token or route.username or signed or _restricts(route.allowed_networks)):
            problem(
                f"routes.{name}",
                f"no authentication {real}: set token, username/password, secret "
                "(grafana, github, gitlab) or allowed_networks, or public = true to accept anyone",
            )


def load_config(
    path: str | os.PathLike[str] | None, env: Mapping[str, str] | None = None
) -> Config:
    """Read `path` (None: built-in defaults) with environment overrides; raise ConfigError."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    loader = _Loader(env)
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError([(str(path), f"cannot read: {exc.strerror or exc}")]) from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError([(str(path), f"not valid TOML: {exc}")]) from exc
    for key in raw:
        if key not in SECTIONS and key not in ("groups", "routes", "tokens"):
            loader.problem(key, "unknown section")
    sections = {
        name: loader.section(name, cls, raw.get(name, {})) for name, cls in SECTIONS.items()
    }
    config = Config(
        **sections,
        groups=loader.groups(raw.get("groups", {})),
        routes=loader.routes(raw.get("routes", {})),
        tokens=loader.tokens(raw.get("tokens", {})),
        source=str(path) if path is not None else "built-in defaults",
    )
    _validate(config, loader)
    _validate_tokens(config, loader.problem)
    _validate_http(config, loader.problem)
    _validate_protected(config, loader.problem)
    if loader.problems:
        raise ConfigError(loader.problems)
    return config


def config_path_from(arg: str | None, env: Mapping[str, str] | None = None) -> str | None:
    """`--config` wins, then `$SMS_BRIDGE_CONFIG`, else no file at all."""
    env = os.environ if env is None else env
    return arg or env.get(f"{ENV_PREFIX}CONFIG") or None


def _masked_value(spec: dataclasses.Field[Any], value: Any) -> Any:
    if not spec.metadata.get("secret") or not value:
        return dict(value) if isinstance(value, Mapping) else value
    return {k: "***" for k in value} if isinstance(value, Mapping) else "***"


def _plain(value: Any) -> Any:
    """Tables of tables (`[[smtp.rules]]`) as plain data, for JSON."""
    if isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0]):
        return [dataclasses.asdict(v) for v in value]
    return value


def masked(config: Config) -> dict[str, Any]:
    """The config as plain data with every secret replaced, for logs and `check-config`."""
    out: dict[str, Any] = {}
    for name in SECTIONS:
        section = getattr(config, name)
        out[name] = {
            f.name: (
                "***"
                if f.metadata.get("secret") and getattr(section, f.name)
                else _plain(getattr(section, f.name))
            )
            for f in dataclasses.fields(section)
        }
    out["groups"] = {k: list(v) for k, v in config.groups.items()}
    out["tokens"] = {
        k: {f.name: _masked_value(f, getattr(t, f.name)) for f in dataclasses.fields(t)}
        for k, t in config.tokens.items()
    }
    out["routes"] = {
        k: {f.name: _masked_value(f, getattr(r, f.name)) for f in dataclasses.fields(r)}
        for k, r in config.routes.items()
    }
    return out


def _tables(config: Config) -> list[tuple[str, Any]]:
    """Every config dataclass with the key prefix it is written under."""
    return [
        *((name, getattr(config, name)) for name in SECTIONS),
        *((f"routes.{k}", r) for k, r in config.routes.items()),
        *((f"tokens.{k}", t) for k, t in config.tokens.items()),
    ]


def secret_values(config: Config) -> list[str]:
    """Every value of a key marked `secret=True`, for log masking: none is hand-listed."""
    out: list[str] = []
    for _, table in _tables(config):
        for spec in dataclasses.fields(table):
            if spec.metadata.get("secret"):
                value = getattr(table, spec.name)
                out += list(value.values()) if isinstance(value, Mapping) else [value]
    return [v for v in out if v]


def inline_secrets(path: str | os.PathLike[str]) -> list[str]:
    """Keys of secrets written into the file itself (not `*_file`), for the mode warning."""
    return [key for key, file in _secret_keys(path) if file is None]


def secret_files(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """(key, file) of every secret the config reads from a file (`*_file` keys)."""
    return [(key, file) for key, file in _secret_keys(path) if file is not None]


def _secret_keys(path: str | os.PathLike[str]) -> list[tuple[str, str | None]]:
    """Each secret key the file sets: (its key path, the file it names or None if inline)."""
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return []
    tables: list[tuple[str, type, object]] = [
        (name, cls, raw.get(name)) for name, cls in SECTIONS.items()
    ]
    for kind, named_cls in (("routes", RouteConfig), ("tokens", TokenConfig)):
        named = raw.get(kind)
        if isinstance(named, dict):
            tables += [(f"{kind}.{k}", named_cls, v) for k, v in named.items()]
    keys: list[tuple[str, str | None]] = []
    for prefix, cls, table in tables:
        if not isinstance(table, dict):
            continue
        for spec in dataclasses.fields(cls):
            if not spec.metadata.get("secret"):
                continue
            value, file = table.get(spec.name), table.get(f"{spec.name}_file")
            if isinstance(file, str):
                keys.append((f"{prefix}.{spec.name}_file", file))
            if isinstance(value, dict):  # smtp.users: login = "password" or login_file
                keys += [
                    (f"{prefix}.{spec.name}.{k}", v if k.endswith("_file") else None)
                    for k, v in value.items()
                    if isinstance(v, str) and v
                ]
            elif value:
                keys.append((f"{prefix}.{spec.name}", None))
    return keys
