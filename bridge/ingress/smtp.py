"""The SMTP listener: aiosmtpd served on the service's own event loop.

Recipients are checked at RCPT (`NUMBER@DOMAIN` or `GROUP@DOMAIN`, domains from
`smtp.domains` only: no relay), senders at MAIL (client network and MAIL FROM
allowlists), and DATA answers 250 only once `Ingestor.submit` has committed; 451 when the
store cannot write, so the client keeps the mail and retries. Bounces, auto-replies and
reports are stored as `suppressed`, never texted on. AUTH PLAIN/LOGIN against
`[smtp.users]`, only over TLS unless `smtp.auth_allow_plaintext`; a logged-in user texts
only its `smtp.user_recipients` (when listed), its mail deduplicated among its own and
stored as sent by `smtp:LOGIN` (the API's `token`).

Session limits live in `bridge.ingress.smtplimits`; here the mail is parsed in a worker thread
under MIME depth, part and time bounds. Every session
takes the settings in force when it connects, so a SIGHUP reaches the next session;
who may send is asked of the settings in force at each MAIL, RCPT and DATA instead
(`SmtpHandler.login_refusal`), and how one may log in at each EHLO and AUTH
(`BridgeSMTP._auth_in_force`), so a reload that locks SMTP down reaches open ones too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import fnmatch
import logging
import re
import socket
import ssl
import time
from collections.abc import Sequence
from typing import Any, ClassVar

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session, syntax

from bridge.addresses import in_networks, parse_network
from bridge.certificates import TlsFiles, load_pair, read_pair
from bridge.clock import zone
from bridge.config import ProviderConfig, Recipients, SmtpConfig
from bridge.config.recipients import unknown_group
from bridge.errors import InputError, StoreUnavailable, Unavailable
from bridge.firewall import RefusedNumber
from bridge.ingress.ingest import Ingestor
from bridge.ingress.mail import (
    MailText,
    ParseBounds,
    ParseTimeout,
    compose,
    parse_mail,
    parses_quickly,
    without_echoed_subject,
)
from bridge.ingress.mailrules import apply_rule, rule_for
from bridge.ingress.smtpauth import Authenticator, peer_host
from bridge.ingress.smtplimits import LimitedSMTP, Sessions, call_limits
from bridge.ingress.smtptls import ImplicitTlsListener, Listener
from bridge.ingress.templated import Templated, render_template, told
from bridge.ingress.throttle import FailureThrottle
from bridge.ingress.workers import Workers
from bridge.models import SMTP_SENDER
from bridge.phone import AREA_CODE_MISSING, ONLY_DIGITS, PhoneError
from bridge.policy.decide import content_hash, dedupe_scope, slotted_key
from bridge.policy.shaping import Draft
from bridge.schedule import MAIL_HEADER, SHOWN_CHARS, parse_schedule_time, scheduled_epoch
from bridge.sockets import bind_socket
from bridge.text import is_blank

log = logging.getLogger(__name__)
IDENT = "sms-bridge ESMTP"
ADDRESS_CACHE_SIZE = 1024
PARSE_WORKERS = 2  # mail parsing threads; a slow mail holds one, never the event loop
MESSAGE_ID_KEPT = 256  # characters of a Message-ID kept in its dedupe key; a longer one: its hash
# Dates of one content this close are one mail: a device's own retry, built anew, comes
# within seconds or minutes (slotted_key: always within this, never beyond twice it).
RETRY_SLOT = 300


_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = rf"{_ATOM}(?:\.{_ATOM})*"
_QUOTED_PAIR = re.compile(r"\\(.)")  # a backslash-escaped character in a quoted local part
# An address in angle brackets of plain dot-atoms, then nothing or one space and the
# parameters (no comment, no folding): held to aiosmtpd's parse by a property test.
_PLAIN_ADDRESS = re.compile(rf"<({_DOT_ATOM})@({_DOT_ATOM})>(?: ([^\s(].*))?", re.DOTALL)
# What the header parser would misread, taken as written (in angle brackets or not): a
# local part of a number's characters holding a parenthesis, and a domain ending in a
# dot (the root, as DNS writes it: `resolve` drops it; aiosmtpd answered 553 "malformed
# address"). RFC 5321 has no comments
# in a path, but the parser reads `(202)` as one and drops it: RCPT
# TO:<001(202)555-0143@...> was texted to +1 555 0143 (a stranger, or nobody), and
# <(202)555-0143@...> refused quoting an address the sender never wrote. `(0)` after the
# country code (+44(0)20..., +49(0)30...) is the trunk prefix some write there: it stays
# in the number, which `bridge.phone` reads as the API does, where the phone data drops
# a country's trunk 0 after its code and keeps Italy's (part of the number: +39(0)6...,
# the comment dropped, was +39 6...).
_NUMBER_LOCAL = r"[0-9+.\-]*[()][0-9+().\-]*"
_LENIENT_ADDRESS = re.compile(
    rf"(<)?({_NUMBER_LOCAL}|{_DOT_ATOM})@({_DOT_ATOM}\.?)(?(1)>)(?: ([^\s(].*))?", re.DOTALL
)


def _as_written(arg: str) -> tuple[str, str, str | None] | None:
    """An address argument's local part, domain and parameters, read without the header
    parser, or None: it must read it. `<dot-atom@dot-atom>` and its parameters, as nearly
    every client writes it, is what the header parser would answer (alerts to many numbers
    miss the memo; the parse was ~18 % of the loop under the distinct benchmark); the
    `_LENIENT_ADDRESS` shapes are what it misreads."""
    plain = _PLAIN_ADDRESS.fullmatch(arg)
    if plain is not None:
        local, domain, rest = plain.groups()
        return local, domain, rest
    lenient = _LENIENT_ADDRESS.fullmatch(arg)
    if lenient is None:
        return None
    _, local, domain, rest = lenient.groups()
    if "(" in local or ")" in local or domain.endswith("."):
        return local, domain, rest
    return None  # a plain address without angle brackets: the parser's


# bridge.phone's ONLY_DIGITS for mail: no parentheses (`for_mail`), and a space only
# quoted (`resolve`).
_MAIL_SEPARATORS = (
    "only digits, an optional leading +, and separators - and . (and space, in a quoted"
    ' local part: "+1 202 555 0143"@...)'
)


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    load_pair(context, cert, key)
    return context


def read_tls(smtp: SmtpConfig) -> TlsFiles:
    """Read the certificate and key `smtp` names. Blocking file reads: a reload calls
    this off the event loop (a slow disk held every session and request meanwhile)."""
    return read_pair(tls_context, smtp.tls_cert, smtp.tls_key)


def smtp_login(session: Session) -> str | None:
    """The `[smtp.users]` login this session authenticated as, or None."""
    auth: Any = session.auth_data
    if not session.authenticated or not isinstance(auth, LoginPassword):
        return None
    return bytes(auth.login).decode("utf-8", errors="surrogateescape")


def sent_by(login: str | None) -> str | None:
    """Who a message is stored as sent by (its `token`): `smtp:LOGIN`, counted against
    `smtp.user_texts_per_day.LOGIN` and never against an API token's daily cap (no token
    name holds a `:`)."""
    return None if login is None else f"{SMTP_SENDER}{login}"


def shown(address: str) -> str:
    """`address` as a reply may quote it, in angle brackets: bytes that are not UTF-8 as
    `\\xNN`. aiosmtpd decodes a command with surrogateescape and its push() encodes the
    reply as strict UTF-8, so an address of such bytes in a reply raised: a 451 "internal
    error" and a traceback, and a relay retried an address that can never be valid
    until its queue lifetime ran out. Never raises."""
    try:
        raw = address.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate no byte decodes to: escaped as itself
        return f"<{address.encode('utf-8', 'backslashreplace').decode('utf-8')}>"
    return f"<{raw.decode('utf-8', 'backslashreplace')}>"


def not_utf8(address: str) -> bool:
    """Whether `address` holds bytes that are not UTF-8 (surrogates, as aiosmtpd decodes
    them): no mailbox RFC 5321 or 6531 allows, refused before anything reads it."""
    try:
        address.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def for_mail(exc: PhoneError) -> str:
    """Why a number was refused, in words true of mail. The bridge reads parentheses in
    a recipient as separators, but a sender's mail library (Python's smtplib, anything
    built on a header parser) takes `(202)` for a comment and drops it before the bridge
    sees the address: the 550 listed them as separators, and +1(202)555-0143 arrived as
    +1555-0143. Never recommended for mail; a number that lost its area code says how."""
    if exc.message == ONLY_DIGITS:
        return str(PhoneError(exc.field, _MAIL_SEPARATORS))
    if exc.message.endswith(AREA_CODE_MISSING):
        return f"{exc} (mail software drops an area code in parentheses: write it without them)"
    return str(exc)


def unreadable(address: str, exc: Unavailable, session: Session) -> str:
    """The 451 for a recipient that cannot be read now. The reason (the broken region and
    the installed phonenumbers version) goes to the log only: an unauthenticated client
    would learn from it which library version, with which known bugs, runs here."""
    log.warning("SMTP recipient <%s> from %s answered 451: %s", address, peer_host(session), exc)
    return f"451 4.3.0 {shown(address)}: cannot read this number now; try again later"


class BridgeEnvelope(Envelope):
    """aiosmtpd's envelope, with the numbers each accepted recipient read as at RCPT."""

    def __init__(self) -> None:
        super().__init__()
        # address -> (the handler's `generation` at RCPT, its numbers): DATA reads them
        # again only if a reload came between (a new number's read is ~45 us of phonenumbers)
        self.numbers: dict[str, tuple[int, list[str]]] = {}


