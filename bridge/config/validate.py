"""Checks across keys, each problem reported under its key path (nothing stops early).

Every number the config names is resolved by the one recipient resolver the running
bridge uses (`bridge.config.recipients`), so `check-config` and `serve` agree.
"""

from __future__ import annotations

import difflib
import ipaddress
import logging
import re
import zoneinfo
from collections.abc import Callable, Mapping

import phonenumbers

from bridge.config.exposure import validate_protected
from bridge.config.parsing import file_problem, parse_listen, template_problem, url_passwords
from bridge.config.recipients import Recipients
from bridge.config.sections import (
    MAKE_SECRET,
    MAKE_SMTP_PASSWORD,
    MAX_REQUESTS_PER_MINUTE,
    MIN_SECRET_CHARS,
    MIN_SMTP_PASSWORD_CHARS,
    ROUTE_FILTERS,
    ROUTE_OUTCOMES,
    SANDBOX_VARIANTS,
    SCOPES,
    Config,
    ProviderConfig,
    RouteConfig,
    SmtpConfig,
    route_dedupe_window,
)
from bridge.errors import InputError, Unavailable
from bridge.firewall import SENDER_ID_RULE, valid_sender_id

log = logging.getLogger(__name__)

Problem = Callable[[str, str], None]


def validate(config: Config, problem: Problem) -> None:
    """Every cross-key check of a loaded config; each problem goes to `problem(key, why)`."""
    _validate_sections(config, problem)
    _validate_budget(config, problem)
    _validate_tokens(config, problem)
    _validate_http(config, problem)
    validate_protected(config, problem)


DAY = 86400.0
MIN_AUTH_PROBE_INTERVAL = 5.0  # seconds: 12 probes a minute at most while a key is refused
# The least `http.max_body_bytes`: a minimal API call is ~50 bytes, but one Alertmanager
# alert with its labels and annotations, a Grafana or GitHub delivery runs to 1-3 KB. At
# 0 every request was answered 413, a 4xx no sender retries: every alert dropped.
MIN_BODY_BYTES = 4096
# The least `http.max_json_items` but 0 (no cap): real payloads hold up to 0.08 items a
# byte, ~330 in MIN_BODY_BYTES; fewer would refuse bodies the byte limit lets in.
MIN_JSON_ITEMS = 512
# The least `smtp.max_message_bytes`: a mail's headers alone (Received, Date, From,
# Message-ID, MIME) run to several hundred bytes; under it every real mail was refused.
MIN_MESSAGE_BYTES = 1024
# Seconds: the least status.poll_interval, and limits.per_recipient_window while storm
# control is on (a text is counted by the second; a window shorter counts none).
MIN_WINDOW = 1.0
# Seconds: the first wait of a 429 without Retry-After, and of a 5xx's or a timeout's
# resend before its jitter (half to all of it).
MIN_BACKOFF = 1.0
# The least `status.give_up_after`. At 0 the poller asked about no text at all (each was
# past it the moment it was sent): every text stayed `sent` for good, never `delivered`
# nor `failed`. A carrier's report may take minutes (a phone out of coverage, a carrier
# retrying), and a round over many waiting texts reads /logs for several poll intervals
# (its share of the minute's requests): a floor of ten minutes leaves room for both.
MIN_STATUS_PATIENCE = 600.0
# The least `provider.retry_max_age`. At 0 a text was failed at its first 5xx, timeout or
# refused connection ("gave up after 1 attempts"), and a send whose outcome was unsure was
# settled "outcome unknown" at the first look in /logs, never looked at again. The
# reconciler looks again 5 s on, waiting ~15 s for young sends to show
# (bridge.delivery.reconcile): 30 s lets it look twice.
MIN_RETRY_MAX_AGE = 30.0
# The least `routes.NAME.max_timestamp_skew`. Grafana's timestamp is whole seconds taken
# before the request is sent: at 0 every genuine alert was older than that by the time
# it came (a fraction of a second will do) and was answered 401 "replay?": every alert
# lost. A second of rounding, the delivery and two clocks a little apart fit in 5 s.
MIN_TIMESTAMP_SKEW = 5.0


