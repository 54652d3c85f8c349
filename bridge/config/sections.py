"""The config's shape: one frozen dataclass per TOML section, with each key's default.

`_opt` records how a key is read from a string (the environment) and whether it is a
secret; log masking and the secret-file checks derive from `secret=True`, so no secret
is listed by hand anywhere else.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ENV_PREFIX = "SMS_BRIDGE_"
DEFAULT_SMTP_LISTEN = "127.0.0.1:2525"
DEFAULT_HTTP_LISTEN = "127.0.0.1:8080"
DEFAULT_STORE_PATH = "sms-bridge.db"
ONE_MIB = 1024 * 1024
# `http.max_json_items`' default: the `,` `:` `[` `{` a JSON body may hold, counted before
# it is parsed (bridge.ingress.http.bodies). The largest real payload seen (a GitHub
# workflow_run) holds ~1,060, an Alertmanager group of 1,000 alerts ~37,000; real payloads
# hold at most 0.08 a byte, ~84,000 in a megabyte. Parsing and checking cost up to ~0.3 us
# an item: 100,000 hold the event loop ~30 ms at worst, where a megabyte of `[[],[],...]`
# (700,000) held it 200 ms.
MAX_JSON_ITEMS = 100_000
ROUTE_FORMATS = ("alertmanager", "grafana", "github", "gitlab", "generic")
SIGNED_FORMATS = ("grafana", "github", "gitlab")  # the formats that check routes.NAME.secret
# The words a CI route's `conclusions` may name, as its sender writes them in a payload:
# GitHub's check and workflow conclusions, commit status states and deployment states;
# GitLab's pipeline, job and deployment statuses. Any other word matches no event (GitLab
# writes "failed" where GitHub writes "failure"): check-config refuses it.
ROUTE_OUTCOMES: Mapping[str, tuple[str, ...]] = {
    "github": (
        "action_required",
        "cancelled",
        "error",
        "failure",
        "in_progress",
        "inactive",
        "neutral",
        "pending",
        "queued",
        "skipped",
        "stale",
        "startup_failure",
        "success",
        "timed_out",
    ),
    "gitlab": (
        "blocked",
        "canceled",
        "canceling",
        "created",
        "failed",
        "manual",
        "pending",
        "preparing",
        "running",
        "scheduled",
        "skipped",
        "success",
        "waiting_for_resource",
    ),
}
# The formats that read each filter key: on a route of another format it filters nothing.
ROUTE_FILTERS: Mapping[str, tuple[str, ...]] = {
    "match": ("alertmanager", "grafana"),
    "conclusions": tuple(ROUTE_OUTCOMES),
    "branches": tuple(ROUTE_OUTCOMES),
}
GROUP_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")


def _opt(default: Any, kind: str = "", secret: bool | str = False) -> Any:
    """A config key: its default and how to read it from a string (the environment).

    kind "path": a file name, which the loader reads relative to the config file's
    directory when the file writes it (`bridge.config.parsing.resolve_path`).
    secret: True, or "url" for a URL whose passwords are the secret and the rest an
    address worth showing (`bridge.config.masking.secret_values`)."""
    if isinstance(default, dict):
        return field(
            default_factory=lambda: dict(default),
            metadata={"kind": kind or "table", "secret": secret},
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
    # regex: the last body line matching it goes first (a build log's last error is what
    # failed it; the ones before were survived); after first_line_matching's, if both
    last_line_matching: str = ""
    max_lines: int = 0  # body lines kept at most; 0 = all
    compose: str = ""  # subject | body | subject_body | template; "" = smtp.compose
    template: str = ""  # Jinja2 as smtp.template, for compose = "template"


MAIL_RULE_KEYS = {f.name for f in dataclasses.fields(MailRule)}
COMPOSE_MODES = ("subject", "body", "subject_body", "template")


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    listen: str = _opt(DEFAULT_SMTP_LISTEN)
    domains: tuple[str, ...] = _opt(["sms.localhost"])
    hostname: str = _opt("")
    max_message_bytes: int = _opt(ONE_MIB)
    # lines in one mail's DATA; beyond: 552 (1 MiB of base64 is ~14,000 lines). aiosmtpd
    # reads DATA a line at a time on the event loop: a mail of 3-byte lines held it ~1 s.
    max_lines: int = _opt(20000)
    max_recipients: int = _opt(100)
    idle_timeout: float = _opt(300.0, "duration")
    # a whole session, however busy; then 421 4.4.2. Postfix stops reusing a connection
    # after 5 minutes (smtp_connection_reuse_time_limit): twice that ends no relay's.
    max_session_time: float = _opt(600.0, "duration")
    default_region: str = _opt("")
    regions: Mapping[str, str] = _opt({})  # domain -> region for national numbers
    allowed_networks: tuple[str, ...] = _opt([])  # CIDRs; empty: any client
    allowed_senders: tuple[str, ...] = _opt([])  # MAIL FROM globs, "<>" the null sender; empty: any
    require_auth: bool = _opt(False)
    auth_allow_plaintext: bool = _opt(False)  # AUTH before STARTTLS: loopback listeners only
    # ...unless this, with a real provider: every password then crosses the network in
    # clear text, readable by anyone on the path (check-config and the log say so).
    dangerously_allow_plaintext_auth_beyond_loopback: bool = _opt(False)
    users: Mapping[str, str] = _opt({}, secret=True)  # login -> password
    # login -> the numbers and groups it may text (as a route's `to`); a login not named
    # here may text any recipient, as may a session that does not log in
    user_recipients: Mapping[str, tuple[str, ...]] = _opt({}, "lists")
    # login -> its texts per UTC day, as tokens.NAME.texts_per_day (0 or not named: no cap)
    user_texts_per_day: Mapping[str, int] = _opt({}, "counts")
    tls_cert: str = _opt("", "path")
    tls_key: str = _opt("", "path")
    tls_listen: str = _opt("")  # implicit TLS (port 465 style); needs tls_cert
    compose: str = _opt("subject_body")  # subject | body | subject_body | template
    template: str = _opt("")
    sender_id: str = _opt("")  # "" -> provider.sender_id
    rules: tuple[MailRule, ...] = _opt([], "rules")  # [[smtp.rules]]: per-sender line picks
    max_sessions: int = _opt(100)  # open SMTP sessions in all; beyond: 421 at connect
    max_sessions_per_client: int = _opt(25)  # from an IPv4 address or IPv6 /64 (Postfix: 20)
    max_mails_per_session: int = _opt(1000)  # MAIL and DATA commands in one session
    max_commands: int = _opt(20)  # each other command (NOOP, EHLO, AUTH...) per session
    max_mime_depth: int = _opt(20)  # deeper parts are not read
    max_mime_parts: int = _opt(100)  # parts past this are not read
    parse_timeout: float = _opt(5.0, "duration")  # a mail not parsed by then: 451


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
    # `,` `:` `[` `{` a JSON body may hold (each an item to parse); beyond: 413. 0 = no cap.
    max_json_items: int = _opt(MAX_JSON_ITEMS)
    max_recipients: int = _opt(100)  # recipients one API or hook request may name; 0 = no cap
    max_concurrency: int = _opt(100)  # requests in flight; beyond: 503
    # open connections from one client (an IPv4 address or an IPv6 /64); beyond: 503.
    # Peers in trusted_proxies are not counted: the proxy must limit its own clients.
    max_connections_per_client: int = _opt(32)
    max_header_bytes: int = _opt(16384)  # request line and headers; beyond: 431
    header_timeout: float = _opt(10.0, "duration")  # to send the request line and headers
    keep_alive_timeout: float = _opt(5.0, "duration")  # idle between requests
    # To send the whole body; beyond: 408, and the connection closed if already answered.
    body_timeout: float = _opt(30.0, "duration")
    # Host header values served (names, "*.example.org", "*"); [] = the listen host,
    # localhost, 127.0.0.1 and [::1] (any IP literal when listening on a wildcard).
    allowed_hosts: tuple[str, ...] = _opt([])
    trusted_proxies: tuple[str, ...] = _opt([])  # CIDRs whose X-Forwarded-* is believed
    tls_cert: str = _opt("", "path")  # PEM files: HTTPS on http.listen
    tls_key: str = _opt("", "path")


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    # A URL: a password in it (https://user:password@proxy/...) is masked like store.url's.
    base_url: str = _opt("", secret="url")
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
    path: str = _opt(DEFAULT_STORE_PATH, "path")
    # "postgresql://user@host/db": a store shared by a cluster; "" = SQLite at `path`.
    # Secret: a URL may carry a password (the log masks that, not the server's name).
    url: str = _opt("", secret="url")
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

    # This instance's name in the log and its leader session; its claims are the name and
    # a random tag (replicas given one name stay apart). "" = host name and pid.
    instance: str = _opt("")
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


# GitHub signs no timestamp, so a captured body can be replayed at any time; its key is
# the body's hash, and no genuine event repeats a body, so a long window costs nothing.
SIGNED_REPLAY_WINDOW = 7 * 86400.0


def route_dedupe_window(route: RouteConfig, default: float) -> float:
    """How long `route`'s texts are deduplicated: its own window, else `default`
    (dedupe.window); a GitHub route's default is at least a week (SIGNED_REPLAY_WINDOW),
    unless dedupe is off altogether. Here, not in policy, because retention (config
    validation) must outlast it too."""
    if route.dedupe_window >= 0:
        return route.dedupe_window
    if route.format == "github" and default > 0:
        return max(default, SIGNED_REPLAY_WINDOW)
    return default


SCOPES = ("send", "read", "admin", "metrics")
# Shortest secret a caller authenticates with: API tokens, route tokens, basic-auth
# passwords and HMAC secrets. 16 characters of a generated secret (token_urlsafe: 6 bits
# each) is 96 bits, out of reach of any guessing; it refuses the "changeme" and "secret"
# that get pasted into configs, and fits every sender's secret field (GitHub, GitLab and
# Grafana take any length; a UPS card's 15-character field is an SMTP password, not here).
MIN_SECRET_CHARS = 16
# Shortest `[smtp.users]` password. NIST SP 800-63B-4 (2024, section 3.1.1.2): a password
# that is the only factor SHALL be at least 15 characters; an SMTP login is one. It fits
# the shortest password field of the senders these are for (a UPS card's takes 15), and
# turns away the "changeme" and "ups123" that devices are set up with.
MIN_SMTP_PASSWORD_CHARS = 15
# 15 characters (88 random bits): fits that field, where MAKE_SECRET's 43 may not.
MAKE_SMTP_PASSWORD = "python3 -c 'import secrets; print(secrets.token_urlsafe(11))'"
MAX_REQUESTS_PER_MINUTE = 100_000  # provider.requests_per_minute, `sandbox --requests-per-minute`
MAKE_SECRET = "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"


@dataclass(frozen=True, slots=True)
class TokenConfig:
    """`[tokens.NAME]`: an API token and what it may do (`Authorization: Bearer TOKEN`)."""

    name: str = ""
    token: str = _opt("", secret=True)
    scopes: tuple[str, ...] = _opt([])  # send | read | admin | metrics
    # texts sent per UTC day with this token; beyond: budget.on_exceeded. 0 = no cap.
    texts_per_day: int = _opt(0)


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


# The sandbox's answer shapes by name (bridge.provider.sandbox.VARIANTS, which checks it
# matches): named here so config, below the provider, never imports the sandbox.
SANDBOX_VARIANTS = (
    "documented",
    "plain-numbers",
    "other-keys",
    "batch-only",
    "count-only",
    "local-time",
    "epoch-time",
    "created-201",
    "strict",
    "stand-in",
)
