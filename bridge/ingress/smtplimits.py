"""SMTP session limits aiosmtpd lacks or applies differently, as an `SMTP` subclass.

- Sessions in all and per client (`smtp.max_sessions`, `smtp.max_sessions_per_client`;
  a client is an IPv4 address or an IPv6 /64, as `throttle.client_key`): past either,
  421 at connect and the socket closed, before aiosmtpd builds a session. The last
  quarter of the sessions go one to a client, so a few clients cannot hold them all.
- Per-session command budgets (`smtp.max_commands`, `smtp.max_mails_per_session`):
  aiosmtpd's own call limits, which answer 421 and close.
- An idle timer (`smtp.idle_timeout`) that only progress restarts: aiosmtpd restarts it
  before every recognised command, so NOOP every few minutes kept a session for ever.
- A time limit on the whole session (`smtp.max_session_time`): progress just before
  each idle timeout, up to the command and mail budgets, kept one ~1,000 idle timeouts.
  Both timers run on the event loop's clock, as aiosmtpd's own timer does.
- Shutdown (`Sessions.shut_down`): a session between mails is told 421 at once; one
  in a mail is answered for it first, then told 421; past the grace, whatever is left.
- DATA (`MailReader`): the mail read into one buffer, about its size once in memory
  (aiosmtpd's line list and a reader whose limit was raised to the message size held
  ~2x, and more at the end); the loop given a turn every YIELD_EVERY pieces (a mail of
  1 MB in 3-byte lines held it ~1 s); lines past `smtp.max_lines` read and dropped, the
  handler texting the lines read and saying so in its 250 (`data_cut`: a 552 there
  bounced long cron mail, an `rsync -v` log, for good).
- AUTH inside a mail transaction (after MAIL): 503, as RFC 4954 says; aiosmtpd took it.
  An answer to an AUTH challenge over the line limit: 500 5.5.6, not a traceback.
- DATA line length: up to the message size (`smtp.max_message_bytes`) during DATA, not
  aiosmtpd's 1001 bytes, which bounced one-line HTML and unwrapped base64 with a 500.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol, cast

from aiosmtpd.smtp import MISSING, SMTP, Session, syntax

from bridge.addresses import transport_host
from bridge.config import SmtpConfig
from bridge.ingress.throttle import client_key, reserved

log = logging.getLogger(__name__)
# Commands that move a session forward: only their success restarts the idle timer.
# NOOP, RSET, HELP, VRFY, EXPN and refused commands never do.
PROGRESS = ("HELO", "EHLO", "STARTTLS", "AUTH", "MAIL", "RCPT", "DATA")
YIELD_EVERY = 256  # DATA lines read between two turns of the event loop (~0.5 ms)


class Counted(Protocol):
    """What `Sessions` counts and ends: a session, or a TLS handshake
    (`bridge.ingress.smtptls.TlsGate`)."""

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
        421 and a UPS card may never send its alert again). And the last quarter of
        `max_sessions` (`throttle.reserved`) goes one to a client: a client that holds a
        session already gets none of it. Four clients at `max_sessions_per_client`
        (25 of 100) held every session; now three fill all but the reserve and the
        others still get one each, while a relay alone (Postfix opens up to 20 from one
        address) gets its `max_sessions_per_client` as before."""
        if self.closing:
            return "the bridge is shutting down"
        smtp, client = self._limits(), client_key(host)
        if self.total >= smtp.max_sessions:
            return f"too many SMTP sessions (at most {smtp.max_sessions})"
        if self.per_client[client] >= smtp.max_sessions_per_client:
            return f"too many sessions from {client} (at most {smtp.max_sessions_per_client})"
        reserve = reserved(smtp.max_sessions, smtp.max_sessions_per_client)
        if reserve and self.per_client[client] and smtp.max_sessions - self.total <= reserve:
            return (
                f"too many sessions from {client}: the last {reserve} of "
                f"{smtp.max_sessions} are kept for clients that hold none"
            )
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


