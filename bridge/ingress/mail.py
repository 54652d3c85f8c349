"""Mail to text (pure, no I/O): whatever a legacy box sends becomes a clean subject and body.

Parsing uses the stdlib `email` package under `policy.default`; the plain-text part is
preferred (note that `get_body()` prefers HTML unless told otherwise), HTML-only mail goes
through inscriptis (Apache-2.0), every charset and transfer encoding is decoded with
undecodable bytes replaced, and nothing here raises on any input: a mail that cannot be
parsed still yields what could be read of it.
"""

from __future__ import annotations

import dataclasses
import email
import email.header
import email.parser
import email.policy
import re
import time
from dataclasses import dataclass, field
from email.feedparser import BytesFeedParser
from email.headerregistry import ContentDispositionHeader, HeaderRegistry
from email.message import EmailMessage, Message
from typing import Any

from inscriptis import get_text

from bridge.ingress.charsets import decode_best
from bridge.ingress.flowed import unflow
from bridge.schedule import MAIL_HEADER
from bridge.text import ESCAPE_SEQUENCE


# policy.default, but every header read as unstructured text: we need RFC 2047 decoding,
# not address parsing, which costs ten times the rest of the parse (measured).
class _UnstructuredHeaders(HeaderRegistry):
    """Every header unstructured but Content-Disposition; the header class made once per
    name, not per read.

    `get_body()` asks each part `is_attachment()`, which reads the parsed header's
    `content_disposition`: unstructured, that raised, and a body part after (or with)
    any `Content-Disposition` (an HTML body before its attachment, Apple Mail's `inline`)
    was lost. Only parts that carry one pay for the parse."""

    def __init__(self) -> None:
        super().__init__(use_default_map=False)
        # a mixin the registry combines with BaseHeader, as its default map does
        self.map_to_type("content-disposition", ContentDispositionHeader)  # type: ignore[arg-type]
        self._classes: dict[str, type] = {}

    def __getitem__(self, name: str) -> type:
        key = name.lower()
        if key not in self._classes:
            self._classes[key] = super().__getitem__(name)
        return self._classes[key]


