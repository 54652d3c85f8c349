"""SMTP session limits aiosmtpd lacks or applies differently, as an `SMTP` subclass.

- Sessions in all and per client (`smtp.max_sessions`, `smtp.max_sessions_per_client`;
  a client is an IPv4 address or an IPv6 /64, as `throttle.client_key`): past either,
  421 at connect and the socket closed, before aiosmtpd builds a session.
- Per-session command budgets (`smtp.max_commands`, `smtp.max_mails_per_session`):
  aiosmtpd's own call limits, which answer 421 and close.
- An idle timer (`smtp.idle_timeout`) that only progress restarts: aiosmtpd restarts it
  before every recognised command, so NOOP every few minutes kept a session for ever.
- A time limit on the whole session (`smtp.max_session_time`): progress just before
  each idle timeout, up to the command and mail budgets, kept one ~1,000 idle timeouts.
  Both timers run on the event loop's clock, as aiosmtpd's own timer does.
- Shutdown (`Sessions.shut_down`): a session between mails is told 421 at once; one
  in a mail is answered for it first, then told 421; past the grace, whatever is left.
- DATA lines (`smtp.max_lines`) and event-loop time: aiosmtpd reads DATA a line at a
  time, and a line already buffered costs an `await` that never yields, so a mail of
  1 MB in 3-byte lines held the loop ~1 s (20 at once stalled /healthz 6.5 s). DATA is
  read through `DataLines`, which yields every `YIELD_EVERY` lines and, past the cap,
  reads the rest without keeping it; the handler texts the lines read and says so in its
  250 (`data_cut`). A 552 there bounced long cron mail (an `rsync -v` log) for good.
- DATA line length: up to the message size (`smtp.max_message_bytes`) during DATA, not
  aiosmtpd's 1001 bytes, which bounced one-line HTML and unwrapped base64 with a 500.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import ssl
import sys
from asyncio import sslproto
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol, cast

from aiosmtpd.smtp import SMTP, Session, syntax

from bridge.config import SmtpConfig
from bridge.ingress.throttle import client_key

log = logging.getLogger(__name__)
# Commands that move a session forward: only their success restarts the idle timer.
# NOOP, RSET, HELP, VRFY, EXPN and refused commands never do.
PROGRESS = ("HELO", "EHLO", "STARTTLS", "AUTH", "MAIL", "RCPT", "DATA")
YIELD_EVERY = 256  # DATA lines read between two turns of the event loop (~0.5 ms)
DATA_LINE_BYTES = 1 << 20  # the longest DATA line where no message size limit is set


def transport_host(transport: asyncio.BaseTransport) -> str:
    """The client's address, as the socket gives it."""
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple | list) and peer else str(peer)


class Counted(Protocol):
    """What `Sessions` counts and ends: a session, or a TLS handshake (`TlsGate`)."""

    def end_after_mail(self, reply: str, *, from_mail: bool = True) -> None: ...

    def end_now(self, reply: str) -> None: ...


class Sessions:
    """Open SMTP sessions, in all and per client address, against the limits in force."""

    def __init__(self, limits: Callable[[], SmtpConfig]) -> None:
        self._limits = limits
        self.per_client: collections.Counter[str] = collections.Counter()
        self.open: set[Counted] = set()  # admitted and not yet released: shut_down ends them
        self.closing = False
        self._none_open = asyncio.Event()

    @property
    def total(self) -> int:
        return len(self.open)

    def admit(self, session: Counted, host: str) -> str | None:
        """Count the session of the client at `host` in, or say why not.

        Counted per `client_key`: one host holds a whole IPv6 /64, and by its single
        addresses it could open every one of `max_sessions` alone (a relay then gets
        421 and a UPS card may never send its alert again)."""
        if self.closing:
            return "the bridge is shutting down"
        smtp, client = self._limits(), client_key(host)
        if self.total >= smtp.max_sessions:
            return f"too many SMTP sessions (at most {smtp.max_sessions})"
        if self.per_client[client] >= smtp.max_sessions_per_client:
            return f"too many sessions from {client} (at most {smtp.max_sessions_per_client})"
        self.open.add(session)
        self.per_client[client] += 1
        return None

    def release(self, session: Counted, host: str) -> None:
        self.open.discard(session)
        client = client_key(host)
        self.per_client[client] -= 1
        if self.per_client[client] <= 0:
            del self.per_client[client]
        if not self.open:
            self._none_open.set()

    async def shut_down(self, grace: float) -> None:
        """End every session (the listeners are closed already): 421 to each between
        mails now, to each in a mail once that mail is answered; after `grace`, 421 to
        whatever is left. Until this returns the store stays open: a mail in transfer
        when SIGTERM came is stored and answered 250, not cut without an answer (a relay
        retries that, perhaps much later; a UPS or a NAS may never send it again)."""
        self.closing = True
        reply = "421 4.3.2 {host} Service shutting down; try again later"
        for session in list(self.open):
            session.end_after_mail(reply)
        if not self.open:
            return
        self._none_open.clear()
        try:
            await asyncio.wait_for(self._none_open.wait(), grace)
        except TimeoutError:
            log.warning("SMTP: %d sessions still open after %gs: closed", len(self.open), grace)
            for session in list(self.open):
                session.end_now(reply)


