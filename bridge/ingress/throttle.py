"""Per-client bookkeeping against abuse: failed logins throttled, warnings not flooded.

`FailureThrottle` counts failed authentications (SMTP AUTH, bearer tokens, route
credentials) per client. Past `max_failures` within `window` seconds the client is
locked out for `lockout` seconds: every attempt it makes is refused *without being
checked*, right or wrong, since answering a right guess differently would let the
guessing go on at full speed. A success does not clear the count (a genuine client at
the same address would otherwise reset an attacker's budget).

What a lockout must not do is stop the genuine senders at that address: on a loopback
install every local sender is 127.0.0.1, behind a NAT every host is its address, and a
script with a wrong token (or a local attacker) locked Alertmanager out with it: its
alerts answered 503 for the whole lockout. So a credential that succeeded from a client
*before* its lockout (OWASP's "device cookie") is remembered (`trust`) and passes it
(`trusted`): a guess cannot be among them, since nothing reaches the checks while the
lockout lasts, and a right guess made earlier was already a success.

`QuietLog` keeps one WARNING per client and kind a minute; the rest are counted and
summed into the next line, so 25,000 failures make a few lines, not 25,000.

A client is its IPv4 address, or its IPv6 /64: one host usually holds a whole /64, and
counting single IPv6 addresses would give it 2**64 fresh budgets. Both tables are
bounded; a flood of new clients evicts the oldest entries, never grows memory.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from bridge.addresses import client_address
from bridge.clock import Clock

# The last 1/RESERVED_SHARE of SMTP sessions and of HTTP requests in flight go one to a
# client: a few clients at their per-client cap held them all (smtplimits, http.limits).
RESERVED_SHARE = 4
MAX_FAILURES = 10  # failed authentications from one client within WINDOW
WINDOW = 60.0
LOCKOUT = 300.0  # seconds a client past MAX_FAILURES is refused
MAX_CLIENTS = 10_000  # entries kept; beyond, the oldest go
_ABSENT = object()  # a dict.pop default: the key was not there
TRUSTED_PER_CLIENT = 16  # credentials remembered per client (API and route tokens)
LOG_EVERY = 60.0  # seconds between two warnings of one kind about one client


@functools.lru_cache(maxsize=4096)
def client_key(host: str) -> str:
    """The client an address belongs to: itself for IPv4, its /64 for IPv6."""
    address = client_address(host)
    if address is None:
        return host
    if address.version == 4:  # an IPv4-mapped one too: not one /64 for every IPv4 client
        return str(address)
    return str(ipaddress.IPv6Network((address, 64), strict=False))


@dataclass(slots=True)
class _Record:
    failures: int
    since: float  # start of the current counting window
    locked_until: float = 0.0


class FailureThrottle:
    """Failed authentications per client, and the lockout that follows too many."""

    def __init__(
        self,
        clock: Clock,
        *,
        max_failures: int = MAX_FAILURES,
        window: float = WINDOW,
        lockout: float = LOCKOUT,
        max_clients: int = MAX_CLIENTS,
    ) -> None:
        self.clock = clock
        self.max_failures = max_failures
        self.window = window
        self.lockout = lockout
        self.max_clients = max_clients
        self._records: dict[str, _Record] = {}
        # client -> fingerprints of credentials that succeeded from it, oldest first.
        # Only a verified credential adds one: a client without one cannot grow it.
        self._trusted: dict[str, dict[int, None]] = {}

    def locked(self, host: str) -> float:
        """Seconds the client must still wait; 0 when it may try."""
        record = self._records.get(client_key(host))
        if record is None:
            return 0.0
        return max(0.0, record.locked_until - self.clock.now())

    def failed(self, host: str) -> float:
        """Count one failure; the lockout it starts (seconds), or 0."""
        key, now = client_key(host), self.clock.now()
        record = self._records.get(key)
        if record is None or now - record.since > self.window:
            if len(self._records) >= self.max_clients:
                self._evict(now)
            record = self._records[key] = _Record(0, now, getattr(record, "locked_until", 0.0))
        record.failures += 1
        if record.failures >= self.max_failures and record.locked_until <= now:
            record.locked_until = now + self.lockout
            record.failures, record.since = 0, now
            return self.lockout
        return 0.0

    def trust(self, host: str, credentials: Iterable[str]) -> None:
        """Remember `credentials` (header values the bridge verified) as genuine from
        `host`. Fingerprints (the process's randomised hash), never the secrets.

        Least recently used first out: a credential verified again moves to the end. The
        first verified went first, however often it was used since: Alertmanager's token,
        used a minute ago, went once sixteen other tokens were used from its address.
        """
        key = client_key(host)
        known = self._trusted.pop(key, None)
        if known is None:
            if len(self._trusted) >= self.max_clients:
                del self._trusted[next(iter(self._trusted))]
            known = {}
        self._trusted[key] = known  # the client heard from last: the end
        for credential in credentials:
            fingerprint = hash(credential)
            new = known.pop(fingerprint, _ABSENT) is _ABSENT
            if new and len(known) >= TRUSTED_PER_CLIENT:
                del known[next(iter(known))]  # new, and no room: the least recent goes
            known[fingerprint] = None  # new or used again: the end

    def trusted(self, host: str, credentials: Iterable[str]) -> bool:
        """Whether every one of `credentials` (at least one) succeeded from `host`."""
        known = self._trusted.get(client_key(host), {})
        fingerprints = [hash(credential) for credential in credentials]
        return bool(fingerprints) and all(f in known for f in fingerprints)

    def _evict(self, now: float) -> None:
        stale = [
            k
            for k, r in self._records.items()
            if r.locked_until <= now and now - r.since > self.window
        ]
        for key in stale or list(self._records)[: max(1, self.max_clients // 10)]:
            del self._records[key]


def reserved(limit: int, per_client: int) -> int:
    """How many of `limit` places go one to a client: the last 1/RESERVED_SHARE, but
    never so many that a client alone could not reach its own cap `per_client` (a relay
    that opens many sessions from one address, every local sender of a loopback install,
    which are all one client)."""
    return max(0, min(limit // RESERVED_SHARE, limit - per_client))


class QuietLog:
    """WARNINGs about one client and kind at most every `every` seconds, with a count of
    those held back in between."""

    def __init__(self, logger: logging.Logger, clock: Clock, *, every: float = LOG_EVERY) -> None:
        self.logger = logger
        self.clock = clock
        self.every = every
        self._last: dict[tuple[str, str], tuple[float, int]] = {}

    def warning(self, kind: str, host: str, message: str, *args: object) -> None:
        key, now = (kind, client_key(host)), self.clock.now()
        last, held = self._last.get(key, (float("-inf"), 0))
        if now - last < self.every:
            self._last[key] = (last, held + 1)
            return
        if len(self._last) >= MAX_CLIENTS:
            self._last.clear()
        self._last[key] = (now, 0)
        if held:
            message += f" ({held} more like it in the last {self.every:g}s not logged)"
        self.logger.warning(message, *args)