class BridgeSMTP(LimitedSMTP):
    """aiosmtpd's SMTP session, with MAIL FROM and RCPT TO address parsing memoised.

    aiosmtpd 1.4.6 parses each address with the email package's header parser and
    defines a `typing.Protocol` class on every call: about two thirds of a bare aiosmtpd
    server's time per mail over a reused connection (BENCHMARKS.md). Senders and recipients repeat (a UPS mails the
    same number every time), so each argument's parse is kept; the result depends on
    nothing else but `local_part_limit`. Bounded: a client sending junk only clears it.
    Junk that crashes the parser is a malformed address (553), not aiosmtpd's 500 with
    the exception's text.
    """

    _addresses: ClassVar[dict[tuple[str, int], tuple[str | None, str | None]]] = {}

    def __init__(self, handler: SmtpHandler, *args: Any, **kwargs: Any) -> None:
        super().__init__(handler, *args, **kwargs)
        # Built with none excluded; narrowed to the settings in force at each EHLO and
        # AUTH (before EHLO, AUTH is refused whatever they say).
        self._every_auth_method = dict(self._auth_methods)

    def _auth_in_force(self) -> None:
        """Take the AUTH settings in force now. aiosmtpd reads `auth_require_tls` and the
        mechanisms once, at connect: a reload that forbade AUTH in clear text left every
        session opened before offering it and taking passwords over cleartext (for up to
        smtp.max_session_time), and one that added the first `[smtp.users]` left them
        answering 504 to AUTH. Asked at each EHLO and AUTH, as `login_refusal` is at
        each MAIL, RCPT and DATA."""
        smtp = self.event_handler.smtp
        self._auth_require_tls = not smtp.auth_allow_plaintext
        self._auth_methods = dict(self._every_auth_method) if smtp.users else {}

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        self._auth_in_force()  # what EHLO offers is what AUTH then takes
        await super().smtp_EHLO(hostname)

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str) -> None:
        self._auth_in_force()  # 538 without TLS once a reload forbade plaintext AUTH
        await super().smtp_AUTH(arg)

    def _create_envelope(self) -> Envelope:
        return BridgeEnvelope()

    async def check_auth_needed(self, caller_method: str) -> bool:
        # aiosmtpd asks its `auth_required`, fixed at connect: a reload that turned
        # require_auth on, or replaced a leaked password, left every session opened
        # before sending as it was (for up to smtp.max_session_time).
        assert self.session is not None
        refusal = self.event_handler.login_refusal(self.session)
        if refusal is None:
            return False
        log.info("SMTP %s from %s refused: %s", caller_method, peer_host(self.session), refusal)
        await self.push(refusal)
        if refusal.startswith("421"):  # the channel closes, as RFC 5321 says a 421 does
            assert self._handler_coroutine is not None and self.transport is not None
            self._handler_coroutine.cancel()
            self.transport.close()
        return True

    def _getparams(self, params: Sequence[str]) -> dict[str, str | bool] | None:
        # RFC 4954's `AUTH=<mailbox>` MAIL parameter, which Exim and sendmail add once
        # they have logged in (Debian's Exim smarthost sends `AUTH=<>`): aiosmtpd knows
        # only SIZE, BODY and SMTPUTF8 and refused the mail with a permanent 555. The
        # bridge advertises AUTH, so it must take the parameter; it trusts only its own
        # AUTH, so the value is read and ignored, as the RFC allows.
        found = super()._getparams(params)
        if found is not None:
            found.pop("AUTH", None)
        return found

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        written = _as_written(arg)
        if written is not None:
            local, domain, rest = written
            if self.local_part_limit and len(local) > self.local_part_limit:
                return None, None
            return f"{local}@{domain}", rest or ""
        key = (arg, self.local_part_limit)
        parsed = self._addresses.get(key)
        if parsed is None:
            try:
                parsed = super()._getaddr(arg)
            except Exception:  # the stdlib parser crashes on some junk ("0@"): malformed
                parsed = (None, None)
            if len(self._addresses) >= ADDRESS_CACHE_SIZE:
                self._addresses.clear()
            self._addresses[key] = parsed
        return parsed