class TlsGate(asyncio.Protocol):
    """A connection to the implicit-TLS listener until its TLS handshake is done: counted
    in `Sessions` from the moment it is accepted, then handed to its SMTP session.

    Served by asyncio's own TLS (`create_server(ssl=...)`), a session was counted only
    once its handshake was done: connections that never began one were not counted at
    all, each held up to asyncio's 60 s handshake timeout, so anyone could hold every
    file descriptor of the bridge (its SMTP and HTTP listeners then took no one) while
    `smtp.max_sessions` read 0. Past a limit the socket is closed at once: a 421 cannot
    be told before TLS.

    TLS is layered here as asyncio's server does it (and aiosmtpd's STARTTLS): in
    `connection_made` itself, so no byte of the ClientHello can reach this protocol
    (`loop.start_tls` from a task left a turn of the loop for it, and uvloop read it).
    """

    def __init__(
        self, sessions: Sessions, session: Callable[[], LimitedSMTP], context: ssl.SSLContext
    ) -> None:
        self._sessions = sessions
        self._session = session
        self._context = context
        self._transport: asyncio.BaseTransport | None = None
        self._host: str | None = None  # counted in `sessions` while set

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        host = transport_host(transport)
        refusal = self._sessions.admit(self, host)
        if refusal is not None:
            log.warning("SMTP TLS connection from %s refused: %s", host, refusal)
            transport.close()
            return
        self._host = host
        loop = asyncio.get_running_loop()
        session = self._session()
        session.handed_over = self._release  # the session counts itself from its start
        handshake = loop.create_future()
        handshake.add_done_callback(self._handshake_done)
        tls = sslproto.SSLProtocol(loop, session, self._context, handshake, server_side=True)
        transport.set_protocol(tls)
        tls.connection_made(transport)

    def _handshake_done(self, handshake: asyncio.Future[None]) -> None:
        exc = None if handshake.cancelled() else handshake.exception()
        if exc is not None:  # the client went, timed out, or spoke no TLS: closed by TLS
            log.info("SMTP TLS handshake from %s failed: %s", self._host, exc)
        self._release()

    def _release(self) -> None:
        if self._host is not None:
            self._sessions.release(self, self._host)
            self._host = None

    def connection_lost(self, exc: Exception | None) -> None:  # refused: never handed on
        self._release()

    def end_after_mail(self, reply: str, *, from_mail: bool = True) -> None:
        self.end_now(reply)  # no mail before TLS

    def end_now(self, reply: str) -> None:
        if self._transport is not None:
            self._transport.close()


