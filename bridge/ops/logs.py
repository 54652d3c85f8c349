"""Logging: one event per line, human or JSON, with secrets masked."""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections.abc import Iterable
from datetime import UTC, datetime
from types import TracebackType
from typing import TypeAlias

from bridge.config.masking import mask_ordered, masked_first
from bridge.text import BIDI_CODES


class MaskingFilter(logging.Filter):
    """Replaces every configured secret in a record's final text with `***`."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets: list[str] = []
        self.update(secrets)

    def update(self, secrets: Iterable[str]) -> None:
        """Mask these from now on (a reload may bring new ones)."""
        self.secrets = list(masked_first(frozenset(secrets)))

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            record.msg, record.args = self.mask(record.getMessage()), None
            if record.exc_info and not record.exc_text:  # a traceback may quote a secret
                record.exc_text = format_exception(record.exc_info)
            if record.exc_text:
                record.exc_text = self.mask(record.exc_text)
        return True

    def mask(self, text: str) -> str:
        return mask_ordered(text, self.secrets)


# Every character str.splitlines breaks at, and every other control but tab (C0, DEL,
# C1). A message carries text others chose (a mail header decoded from an encoded word,
# a request path, a provider's answer): written raw, a line break in it would start a
# line that looks like the bridge's own, and an escape sequence (ESC, the 8-bit CSI)
# would run in the terminal of whoever reads the log (`docker logs`, `tail -f`).
#
# The explicit bidi controls (bridge.text.BIDI_CODES: LRE RLE PDF LRO RLO, LRI RLI FSI
# PDI) likewise: a terminal that reorders text drew the rest of a line quoting a
# caller's words (a route's refusal, a mail header) in another order than it was
# written ("Trojan Source"), so the line read otherwise than the bridge wrote it. The
# implicit marks (LRM, RLM, ALM) stay raw, as bridge.text keeps them in texts: they
# reorder no letter, and right-to-left names need them.
_BIDI = tuple(map(chr, BIDI_CODES))
_CONTROLS = (*map(chr, range(0x20)), *map(chr, range(0x7F, 0xA0)), "\u2028", "\u2029", *_BIDI)
_LINE_BREAKS = str.maketrans({c: repr(c)[1:-1] for c in _CONTROLS if c != "\t"})
# Starts every line a record writes after its first (traceback, stack): no such line
# can pass for a record of its own, which starts with the time. Leading white space is
# what log shippers' multi-line rules take for a continuation.
CONTINUATION = "  | "

ExcInfo: TypeAlias = (
    tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]
)


def format_exception(exc_info: ExcInfo) -> str:
    """The traceback as `logging.Formatter.formatException` writes it, but with the line
    breaks in each exception's own text (its message and notes, of the chained and
    grouped ones too) escaped: that text may quote what a sender wrote."""
    _, value, tb = exc_info
    if value is None:
        return "NoneType: None"
    top = traceback.TracebackException(type(value), value, tb, compact=True)
    pending, seen = [top], set()
    while pending:
        te = pending.pop()
        if id(te) in seen:
            continue
        seen.add(id(te))
        # `_str` is the message as format_exception_only writes it (no public way to
        # change it); a Python that renames it leaves it raw, which test_logs catches.
        message = getattr(te, "_str", None)
        if isinstance(message, str):
            setattr(te, "_str", message.translate(_LINE_BREAKS))  # noqa: B010
        if isinstance(te.__notes__, list | tuple):
            te.__notes__ = [
                n.translate(_LINE_BREAKS) if isinstance(n, str) else n for n in te.__notes__
            ]
        syntax = getattr(te, "msg", None)  # a SyntaxError's message, written apart
        if isinstance(syntax, str):
            te.msg = syntax.translate(_LINE_BREAKS)
        pending += [t for t in (te.__cause__, te.__context__) if t is not None]
        pending += te.exceptions or []
    return "".join(top.format()).rstrip("\n")


class LineFormatter(logging.Formatter):
    """The human format: one event per line, line breaks in the message escaped (`\\n`).
    A traceback or stack follows on lines of its own, each starting with CONTINUATION,
    line breaks in the exceptions' messages escaped as in the record's message."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = record.message.translate(_LINE_BREAKS)
        return super().formatMessage(record)

    def formatException(self, ei: ExcInfo) -> str:
        return format_exception(ei)

    def format(self, record: logging.LogRecord) -> str:
        # The first line is the message's, escaped: every later one is the traceback's
        # or the stack's. Split as splitlines splits, which is how a reader will.
        first, *rest = super().format(record).splitlines() or [""]
        return "\n".join([first, *(f"{CONTINUATION}{line}".rstrip(" ") for line in rest)])


# json escapes C0 itself; DEL, C1 and the explicit bidi controls it leaves raw.
_JSON_RAW = {c: f"\\u{c:04x}" for c in (*range(0x7F, 0xA0), *BIDI_CODES)}


class JsonFormatter(logging.Formatter):
    def formatException(self, ei: ExcInfo) -> str:
        return format_exception(ei)  # as the masking filter would write it

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exception"] = record.exc_text
        return json.dumps(out, ensure_ascii=False).translate(_JSON_RAW)


def setup_logging(level: str = "info", fmt: str = "human", secrets: Iterable[str] = ()) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter()
        if fmt == "json"
        else LineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    handler.addFilter(MaskingFilter(secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "uvicorn.access", "mail.log"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def mask_secrets(secrets: Iterable[str]) -> None:
    """Replace the masked secrets of the installed handlers (after a reload)."""
    for handler in logging.getLogger().handlers:
        for filt in handler.filters:
            if isinstance(filt, MaskingFilter):
                filt.update(secrets)