class SmtpHandler:
    """aiosmtpd handler hooks; names are aiosmtpd's."""

    def __init__(
        self,
        *,
        smtp: SmtpConfig,
        provider: ProviderConfig,
        recipients: Recipients,
        ingestor: Ingestor,
        secrets: Sequence[str] = (),
    ) -> None:
        self.ingestor = ingestor
        self.provider = provider  # default sender id and time zone: fixed until restart
        self.smtp = smtp
        # STARTTLS's context (None: no certificate), and the implicit-TLS listener's: the
        # last certificate that loaded, taken by each connection as it is accepted.
        self.tls = tls_context(smtp.tls_cert, smtp.tls_key) if smtp.tls_cert else None
        self.listener_tls = self.tls  # at start a certificate that does not load is fatal
        self.sessions = Sessions(lambda: self.smtp)
        self.parsers = Workers(PARSE_WORKERS, "mail-parse")
        # Kept across reloads. Named so that no attribute of a handler starts with `auth_`:
        # aiosmtpd offers each as an AUTH mechanism ("AUTH LOGIN PLAIN throttle"), and
        # `AUTH throttle` called this object, a 451 and a traceback for every try.
        self.failed_logins = FailureThrottle(ingestor.clock)
        self.generation = 0  # one more at each reload: what RCPT read is stale after one
        self.reload(smtp=smtp, recipients=recipients, secrets=secrets, tls=TlsFiles(self.tls))

    def close(self) -> None:
        self.parsers.close()

    def reload(
        self,
        *,
        smtp: SmtpConfig,
        recipients: Recipients,
        secrets: Sequence[str] = (),
        tls: TlsFiles | None = None,
    ) -> list[str]:
        """Take everything new sessions use; sessions in progress carry on as they were.
        `secrets` (the config's, `secret_values`) are masked in what a message's note
        quotes of a mail (a template's missing field, its error).

        `tls`: `smtp`'s certificate as `read_tls` read it, off the event loop; None reads
        it here, blocking (a caller with no sessions to stall: tests). Returns problems to
        warn about (a certificate that does not load keeps the old: `self.smtp` then
        names the files still in force).
        """
        problems = []
        tls = read_tls(smtp) if tls is None else tls
        if tls.problem is None:
            self.tls = tls.context
            self.listener_tls = tls.context or self.listener_tls  # tls_listen waits for a restart
        else:
            problems.append(
                f"smtp.tls_cert: cannot load, the previous certificate stays: {tls.problem}"
            )
            smtp = dataclasses.replace(smtp, tls_cert=self.smtp.tls_cert, tls_key=self.smtp.tls_key)
        self.smtp = smtp
        self.recipients = recipients
        self.secrets = tuple(secrets)
        self.generation += 1
        self.authenticator = Authenticator(dict(smtp.users), self.failed_logins)
        self.domains = {d.lower() for d in smtp.domains}
        self.user_recipients = {
            login: allowed_numbers(recipients, targets)
            for login, targets in smtp.user_recipients.items()
        }
        self.networks = [parse_network(n) for n in smtp.allowed_networks]
        return problems

    # -- who may send --------------------------------------------------------------------
    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        """The Authenticator in force now (aiosmtpd keeps the one it was handed at
        connect: a password a reload replaced still logged in on a session opened before)."""
        return self.authenticator(server, session, envelope, mechanism, auth_data)

    def login_refusal(self, session: Session) -> str | None:
        """Why this session may not go on (MAIL, RCPT, DATA) under the settings in force
        now, or None: require_auth and no login, or a login whose credential no longer
        logs in under the current `[smtp.users]` (the password changed or the user went)."""
        if not session.authenticated:
            if self.smtp.require_auth:
                return "530 5.7.0 Authentication required"
            return None
        if not self.authenticator.still_valid(session.auth_data):
            # Temporary, and the session closed: an MTA whose password was rotated with
            # the bridge's reconnects and logs in anew. A 530 here is permanent: the mail
            # was bounced, an alert lost, where the next connection would have taken it.
            return (
                "421 4.7.0 The credentials this session logged in with are no longer valid;"
                " closing: log in again on a new connection"
            )
        return None

    def _client_allowed(self, session: Session) -> bool:
        if not self.networks:
            return True
        return in_networks(peer_host(session), self.networks)

    def _sender_refusal(self, address: str) -> str | None:
        """Why `smtp.allowed_senders` refuses this MAIL FROM, or None.

        The null sender (`<>`, a bounce or an auto-reply) is no sender a pattern names:
        where an allowlist is set it is refused unless the list holds `<>` itself. A glob
        (`*`) once admitted it, and the bounce was stored and never texted.
        """
        patterns = self.smtp.allowed_senders
        if not patterns:
            return None  # any sender; a null sender's mail is stored as suppressed
        if address in ("", "<>"):
            if "<>" in patterns:
                return None
            return (
                "550 5.7.1 Null sender <> (a bounce or auto-reply) is not allowed to send "
                "here: smtp.allowed_senders is set"
            )
        if any(p != "<>" and fnmatch.fnmatch(address.lower(), p.lower()) for p in patterns):
            return None
        return f"550 5.7.1 Sender {shown(address)} is not allowed to send here"

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        """EHLO's lines, without `AUTH` when no mechanism is on (no `[smtp.users]`):
        aiosmtpd offers it with none (`250-AUTH `), which RFC 4954 has no room for, and
        a client holding a password then failed on it instead of sending anonymously."""
        session.host_name = hostname  # aiosmtpd leaves that to this hook
        return [line for line in responses if line.rstrip() != "250-AUTH"]

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if not self._client_allowed(session):
            return f"550 5.7.1 Client {peer_host(session)} is not allowed to send here"
        if not_utf8(address):
            return f"553 5.1.7 Sender {shown(address)}: not a valid address (not UTF-8)"
        refusal = self._sender_refusal(address)
        if refusal:
            return refusal
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    # -- recipients ----------------------------------------------------------------------
    def not_allowed(self, login: str | None, numbers: list[str]) -> str | None:
        """Why the SMTP user `login` may not text one of `numbers`, or None.

        A user a reload removed from `[smtp.users]` may text no one from a session it
        logged in to before: read from the lists in force, it was no longer listed in
        `smtp.user_recipients` either, and so could text anyone."""
        if login is not None and login not in self.smtp.users:
            return f"smtp user {login!r} is no longer in [smtp.users]"
        allowed = self.user_recipients.get(login) if login is not None else None
        if allowed is None or allowed.issuperset(numbers):
            return None
        return f"smtp user {login!r} may not text it (smtp.user_recipients.{login})"

    def resolve(self, address: str) -> list[str]:
        """`NUMBER@DOMAIN` or `GROUP@DOMAIN` -> E.164 numbers; InputError says why not."""
        local, at, domain = address.rpartition("@")
        domain = domain.lower().rstrip(".")
        if not at or domain not in self.domains:
            raise InputError(
                "domain", f"relaying denied: {domain or address!r} is not a domain of this bridge"
            )
        if len(local) > 1 and local[0] == local[-1] == '"':
            # RFC 5321's quoted local part, as a mail client writes `+1 202 555 0143`: the
            # spaces the 550 lists as separators can reach the bridge no other way.
            local = _QUOTED_PAIR.sub(r"\1", local[1:-1])
        return self.recipients.mailbox(local, domain)

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if len(envelope.rcpt_tos) >= self.smtp.max_recipients:
            return f"452 4.5.3 Too many recipients (at most {self.smtp.max_recipients})"
        if not_utf8(address):
            return f"553 5.1.3 {shown(address)}: not a valid address (not UTF-8)"
        try:
            numbers = self.resolve(address)
        except PhoneError as exc:
            typo = unknown_group(address.rpartition("@")[0])
            return f"550 5.1.1 {shown(address)}: {typo or for_mail(exc)}"
        except RefusedNumber as exc:  # a possible number this bridge may not text
            return f"550 5.7.1 {shown(address)}: {exc}"
        except InputError as exc:
            if exc.field == "domain":
                return f"550 5.7.1 {shown(address)}: {exc.message}"
            return f"550 5.1.1 {shown(address)}: {exc.message}"
        except Unavailable as exc:  # this recipient only: the MTA retries it, the rest go
            return unreadable(address, exc, session)
        if why := self.not_allowed(smtp_login(session), numbers):
            return f"550 5.7.1 {shown(address)}: {why}"
        if isinstance(envelope, BridgeEnvelope):
            envelope.numbers[address] = (self.generation, numbers)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    # -- the message ---------------------------------------------------------------------
    def text_for(self, mail: MailText, mail_from: str | None) -> Templated:
        """The SMS text: the first matching `[[smtp.rules]]` picks the body's lines and may
        set its own compose mode and template; else `smtp.compose`. A template's text
        says, as a route's does, why subject and body went out instead or which fields
        it printed as empty (the message's note)."""
        smtp = self.smtp
        rule = rule_for(smtp.rules, mail, mail_from)
        mode, template, where = smtp.compose, smtp.template, "smtp.template"
        if rule is not None:
            mode, template = rule.compose or mode, rule.template or template
            if rule.template:
                where = f"smtp.rules[{smtp.rules.index(rule)}].template"
        # Where the text shows the subject, an echo of it in the body is noise; dropped
        # before a rule counts the body's lines (it is none of them). Where it does not
        # (`body`, a template without it), that line may be all that says what failed.
        if mode != "body" and (mode != "template" or "subject" in template):
            mail = without_echoed_subject(mail)
        if rule is not None:
            mail = apply_rule(rule, mail)
        if mode != "template":
            return Templated(compose(mail, mode))
        context = {
            "subject": mail.subject,
            "body": mail.body,
            "sender": mail.sender,
            "mail_from": mail_from or "",
            "headers": mail.headers,
        }
        templated = render_template(
            template,
            context,
            secrets=self.secrets,
            where=where,
            instead="subject and body",
            lacking="mail",
        )
        if templated.text:
            return templated
        # Subject and body as `subject_body` composes them: its echo in the body too.
        return dataclasses.replace(
            templated, text=compose(without_echoed_subject(mail), "subject_body")
        )

    def schedule_of(self, mail: MailText) -> tuple[str | None, str | None]:
        """The `X-SMS-Schedule` header (read by the parse worker): (its time as stored,
        past or not, for the dedupe key; the schedule time, None to send now).

        Unlike the API's caller, a mail's sender is not answered at once: an MTA that
        queued the mail (the bridge down, or its own 451 earlier) delivers it after its
        time, and a 554 for "in the past" bounced a text that is merely due. A scheduled
        text whose time passes in the queue is sent at once; so is this one. Its key keeps
        the time all the same: the MTA's retry of a mail whose 250 it missed meets its
        first however late it comes.
        """
        if not mail.schedule:
            return None, None
        now = self.ingestor.clock.now()
        when = parse_schedule_time(
            mail.schedule,
            now=float("-inf"),
            tz=zone(self.provider.timezone),
            field=MAIL_HEADER,
            secrets=self.secrets,
        )
        epoch = scheduled_epoch(when)
        if epoch is None:
            # parse_schedule_time writes only what this reads; should that ever break, a
            # time nothing can read is no schedule (None was "not passed yet": stored,
            # answered 250, then refused by the provider for good).
            shown = told(mail.schedule, self.secrets, SHOWN_CHARS)
            log.warning("%s %r stored as %r, unreadable: sent now", MAIL_HEADER, shown, when)
            return when, None
        if epoch <= now:
            # Masked before the cut: the log masks the line, but only what the cut left,
            # and a secret across it (fraction digits are any number) kept its start.
            shown = told(mail.schedule, self.secrets, SHOWN_CHARS)
            log.info("%s %r has passed: sent now", MAIL_HEADER, shown)
            return when, None
        return when, when

    async def parse(
        self, raw: bytes, mail_from: str | None, cut: str | None = None
    ) -> MailText | str:
        """The mail parsed under the MIME bounds (in a worker thread unless it
        `parses_quickly`), or the SMTP refusal. `cut` says why the listener kept only the
        mail's first lines (`truncated` then says so first).

        A parse still running at `smtp.parse_timeout` (it also stops itself at the next
        part), or one that never got a worker in that time, is a 451: the time a parse
        takes is the bridge's load as much as the mail's shape, so a permanent 5xx would
        have the sender bounce a real alert that parses in time once the load is gone. A
        mail that is costly by its shape alone fails again each try until the client's
        queue lifetime ends (bounded: each try holds one worker for `parse_timeout`).
        """
        smtp = self.smtp
        bounds = ParseBounds(smtp.max_mime_depth, smtp.max_mime_parts, smtp.parse_timeout)
        started: list[float] = []

        def work() -> MailText:
            started.append(time.monotonic())
            return parse_mail(raw, mail_from=mail_from, bounds=bounds)

        try:
            # A small plain alert parses in less time than the hop to a worker costs (and
            # the hop waits for the GIL while the loop is busy): read here, at once, even
            # while a costly mail holds every worker.
            mail = (
                work() if parses_quickly(raw) else await self.parsers.run(work, smtp.parse_timeout)
            )
        except (TimeoutError, ParseTimeout):
            if not started:
                log.warning("SMTP DATA refused with 451: every mail parser is busy")
                return "451 4.3.2 Too busy to read the mail now; try again later"
            log.warning("SMTP DATA refused with 451: not parsed in %gs", smtp.parse_timeout)
            return (
                f"451 4.3.0 Mail not parsed within {smtp.parse_timeout:g}s "
                f"(smtp.parse_timeout); not accepted, try again later"
            )
        if cut:
            mail = dataclasses.replace(
                mail, truncated="; ".join(filter(None, (cut, mail.truncated)))
            )
        if mail.truncated:
            log.warning("mail read only in part (%s); texted from what was read", mail.truncated)
        return mail

    async def handle_exception(self, error: Exception) -> str:
        """A bug in a hook (aiosmtpd calls this for whatever one raised). Left to aiosmtpd,
        the client got `500 Error: (Type) text`: the exception's own words, which may quote
        the mail or the store's error, and a permanent code that makes a relay bounce the
        alert. A 451 makes it try again later, as a 503 does over HTTP."""
        log.error("SMTP command failed in the bridge", exc_info=error)
        # Raised after the mail was stored, the retry is a duplicate (within the window).
        return "451 4.3.0 Internal error in the bridge; try again later"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        cut = getattr(server, "data_cut", None)  # the lines past smtp.max_lines: dropped
        raw = (
            envelope.content
            if isinstance(envelope.content, bytes)
            else (str(envelope.content or "").encode("utf-8", errors="replace"))
        )
        mail = await self.parse(raw, envelope.mail_from, cut)
        if isinstance(mail, str):
            return mail
        recipients: dict[str, None] = {}
        login = smtp_login(session)
        read = envelope.numbers if isinstance(envelope, BridgeEnvelope) else {}
        for address in envelope.rcpt_tos:
            try:
                # As RCPT read it, unless a reload came since (then as the new config
                # reads it: a recipient it refuses is a 451 below). Who may text it is
                # asked again all the same: it is a dict lookup.
                known = read.get(address)
                if known is not None and known[0] == self.generation:
                    numbers = known[1]
                else:
                    numbers = self.resolve(address)
                if why := self.not_allowed(login, numbers):
                    raise InputError("recipient", why)
                recipients.update(dict.fromkeys(numbers))
            except InputError as exc:
                # Accepted at RCPT, refused now: a reload between the two. A 5xx here
                # bounced the mail for every recipient; on the client's retry RCPT
                # answers each one by the new config, and the rest are texted.
                log.warning("SMTP DATA refused with 451: <%s> %s since RCPT", address, exc)
                return (
                    f"451 4.3.0 {shown(address)}: refused since RCPT by a configuration reload; "
                    "try again later"
                )
            except Unavailable as exc:
                return unreadable(address, exc, session)
        try:
            scheduled_for, schedule = self.schedule_of(mail)
        except InputError as exc:
            return f"554 5.6.0 {MAIL_HEADER}: {exc.message}"
        composed = self.text_for(mail, envelope.mail_from)
        text = composed.text
        if is_blank(text):  # as the API and hooks judge it: a zero-width space shows nothing
            text = f"(empty mail from {mail.sender or envelope.mail_from or 'unknown sender'})"
        draft = Draft(
            recipients=list(recipients),
            text=text,
            source="smtp",
            sender_id=self.smtp.sender_id or self.provider.sender_id,
            # One user's mail never mutes another's (two UPSes, one alert text).
            scope=dedupe_scope("mail", login),
            token=sent_by(login),
            dedupe_key=mail_dedupe_key(mail, scheduled_for),
            suppressed_reason=mail.loop_reason,
            topic=mail.subject[:32] or None,
            schedule_time=schedule,
            note=composed.note(),
        )
        try:
            accepted = await self.ingestor.submit([draft])
        except StoreUnavailable as exc:
            log.error("SMTP DATA refused with 451: %s", exc)
            # Why, in words an unauthenticated client may read (StoreUnavailable.public).
            return f"451 4.3.0 Cannot store the message now ({exc.public}); try again later"
        ids = ",".join(str(a.id) for a in accepted)
        if mail.loop_reason:
            log.info("mail stored as suppressed (%s): %s", mail.loop_reason, ids)
        partly = f" (read in part: {mail.truncated})" if mail.truncated else ""
        return f"250 2.0.0 OK: stored as message {ids}{partly}"