class DataLines:
    """The session's StreamReader as aiosmtpd's DATA loop sees it: lines counted, the
    loop given a turn every YIELD_EVERY lines, and past `most` lines the rest of the
    mail read and dropped here (a tighter loop than aiosmtpd's) before the end-of-data
    line is handed back, so aiosmtpd ends DATA having kept only `most` lines.

    The end of data is found exactly as aiosmtpd finds it (a whole line `.` CRLF read
    with `readuntil`), so what follows the mail is read as commands by both alike.
    """

    END = b".\r\n"

    def __init__(self, reader: asyncio.StreamReader, most: int) -> None:
        self.reader = reader
        self.most = most
        self.lines = 0
        self.over = False

    def readuntil(self, separator: bytes = b"\n") -> Awaitable[bytes]:
        # Not a coroutine itself: most lines are the reader's own `readuntil`, awaited
        # directly by aiosmtpd, without a coroutine of ours around every line.
        self.lines += 1
        if self.lines <= self.most and self.lines % YIELD_EVERY:
            return self.reader.readuntil(separator)
        return self._turn_or_skip(separator)

    async def _turn_or_skip(self, separator: bytes) -> bytes:
        if self.lines % YIELD_EVERY == 0:
            await asyncio.sleep(0)
        if self.lines <= self.most:
            return await self.reader.readuntil(separator)
        # Only lines dropped make the mail cut: the line after a mail of exactly `most`
        # lines is its end (it was counted as one too many, and the whole mail answered
        # as read in part).
        self.over = await self._skip_rest()
        return self.END

    async def read(self, n: int = -1) -> bytes:  # aiosmtpd drains an overlong line
        return await self.reader.read(n)

    async def _skip_rest(self) -> bool:
        """Read up to the end of data, keeping nothing; whether anything came before it."""
        skipped = 0
        while True:
            try:
                line = await self.reader.readuntil(b"\r\n")
            except asyncio.LimitOverrunError as exc:  # an overlong line: a piece of it
                await self.reader.read(exc.consumed)
                skipped += 1
                continue
            except asyncio.IncompleteReadError:  # the client went away
                return True
            if line == self.END:
                return skipped > 0
            skipped += 1
            if skipped % YIELD_EVERY == 0:
                await asyncio.sleep(0)


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


class QuietSession(Session):
    """aiosmtpd's Session without its deprecation warning: aiosmtpd 1.4 itself sets the
    deprecated `login_data` on every successful AUTH, which logged a WARNING each time.
    Nothing in the bridge reads it (`auth_data` holds the login)."""

    @property
    def login_data(self) -> Any:
        return self._login_data

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self._login_data = value


