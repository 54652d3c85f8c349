"""SMTP session limits aiosmtpd lacks or applies differently, as an `SMTP` subclass.

- Sessions in all and per client address (`smtp.max_sessions`,
  `smtp.max_sessions_per_client`): past either, 421 at connect and the socket closed,
  before aiosmtpd builds a session.
- Per-session command budgets (`smtp.max_commands`, `smtp.max_mails_per_session`):
  aiosmtpd's own call limits, which answer 421 and close.
- An idle timer (`smtp.idle_timeout`) that only progress restarts: aiosmtpd restarts it
  before every recognised command, so NOOP every few minutes kept a session for ever.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, cast

from aiosmtpd.smtp import SMTP

from bridge.config import SmtpConfig

log = logging.getLogger(__name__)
# Commands that move a session forward: only their success restarts the idle timer.
# NOOP, RSET, HELP, VRFY, EXPN and refused commands never do.
PROGRESS = ("HELO", "EHLO", "STARTTLS", "AUTH", "MAIL", "RCPT", "DATA")


class Sessions:
    """Open SMTP sessions, in all and per client address, against the limits in force."""

    def __init__(self, limits: Callable[[], SmtpConfig]) -> None:
        self._limits = limits
        self.total = 0
        self.per_client: collections.Counter[str] = collections.Counter()

    def admit(self, client: str) -> str | None:
        """Count the session in, or say why not."""
        smtp = self._limits()
        if self.total >= smtp.max_sessions:
            return f"too many SMTP sessions (at most {smtp.max_sessions})"
        if self.per_client[client] >= smtp.max_sessions_per_client:
            return f"too many sessions from {client} (at most {smtp.max_sessions_per_client})"
        self.total += 1
        self.per_client[client] += 1
        return None

    def release(self, client: str) -> None:
        self.total -= 1
        self.per_client[client] -= 1
        if self.per_client[client] <= 0:
            del self.per_client[client]


def call_limits(smtp: SmtpConfig) -> dict[str, int]:
    """aiosmtpd's per-session command budgets; past one it answers 421 and closes."""
    mails = smtp.max_mails_per_session
    return {
        "*": smtp.max_commands,
        "MAIL": mails,
        "DATA": mails,
        "RSET": mails + smtp.max_commands,  # some clients reset before every mail
        "RCPT": mails * smtp.max_recipients,
        "QUIT": 1,
    }


class LimitedSMTP(SMTP):
    """aiosmtpd's session under `Sessions` and the progress-only idle timer."""

    def __init__(
        self,
        *args: Any,
        sessions: Sessions | None = None,
        encrypted_from_start: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._encrypted_from_start = encrypted_from_start
        self._sessions = sessions
        self._client: str | None = None  # counted in `sessions` while set
        self._refused = False
        self._last_reply = ""
        for name in PROGRESS:
            self._smtp_methods[name] = self._progressing(self._smtp_methods[name])

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None and self._sessions is not None:  # not the STARTTLS switch
            peer = transport.get_extra_info("peername")
            client = str(peer[0]) if isinstance(peer, tuple | list) and peer else str(peer)
            refusal = self._sessions.admit(client)
            if refusal is not None:
                log.warning("SMTP connection from %s refused: %s", client, refusal)
                self._refused = True
                transport.write(f"421 4.7.0 {refusal}; try again later\r\n".encode())  # type: ignore[attr-defined]
                transport.close()
                return
            self._client = client
        super().connection_made(transport)
        if self._encrypted_from_start:
            # Implicit TLS (port 465 style): aiosmtpd knows TLS only from its own STARTTLS
            # and checks `_tls_protocol` for truth alone (AUTH, the STARTTLS offer).
            self._tls_protocol = cast(Any, transport.get_extra_info("ssl_object"))

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return  # aiosmtpd never saw this connection
        if self._client is not None and self._sessions is not None:
            self._sessions.release(self._client)
            self._client = None
        super().connection_lost(error)

    def _reset_timeout(self, duration: float | None = None) -> None:
        # aiosmtpd restarts the idle timer before every recognised command, NOOP included;
        # here only the connection (and a PROXY wait) arm it, and progress restarts it.
        if self._timeout_handle is None or duration is not None:
            super()._reset_timeout(duration)

    def _progressing(
        self, method: Callable[[str | None], Awaitable[None]]
    ) -> Callable[[str | None], Awaitable[None]]:
        @functools.wraps(method)  # keeps the syntax attributes HELP reads
        async def progressing(arg: str | None) -> None:
            await method(arg)
            if self._last_reply[:1] in ("2", "3"):
                SMTP._reset_timeout(self)

        return progressing

    async def push(self, status: Any) -> None:
        self._last_reply = status if isinstance(status, str) else bytes(status).decode("latin-1")
        await super().push(status)
