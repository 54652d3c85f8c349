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
        # The provider's words said the account cannot send (no balance, key invalid,
        # suspended: `ProviderAccountError`), waited out as an inactive account.
        self.account = False
        self.since: float | None = None
        self.last_success: float | None = None
        # The first of the sends since the last success that got no answer or a 5xx, and
        # the latest of them.
        self.failing_since: float | None = None
        self.last_unanswered: float | None = None

    @property
    def ready(self) -> bool:
        return self.auth_error is None

    def auth_failed(
        self, reason: str, now: float, *, inactive: bool = False, account: bool = False
    ) -> None:
        if self.auth_error is None:
            what = "says the account is not active" if inactive else "refused our key or path"
            what = "says the account cannot send" if account else what
            log.error("provider %s: %s; sending paused, queue kept", what, reason)
            self.since = now
        self.inactive = inactive or account
        self.account = account
        label = "account cannot send" if account else "account not active"
        self.auth_error = f"{label}: {reason}" if self.inactive else reason

    def succeeded(self, now: float) -> None:
        if self.auth_error is not None:
            log.warning("provider accepts our requests again: sending resumes")
        self.auth_error = None
        self.inactive = self.account = False
        self.since = None
        self.last_success = now
        self.failing_since = None

    def unanswered(self, now: float) -> None:
        """A send got no answer (connection refused, a timeout) or a 5xx."""
        if self.failing_since is None:
            self.failing_since = now
        self.last_unanswered = now

    def unreachable_for(self, now: float, *, retried_within: float) -> float | None:
        """How long every send has failed so: None if the last one went through, or if
        none failed within `retried_within` (the longest wait between retries): the texts
        that failed were given up or cancelled, nothing has been tried since, and an
        idle bridge would say for ever that the provider is down."""
        if self.failing_since is None or self.last_unanswered is None:
            return None
        if now - self.last_unanswered > retried_within:
            return None
        return now - self.failing_since