def allowed_numbers(recipients: Recipients, targets: Sequence[str]) -> frozenset[str]:
    """The numbers `targets` (numbers and groups, as `smtp.user_recipients` lists them)
    allow. One that cannot be read now allows nothing (check-config has said why): the
    list is an allow-list, so what it cannot name stays refused."""
    allowed: set[str] = set()
    for target in targets:
        try:
            allowed.update(recipients.resolve([target]))
        except (InputError, Unavailable) as exc:
            log.warning("smtp.user_recipients: %s allows no one now: %s", target, exc)
    return frozenset(allowed)


def mail_dedupe_key(mail: MailText, scheduled_for: str | None = None) -> str | None:
    """A resend is the same content (From, Subject, body) with a `Date` within
    `RETRY_SLOT` of its first: an MTA's retry keeps the Date, and a UPS or NAS that builds
    its mail anew for its own retry writes a Date (and Message-ID) seconds or minutes
    later; each was texted twice while the Message-ID or the exact Date was the key. The
    same words half an hour later (cron's "backup failed" again) are a new mail, and so
    are two mails sharing one Message-ID with different content (cheap devices, test
    fixtures).

    Without a Date, the Message-ID and the content; with neither, the text is the key. A
    Date no parser reads is kept as it is written, with the content.

    A scheduled mail's key holds its time (`scheduled_for`, the X-SMS-Schedule header
    as stored): without it, whoever knew a device's (often predictable) Message-ID could
    mail its words scheduled a year ahead and have the real alert, now, suppressed as
    its duplicate. An MTA's retry carries the same header, and meets its first."""
    content = content_hash(mail.sender, mail.subject, mail.body)
    if scheduled_for:
        content = f"{content}@{scheduled_for}"
    date = mail.headers.get("date", "").strip()
    written = _date_epoch(date)
    if written is not None:
        return slotted_key(f"sent:{content}", written, RETRY_SLOT)
    if mail.message_id:
        message_id = mail.message_id
        if len(message_id) > MESSAGE_ID_KEPT:
            # A Message-ID folded over many lines has no length limit, and PostgreSQL
            # cannot index a key past ~2.7 kB: the insert failed, a 451 for ever.
            message_id = "sha256:" + content_hash(message_id)
        return f"message-id:{message_id}:{content}"
    if date:
        return f"date:{content_hash(date)}:{content}"
    return None  # the text is the key