class LimitedSMTP(SMTP):
    """aiosmtpd's session under `Sessions` and the progress-only idle timer."""

    def __init__(
        self,
        *args: Any,
        sessions: Sessions | None = None,
        encrypted_from_start: bool = False,
        max_lines: int = 0,
        session_time: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.max_lines = max_lines  # 0: no cap, but DATA still yields to the loop
        self.session_time = session_time  # seconds from connect (config: above 0; 0 here: none)
        self._session_timer: asyncio.TimerHandle | None = None
        self._in_data = False  # a mail being read, parsed or stored
        self._ending: str | None = None  # the 421 to send once no mail is in transfer
        self._encrypted_from_start = encrypted_from_start
        self._sessions = sessions
        self._client: str | None = None  # counted in `sessions` while set
        self._refused = False
        self._last_reply = ""
        # Set by a TlsGate: its count of this connection, released as the session counts.
        self.handed_over: Callable[[], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        connecting = self.transport is None  # not the STARTTLS switch
        if connecting and self.handed_over is not None:
            self.handed_over()
        if connecting and self._sessions is not None:
            client = transport_host(transport)
            refusal = self._sessions.admit(self, client)
            if refusal is not None:
                log.warning("SMTP connection from %s refused: %s", client, refusal)
                self._refused = True
                transport.write(f"421 4.7.0 {refusal}; try again later\r\n".encode())  # type: ignore[attr-defined]
                transport.close()
                return
            self._client = client
        super().connection_made(transport)
        if connecting and self.session_time:
            self._session_timer = self.loop.call_later(self.session_time, self._time_is_up)
        if self._encrypted_from_start:
            # Implicit TLS (port 465 style): aiosmtpd knows TLS only from its own STARTTLS
            # and checks `_tls_protocol` for truth alone (AUTH, the STARTTLS offer).
            self._tls_protocol = cast(Any, transport.get_extra_info("ssl_object"))

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused or self.transport is None:
            return  # aiosmtpd never saw this connection (refused, or TLS never done)
        if self._session_timer is not None:
            self._session_timer.cancel()
        if self._client is not None and self._sessions is not None:
            self._sessions.release(self, self._client)
            self._client = None
        super().connection_lost(error)

    def _create_session(self) -> Session:
        return QuietSession(self.loop)

    def _time_is_up(self) -> None:
        """`session_time` has passed: the session ends now, unless a mail is being read or
        stored. That one is answered first (its transfer is bounded by the idle timer):
        cut, the client would send it again, perhaps stored already."""
        log.warning(
            "SMTP session from %s closed: longer than %gs (smtp.max_session_time)",
            self._client,
            self.session_time,
        )
        self.end_after_mail(
            f"421 4.4.2 {{host}} Session time limit reached "
            f"({self.session_time:g}s, smtp.max_session_time); closing connection",
            from_mail=False,  # MAIL then RCPTs for ever must not hold it past the limit
        )

    def end_after_mail(self, reply: str, *, from_mail: bool = True) -> None:
        """Send `reply` (a 421; `{host}` is this server's name) and close: now, or once
        the mail in transfer (DATA being read or stored; with `from_mail`, from MAIL on:
        the caller bounds the wait) is answered."""
        if self._ending is None:
            self._ending = reply
        envelope = getattr(self, "envelope", None)
        in_mail = self._in_data or (from_mail and getattr(envelope, "mail_from", None) is not None)
        if not in_mail:
            self.end_now(self._ending)

    def end_now(self, reply: str) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        line = reply.replace("{host}", self.hostname)
        self.transport.write(f"{line}\r\n".encode())  # type: ignore[attr-defined]
        self.transport.close()

    @syntax("DATA")  # as aiosmtpd's own: HELP reads it from the method
    async def smtp_DATA(self, arg: str) -> None:
        reader = self._reader
        lines = DataLines(reader, self.max_lines or sys.maxsize)
        self._reader = cast(Any, lines)
        self._in_data = True
        # A mail's lines may be as long as the mail may be (`smtp.max_message_bytes`), not
        # aiosmtpd's 1001 bytes, past which it answered a permanent `500 Line too long`:
        # a NAS's one-line HTML, unwrapped base64 or a script's JSON bounced. RFC 5321
        # lets a server take longer lines; Postfix does. Commands keep the short limit.
        saved = reader._limit, self.line_length_limit  # type: ignore[attr-defined]
        longest = max(saved[1], (self.data_size_limit or DATA_LINE_BYTES) + 2)
        reader._limit = self.line_length_limit = longest  # type: ignore[attr-defined]
        try:
            await super().smtp_DATA(arg)  # calls the handler's handle_DATA at the end
        finally:
            reader._limit, self.line_length_limit = saved  # type: ignore[attr-defined]
            self._reader = reader
            self._in_data = False
            if self._ending is not None:  # after the mail's answer, which the client has now
                self.end_now(self._ending)

    @property
    def data_cut(self) -> str | None:
        """For the DATA handler: why only the first lines of the mail were kept, else None."""
        lines: Any = self._reader
        if isinstance(lines, DataLines) and lines.over:
            return f"more than {lines.most} lines (smtp.max_lines)"
        return None

    def _reset_timeout(self, duration: float | None = None) -> None:
        # aiosmtpd restarts the idle timer before every recognised command, NOOP included;
        # here only the connection (and a PROXY wait) arm it, and progress restarts it.
        if self._timeout_handle is None or duration is not None:
            super()._reset_timeout(duration)

    def push(self, status: Any) -> Coroutine[Any, Any, None]:
        # A plain method handing back aiosmtpd's coroutine (aiosmtpd awaits it): no
        # coroutine of our own around each of the four replies of every mail.
        self._last_reply = status if isinstance(status, str) else bytes(status).decode("latin-1")
        return super().push(status)


def _progressing(
    method: Callable[[Any, str | None], Awaitable[None]],
) -> Callable[[Any, str | None], Awaitable[None]]:
    """The command `method`, restarting the idle timer when it succeeded (2xx or 3xx)."""

    @functools.wraps(method)  # keeps the syntax attributes HELP reads
    async def progressing(self: LimitedSMTP, arg: str | None) -> None:
        await method(self, arg)
        if self._last_reply[:1] in ("2", "3"):
            SMTP._reset_timeout(self)

    return progressing


# Wrapped once, on the class (aiosmtpd finds them by name for every session): wrapping
# each session's bound methods cost every connection seven `functools.wraps`. A subclass
# that overrides one of these commands must wrap its own with `_progressing`.
for _name in PROGRESS:
    setattr(LimitedSMTP, f"smtp_{_name}", _progressing(getattr(LimitedSMTP, f"smtp_{_name}")))
