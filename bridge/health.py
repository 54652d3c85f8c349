"""What `/readyz` reports: is the provider usable, and why not."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class ProviderHealth:
    """Red after a 401/403/404 until a probe succeeds; remembers the reason."""

    def __init__(self) -> None:
        self.auth_error: str | None = None
        self.since: float | None = None
        self.last_success: float | None = None

    @property
    def ready(self) -> bool:
        return self.auth_error is None

    def auth_failed(self, reason: str, now: float) -> None:
        if self.auth_error is None:
            log.error("provider refused our key or path: %s; sending paused, queue kept", reason)
            self.since = now
        self.auth_error = reason

    def succeeded(self, now: float) -> None:
        if self.auth_error is not None:
            log.warning("provider accepts our requests again: sending resumes")
        self.auth_error = None
        self.since = None
        self.last_success = now