class MailReader:
    """A mail's DATA read from the session's StreamReader into one buffer: its size once.

    aiosmtpd's DATA loop kept each line as an object of its own (~60 bytes on top of
    each) and joined them at the end, and for long lines the reader's limit was raised
    to the message size, so the reader itself could hold twice that unread: measured,
    a session in DATA held ~2x its mail and more at its end (a hundred sessions of the
    default 1 MiB, some 300 MB). Here the reader keeps its small limit (a line longer
    than `PIECE_BYTES` comes in pieces, as aiosmtpd drains one), and every piece goes
    into `content` at once: about 1x the mail, plus the reader's bounded buffer.

    Lines past `most_lines` are read and dropped (`over`), uncounted; past `most_bytes`
    of the lines before (counted as aiosmtpd counts them, dot-stuffing included)
    nothing more is kept (`too_big`).
    The loop gets a turn every YIELD_EVERY pieces: a piece already buffered costs an
    `await` that never yields, and a mail of 3-byte lines held the loop ~1 s. The end of
    data is a whole line `.` CRLF, as aiosmtpd finds it, so what follows the mail is
    read as commands by both alike.
    """

    END = b".\r\n"
    PIECE_BYTES = 64 << 10  # the reader's limit in DATA: it pauses the socket past twice that

    def __init__(self, reader: asyncio.StreamReader, *, most_lines: int, most_bytes: int) -> None:
        self.reader = reader
        self.most_lines = most_lines
        self.most_bytes = most_bytes
        self.content = bytearray()
        self.lines = 0
        self.over = False
        self.too_big = False

    async def read(self) -> None:
        """Read up to the end-of-data line; IncompleteReadError if the client goes."""
        reader, content = self.reader, self.content
        saved = reader._limit  # type: ignore[attr-defined]
        reader._limit = self.PIECE_BYTES  # type: ignore[attr-defined]
        try:
            line_start, size, pieces = True, 0, 0
            while True:
                try:
                    piece = await reader.readuntil(b"\r\n")
                except asyncio.LimitOverrunError as exc:  # a long line: the piece read so far
                    piece = await reader.read(exc.consumed)
                pieces += 1
                if pieces % YIELD_EVERY == 0:
                    await asyncio.sleep(0)
                if line_start:
                    if piece == self.END:
                        return
                    self.lines += 1
                if self.lines > self.most_lines:  # read and dropped: not counted either
                    self.over = True
                    line_start = piece.endswith(b"\r\n")
                    continue
                size += len(piece)
                if size > self.most_bytes and not self.too_big:
                    self.too_big = True
                    content.clear()
                if not self.too_big:  # RFC 5321 4.5.2: a line's leading dot is transparency
                    content += piece[1:] if line_start and piece[:1] == b"." else piece
                line_start = piece.endswith(b"\r\n")
        finally:
            reader._limit = saved  # type: ignore[attr-defined]


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
        self._data_cut: str | None = None  # why the mail in hand was read only in part
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

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str) -> None:
        """aiosmtpd's AUTH, refused inside a mail transaction (RFC 4954 section 4: 503).
        aiosmtpd took it: recipients accepted for an anonymous session were then sent
        as the user who logged in after them, whom the RCPTs were never checked for
        (`smtp.user_recipients`), and DATA answered a misleading 451.

        The mechanism's name is folded to upper case (RFC 4954 section 4: SASL names
        are case-insensitive): aiosmtpd looked `auth plain` up as written, a 504. The
        initial response after it is base64, taken as sent."""
        envelope = getattr(self, "envelope", None)
        if envelope is not None and envelope.mail_from is not None:
            await self.push("503 5.5.1 AUTH not permitted during a mail transaction")
            return
        words = (arg or "").split(None, 1)  # as aiosmtpd splits it: any white space
        await super().smtp_AUTH(" ".join([words[0].upper(), *words[1:]]) if words else "")

    async def challenge_auth(self, *args: Any, **kwargs: Any) -> Any:
        """aiosmtpd's AUTH challenge, its answer over the line limit refused as RFC 4954
        says (500 5.5.6). aiosmtpd let the reader's ValueError escape: a 451 "internal
        error" and a traceback in the log at ERROR for every such line, which any client
        could send without logging in."""
        try:
            return await super().challenge_auth(*args, **kwargs)
        except ValueError:  # StreamReader.readline past its limit
            await self.push("500 5.5.6 Authentication exchange line is too long")
            return MISSING

    @syntax("DATA")  # as aiosmtpd's own: HELP reads it from the method
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA, its mail read by `MailReader` (about its size once in memory).

        A mail's lines may be as long as the mail may be (`smtp.max_message_bytes`), not
        aiosmtpd's 1001 bytes, past which it answered a permanent `500 Line too long`: a
        NAS's one-line HTML, unwrapped base64 or a script's JSON bounced. RFC 5321 lets
        a server take longer lines; Postfix does. Commands keep the short limit.
        """
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        mail = MailReader(
            self._reader,
            most_lines=self.max_lines or sys.maxsize,
            most_bytes=self.data_size_limit or sys.maxsize,
        )
        self._in_data = True
        self._data_cut = None
        try:
            try:
                await mail.read()
            except asyncio.CancelledError:  # the connection went during DATA (aiosmtpd's way)
                self._writer.close()
                raise
            except asyncio.IncompleteReadError:
                return  # the client went; nothing to answer
            if mail.too_big:
                await self.push(
                    f"552 5.3.4 Message too big: at most {self.data_size_limit} bytes"
                    " (smtp.max_message_bytes)"
                )
                self._set_post_data_state()
                return
            if mail.over:
                self._data_cut = f"more than {mail.most_lines} lines (smtp.max_lines)"
            # One synchronous step, so no two sessions are ever in it at once: the copy
            # is the mail twice for a moment, then once.
            raw = bytes(mail.content)
            mail.content.clear()
            self.envelope.content = self.envelope.original_content = raw
            status = await self._call_handler_hook("DATA")
            self._set_post_data_state()
            await self.push("250 OK" if status is MISSING else status)
        finally:
            self._in_data = False
            if self._ending is not None:  # after the mail's answer, which the client has now
                self.end_now(self._ending)

    @property
    def data_cut(self) -> str | None:
        """For the DATA handler: why only the first lines of the mail were kept, else None."""
        return self._data_cut

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
