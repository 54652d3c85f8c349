"""The one recipient resolver: numbers, group names and mailboxes -> allowed E.164 numbers.

Built from a config once (phone rules, `[groups]`, the SMTP domains' regions) and handed
to every path that turns a written recipient into a number: the API, webhook routes, the
console, SMTP RCPT and DATA, the budget's admins and `check-config`. Before, each built
its own from pieces of the config, and one (the budget's admins) forgot
`phone.default_region`: `check-config` passed a national admin number that `serve` then
died on. One resolver, one answer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from bridge.config.sections import Config
from bridge.errors import InputError
from bridge.firewall import Firewall, RefusedNumber
from bridge.phone import PhoneError


@dataclass(frozen=True, slots=True)
class Recipients:
    firewall: Firewall  # phone.*: the default region, which numbers may be texted
    groups: Mapping[str, tuple[str, ...]]  # [groups]: name -> members as written
    group_names: Mapping[str, str]  # a group's name in lower case -> its name as written
    mail_regions: Mapping[str, str]  # SMTP domain (lower case) -> region of national numbers
    mail_region: str | None = None  # smtp.default_region: mail to other domains

    @classmethod
    def from_config(cls, config: Config) -> Recipients:
        smtp = config.smtp
        return cls(
            firewall=Firewall.from_config(config),
            groups=dict(config.groups),
            group_names={name.lower(): name for name in config.groups},
            mail_regions={d.lower(): r.upper() for d, r in smtp.regions.items()},
            mail_region=smtp.default_region.upper() or None,
        )

    def group(self, name: str) -> tuple[str, ...] | None:
        """The members of the group `name`, in any case (`OnCall` is `oncall`: a mail's
        local part is read case-blind, and an API caller or a route names groups by the
        same rule), or None. The config refuses two groups that differ only by case."""
        written = self.group_names.get(name.lower())
        return None if written is None else self.groups[written]

    def number(self, text: str, *, region: str | None = None) -> str:
        """One number as written -> E.164: PhoneError if impossible, RefusedNumber if not
        allowed. `region` (an SMTP domain's) wins over `phone.default_region`."""
        return self.firewall.number(text, region=region)

    def resolve(self, targets: Iterable[str], *, field: str = "to") -> list[str]:
        """Numbers and group names -> unique allowed E.164 numbers in first-seen order;
        an InputError names the entry (`to[2]`, `to[0] (oncall)`) and why."""
        seen: dict[str, None] = {}
        for index, target in enumerate(targets):
            members = self.group(target)
            for item in members if members is not None else [target]:
                try:
                    seen[self.number(item)] = None
                except (PhoneError, RefusedNumber) as exc:
                    where = (
                        f"{field}[{index}]" if members is None else f"{field}[{index}] ({target})"
                    )
                    typo = unknown_group(item) if members is None else None
                    raise InputError(where, typo or str(exc)) from exc
        return list(seen)

    def mailbox(self, local: str, domain: str) -> list[str]:
        """`GROUP@DOMAIN` (the group's name in any case) or `NUMBER@DOMAIN` -> numbers.

        A national NUMBER reads in the domain's `smtp.regions` entry, else
        `smtp.default_region`, else `phone.default_region`. A group's members read as
        everywhere else, in `phone.default_region`: the owner wrote them in it and
        check-config checked them so, whichever domain the mail names (in a domain's
        region, a German 0151... member was an Austrian +43 1 51...). PhoneError or
        RefusedNumber say why not; whether the domain is this bridge's is the listener's
        question.
        """
        members = self.group(local)
        if members is not None:
            return [self.number(member) for member in members]
        region = self.mail_regions.get(domain.lower()) or self.mail_region
        return [self.number(local, region=region)]


def unknown_group(target: str) -> str | None:
    """Why a recipient with letters in it was refused: it is a name, so a group's name
    misspelt, not a number with stray characters ("only digits..." sent people hunting
    for a bad number). None for what reads as a number."""
    if any(c.isalpha() for c in target):
        return f"no group named {target!r} in [groups]"
    return None
