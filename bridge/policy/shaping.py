"""Shaping: every text the bridge stores, from a sender or of its own (budget warnings,
storm digests), is made ready to send here, one way.

Blanks before its first shown character and after its last taken off, control
characters replaced or taken out (`bridge.text.without_controls`), look-alike
punctuation replaced where that makes the text GSM (limits.transliterate), cut to
limits.max_parts, its encoding and provider message_type (provider.arabic_type),
its parts, a cost estimate, its dedupe key and the topic a digest counts it as. Pure: no I/O, so it runs inside a
writer job as well as before one.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import NamedTuple

from bridge.config import LimitsConfig, ProviderConfig
from bridge.models import NewMessage, State
from bridge.phone import is_assigned
from bridge.policy.decide import content_hash, scoped_key, text_key
from bridge.pricing import PriceBook
from bridge.text import (
    Shape,
    blank_prefix,
    is_gsm,
    shape,
    transliterate,
    truncate_to_parts,
    without_bidi,
    without_controls,
)

log = logging.getLogger(__name__)
TOPIC_CHARS = 32  # a message with no topic of its own is counted by its first line, cut here
# The scope of the keys of messages stored suppressed from the start (bounces,
# auto-replies): no source is named so, so no message that is sent ever meets them.
NEVER_SENT = "never-sent"


# What of a text is shaped: far past the longest SMS (limits.max_parts <= 10: 1,530 GSM
# septets), so the text as stored is the same; and `_prepared` caches each text it is
# given, so a sender's 1 MB texts (a webhook payload's), 1024 of them, are not a GB held.
SHAPED_CHARS = 16 * 1024


def default_topic(text: str) -> str:
    return text.split("\n", 1)[0][:TOPIC_CHARS]


@functools.lru_cache(maxsize=1024)  # alert texts repeat, in a storm above all
def _prepared(
    text: str, replace_look_alikes: bool, max_parts: int, arabic_type: int
) -> tuple[str, Shape, str]:
    """The text as stored (look-alikes replaced, cut to `max_parts`), its shape, and the
    dedupe key it has when its sender gives none."""
    cut = truncate_to_parts(text, max_parts)
    if replace_look_alikes:
        # Only where it makes the text GSM as sent (after the cut: a curly quote in the
        # head of a text whose emoji is cut away): in a text that stays UCS-2 it saves
        # nothing and harms some (a ZWNJ is part of Persian spelling, a ZWJ holds emoji).
        replaced = transliterate(text)
        if replaced != text:  # nothing replaced (most texts): the cut as it is
            replaced = truncate_to_parts(replaced, max_parts)
            if is_gsm(replaced):
                cut = replaced
    text = cut
    return text, shape(text, arabic_type=arabic_type), text_key(text)


# A sender's own dedupe key longer than this is stored as its digest, and a topic or
# instance is cut here: the API's cap on `dedupe_key`. A payload's key (a generic
# route's `dedupe_path`) was as long as its body, and PostgreSQL's index on the key
# holds 2,704 bytes at most: the insert failed, a 500 the sender retried for ever.
KEY_CHARS = 256


def _key(value: str | None) -> str | None:
    """A sender's dedupe key as stored: itself, or past KEY_CHARS its digest (equal
    keys still meet, as the same digest)."""
    value = _storable(value)
    if value and len(value) > KEY_CHARS:
        return "digest:" + content_hash(value)
    return value


def _label(value: str | None) -> str | None:
    """A topic or instance as stored: cut to KEY_CHARS."""
    value = _storable(value)
    return value[:KEY_CHARS] if value else value


def _storable(value: str | None) -> str | None:
    """`value` without NUL (JSON's `\\u0000`): PostgreSQL's text cannot hold it (the
    insert failed, a 500), and no phone shows it. Taken out on every backend alike. And
    without the explicit bidi controls (`without_bidi`), as the text is: a topic, an
    instance or a key is a payload's string the console, the log and a digest show."""
    if not value:
        return value
    return without_bidi(value.replace("\x00", "") if "\x00" in value else value)


def _trimmed(text: str) -> str:
    """The part of `text` that is shaped: from its first character a phone shows (a text
    of 16 KiB of blanks, then words, was cut to its blanks and sent empty), its first
    SHAPED_CHARS, without control characters (`without_controls`: BEL and ESC reached
    the phone, and made the text UCS-2), and without white space at its end."""
    start = blank_prefix(text)
    return without_controls(text[start : start + SHAPED_CHARS]).rstrip()


class Draft(NamedTuple):
    """One text to one or more already-resolved E.164 recipients (Recipients.resolve).

    A NamedTuple, as `NewMessage` is: built once a request, and a frozen dataclass's
    `__init__` sets each of its 13 fields through `object.__setattr__`, ~3x the
    instructions of a tuple's (~3 % of the loop's work on an alert, BENCHMARKS.md,
    issue #16). Nothing unpacks, indexes or compares one with a plain tuple."""

    recipients: Sequence[str]
    text: str
    source: str
    sender_id: str
    route: str | None = None
    dedupe_key: str | None = None
    schedule_time: str | None = None
    suppressed_reason: str | None = None  # e.g. an auto-reply: stored, never sent
    topic: str | None = None  # what a storm digest counts it as; default: its first line
    instance: str | None = None  # what a storm digest names besides (a host, a pod)
    scope: str | None = None  # where dedupe keys come from (policy.dedupe_scope); default: source
    token: str | None = None  # the [tokens.NAME] that sent it: counted by its daily cap
    # How its text was made, for its rows' events (a route's template that printed a
    # field the payload lacks as empty): what the operator sees on the message's page.
    note: str | None = None


class Shaper:
    """The shaping settings in force: `[limits]` (reloadable) and the provider's
    `arabic_type` (fixed until restart, as the whole provider section is)."""

    def __init__(
        self,
        *,
        limits: LimitsConfig,
        provider: ProviderConfig,
        prices: PriceBook | None = None,
    ) -> None:
        self.arabic_type = provider.arabic_type
        self.prices = prices or PriceBook()
        self.reload(limits)

    def reload(self, limits: LimitsConfig) -> None:
        """max_parts and transliterate, from the next text on (SIGHUP)."""
        self.limits = limits

    def messages(self, drafts: Sequence[Draft]) -> list[NewMessage]:
        """The rows `drafts` become, before policy decides their state."""
        out = []
        for draft in drafts:
            text, form, text_dedupe_key = _prepared(
                _trimmed(draft.text),
                self.limits.transliterate,
                self.limits.max_parts,
                self.arabic_type,
            )
            topic = _label(draft.topic) or default_topic(text)
            instance, reason = _label(draft.instance), _storable(draft.suppressed_reason)
            if not draft.dedupe_key and draft.schedule_time:
                # The same words for another time are another text (a reminder morning
                # and evening); a retry of the same request still meets its first.
                text_dedupe_key = f"{text_dedupe_key}@{draft.schedule_time}"
            dedupe_key = scoped_key(
                draft.scope or draft.source, _key(draft.dedupe_key) or text_dedupe_key
            )
            if draft.suppressed_reason:
                # Never texted, so nobody's original: under the sender's key, a bounce or
                # an auto-reply (anyone may mail one with a page's words) silenced the
                # genuine page that came after it as its "duplicate".
                dedupe_key = scoped_key(NEVER_SENT, dedupe_key)
            for recipient in draft.recipients:
                if not is_assigned(recipient):
                    log.warning(
                        "%s is possible but not a known assigned number; sending anyway", recipient
                    )
                out.append(
                    NewMessage(
                        recipient=recipient,
                        text=text,
                        source=draft.source,
                        sender_id=draft.sender_id,
                        message_type=form.message_type,
                        parts=form.parts,
                        route=draft.route,
                        dedupe_key=dedupe_key,
                        schedule_time=draft.schedule_time,
                        state=State.SUPPRESSED if draft.suppressed_reason else State.QUEUED,
                        reason=reason,  # a mail's loop reason quotes its header
                        reason_kind="loop" if draft.suppressed_reason else None,
                        topic=topic,
                        instance=instance,
                        token=draft.token,
                        estimated_cost=self.prices.estimate(recipient, form.parts),
                    )
                )
        return out
