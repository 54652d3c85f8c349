"""Protected mode and reloads: what may be reachable from the network, what a SIGHUP
may change.

With a real provider every SMS costs money, so `validate_protected` refuses listeners
and routes that other machines could use unauthenticated. `as_reloaded` is the config a
reload really runs (restart-only keys keep their running values), and protected mode
judges that, not the file.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import urllib.parse
from collections.abc import Callable
from typing import Any

from bridge.addresses import client_address, parse_network
from bridge.config.parsing import parse_listen
from bridge.config.sections import SIGNED_FORMATS, Config, route_dedupe_window


def is_loopback_host(host: str) -> bool:
    """`localhost`, 127.0.0.0/8 (IPv4-mapped too) or ::1: reachable from this machine only."""
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost":  # not *.localhost: only some resolvers keep those on loopback
        return True
    address = client_address(host)  # ::ffff:127.0.0.1 is loopback as 127.0.0.1 is
    return address is not None and address.is_loopback


def _listen_host(listen: str) -> str | None:
    try:
        return parse_listen(listen)[0] if listen else None
    except ValueError:
        return None  # reported by _validate


# Ranges no one on the Internet reaches the bridge from: an allowlist of them restricts.
_LOCAL_RANGES = tuple(
    ipaddress.ip_network(n)
    for n in (
        *("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8", "169.254.0.0/16"),
        *("100.64.0.0/10", "fc00::/7", "fe80::/10", "::1/128"),
    )
)
_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
# The most public address space an allowlist may admit and still count as a restriction:
# an IPv4 /8 (a large organisation) or an IPv6 /32 (a whole provider's allocation).
_MOST_PUBLIC = {4: 2**24, 6: 2**96}
# Said when an allowlist is set but judged none: "neither ... allowed_networks" had the
# operator who set ["0.0.0.0/0"] looking for a key they had written.
_ADMITS_ALL = "admits the Internet (more than an IPv4 /8 or an IPv6 /32 of public space)"


def _restricts(networks: tuple[str, ...]) -> bool:
    """Does this allowlist leave the Internet out? Judged on the union, not each entry:
    `0.0.0.0/1` plus `128.0.0.0/1` is everyone, as `0.0.0.0/0` is. Private, loopback
    and link-local ranges are free; public space is summed per address family."""
    try:
        parsed = [parse_network(n) for n in networks]  # ::ffff:0:0/96 is the IPv4 Internet
    except ValueError:
        return True  # the bad entry is reported by _validate
    if not parsed:
        return False
    if any(n.version == 6 and n.supernet_of(_IPV4_MAPPED) for n in parsed):
        # `::/64` holds ::ffff:0:0/96, and every IPv4 client matches it by its mapped
        # form (`in_networks`): counted as IPv6 space alone, it passed for a restriction.
        parsed.append(ipaddress.IPv4Network("0.0.0.0/0"))
    for version, most in _MOST_PUBLIC.items():
        family: list[Any] = [n for n in parsed if n.version == version]
        local = [n for n in _LOCAL_RANGES if n.version == version]
        public = 0
        for network in ipaddress.collapse_addresses(family):
            if not any(network.subnet_of(r) for r in local):
                public += network.num_addresses
        if public > most:
            return False
    return True


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


PLAINTEXT_OVERRIDE = "smtp.dangerously_allow_plaintext_auth_beyond_loopback"


def plaintext_auth_beyond_loopback(config: Config) -> str | None:
    """The non-loopback `smtp.listen` on which `[smtp.users]` may log in without TLS
    (`smtp.auth_allow_plaintext`), or None. Their passwords cross the network there in
    clear text (base64 is no encryption): anyone on the path may read and reuse them."""
    smtp = config.smtp
    host = _listen_host(smtp.listen)
    if not (smtp.auth_allow_plaintext and smtp.users) or host is None or is_loopback_host(host):
        return None
    return smtp.listen


def plaintext_auth_warnings(config: Config) -> list[str]:
    """What check-config, `serve` and each reload say while SMTP passwords may cross the
    network in clear text (allowed by the sandbox, or by protected mode's override)."""
    listen = plaintext_auth_beyond_loopback(config)
    if listen is None:
        return []
    override = " (" + PLAINTEXT_OVERRIDE + " = true)" if config.provider.base_url else ""
    return [
        f"smtp.auth_allow_plaintext: SMTP passwords may be sent in clear text to {listen},"
        f" which is reachable from the network{override}: anyone on the path can read"
        " them; set smtp.tls_cert and turn auth_allow_plaintext off"
    ]


def unrestricted_sessions_warnings(config: Config) -> list[str]:
    """`smtp.user_recipients` binds only a session that logged in: without
    `smtp.require_auth`, a client that skips AUTH texts anyone the firewall allows.

    Said, not refused: a bridge may well mean it (local cron mail on 127.0.0.1 unlisted,
    remote users logging in and listed), and refusing would stop such a bridge at the
    next restart. But an owner who listed a user's recipients most likely expected them
    to bind everyone, so check-config, `serve` and each reload name both keys."""
    smtp = config.smtp
    if not smtp.user_recipients or smtp.require_auth:
        return []
    listed = ", ".join(sorted(smtp.user_recipients))
    return [
        f"smtp.user_recipients ({listed}) binds only sessions that log in, and"
        " smtp.require_auth is off: a client that does not log in may text any allowed"
        " number; set smtp.require_auth = true to make every sender log in"
    ]


def replayable_routes_warnings(config: Config) -> list[str]:
    """Grafana routes that take a replayed signed request: a request captured on the way
    (a proxy's log, a hop without TLS) passes again once the route's dedupe window is
    over, its alert texted again as often as it is replayed.

    Said, not refused: Grafana sends no timestamp unless its "Timestamp header" is set,
    and a route that demands one refuses every call without it. check-config, `serve`
    and each reload name the route and the settings that close it."""
    return [
        f"routes.{name}: {why}"
        for name, route in sorted(config.routes.items())
        if route.format == "grafana" and route.secret and (why := _replay_gap(config, name))
    ]


def _replay_gap(config: Config, name: str) -> str | None:
    """Why the signed Grafana route `name` takes a replay, or None."""
    route = config.routes[name]
    if not route.timestamp_header:
        return (
            "signed without a timestamp, so a captured request is taken again (a replay)"
            " once the route's dedupe window is over, its alert texted again; set Grafana's"
            f' HMAC "Timestamp header" and routes.{name}.timestamp_header to one name,'
            " e.g. X-Grafana-Alerting-Timestamp"
        )
    window = route_dedupe_window(route, config.dedupe.window)
    if window >= route.max_timestamp_skew:
        return None
    return (
        f"a signed time up to max_timestamp_skew ({route.max_timestamp_skew:g}s) old is"
        f" taken, but the dedupe window is {window:g}s: a request replayed between is"
        f" texted again (a replay); set routes.{name}.dedupe_window to at least the skew"
    )


def protection_problems(config: Config) -> list[tuple[str, str]]:
    """What protected mode refuses in `config` (see `validate_protected`)."""
    problems: list[tuple[str, str]] = []
    validate_protected(config, lambda key, why: problems.append((key, why)))
    return problems


def validate_protected(config: Config, problem: Callable[[str, str], None]) -> None:
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
                open_by = (
                    f"and smtp.allowed_networks {_ADMITS_ALL}"
                    if smtp.allowed_networks
                    else "with neither smtp.require_auth nor smtp.allowed_networks"
                )
                problem(
                    key,
                    f"{listen} is reachable from the network {open_by} {real}: list "
                    'your senders in smtp.allowed_networks (e.g. ["192.0.2.0/24"]), set '
                    "smtp.require_auth with [smtp.users], or listen on 127.0.0.1",
                )
    plaintext = plaintext_auth_beyond_loopback(config)
    if plaintext is not None and not smtp.dangerously_allow_plaintext_auth_beyond_loopback:
        problem(
            "smtp.auth_allow_plaintext",
            f"{plaintext} is reachable from the network and AUTH there would send "
            f"[smtp.users] passwords in clear text {real}: set smtp.tls_cert (STARTTLS) "
            f"and turn auth_allow_plaintext off, listen on 127.0.0.1, or, knowing anyone "
            f"on the path can read them, set {PLAINTEXT_OVERRIDE} = true",
        )
    if http_host is None:
        return  # no HTTP listener: the routes cannot be reached
    for name, route in config.routes.items():
        if route.public:
            continue
        signed = route.secret and route.format in SIGNED_FORMATS  # others never check it
        if route.token or route.username or signed:
            continue
        if not _restricts(route.allowed_networks):
            broad = f"; its allowed_networks {_ADMITS_ALL}" if route.allowed_networks else ""
            problem(
                f"routes.{name}",
                f"no authentication {real}{broad}: set token, username/password, secret "
                "(grafana, github, gitlab) or allowed_networks, or public = true to accept anyone",
            )
        elif why := _proxied_loopback(config, route.allowed_networks):
            problem(f"routes.{name}", f"{why} {real}: {_PROXIED_LOOPBACK_FIX}")


_PROXIED_LOOPBACK_FIX = (
    'set http.trusted_proxies to the proxy\'s address (e.g. ["127.0.0.1/32"]) so that'
    " allowed_networks sees the real client, or give the route a token"
)


def _proxied_loopback(config: Config, networks: tuple[str, ...]) -> str | None:
    """Why an allowlist of loopback alone protects nothing here, or None.

    `http.allowed_hosts` naming a host other than loopback's means a proxy on this
    machine passes the senders' requests on (docs/recipes.md's Caddy): without
    `http.trusted_proxies` the bridge sees each of them coming from 127.0.0.1, and
    ["127.0.0.0/8", "::1/128"] (config.example.toml's) admits the whole Internet."""
    if config.http.trusted_proxies:
        return None
    named = [h for h in config.http.allowed_hosts if not is_loopback_host(h)]
    try:
        loopback_only = all(parse_network(n).is_loopback for n in networks)
    except ValueError:
        return None  # the bad entry is reported by _validate
    if not (named and networks and loopback_only):
        return None
    return (
        f"its only protection is allowed_networks of loopback, but http.allowed_hosts"
        f" serves {named[0]!r} with no http.trusted_proxies: through a proxy on this"
        " machine every caller is 127.0.0.1, and anyone who reaches the proxy passes"
    )
