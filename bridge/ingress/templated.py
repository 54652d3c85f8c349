"""A sender's template as the operator hears of it: a webhook route's `template`, a
mail's `compose = "template"` (`smtp.template` or a rule's). One report for both: its
text, or why the default text went out instead, and the fields it printed as empty
because the payload (or the mail) lacked them; logged, noted on the message (its
events: the console's page, `GET /api/v1/messages/{id}`) and, for a route, in the 202.

What is told may quote what a sender wrote (a name the template looked up may be a
payload's value, an error may quote one): each piece is told without NUL and the
explicit bidi controls, with our secrets masked, and only then cut. Cut first, a
secret that crossed the cut kept its head unmasked in the note and the log.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bridge.config.masking import mask
from bridge.templates import TemplateError, render_noting
from bridge.text import is_blank, without_bidi

log = logging.getLogger(__name__)
NAME_CHARS = 100  # of each missing field's name told
WHY_CHARS = 300  # of a template's error told


@dataclass(frozen=True, slots=True)
class Templated:
    """The text of one message a template was asked for, and what the operator should
    hear of it. `text` is "" where the default text goes out: the caller puts it in."""

    text: str
    default_text: str | None = None  # why the template's text did not go out (None: it did)
    missing: tuple[str, ...] = ()  # fields it printed as "": the payload lacked them
    instead: str = "the default text"  # what went out in its place, in the note's words
    lacking: str = "payload"  # what the fields are of, in the note's words

    def note(self) -> str | None:
        """What the message's events say of its text: why the template's text did not go
        out, or the fields it printed as empty. Its pieces are masked already."""
        if self.default_text:
            return f"{self.instead} went out: {self.default_text}"
        if self.missing:
            return f"the template printed as empty what the {self.lacking} lacks: " + ", ".join(
                self.missing
            )
        return None


def told(text: str, secrets: Sequence[str], chars: int) -> str:
    """`text` (a sender's words) as the operator is told it: without NUL (no store
    keeps it) and bidi controls, then masked as the log is, then cut to `chars`. In that
    order: a secret split by either is whole once they are out, and is masked whole."""
    return mask(without_bidi(text.replace("\x00", "")), secrets)[:chars]


def render_template(
    source: str,
    context: Mapping[str, Any],
    *,
    secrets: Sequence[str],
    where: str,
    instead: str = "the default text",
    lacking: str = "payload",
) -> Templated:
    """`source` rendered against `context`, told in the log under `where` (`route NAME`,
    `smtp.template`): a failure, or an output that shows nothing, is a Templated whose
    text is "" and whose `default_text` says why (the caller sends `instead`)."""
    try:
        rendered = render_noting(source, context)
    except TemplateError as exc:
        why = f"the template failed ({told(str(exc), secrets, WHY_CHARS)})"
        return _instead(Templated("", why, (), instead, lacking), where)
    missing = tuple(dict.fromkeys(told(name, secrets, NAME_CHARS) for name in rendered.missing))
    if missing:
        log.warning("%s: the %s lacks %s (printed as empty)", where, lacking, ", ".join(missing))
    if not is_blank(rendered.text):
        return Templated(rendered.text, None, missing, instead, lacking)
    why = "the template rendered nothing"
    if missing:
        why += f" (the {lacking} lacks {', '.join(missing)})"
    return _instead(Templated("", why, missing, instead, lacking), where)


def _instead(templated: Templated, where: str) -> Templated:
    log.error("%s: %s; using %s", where, templated.default_text, templated.instead)
    return templated