def _date_epoch(date: str) -> float | None:
    """A Date header's time as an epoch, or None where it cannot be read (a time without
    a zone is read as UTC: only its distance to another of the same sender counts)."""
    if not date:
        return None
    try:
        parsed = email.utils.parsedate_tz(date)
        if parsed is None:
            return None
        if parsed[9] is None:
            parsed = (*parsed[:9], 0)
        return float(email.utils.mktime_tz(parsed))
    except (ValueError, OverflowError, TypeError):
        return None


def smtp_factory(handler: SmtpHandler, *, implicit_tls: bool = False) -> Any:
    """A protocol factory for `loop.create_server`: one aiosmtpd `SMTP` per connection.

    Each connection reads the handler's settings when it is made: TLS, sizes, timeouts
    and limits reloaded by SIGHUP apply from the next session on. Not who may send:
    require_auth, `[smtp.users]` and whether AUTH needs TLS are asked at each EHLO, AUTH,
    MAIL, RCPT and DATA (`BridgeSMTP._auth_in_force`, `SmtpHandler.authenticate`,
    `login_refusal`).
    On the implicit-TLS listener the connection is encrypted before aiosmtpd sees it,
    which aiosmtpd cannot tell by itself: it would offer STARTTLS again and refuse AUTH
    with 538 ("encryption required"); there it gets no STARTTLS context and is told the
    session is encrypted (LimitedSMTP's `encrypted_from_start`).
    """

    def factory() -> SMTP:
        smtp = handler.smtp
        return BridgeSMTP(
            handler,
            sessions=handler.sessions,
            hostname=smtp.hostname or socket.gethostname(),  # never getfqdn(): it can stall
            ident=IDENT,
            data_size_limit=smtp.max_message_bytes,
            enable_SMTPUTF8=True,
            decode_data=False,
            tls_context=None if implicit_tls else handler.tls,
            timeout=smtp.idle_timeout,
            session_time=smtp.max_session_time,
            auth_required=smtp.require_auth,
            auth_require_tls=not smtp.auth_allow_plaintext,
            auth_exclude_mechanism=[],  # all kept: BridgeSMTP offers them as `users` say
            authenticator=handler.authenticate,
            command_call_limit=call_limits(smtp),
            max_lines=smtp.max_lines,
            loop=asyncio.get_running_loop(),
            encrypted_from_start=implicit_tls,
        )

    return factory


