"""Logging: one event per line, human or JSON, with secrets masked."""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Iterable
from datetime import UTC, datetime

# A one-character secret would turn every line into stars and show, by where the stars
# fall, what it is; such a "secret" protects nothing anyway. Two characters and up are
# masked even if that garbles some words: a garbled line is a nuisance, a leaked
# password is not.
MIN_MASKED_CHARS = 2


class MaskingFilter(logging.Filter):
    """Replaces every configured secret in a record's final text with `***`."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets: list[str] = []
        self.update(secrets)

    def update(self, secrets: Iterable[str]) -> None:
        """Mask these from now on (a reload may bring new ones)."""
        self.secrets = list(_masked_first(frozenset(secrets)))

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            record.msg, record.args = self.mask(record.getMessage()), None
            if record.exc_info and not record.exc_text:  # a traceback may quote a secret
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = self.mask(record.exc_text)
        return True

    def mask(self, text: str) -> str:
        return _replace(text, self.secrets)


@functools.lru_cache(maxsize=16)  # one per config in force
def _masked_first(secrets: frozenset[str]) -> tuple[str, ...]:
    """The secrets worth masking, longest first: one that holds another goes whole."""
    return tuple(sorted((s for s in secrets if len(s) >= MIN_MASKED_CHARS), key=len, reverse=True))


def _replace(text: str, ordered: Iterable[str]) -> str:
    for secret in ordered:
        text = text.replace(secret, "***")
    return text


def mask(text: str, secrets: Iterable[str]) -> str:
    """`text` as the log would show it: every secret `***`. For text that leaves the
    bridge other than by the log (HTTP answers) and may quote what others wrote (a
    provider's error, a database's)."""
    return _replace(text, _masked_first(frozenset(secrets)))


# Every character str.splitlines breaks at. A message carries text others chose (a mail
# header decoded from an encoded word, a request path, a provider's answer): written
# raw, a line break in it would start a line that looks like the bridge's own.
_LINE_BREAKS = str.maketrans({c: repr(c)[1:-1] for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"})


class LineFormatter(logging.Formatter):
    """The human format: one event per line, line breaks in the message escaped (`\\n`).
    A traceback, appended after the message, keeps its own lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = record.message.translate(_LINE_BREAKS)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
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
        return json.dumps(out, ensure_ascii=False)


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