def daily_caps(config: Config) -> list[str]:
    """The key of every daily cap set: the budget's, each route's, each API token's and
    SMTP user's."""
    b = config.budget
    keys = [
        f"budget.{key}"
        for key, cap in (
            ("texts_per_day", b.texts_per_day),
            ("parts_per_day", b.parts_per_day),
            ("cost_per_day", b.cost_per_day),
        )
        if cap > 0
    ]
    keys += [
        f"routes.{n}.max_texts_per_day" for n, r in config.routes.items() if r.max_texts_per_day > 0
    ]
    keys += [f"tokens.{n}.texts_per_day" for n, t in config.tokens.items() if t.texts_per_day > 0]
    keys += [
        f"smtp.user_texts_per_day.{n}" for n, c in config.smtp.user_texts_per_day.items() if c > 0
    ]
    return keys


def purge_floor(config: Config) -> tuple[float, str, str]:
    """The shortest age a purge may take: the longest time the bridge still reads a
    finished message for, the key that sets it and what reads it ((0, "", "") if none)."""
    floors = [(0.0, "", "")]
    if caps := daily_caps(config):
        floors.append((DAY, caps[0], "the daily caps count the messages sent today"))
    if config.budget.admin:
        # The warnings' dedupe key holds the day (bridge.policy.budgets.Budget.warn).
        floors.append((DAY, "budget.admin", "its warnings go once a day by the day's stored one"))
    repeat = "a repeat within it is suppressed by its stored original"
    floors.append((config.dedupe.window, "dedupe.window", repeat))
    for name, route in config.routes.items():
        window = route_dedupe_window(route, config.dedupe.window)
        if route.dedupe_window >= 0:
            floors.append((window, f"routes.{name}.dedupe_window", repeat))
        elif route.format == "github":  # a week by default: no key of its own says so
            why = "a GitHub delivery replayed within a week is suppressed by its stored original"
            floors.append((window, f"routes.{name}", why))
    if config.limits.per_recipient > 0:
        why = "storm control counts the texts stored within it"
        floors.append((config.limits.per_recipient_window, "limits.per_recipient_window", why))
    return max(floors, key=lambda floor: floor[0])  # the first of equals: the caps' wording


def purge_problem(config: Config, age: float) -> str | None:
    """Why purging the finished messages older than `age` would forget what the bridge
    still reads them for (`purge_floor`: a purge of today's sends lets as many again
    through the daily caps; of an original within the dedupe window, its repeat), or
    None. Refused rather than worked around: a retention the store silently stretched
    would not be the retention asked for, and security.md advises a short one."""
    floor, key, why = purge_floor(config)
    if age >= floor:
        return None
    shortest = _duration(floor)
    return (
        f"under {'a day' if floor == DAY else shortest} while {key} is set: {why},"
        f" which a purge would forget; use {shortest} or more"
    )


