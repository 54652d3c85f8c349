"""What `/readyz` reports: is the provider usable, and why not."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class ProviderHealth:
    """Red after a 401/403/404 until a probe succeeds; remembers the reason.

    A 403 (account not active) is `inactive`: /balance may well answer for such an
    account, so only a send that goes through turns health green again (no flapping).
    """

    def __init__(self) -> None:
        self.auth_error: str | None = None
        self.inactive = False
        self.since: float | None = None
        self.last_success: float | None = None

    @property
    def ready(self) -> bool:
        return self.auth_error is None

    def auth_failed(self, reason: str, now: float, *, inactive: bool = False) -> None:
        if self.auth_error is None:
            what = "says the account is not active" if inactive else "refused our key or path"
            log.error("provider %s: %s; sending paused, queue kept", what, reason)
            self.since = now
        self.inactive = inactive
        self.auth_error = f"account not active: {reason}" if inactive else reason

    def succeeded(self, now: float) -> None:
        if self.auth_error is not None:
            log.warning("provider accepts our requests again: sending resumes")
        self.auth_error = None
        self.inactive = False
        self.since = None
        self.last_success = now
