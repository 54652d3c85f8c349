"""The bridge's exception tree.

BridgeError
├── ConfigError             every problem of a config, each with its key path
├── InputError              bad input from a sender: 400 / 5xx SMTP, names the field
├── Unavailable             the bridge cannot take it now: 503 / 451, the sender retries
│   ├── StoreUnavailable    the store cannot commit
│   │   ├── StoreBusy       a transaction the server refused for now (deadlock...)
│   │   └── SchemaError     the database's schema is not the one this bridge runs on
│   └── PhoneDataUnavailable  (bridge.phone) the phone metadata fails on a recipient
└── ProviderError           the provider's answer, classified once for the dispatcher
    ├── PermanentSendError  400: never retried, the provider's reason kept
    ├── ProviderAuthError   401, 403, 404: stop sending, keep the queue, health red
    │   └── ProviderInactiveError  403 "account not active": paused with its own backoff
    │       └── ProviderAccountError  any answer whose words say the account cannot send
    │                                 (no balance, key invalid, suspended): as a 403
    └── TransientSendError  5xx, timeouts, resets, unparseable bodies: retry later
        └── RateLimitedError   429: pause the whole key, honour retry_after
"""

from __future__ import annotations


class BridgeError(Exception):
    """Base of every error the bridge raises on purpose."""


class ConfigError(BridgeError):
    """A configuration that cannot run; `problems` holds (key path, what is wrong)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{key}: {why}" for key, why in problems))


class InputError(BridgeError):
    """Input a sender must correct; `field` names what is wrong."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class Unavailable(BridgeError):
    """Not the sender's fault and not taken: answered 503 / 451 with the reason, so the
    sender retries rather than drops what it sent."""


class StoreUnavailable(Unavailable):
    """The store could not commit; nothing was acknowledged."""

    @property
    def public(self) -> str:
        """Why, in words anyone may read. The store's own may name its host and port
        (asyncpg's "Connect call failed ('10.0.0.5', 5432)") or its file: those go to
        the log and to callers that may read the messages, not to anonymous ones."""
        return "the store is unavailable"


class StoreBusy(StoreUnavailable):
    """The server gave the transaction up for now (a deadlock, a serialization failure,
    a lock not had in time): the same write passes when tried again. Its words are the
    server's about this transaction (no address, no name), so ingress may quote them."""

    @property
    def public(self) -> str:
        return str(self)


class SchemaError(StoreUnavailable):
    """The database's schema is missing, older or newer than this bridge's: `serve`
    refuses to start on it; the message says what to run."""


class ProviderError(BridgeError):
    """An unsuccessful exchange with the provider."""

    def __init__(self, reason: str, *, status: int | None = None) -> None:
        self.reason = reason
        self.status = status
        super().__init__(reason if status is None else f"HTTP {status}: {reason}")


class PermanentSendError(ProviderError):
    """The provider refused the request itself (400); retrying cannot help."""


class ProviderAuthError(ProviderError):
    """Key or configuration wrong (401, 403, 404); nothing can be sent until fixed."""


class ProviderInactiveError(ProviderAuthError):
    """403: the key is known but the account is not active; /balance may still answer."""


class ProviderAccountError(ProviderInactiveError):
    """Any answer (a 402, a 400, a 200 `"success": false`) whose words say the account
    cannot send, whatever the message: no balance, a key the provider calls invalid, a
    suspended account. Not the message's fault: waited out as an inactive account."""


class TransientSendError(ProviderError):
    """Worth retrying; `retry_after` is the provider's hint in seconds, if any."""

    def __init__(
        self, reason: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(reason, status=status)
        self.retry_after = retry_after


class RateLimitedError(TransientSendError):
    """429: the key's budget is spent; pause every request, not just this one."""


class HttpError(BridgeError):
    """A request the HTTP face refuses: answered as JSON with this status and field."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
