"""Per-sender rules for machine mail (pure): which lines of a long mail are texted.

Nagios, apcupsd, mdadm, fail2ban or Proxmox put the line that matters after lines of
boilerplate (or a whole log), so a text cut at `limits.max_parts` can lose it. The first
`[[smtp.rules]]` entry whose sender glob and subject pattern match picks the body's lines
before the text is composed: `keep` only lines matching one of its patterns, `drop` lines
matching one, put the `first_line_matching` line first (and the `last_line_matching` one
after it: a build log's last error is what failed the build), cut at `max_lines`. Patterns are
Python regular expressions matched case-insensitively anywhere in the line; sender globs
are matched against the From address and the envelope sender.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import re
from collections.abc import Sequence
from email.utils import parseaddr

from bridge.config import MailRule
from bridge.ingress.mail import MailText

_ADDRESS = re.compile(r"<([^<>]*)>")
ADDRESS_HEADER_CHARS = 998  # of a From header given to the address parser: one line's worth


@functools.lru_cache(maxsize=512)  # a few rules, each pattern compiled once
def _pattern(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE)


def _address(header: str) -> str:
    """`Name <a@b>` -> `a@b`; `a@b (Comment)`, as cron writes its From, -> `a@b` (the
    comment once stayed, and `*@host` missed cron's mail relayed with another envelope
    sender); lowercased. What the parser cannot read: the bracketed part, else as is."""
    address = parseaddr(header[:ADDRESS_HEADER_CHARS])[1]
    if not address:
        found = _ADDRESS.search(header)
        address = found.group(1) if found else header
    return address.strip().lower()


def _sender_matches(rule: MailRule, mail: MailText, mail_from: str | None) -> bool:
    addresses = [a for a in (_address(mail.sender), (mail_from or "").lower()) if a]
    return any(fnmatch.fnmatchcase(a, glob.lower()) for a in addresses for glob in rule.sender)


def rule_for(rules: Sequence[MailRule], mail: MailText, mail_from: str | None) -> MailRule | None:
    """The first rule whose sender and subject (each where given) match this mail."""
    for rule in rules:
        if rule.sender and not _sender_matches(rule, mail, mail_from):
            continue
        if rule.subject and not _pattern(rule.subject).search(mail.subject):
            continue
        return rule
    return None


def _any(patterns: Sequence[str], line: str) -> bool:
    return any(_pattern(p).search(line) for p in patterns)


def _matching(pattern: str, lines: Sequence[str]) -> str | None:
    """The first of `lines` that `pattern` matches; None for no pattern or no line."""
    if not pattern:
        return None
    found = _pattern(pattern)
    return next((line for line in lines if found.search(line)), None)


def apply_rule(rule: MailRule, mail: MailText) -> MailText:
    """The mail with its body reduced to the lines the rule picks, in the order it says."""
    lines = mail.body.split("\n") if mail.body else []
    picked = [
        line
        for line in lines
        if (not rule.keep or _any(rule.keep, line)) and not _any(rule.drop, line)
    ]
    # searched in the whole body: the line that matters may be one `keep` left out
    leads = [
        line
        for line in (
            _matching(rule.first_line_matching, lines),
            _matching(rule.last_line_matching, lines[::-1]),
        )
        if line is not None
    ]
    if leads:
        picked = [*dict.fromkeys(leads), *(line for line in picked if line not in leads)]
    if rule.max_lines:
        picked = picked[: rule.max_lines]
    return dataclasses.replace(mail, body="\n".join(picked))