async def start_smtp(
    handler: SmtpHandler, sockets: Sequence[socket.socket | None] | None = None
) -> list[Listener]:
    """Serve SMTP and implicit TLS, each if configured, on this loop; the caller closes
    them. `sockets`: the plain listener's and the TLS one's, None for one not served."""
    loop = asyncio.get_running_loop()
    servers: list[Listener] = []
    # `serve` binds both before start-up (a taken port is a config error there); tests
    # that call this directly let it bind.
    smtp = handler.smtp
    plain = sockets[0] if sockets else bind_socket(smtp.listen) if smtp.listen else None
    if plain is not None:
        servers.append(await loop.create_server(smtp_factory(handler), sock=plain))
    if smtp.tls_listen:
        tls = sockets[1] if sockets and len(sockets) > 1 else bind_socket(smtp.tls_listen)
        assert tls is not None  # serve binds tls_listen whenever it is set
        session = smtp_factory(handler, implicit_tls=True)
        assert handler.listener_tls is not None  # validated: smtp.tls_listen needs smtp.tls_cert

        def context() -> ssl.SSLContext:  # the certificate in force when the connection comes
            assert handler.listener_tls is not None
            return handler.listener_tls

        servers.append(ImplicitTlsListener(tls, handler.sessions, session, context))
    return servers