POLICY = email.policy.default.clone(header_factory=_UnstructuredHeaders())
MAX_BODY_CHARS = 20_000  # an SMS needs a few hundred; bound the cleaning work
_QUOTE_INTRO = re.compile(
    r"^(On .{5,200} wrote:|Am .{5,200} schrieb .{1,100}:|Le .{5,200} a écrit\s?:)$",
    re.IGNORECASE,
)
# Gmail's and Thunderbird's inline forward: the forwarded mail follows, its header block
# first. Not a quote to cut: the alert someone forwarded is what is to be texted.
_FORWARD_INTRO = re.compile(r"-+\s*Forwarded message\s*-+", re.IGNORECASE)
# Apple Mail's forward: the forwarded mail follows, its header block first, quoted with ">"
# (iPhone) or not (some Mac versions); the alert is kept, unquoted.
_QUOTED_FORWARD_INTRO = re.compile(
    r"(Begin forwarded message|Anfang der weitergeleiteten Nachricht|Début du message"
    r" réexpédié|Inicio del mensaje reenviado|Inizio messaggio inoltrato|Begin doorgestuurd"
    r" bericht)\s?:",
    re.IGNORECASE,
)
# What a phone's mail app writes under every mail, with no "-- " before it: no news.
_MOBILE_FOOTER = re.compile(
    r"(Sent from my [\w .-]{1,40}|Sent from (Outlook|Mail|Yahoo Mail)( for [\w .]{1,30})?"
    r"( on [\w .]{1,20})?|Get Outlook for (iOS|Android)\b.{0,80}|Von meinem [\w .-]{1,40}"
    r" gesendet|Envoy(é|e) de mon [\w .-]{1,40}|Enviado desde mi [\w .-]{1,40})",
    re.IGNORECASE,
)
# Outlook's (and Exchange web mail's) block before the earlier mail, the same in a reply
# and a forward: a separator ("-----Original Message-----", localised, or a rule of 32
# underscores), then From/Sent/To/Subject in the client's language. Only the subject's
# prefix tells a forward (the alert is the news) from a reply (the reply is).
_OUTLOOK_SEPARATOR = re.compile(
    r"-+\s*(Original Message|Urspr(ü|ue)ngliche Nachricht|Message d'origine|"
    r"Mensaje original|Messaggio originale|Oorspronkelijk bericht|Mensagem original)\s*-+",
    re.IGNORECASE,
)
# Outlook's rule: exactly 32 underscores (desktop, web and mobile alike). Any rule of 10
# or more was taken for it, and a report's rule above "From: /srv/data" cut the report.
_OUTLOOK_RULE = "_" * 32
# The words of the block's lines, by language (those whose From word is known: English,
# German, French, Spanish, Portuguese, Italian, Dutch, Danish/Norwegian, Swedish, Polish,
# Czech, Slovak).
_FROM_WORDS = r"From|Von|De|Da|Van|Fra|Från|Od"
_SENT_WORDS = (
    r"Sent|Gesendet|Envoy(é|e)|Enviad[oa]|Inviato|Verzonden|Sendt|Skickat|Wys(ł|l)ano"
    r"|Odesl(á|a)no|Odoslan(é|e)"
)
_TO_SUBJECT_WORDS = (
    r"To|Cc|An|À|Para|A|Aan|Til|Till|Do|Komu|Subject|Betreff|Objet|Asunto|Oggetto"
    r"|Onderwerp|Emne|Ämne|Temat|Assunto|P(ř|r)edm(ě|e)t"
)
_OUTLOOK_FROM = re.compile(rf"({_FROM_WORDS})\s*:\s*\S", re.IGNORECASE)
_OUTLOOK_SENT = re.compile(rf"({_SENT_WORDS})\s*:", re.IGNORECASE)
_OUTLOOK_TO_SUBJECT = re.compile(rf"({_TO_SUBJECT_WORDS})\s*:", re.IGNORECASE)
# Its HTML, flattened onto one line: From, Sent, then To or Subject.
_OUTLOOK_ONE_LINE = re.compile(r"From: .+ Sent: .+", re.IGNORECASE)
_OUTLOOK_ONE_LINE_REST = re.compile(r" (To|Subject): ", re.IGNORECASE)
_FORWARD_HEADER = re.compile(
    rf"({_FROM_WORDS}|{_SENT_WORDS}|{_TO_SUBJECT_WORDS}|Date|Datum)\s*:",
    re.IGNORECASE,
)
# The subject prefix Outlook and others write on a forward, by language: FW/Fwd, WG
# (German), TR (French), RV (Spanish), I (Italian), ENC (Portuguese), Doorst (Dutch),
# VS/VB (Nordic), PD (Polish); after any [EXTERNAL]-style tags a gateway adds. A reply's
# RE:/AW:/SV: first ("RE: FW: ...") makes it a reply.
_FORWARD_SUBJECT = re.compile(
    r"^\s*(\[[^\]]{0,40}\]\s*)*(fwd?|wg|tr|rv|i|enc|doorst|vs|vb|vl|pd)\s*:", re.IGNORECASE
)
# A rule drawn of one character (Jenkins' 42 dashes between its changes and the console,
# "=====" under a heading): no news, and ~10 % of a 3-part text. Not `grep -C`'s `--`.
_RULE_CHARACTERS = "-=_*#~+."
_RULE = re.compile(r"([-=_*#~+.])\1{3,}")
# Where a line may be one of the above (an intro, a separator, a header, a footer, a
# rule): only such lines are looked at further, most lines of a log after one look.
# A line of a character or two of a rule ("-", "**") is none of them: not looked at further
# (10,000 lines of "-" took 25 ms, each looked at).
_SPECIAL = re.compile(
    r"(?:on |am |le |([-=_*#~+.])\1{3}|-+\s*[^\W\d_]|from|von|de|da|van|fra|från|od|sent"
    r"|get |envoy|enviado|begin|anfang|début|inicio|inizio)",
    re.IGNORECASE,
)
# The footer Mailman adds under a list's mail, below a rule of underscores: the list's
# name ("ops mailing list"; Mailman 3: "... -- ops@lists.example.org"), then its address,
# its listinfo URL or how to unsubscribe, and nothing else to the mail's end.
_LIST_FOOTER_TITLE = re.compile(r"\S[^@]{0,80} mailing list(?: -- \S+@\S+)?", re.IGNORECASE)
_LIST_FOOTER_LINE = re.compile(
    r"[^\s@]+@[^\s@]+|https?://\S+/(?:mailman|listinfo|postorius)\S*"
    r"|To unsubscribe,? send an? e-?mail to \S+@\S+",
    re.IGNORECASE,
)
_LIST_FOOTER_LINES = 4  # the title and at most three lines under it
# A line of `diff`'s hunk header (normal format): 3a4, 12,14c12.
_DIFF_HUNK = re.compile(r"^\d+(?:,\d+)?[acd]\d+(?:,\d+)?$", re.MULTILINE)
_HTML_SIGNATURE = re.compile(r"^[ \t]*--[ \t]*$", re.MULTILINE)
# The delimiter as the HTML has it, its space before the next tag (`-- <br>`, a
# `gmail_signature_prefix` span's `-- </span>`): white space HTML's text then drops.
# White space in one place only (one run, then a line break): `+\s*` read a long run of
# spaces after a `--` in n * n steps.
_HTML_DELIMITER = re.compile(
    r"--(?:[ \t\xa0]|&nbsp;|&#160;|&#xa0;)+(?:\r?\n[ \t]*)?<", re.IGNORECASE
)
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200b\u202f\u205f\u3000]+")
# A terminal's escape sequence goes whole, as the shaper takes it out (bridge.text): its
# ESC alone taken out here, "Disk ESC[31mfull" reached the phone as "Disk [31mfull".
_CONTROL = re.compile(ESCAPE_SEQUENCE + r"|[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_LINESEP = re.compile(r"\r|\n")  # what policy.default removes to unfold a header
_NON_WORDS = re.compile(r"\W+")
# A "Subject:" line a script wrote into the body it pipes to `mail -s` (apcupsd's
# apccontrol does, having been written for sendmail, which would have read it as a header).
_ECHOED_SUBJECT = re.compile(r"subject\s*:\s*(.*)", re.IGNORECASE)
TEMPLATE_HEADERS = ("from", "to", "subject", "date", "message-id")
# What tells an auto-reply: RFC 3834's header, and what vacation responders send instead.
AUTO_REPLY_HEADERS = ("auto-submitted", "x-autoreply", "x-autorespond", "precedence")
SCHEDULE_HEADER = MAIL_HEADER.lower()
HEADERS_READ = frozenset((*TEMPLATE_HEADERS, *AUTO_REPLY_HEADERS, SCHEDULE_HEADER))
_AUTO_REPLY_SUBJECT = re.compile(
    r"^(automatic reply|auto-?reply|auto-?response|out of (the )?office|abwesenheitsnotiz|"
    r"automatische antwort|r[ée]ponse automatique|respuesta autom[áa]tica)\b",
    re.IGNORECASE,
)
_MAILER_DAEMON = re.compile(r"\bmailer-daemon@", re.IGNORECASE)
# postmaster@ also sends mail that is not a bounce (some boxes notify from it): a bounce
# only with a bounce's subject.
_POSTMASTER = re.compile(r"\bpostmaster@", re.IGNORECASE)
_BOUNCE_SUBJECT = re.compile(
    r"undeliver|delivery (status|fail)|returned mail|failure notice|not be delivered",
    re.IGNORECASE,
)


@dataclass(frozen=True, slots=True)
class MailText:
    subject: str
    body: str
    sender: str  # the From header as text
    message_id: str | None
    headers: dict[str, str] = field(default_factory=dict)
    loop_reason: str | None = None  # set for bounces and auto-replies: store, never send
    truncated: str | None = None  # why only part of the MIME structure was read
    schedule: str | None = None  # the X-SMS-Schedule header, as written: read with the
    # rest, so the event loop never runs a header parser over a mail a worker took


@dataclass(frozen=True, slots=True)
class ParseBounds:
    """How much MIME structure a mail may make the parser build, and for how long."""

    max_depth: int = 20  # the message itself is depth 1
    max_parts: int = 100  # every part counts, the message and containers included
    seconds: float = 0.0  # 0: no limit


class ParseTimeout(Exception):
    """The parse outran `ParseBounds.seconds`; what was read so far is not trusted."""


class _Truncated(Exception):
    """Stop building parts; the tree built so far is still a message to read."""


class _BoundedParser(BytesFeedParser):
    """The stdlib feed parser, counting the parts it creates (its one per-part hook).

    A thousand nested multiparts cost seconds and end in RecursionError; 20,000 flat
    parts in under 1 MB cost two seconds: both are stopped at the bound, cheaply.
    """

    def __init__(self, policy: Any, bounds: ParseBounds, deadline: float | None) -> None:
        super().__init__(policy=policy)
        self._bounds = bounds
        self._deadline = deadline
        self._parts = 0

    def _new_message(self) -> None:
        if self._deadline is not None and time.monotonic() > self._deadline:
            raise ParseTimeout(f"mail not parsed within {self._bounds.seconds:g}s")
        self._parts += 1
        if self._parts > self._bounds.max_parts:
            raise _Truncated(f"more than {self._bounds.max_parts} MIME parts")
        if len(self._msgstack) >= self._bounds.max_depth:  # type: ignore[attr-defined]
            raise _Truncated(f"MIME parts nested deeper than {self._bounds.max_depth}")
        super()._new_message()  # type: ignore[misc]

    def partial(self) -> Message:
        """The root as far as it was built; parts cut short read as empty."""
        stack: list[Message] = self._msgstack  # type: ignore[attr-defined]
        for part in stack:
            if part.get_payload() is None:
                part.set_payload("")
        return stack[0]


def _parse(
    raw: bytes, policy: Any, bounds: ParseBounds, deadline: float | None
) -> tuple[Message, str | None]:
    parser = _BoundedParser(policy, bounds, deadline)
    try:
        parser.feed(raw)
        message: Message = parser.close()
        return message, None
    except _Truncated as exc:
        return parser.partial(), str(exc)
    except RecursionError:  # the bounds were set above what the interpreter can nest
        return parser.partial(), "MIME structure too deep to read"


def policy_header_text(policy: Any, name: str, raw: Any) -> str:
    """A raw header value decoded by the message's policy (RFC 2047 and all)."""
    raw = _raw_8bit(raw)
    try:
        text = str(policy.header_fetch_parse(name, raw))
    except Exception:  # a malformed header the policy refuses to parse
        text = _decode_rfc2047(str(raw))
    if "=?" in str(raw):
        # Encoded words read by their bytes, not only their label (UTF-8 labelled
        # iso-8859-1 is common and decodes without error into mojibake); the policy's
        # reading stands where that one is not clean (a word it alone could parse).
        best = _decode_rfc2047(_LINESEP.sub("", str(raw)))
        if "=?" not in best and "\ufffd" not in best:
            text = best
    return _CONTROL.sub("", text)


def _raw_8bit(raw: Any) -> Any:
    """Raw 8-bit bytes in a header (the parser keeps them as surrogate escapes) decoded by
    the best reading: a Subject in raw cp1252 is not UTF-8 with holes."""
    if not isinstance(raw, str) or raw.isascii():
        return raw
    try:
        data = raw.encode("ascii", errors="surrogateescape")
    except UnicodeEncodeError:  # already text (a header set from str): nothing to decode
        return raw
    return decode_best(data)


def header_text(policy: Any, name: str, raw: Any) -> str:
    """As `policy_header_text`, without building a header object for plain ASCII.

    For ASCII without encoded words the policy's unstructured header is the value itself
    once unfolded (a property test holds the two to the same answer); building that object
    was the costliest part of parsing a small mail.
    """
    if isinstance(raw, str) and raw.isascii() and "=?" not in raw:
        return _CONTROL.sub("", _LINESEP.sub("", raw))
    return policy_header_text(policy, name, raw)


def _headers(msg: Message) -> dict[str, str]:
    """The first value of each header in `HEADERS_READ`, in one pass over the header list."""
    found: dict[str, str] = {}
    for name, raw in msg.raw_items():
        key = name.lower()
        if key in HEADERS_READ and key not in found:
            found[key] = header_text(msg.policy, name, raw)
    return found


def _decode_rfc2047(text: str) -> str:
    try:
        parts = email.header.decode_header(text)
    except Exception:
        return text
    out = []
    for chunk, charset in parts:
        if isinstance(chunk, str):
            out.append(chunk)
        elif charset is None:  # text between encoded words, kept by decode_header as bytes
            try:  # its encoding of str (raw-unicode-escape), undone...
                out.append(chunk.decode("raw-unicode-escape"))
            except UnicodeDecodeError:  # ...unless the text held a literal "\u" (C:\users)
                out.append(decode_best(chunk))
        else:
            out.append(decode_best(chunk, charset))
    return "".join(out)


def _part_text(part: Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        payload = str(part.get_payload()).encode("utf-8", errors="replace")
    return _payload_text(payload, part.get_content_charset())


def _payload_text(payload: bytes, charset: str | None) -> str:
    bound = MAX_BODY_CHARS * 4
    return decode_best(payload[:bound], charset, cut=len(payload) > bound)


def _html_to_text(html: str) -> str:
    """The text of an HTML body; a signature's `-- <br>` line (its trailing space lost
    with HTML's white space) given back its delimiter, as `clean_body` knows it.

    Only where the HTML holds such a delimiter: a bare `--` line is otherwise what
    `grep -C` prints between matches, in a `<pre>` of cron output as in plain text
    (where it is kept), and the matches after it are the news."""
    try:
        text = get_text(html)
    except Exception:  # inscriptis/lxml on hostile markup: fall back to raw text
        return re.sub(r"<[^>]*>", " ", html)
    if not _HTML_DELIMITER.search(html):
        return text
    return _HTML_SIGNATURE.sub("-- ", text)


def _blank(part: Message) -> bool:
    """Whether a part holds nothing but whitespace (its bytes: no charset to read)."""
    payload = part.get_payload(decode=True)
    return isinstance(payload, bytes) and not payload.strip()


_BOUNDARY_LINE = re.compile(r'^--([^\s"]{1,70})[ \t]*\r?$', re.MULTILINE)


def _body(msg: Message, bounds: ParseBounds, deadline: float | None) -> str:
    part: Message | None
    if isinstance(msg, EmailMessage):
        try:
            part = msg.get_body(preferencelist=("plain", "html"))
            if part is not None and part.get_content_subtype() == "plain" and _blank(part):
                # an empty plain alternative (Spring's setText("", html)): the HTML is the mail
                part = msg.get_body(preferencelist=("html",)) or part
            if part is not None and _blank(part):
                # A blank inline body is none: Thunderbird's and Outlook's "forward as
                # attachment", and a NAS attaching report.txt, send an empty text/plain
                # first, and the SMS held the subject only.
                part = _first_text_part(msg) or part
        except Exception:
            part = None
    else:
        part = msg if not msg.is_multipart() else None
    if part is None and msg.get_content_maintype() == "multipart" and not msg.is_multipart():
        return _unbounded_body(msg, bounds, deadline)
    if part is None:
        part = _first_text_part(msg)
    if part is None:
        if msg.is_multipart() or msg.get_content_maintype() != "text":
            return ""
        part = msg
    text = _part_text(part)
    if part.get_content_subtype() == "html":
        text = _html_to_text(text)
    elif part.get_content_subtype() == "plain":
        text = unflow(text, _param(part, "format"), _param(part, "delsp"))
    return text


def _param(part: Message, name: str) -> str | None:
    value = part.get_param(name)
    return value if isinstance(value, str) else None  # an RFC 2231 tuple: not these


def _first_text_part(msg: Message) -> Message | None:
    """With no inline body (get_body found none, or a blank one): the first plain part
    that is not blank, anywhere, else the first such HTML one, attachments and forwarded
    `message/rfc822` mails included. A NAS that attaches its log as `report.txt`, or a
    mail forwarded as an attachment, gave a subject-only text."""
    if not msg.is_multipart():
        return None
    parts = [p for p in msg.walk() if p is not msg and not p.is_multipart()]
    for subtype in ("plain", "html"):
        for part in parts:
            if part.get_content_type() == f"text/{subtype}" and not _blank(part):
                return part
    return None


def _unbounded_body(msg: Message, bounds: ParseBounds, deadline: float | None) -> str:
    """The body of a `multipart/*` without a boundary parameter: the stdlib keeps its
    parts as one payload and reads no body in it (the whole text was lost). The first
    `--token` line is taken for the boundary and the payload read again under the same
    bounds; with none, nothing (the raw MIME lines are no text to send)."""
    payload = msg.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    text = payload.decode("ascii", errors="replace")
    found = _BOUNDARY_LINE.search(text)
    if found is None:
        return ""
    head = f'Content-Type: multipart/mixed; boundary="{found.group(1)}"\r\n\r\n'.encode()
    again, _ = _parse(head + payload, POLICY, bounds, deadline)
    if not again.is_multipart():
        return ""
    return _body(again, bounds, deadline)


def is_forward(subject: str) -> bool:
    """Whether a subject is a forward's (FW:, WG:, TR:...), as opposed to a reply's."""
    return bool(_FORWARD_SUBJECT.match(subject))


def _clean_line(raw: str) -> str:
    if raw.isascii() and raw.isprintable() and "  " not in raw:
        return raw.strip()  # no control, escape or run of spaces: most lines of a log
    return _SPACES.sub(" ", _CONTROL.sub("", raw)).strip().lstrip("\ufeff")


def _wrapped_intro(line: str, following: str) -> bool:
    """Whether `line` and the next are one "On ... wrote:" a client wrapped (Gmail wraps
    it past ~78 characters, a long sender name and address pushing "wrote:" down)."""
    return 0 < len(following) < 40 and bool(_QUOTE_INTRO.match(f"{line} {following}"))


def _text_after(lines: list[str], index: int) -> int | None:
    """The next line with text after line `index`, past one blank line at most (the
    blank an HTML block's margin leaves), or None."""
    for following in range(index + 1, min(index + 3, len(lines))):
        if lines[following]:
            return following
    return None


def _sent_under(lines: list[str], index: int) -> int | None:
    """The Sent line right under the From line `index` of Outlook's block, or None."""
    sent = _text_after(lines, index)
    return sent if sent is not None and _OUTLOOK_SENT.match(lines[sent]) else None


def _outlook_one_line(line: str) -> bool:
    """Outlook's block as its HTML flattened onto one line: From, Sent, then To or
    Subject (a log line "From: a Sent: b" alone is no block)."""
    if not _OUTLOOK_ONE_LINE.fullmatch(line):
        return False
    return _OUTLOOK_ONE_LINE_REST.search(line, line.lower().index(" sent: ")) is not None


def _outlook_separator(line: str, lines: list[str], index: int) -> bool:
    """Whether line `index` is the separator of Outlook's block before an earlier mail:
    "-----Original Message-----" (localised), or its rule of 32 underscores with a From
    line and a Sent line under it (a report's rule above "From: /srv/data" is a rule)."""
    if _OUTLOOK_SEPARATOR.fullmatch(line):
        return True
    if line != _OUTLOOK_RULE:
        return False
    sender = _text_after(lines, index)
    return (
        sender is not None
        and bool(_OUTLOOK_FROM.match(lines[sender]))
        and _sent_under(lines, sender) is not None
    )


def _outlook_headers(line: str, lines: list[str], index: int) -> bool:
    """Whether Outlook's block starts at the line `index` with no separator above it (in
    its HTML the separator is a border): From, Sent, then To or Subject, or all on one
    line. A From line and a Sent line alone are two lines of a log as often."""
    if not _OUTLOOK_FROM.match(line):
        return False
    if _outlook_one_line(line):
        return True
    sent = _sent_under(lines, index)
    if sent is None:
        return False
    rest = _text_after(lines, sent)
    return rest is not None and bool(_OUTLOOK_TO_SUBJECT.match(lines[rest]))


_NO_HEAD, _HEAD_NEXT, _IN_HEAD = 0, 1, 2  # before, at and in a forwarded mail's headers


class _Body:
    """`clean_body`'s walk over the lines of one body, and where it is."""

    def __init__(self, raws: list[str], *, forward: bool, quotes: bool) -> None:
        self.raws = raws
        # Each line cleaned once: the checks look a line or two ahead, and cleaning them
        # there again tripled the work on a body of rules (10,000 lines of "-", measured).
        self.lines = [_clean_line(raw) for raw in raws]
        self.forward = forward
        self.quotes = quotes  # whether a ">" line is a quote (not in a diff's output)
        self.head = _NO_HEAD
        self.unquote = False  # in a forwarded mail quoted with ">" (iPhone Mail's forward)

    def text(self) -> str:
        kept = []
        for index, raw in enumerate(self.raws):
            if raw == "-- ":
                break  # signature delimiter: the rest is the signature
            line = self.lines[index]
            if raw[:1] == ">" or self.unquote or self.head:  # a quote, or a forward's
                line = self._line(index, raw)
            if not line:
                continue
            if _SPECIAL.match(line):  # one look for most lines; the rest only where it may be
                kind = self._special(line, index)
                if kind == "stop":
                    break
                if kind != "keep":
                    continue
            if not (self.head and self._header(line)):
                kept.append(line)
        return "\n".join(kept)

    def _line(self, index: int, raw: str) -> str:
        """The text of a line, unquoted in a quoted forward; "" for a quote's line."""
        line = self.lines[index]
        if self.quotes and raw[:1] == ">":
            # A quote mark starts its line (RFC 3676 space-stuffs any other ">" line):
            # Jenkins' " > git fetch ..." is the console echoing the command that failed.
            if not self.unquote:
                return ""
            line = line[1:].strip().lstrip("\ufeff")
        elif self.unquote and line:
            self.unquote, self.head = False, _NO_HEAD  # the quoted forward ended
        if not line and self.head == _IN_HEAD:
            self.head = _NO_HEAD  # a header block ends at its first blank line
        return line

    def _header(self, line: str) -> bool:
        """Whether `line` is a line of a forwarded mail's header block (left out)."""
        if _FORWARD_HEADER.match(line) or _outlook_one_line(line):
            self.head = _IN_HEAD
            return True
        self.head = _NO_HEAD
        return False

    def _special(self, line: str, index: int) -> str:
        """What to do with a line `_SPECIAL` matched: "stop" (a reply's quote starts),
        "drop" it (a rule, a phone's footer, an intro or separator) or "keep" it; where a
        forwarded mail's header block comes next, noted."""
        kind = _special(
            line, self.lines, index, forward=self.forward, in_head=self.head != _NO_HEAD
        )
        if kind == "quoted":
            # Apple Mail quotes the forwarded mail with ">", or (other versions) not.
            self.unquote = self.quotes and self._quoted_next(index)
        if kind in ("head", "quoted"):
            self.head = self.head or _HEAD_NEXT
            return "drop"
        return kind

    def _quoted_next(self, index: int) -> bool:
        for following in range(index + 1, len(self.lines)):  # up to the next text: linear
            if self.lines[following]:
                return self.raws[following][:1] == ">"
        return False


def clean_body(text: str, *, forward: bool = False) -> str:
    """Drop signatures, quoted replies and blank lines; fold whitespace.

    Only `-- ` (dash dash space, RFC 3676) starts a signature: a bare `--` is what
    `grep -C` prints between matches in cron output, and the matches after it are the
    news. `>` lines (the mark at the line's start, not after a space) are a quoted reply,
    except in a body holding a `diff` hunk header (`3a4`, `12,14c12`): there they are the
    lines added, say to /etc/passwd. A forwarded mail (`---------- Forwarded message
    ---------`) is kept, less its header block (up to its first blank line); so is the
    earlier mail after Outlook's block (`-----Original Message-----` or 32 underscores,
    then From/Sent/To) when the mail is a `forward` (its subject says FW:), where in a
    reply that block starts the quote, and after Apple Mail's "Begin forwarded message:",
    unquoted if quoted. A line that is a rule of one character (`-----`, `=====`) or a
    phone's "Sent from my iPhone" is left out.
    """
    text = text[:MAX_BODY_CHARS].replace("\r\n", "\n").replace("\r", "\n")
    quotes = _DIFF_HUNK.search(text) is None
    return _Body(text.split("\n"), forward=forward, quotes=quotes).text()


def _special(line: str, lines: list[str], index: int, *, forward: bool, in_head: bool) -> str:
    """What `clean_body` does with a line `_SPECIAL` matched (line `index` of `lines`):
    "drop" it (a rule, a phone's footer), "stop" (a reply's quote starts), "head" (a
    forwarded mail's header block starts), "quoted" (Apple Mail's forward starts) or
    "keep" it. `in_head`: in (or at) a forwarded mail's header block already."""
    if line[0] in _RULE_CHARACTERS:  # a rule, a forward's intro, Outlook's separator
        rule = _RULE.fullmatch(line) is not None
        if rule and line[0] == "_" and _list_footer(lines, index):
            return "stop"
        if rule and line != _OUTLOOK_RULE:
            return "drop"
        if _FORWARD_INTRO.fullmatch(line):
            return "head"
        if not in_head and _outlook_separator(line, lines, index):
            return "head" if forward else "stop"  # the quote of a reply, or a forward
        return "drop" if rule else "keep"
    if _MOBILE_FOOTER.fullmatch(line):
        return "drop"
    if _QUOTED_FORWARD_INTRO.fullmatch(line):
        return "quoted"
    following = lines[index + 1] if index + 1 < len(lines) else ""
    if _QUOTE_INTRO.match(line) or _wrapped_intro(line, following):
        return "stop"
    if not in_head and _outlook_headers(line, lines, index):
        return "head" if forward else "stop"
    return "keep"


def _list_footer(lines: list[str], index: int) -> bool:
    """Whether the lines after the rule at `index` are a mailing list's footer and the
    mail's end (`_LIST_FOOTER_TITLE`): "ops mailing list", the list's address and its
    listinfo URL went out in every text of a list's alert. Anything else under the rule
    (more lines, other words) keeps it all: an alert's text is never dropped for looking
    like one. Looks at most a few lines past blank ones (linear over a body of rules)."""
    found = []
    for following in range(index + 1, len(lines)):  # no slice: a copy per rule
        line = lines[following]
        if line:
            found.append(line)
            if len(found) > _LIST_FOOTER_LINES:
                return False
    return (
        len(found) >= 2
        and _LIST_FOOTER_TITLE.fullmatch(found[0]) is not None
        and all(_LIST_FOOTER_LINE.fullmatch(line) for line in found[1:])
    )


def _loop_reason(content_type: str, found: dict[str, str], mail_from: str | None) -> str | None:
    """Why this mail must never be texted on, or None. Most specific first.

    Only bounces and auto-replies: texting them (or answering them) is what loops.
    `Auto-Submitted: auto-generated`, `Precedence: bulk` and `List-ID` mark mail a robot
    wrote, which is what cron, Jenkins and every monitor send: RFC 3834 asks not to
    auto-reply to those, not to drop them.
    """
    if content_type in ("multipart/report", "message/delivery-status"):
        return f"delivery status notification ({content_type})"
    if mail_from is not None and mail_from in ("", "<>"):
        return "null sender: a bounce or auto-reply, never texted on"
    sender = found.get("from", "")
    if _MAILER_DAEMON.search(sender) or (
        _POSTMASTER.search(sender) and _BOUNCE_SUBJECT.search(found.get("subject", ""))
    ):
        return "bounce from the mail system (MAILER-DAEMON or postmaster)"
    auto = found.get("auto-submitted", "").strip().lower()
    if auto.startswith("auto-replied"):
        return f"auto-submitted mail (Auto-Submitted: {auto})"
    for name in ("x-autoreply", "x-autorespond"):
        if found.get(name, "").strip().lower() not in ("", "no", "false", "0"):
            return f"auto-reply ({name})"
    if found.get("precedence", "").strip().lower() == "auto_reply":
        return "auto-reply (Precedence: auto_reply)"
    if _AUTO_REPLY_SUBJECT.match(found.get("subject", "").strip()):
        return "auto-reply (vacation or out-of-office subject)"
    return None


def _unreadable(raw: bytes) -> str:
    return clean_body(raw[:MAX_BODY_CHARS].decode("utf-8", errors="replace"))


def _is_forward(found: dict[str, str]) -> bool:
    return is_forward(found.get("subject", ""))


def parse_mail(
    raw: bytes, *, mail_from: str | None = None, bounds: ParseBounds = ParseBounds()
) -> MailText:
    """Any bytes -> subject, body and loop status.

    Raises only ParseTimeout. Past `bounds` the mail is read from the parts built before
    the bound (`truncated` says which bound); a mail no parser reads is its raw text.
    """
    plain = _plain_mail(raw)
    if plain is None:
        return _parsed_mail(raw, mail_from, bounds)
    found, payload, charset, flow = plain
    text = unflow(_payload_text(payload, charset), *flow)
    body = clean_body(text, forward=_is_forward(found))
    return _mail_text(found, body, "text/plain", mail_from, None)


def _parsed_mail(raw: bytes, mail_from: str | None, bounds: ParseBounds) -> MailText:
    """`parse_mail` through the stdlib's parser, for any mail."""
    deadline = time.monotonic() + bounds.seconds if bounds.seconds > 0 else None
    msg: Message
    truncated: str | None = None
    try:
        msg, truncated = _parse(raw, POLICY, bounds, deadline)
    except ParseTimeout:
        raise
    except Exception:  # the fallback parse is bounded and guarded alike
        try:
            msg, truncated = _parse(raw, email.policy.compat32, bounds, deadline)
        except ParseTimeout:
            raise
        except Exception:
            msg, truncated = Message(), "not a readable MIME message"
    found = _headers(msg)
    try:
        readable = len(msg) or msg.get_payload()
        text = _body(msg, bounds, deadline) if readable else None
        body = _unreadable(raw) if text is None else clean_body(text, forward=_is_forward(found))
    except ParseTimeout:  # a boundary-less multipart is parsed again: under the deadline
        raise
    except Exception:
        body = _unreadable(raw)
    return _mail_text(found, body, msg.get_content_type(), mail_from, truncated)


def _mail_text(
    found: dict[str, str],
    body: str,
    content_type: str,
    mail_from: str | None,
    truncated: str | None,
) -> MailText:
    headers = {name: found[name] for name in TEMPLATE_HEADERS if found.get(name)}
    subject = _SPACES.sub(" ", headers.get("subject", "").replace("\n", " ")).strip()
    message_id = headers.get("message-id", "").strip() or None
    return MailText(
        subject=subject,
        body=body,
        sender=headers.get("from", ""),
        message_id=message_id,
        headers=headers,
        loop_reason=_loop_reason(content_type, found, mail_from),
        truncated=truncated,
        schedule=found.get(SCHEDULE_HEADER) or None,
    )


# What an alerting box mails: a few headers and a line or two of ASCII, 200-600 bytes.
# Within these bounds the costliest mail found (2 KiB of blank lines) parses in ~1.2 ms,
# a typical alert in ~60 us. Bytes beyond ASCII, encoded words and transfer
# encodings are left to the workers: mislabelled bytes send the text through
# charset-normalizer, ~2.5 ms for 1.7 KiB of them (BENCHMARKS.md, issue #16).
QUICK_PARSE_BYTES = 2048
_NOT_QUICK = (b"=?", b"multipart/", b"text/html", b"base64", b"quoted-printable")


def parses_quickly(raw: bytes) -> bool:
    """Whether `raw` is small and plain enough to parse on the event loop: ASCII only,
    no MIME parts, no HTML to render, no encoded words or transfer encodings to decode.
    Anything else goes to a parse worker, whose deadline bounds a mail built to be slow
    (deep or wide MIME, thousands of words, bytes in a charset to guess)."""
    if len(raw) > QUICK_PARSE_BYTES or not raw.isascii():
        return False
    lowered = raw.lower()
    return not any(marker in lowered for marker in _NOT_QUICK)


# A header line as the stdlib's feed parser takes one (its headerRE, less the empty name
# and the mbox "From " line, which go to the full parser).
_HEADER_LINE = re.compile(r"[\x21-\x39\x3b-\x7e]+:")
_PLAIN_TYPE = re.compile(
    r'\s*text/plain\s*((?:;\s*[\w.-]+\s*=\s*(?:"[^"\\;]*"|[\w.:+-]+)\s*)*);?\s*',
    re.IGNORECASE | re.ASCII,
)
_PARAM = re.compile(r';\s*([\w.-]+)\s*=\s*(?:"([^"]*)"|([^\s;]+))', re.ASCII)
_PLAIN_ENCODINGS = ("7bit", "8bit", "binary")
_READ_RAW = ("content-type", "content-transfer-encoding")


def _plain_mail(
    raw: bytes,
) -> tuple[dict[str, str], bytes, str | None, tuple[str | None, str | None]] | None:
    """The headers read (as `_headers` reads them), the body's bytes, its charset and
    its `format` and `delsp` parameters of a mail in the plainest shape an alerting box
    sends, or None for the stdlib's parser.

    That shape: ASCII, every header line a `Name: value` or its folded continuation,
    one line ending throughout the header block, a blank line before the body, no
    Content-Type but a simple text/plain and no transfer encoding but 7bit, 8bit or
    binary. There the stdlib's parser builds a single text part whose payload is the
    bytes after the blank line; this reads the same answers without building it (~60 %
    of parsing a typical alert on the event loop, BENCHMARKS.md). Anything else, and
    anything unsure, is None: a property test holds both readings to the same MailText.
    """
    if not raw.isascii():
        return None
    text = raw.decode("ascii")
    block = _header_block(text)
    if block is None:
        return None
    end, eol = block
    folded = _folded_headers(text[:end], eol)
    if folded is None:
        return None
    read = _plain_headers(folded, eol)
    if read is None:
        return None
    found, charset, flow = read
    return found, raw[end + 2 * len(eol) :], charset, flow


def _header_block(text: str) -> tuple[int, str] | None:
    """Where the header block of a plain mail ends, and its one line ending; None where
    there is no blank line after it, or its line endings are mixed."""
    end = text.find("\r\n\r\n")
    eol = "\r\n"
    if end < 0 or "\n\n" in text[:end]:
        end, eol = text.find("\n\n"), "\n"
    if end <= 0:
        return None
    head = text[:end]
    if eol == "\n" and "\r" in head:
        return None
    if eol == "\r\n" and not head.count("\r") == head.count("\n") == head.count("\r\n"):
        return None
    return end, eol


def _folded_headers(head: str, eol: str) -> list[tuple[str, list[str]]] | None:
    """Each header's name and its lines (the first less the name, then its folded
    continuations); None at a line that is neither."""
    folded: list[tuple[str, list[str]]] = []
    for line in head.split(eol):
        if line[:1] in (" ", "\t"):
            if not folded:
                return None
            folded[-1][1].append(line)  # joined once, by the reader: thousands of folds stay linear
        elif _HEADER_LINE.match(line):
            name, value = line.split(":", 1)
            folded.append((name, [value.lstrip(" \t")]))
        else:
            return None
    return folded


def _plain_headers(
    folded: list[tuple[str, list[str]]], eol: str
) -> tuple[dict[str, str], str | None, tuple[str | None, str | None]] | None:
    """The headers read (as `_headers` reads them), the charset and the `format` and
    `delsp` parameters; None unless the Content-Type is one simple text/plain and the
    transfer encoding a plain one."""
    found: dict[str, str] = {}
    charset: str | None = None
    params: dict[str, str] = {}
    seen_type = False
    for name, lines in folded:
        value = eol.join(lines)  # the raw value as the policy parses a header
        key = name.lower()
        if key in _READ_RAW and ("=?" in value or _CONTROL.search(value)):
            return None  # the stdlib reads these raw: control bytes kept, encoded words not
        if key == "content-type":
            plain_type = _PLAIN_TYPE.fullmatch(header_text(POLICY, name, value))
            if seen_type or plain_type is None:
                return None
            seen_type = True
            for param, quoted, token in _PARAM.findall(plain_type.group(1)):
                if param.lower() == "charset" and charset is None:
                    charset = (quoted or token).lower()
                params.setdefault(param.lower(), quoted or token)
        elif (
            key == "content-transfer-encoding"
            and header_text(POLICY, name, value).strip().lower() not in _PLAIN_ENCODINGS
        ):
            return None
        if key in HEADERS_READ and key not in found:
            found[key] = header_text(POLICY, name, value)
    return found, charset, (params.get("format"), params.get("delsp"))


def _normalised(text: str) -> str:
    return _NON_WORDS.sub(" ", text).strip().lower()


def without_echoed_subject(mail: MailText) -> MailText:
    """The mail less a first body line that is "Subject: <the subject>", for a text that
    shows the subject (where it is the text's first line; compose drops only a body that
    starts with the subject itself). Not for `body` mode, where that line may be the
    only place the text says what failed."""
    first, _, rest = mail.body.partition("\n")
    echoed = _ECHOED_SUBJECT.fullmatch(first)
    if mail.subject and echoed and _normalised(echoed.group(1)) == _normalised(mail.subject):
        return dataclasses.replace(mail, body=rest)
    return mail


def compose(mail: MailText, mode: str) -> str:
    """The SMS text from subject and body: `subject`, `body` or `subject_body`."""
    if mode == "subject":
        return mail.subject or mail.body
    if mode == "body":
        return mail.body or mail.subject
    subject, body = mail.subject, mail.body
    if not subject:
        return body
    if not body:
        return subject
    plain_subject, plain_body = _normalised(subject), _normalised(body)
    if plain_body.startswith(plain_subject):
        return body
    if plain_subject.startswith(plain_body):
        return subject
    return f"{subject}\n{body}"