def _duration(seconds: float) -> str:
    """`seconds` as the largest whole unit a duration key takes (7d, 3h, 90s)."""
    for unit, size in (("d", DAY), ("h", 3600.0), ("m", 60.0)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def _validate_budget(config: Config, problem: Problem) -> None:
    """The daily caps, and the retention they rest on."""
    b = config.budget
    if b.on_exceeded not in ("wait", "fail"):
        problem("budget.on_exceeded", "must be wait or fail")
    # Each by its own key: a negative parts_per_day was reported as texts_per_day, and a
    # route's negative max_texts_per_day (a typo for a cap) meant no cap at all.
    negative: list[tuple[str, float]] = [
        ("budget.texts_per_day", b.texts_per_day),
        ("budget.parts_per_day", b.parts_per_day),
        ("budget.low_balance", b.low_balance),
    ]
    negative += [
        (f"routes.{n}.max_texts_per_day", r.max_texts_per_day) for n, r in config.routes.items()
    ]
    for key, value in negative:
        if value < 0:
            problem(key, "must be 0 (off) or more")
    if b.cost_per_day < 0:
        problem("budget.cost_per_day", "must be 0 (no cap) or more")
    for login, cap in config.smtp.user_texts_per_day.items():
        key = f"smtp.user_texts_per_day.{login}"
        if login not in config.smtp.users:
            problem(key, f"no user {login!r} in [smtp.users]")
        elif cap < 0:
            problem(key, "must be 0 (no cap) or more")
    if config.store.retention > 0 and (why := purge_problem(config, config.store.retention)):
        problem("store.retention", f"{why} (or 0 to keep every message)")


def _validate_sections(config: Config, problem: Problem) -> None:
    _validate_listens(config, problem)
    _validate_smtp(config.smtp, problem)
    _validate_regions(config, problem)
    if config.provider.arabic_type not in (2, 4):
        problem("provider.arabic_type", "must be 2 (Unicode) or 4 (the provider's Arabic type)")
    if config.limits.per_recipient < 0:
        problem("limits.per_recipient", "must be 0 (off) or more")
    elif config.limits.per_recipient and config.limits.per_recipient_window < MIN_WINDOW:
        # A window of 0s counts no text before this one: storm control silently off.
        problem(
            "limits.per_recipient_window",
            f"must be at least {MIN_WINDOW:g}s while limits.per_recipient is set"
            " (0s counts no texts); set limits.per_recipient = 0 to turn storm control off",
        )
    _validate_listener_limits(config, problem)
    if not 1 <= config.limits.max_parts <= 10:
        problem("limits.max_parts", "must be between 1 and 10")
    if (config.smtp.listen or config.smtp.tls_listen) and not config.smtp.domains:
        problem("smtp.domains", "at least one domain is needed while SMTP is on")
    _validate_store_url(config.store.url, problem)
    if not config.store.url and not config.store.path.strip():
        # SQLite takes "" for a temporary database: every message lost at exit.
        problem("store.path", "is empty: name the store's file, or set store.url")
    if config.cluster.instance and not config.cluster.instance.strip():
        # " " is not "": it replaced the host name and pid, and every instance so named
        # was a blank in the log and in pg_stat_activity's leader session.
        problem("cluster.instance", 'is blank: name the instance, or "" for host name and pid')
    if not 5 <= config.cluster.lease <= 3600:
        # Shorter than a send's timeout would hand live sends to another instance.
        problem("cluster.lease", "must be between 5s and 1h")
    _validate_provider(config.provider, problem)
    if config.status.poll_interval < MIN_WINDOW:
        # At 0 the poller went round with no pause, nothing to poll or not: half a core
        # of an idle bridge spent asking the store again.
        problem("status.poll_interval", f"must be at least {MIN_WINDOW:g}s")
    if config.status.give_up_after < max(MIN_STATUS_PATIENCE, config.status.poll_interval):
        problem(
            "status.give_up_after",
            f"must be at least {_duration(MIN_STATUS_PATIENCE)} and status.poll_interval:"
            " texts older are never asked about again (0 asked about none)",
        )
    if not 0 < config.status.budget_share <= 1:
        problem("status.budget_share", "must be above 0 and at most 1")
    if not 0 <= config.sandbox.fail_share <= 1:
        problem("sandbox.fail_share", "must be between 0 and 1")
    if config.sandbox.balance < 0:
        # No account starts in debt: the strict variant refused every send, and the
        # others reported a balance below zero that no rehearsal can mean.
        problem("sandbox.balance", "must be 0 (an empty account) or more")
    _validate_provider_extras(config, problem)
    if config.log.level.lower() not in ("debug", "info", "warning", "error"):
        problem("log.level", "must be debug, info, warning or error")
    if config.log.format not in ("human", "json"):
        problem("log.format", "must be human or json")
    _validate_routes(config.routes, problem)
    _validate_recipients(config, problem)


def _validate_listens(config: Config, problem: Problem) -> None:
    """The SMTP and HTTP listeners' addresses."""
    for key, listen in (("smtp.listen", config.smtp.listen), ("http.listen", config.http.listen)):
        if listen:
            try:
                parse_listen(listen)
            except ValueError as exc:
                problem(key, str(exc))


def _validate_regions(config: Config, problem: Problem) -> None:
    """The region codes numbers without a country code are read in."""
    for region_key, region in [
        ("smtp.default_region", config.smtp.default_region),
        ("phone.default_region", config.phone.default_region),
        *((f"smtp.regions.{d}", r) for d, r in config.smtp.regions.items()),
    ]:
        if region and region.upper() not in phonenumbers.SUPPORTED_REGIONS:
            problem(region_key, f"{region!r} is not a region code such as US, GB or DE")


def store_url_problem(url: str) -> str | None:
    """Why `url` is no PostgreSQL URL whose password a reader can tell apart (store.url,
    `store copy --to`), or None."""
    if not re.match(r"^postgres(ql)?://\S*$", url):
        return "must be a postgresql:// URL, or empty for SQLite at store.path"
    if url_passwords(url) == [url]:
        # Read by the driver, "bridge:hunter" became a host and port, and its error
        # quoted the password; which part is the password no reader can tell.
        return 'a "/", "?", "#" or "@" in the password must be written %2F, %3F, %23, %40'
    return None


def _validate_store_url(url: str, problem: Problem) -> None:
    """store.url: a PostgreSQL URL whose password a reader can tell apart, or empty."""
    if url and (why := store_url_problem(url)):
        problem("store.url", why)


def _validate_smtp(smtp: SmtpConfig, problem: Problem) -> None:
    """[smtp]: its TLS, authentication, networks and how a mail becomes a text."""
    _validate_smtp_tls(smtp, problem)
    if smtp.require_auth and not smtp.users:
        problem("smtp.require_auth", "no [smtp.users] to authenticate")
    _validate_smtp_users(smtp, problem)
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
    if smtp.template and (why := template_problem(smtp.template)):
        problem("smtp.template", why)  # each mail would fall back to subject and body
    if smtp.sender_id and not valid_sender_id(smtp.sender_id):
        problem("smtp.sender_id", SENDER_ID_RULE)


def _validate_smtp_tls(smtp: SmtpConfig, problem: Problem) -> None:
    """[smtp]'s TLS: a listener for implicit TLS, and the certificate and key it needs."""
    if smtp.tls_listen:
        try:
            parse_listen(smtp.tls_listen)
        except ValueError as exc:
            problem("smtp.tls_listen", str(exc))
    if bool(smtp.tls_cert) != bool(smtp.tls_key):
        problem("smtp.tls_cert", "tls_cert and tls_key go together")
    for key in ("tls_cert", "tls_key"):
        if getattr(smtp, key) and (why := file_problem(getattr(smtp, key))):
            problem(f"smtp.{key}", f"{getattr(smtp, key)}: {why}")
    if smtp.tls_listen and not smtp.tls_cert:
        problem("smtp.tls_listen", "implicit TLS needs smtp.tls_cert and smtp.tls_key")


def _validate_smtp_users(smtp: SmtpConfig, problem: Problem) -> None:
    """[smtp.users]: logins a client can name, passwords not guessed."""
    for login, password in smtp.users.items():
        if not login or any(ord(c) < 32 or ord(c) == 127 for c in login):
            # `SMS_BRIDGE_SMTP_USERS==pw` made a login "", and a NUL or line break no
            # AUTH command can carry: a user no client could name, accepted silently.
            problem(f"smtp.users.{login!r}", "a login is one or more printable characters")
            continue
        if not password:  # AUTH with the login and nothing else passed
            problem(
                f"smtp.users.{login}",
                "an empty password (an empty *_file?): anyone naming this login could send",
            )
        elif why := _short_secret(
            password, MIN_SMTP_PASSWORD_CHARS, "an SMTP password", MAKE_SMTP_PASSWORD
        ):
            # A login is the only factor, and a short one falls to guessing spread over
            # time and addresses, however the lockout slows each client.
            problem(f"smtp.users.{login}", why)


def _validate_provider(p: ProviderConfig, problem: Problem) -> None:
    """[provider]: where and how the bridge calls the SMS API."""
    if p.base_url and not re.match(r"^https?://[^/\s]+", p.base_url):
        problem("provider.base_url", "must be an http:// or https:// URL, or empty for the sandbox")
    if p.auth_header not in ("x-api-key", "bearer"):
        problem("provider.auth_header", "must be x-api-key or bearer")
    if p.base_url and not p.api_key:
        problem("provider.api_key", "required when provider.base_url is set")
    if not 1 <= p.requests_per_minute <= MAX_REQUESTS_PER_MINUTE:
        problem("provider.requests_per_minute", f"must be between 1 and {MAX_REQUESTS_PER_MINUTE}")
    for key in ("timeout", "connect_timeout"):
        if getattr(p, key) <= 0:  # httpx's 0 times out at once: every send failed
            problem(f"provider.{key}", "must be above 0")
    if not p.auth_probe_interval >= MIN_AUTH_PROBE_INTERVAL:
        # At 0 a refused key was probed back to back: the minute's 100 requests went in
        # 8 s, every one a 401 the provider may count against the account.
        problem(
            "provider.auth_probe_interval",
            f"must be at least {MIN_AUTH_PROBE_INTERVAL:g}s: each probe of a refused key"
            " is a request of the minute's budget",
        )
    if not p.backoff_initial >= MIN_BACKOFF:
        # At 0 a 429 without Retry-After paused for 0 s: resent at once into the same full
        # window, as often as the bridge's own budget allowed (and so were 5xx answers).
        problem(
            "provider.backoff_initial",
            f"must be at least {MIN_BACKOFF:g}s: each retry is a request of the minute's budget",
        )
    if not p.backoff_max >= max(p.backoff_initial, MIN_BACKOFF):
        problem(
            "provider.backoff_max",
            f"must be at least {MIN_BACKOFF:g}s and provider.backoff_initial",
        )
    if not p.retry_max_age >= max(MIN_RETRY_MAX_AGE, p.backoff_initial):
        # Under backoff_initial the first retry's wait already ran past it: no retry.
        problem(
            "provider.retry_max_age",
            f"must be at least {MIN_RETRY_MAX_AGE:g}s and provider.backoff_initial:"
            " a shorter one fails a text at its first transient error",
        )
    if not 1 <= p.max_bulk <= 1000:
        problem("provider.max_bulk", "must be between 1 and 1000 (the provider's bulk limit)")
    if not valid_sender_id(p.sender_id):
        problem("provider.sender_id", SENDER_ID_RULE)
    for key in ("pricing_path", "account_path", "calculate_path"):
        if not getattr(p, key).startswith("/"):
            problem(f"provider.{key}", "must start with /")


def _validate_routes(routes: Mapping[str, RouteConfig], problem: Problem) -> None:
    """[routes.*]: each webhook route's authentication, recipients, sender and filters."""
    for name, route in routes.items():
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
        if not route.max_timestamp_skew >= MIN_TIMESTAMP_SKEW:
            problem(
                f"{key}.max_timestamp_skew",
                f"must be at least {MIN_TIMESTAMP_SKEW:g}s: a signed time is whole seconds"
                " taken before sending, so a shorter one refuses genuine alerts",
            )
        _validate_filters(key, route, problem)


def _validate_filters(key: str, route: RouteConfig, problem: Problem) -> None:
    """A filter the route's format cannot meet: a key it does not read, or an outcome its
    sender never writes. Either texted nothing or everything with nothing said (a gitlab
    route's "failure", GitHub's word, answered every failed pipeline `200 ignored`)."""
    for name, formats in ROUTE_FILTERS.items():
        if getattr(route, name) and route.format not in formats:
            problem(
                f"{key}.{name}",
                f"{route.format} routes do not read it (only {', '.join(formats)} routes)",
            )
    outcomes = ROUTE_OUTCOMES.get(route.format, ())
    for index, outcome in enumerate(route.conclusions if outcomes else ()):
        if outcome not in outcomes:
            near = difflib.get_close_matches(outcome, outcomes, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            problem(
                f"{key}.conclusions[{index}]",
                f"{outcome!r} is not a {route.format} outcome{hint}: use {', '.join(outcomes)}",
            )


def _validate_recipients(config: Config, problem: Problem) -> None:
    """Phone rules, and every number the config names goes through the resolver the
    running bridge uses: a config that texts a refused number is a config error, not a
    surprise (nor a traceback at start, as `budget.admin` once was)."""
    phone = config.phone
    for index, country in enumerate(phone.allowed_countries):
        if country.upper() not in phonenumbers.SUPPORTED_REGIONS:
            problem(
                f"phone.allowed_countries[{index}]", f"{country!r} is not an ISO code such as US"
            )
    if config.http.max_recipients < 0:
        problem("http.max_recipients", "must be 0 (no cap) or more")
    if config.http.max_json_items < 0:
        problem("http.max_json_items", "must be 0 (no cap) or more")
    for index, sender_id in enumerate(config.provider.allowed_sender_ids):
        if not valid_sender_id(sender_id):
            problem(f"provider.allowed_sender_ids[{index}]", SENDER_ID_RULE)
    recipients = Recipients.from_config(config)

    def check_number(key: str, target: str, why: str = "") -> None:
        try:
            recipients.number(target)
        except InputError as exc:
            problem(key, f"{why}{exc}")
        except Unavailable as exc:
            # Not the config's fault but the installed phonenumbers': refusing to start
            # would stop every country's alerts for one. This number is answered 503 /
            # 451 when used (the sender retries); the others go.
            log.warning("%s: %s", key, exc)

    for name, members in config.groups.items():
        for index, member in enumerate(members):
            check_number(f"groups.{name}[{index}]", member)
    named = [("budget.admin", config.budget.admin)] + [
        (f"routes.{name}.to", route.to) for name, route in config.routes.items()
    ]
    for login, targets in config.smtp.user_recipients.items():
        key = f"smtp.user_recipients.{login}"
        if login not in config.smtp.users:
            problem(key, f"no user {login!r} in [smtp.users]")
        elif not targets:
            # Refused rather than read as "anyone": an empty allow-list texting everyone
            # is the opposite of what it says.
            problem(key, "empty: this user could text no one; remove it to allow anyone")
        named.append((key, targets))
    for key, targets in named:
        for index, target in enumerate(targets):
            if recipients.group(target) is not None:
                continue  # its members are checked above
            check_number(f"{key}[{index}]", target, "neither a group nor an allowed number: ")


def _short_secret(
    value: str, minimum: int = MIN_SECRET_CHARS, what: str = "a secret", make: str = MAKE_SECRET
) -> str | None:
    """Why a caller's secret is too short to keep guessing out, or None."""
    if len(value) >= minimum:
        return None
    # Never the secret, nor its length: check-config's output lands in logs and tickets.
    return f"too short: {what} needs at least {minimum} characters; make one with `{make}`"


def _validate_tokens(config: Config, problem: Problem) -> None:
    """API tokens, and every secret a route authenticates its callers with."""
    for name, route in config.routes.items():
        for field in ("token", "password", "secret"):
            value = getattr(route, field)
            if value and (why := _short_secret(value)):  # "" = that way is not used
                problem(f"routes.{name}.{field}", why)
    seen: dict[str, str] = {}
    for name, spec in config.tokens.items():
        key = f"tokens.{name}"
        if why := _short_secret(spec.token):
            problem(f"{key}.token", why)
        elif spec.token in seen:
            problem(f"{key}.token", f"the same token as tokens.{seen[spec.token]}")
        else:
            seen[spec.token] = name
        if spec.texts_per_day < 0:
            problem(f"{key}.texts_per_day", "must be 0 (no cap) or more")
        if not spec.scopes:
            problem(f"{key}.scopes", f"at least one of {', '.join(SCOPES)}")
        for scope in spec.scopes:
            if scope not in SCOPES:
                problem(f"{key}.scopes", f"{scope!r} is not one of {', '.join(SCOPES)}")


def _validate_provider_extras(config: Config, problem: Problem) -> None:
    """Keys of the provider-shape work (issue 17), kept apart for easy merging."""
    if not 0 <= config.provider.max_unknown_resends <= 5:
        problem("provider.max_unknown_resends", "must be between 0 and 5")
    try:
        zoneinfo.ZoneInfo(config.provider.timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        problem("provider.timezone", f"{config.provider.timezone!r} is not an IANA time zone")
    if config.sandbox.variant not in SANDBOX_VARIANTS:
        problem("sandbox.variant", f"must be one of {', '.join(sorted(SANDBOX_VARIANTS))}")


def _validate_listener_limits(config: Config, problem: Problem) -> None:
    """Connection, command and parse limits: each at least 1 (or above 0 for times), the
    byte limits at least what ordinary traffic needs."""
    for section, keys in (
        (
            "smtp",
            (
                # max_recipients 0 refused every RCPT.
                "max_recipients",
                "max_sessions",
                "max_sessions_per_client",
                "max_lines",
                "max_mails_per_session",
                "max_commands",
                "max_mime_depth",
                "max_mime_parts",
                "parse_timeout",
                # idle_timeout 0 closed every session at once: no mail taken at all.
                "idle_timeout",
                "max_session_time",
            ),
        ),
        (
            "http",
            (
                "max_concurrency",
                "max_connections_per_client",
                "header_timeout",
                "keep_alive_timeout",
                "body_timeout",
            ),
        ),
    ):
        for key in keys:
            if getattr(getattr(config, section), key) <= 0:
                problem(f"{section}.{key}", "must be above 0")
    for key, value, least in (
        ("http.max_header_bytes", config.http.max_header_bytes, 1024),
        ("http.max_body_bytes", config.http.max_body_bytes, MIN_BODY_BYTES),
        # 0 read as "no limit" in aiosmtpd: a session then buffered whatever a client
        # sent (gigabytes).
        ("smtp.max_message_bytes", config.smtp.max_message_bytes, MIN_MESSAGE_BYTES),
    ):
        if value < least:
            problem(key, f"must be at least {least}")
    if 0 < config.http.max_json_items < MIN_JSON_ITEMS:
        problem("http.max_json_items", f"must be 0 (no cap) or at least {MIN_JSON_ITEMS}")


def _validate_http(config: Config, problem: Problem) -> None:
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
        if getattr(http, key) and (why := file_problem(getattr(http, key))):
            problem(f"http.{key}", f"{getattr(http, key)}: {why}")
