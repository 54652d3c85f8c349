"""Jinja2 text templates for SMS, sandboxed: a template from config can read, not act.

What a template may build and how many steps it may take, as the values it reads are
whoever posts to a route: `bridge.template_limits`, whose environment this renders with.

A field the payload lacks prints as "" (a sender's JSON varies), an attribute or item of
one too; `render_noting` says which did, so the hook's answer can tell the operator. A
payload's key never hides one of the template's own names (`range`...) where the template
calls it: every field is also under FIELDS.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from itertools import islice
from typing import Any

from jinja2 import TemplateError, UndefinedError, nodes
from jinja2.runtime import ChainableUndefined, Undefined
from jinja2.sandbox import SandboxedEnvironment

from bridge.template_limits import (
    MAX_OUTPUT_CHARS,
    MAX_STEPS,
    BoundedEnvironment,
    budget,
    counted,
    read_bounded,
)

__all__ = [
    "FIELDS",
    "MAX_OUTPUT_CHARS",
    "MAX_STEPS",
    "Rendered",
    "TemplateError",
    "check_template",
    "render",
    "render_noting",
]

# How many missing fields `render_noting` reports: a name may be a payload's value
# (`labels[payload.key]`), and the report goes into the 202 and the log. Each whole:
# whoever tells of it masks our secrets in it first and only then cuts it
# (`bridge.ingress.templated`), so no part of a secret is left past the cut.
MAX_MISSING = 20

# The names printed as "" because the payload lacked them, in this render.
_missing: ContextVar[list[str] | None] = ContextVar("template_missing", default=None)


class _Undefined(ChainableUndefined):
    """A missing field: prints as "" (a sender's JSON varies), and is noted when it does.
    Chainable: an attribute or item of a missing field is as missing as the field (it was
    a template failure, `'labels' is undefined`, where the field alone printed as "")."""

    __slots__ = ()

    def _refused(self) -> bool:
        """The sandbox's refusal of an attribute (`x.__class__`), not a missing field: it
        fails the template, or a probe of the sandbox reads as a field the payload lacks."""
        return self._undefined_exception is not UndefinedError

    def __getattr__(self, name: str) -> Any:
        if self._refused():  # as Undefined: a dunder Python looks for is not there
            return Undefined.__getattr__(self, name)
        return super().__getattr__(name)

    def __getitem__(self, key: Any) -> Any:
        if self._refused():
            self._fail_with_undefined_error()
        return super().__getitem__(key)

    def __str__(self) -> str:
        if self._refused():
            self._fail_with_undefined_error()
        noted = _missing.get()
        if noted is not None and self._undefined_name is not None:
            noted.append(str(self._undefined_name))
        return ""


@functools.lru_cache(maxsize=1)
def _environment() -> SandboxedEnvironment:
    # autoescape off: the output is an SMS, not HTML. trim_blocks keeps {% %} lines tidy.
    return BoundedEnvironment(
        autoescape=False, trim_blocks=True, lstrip_blocks=True, undefined=_Undefined
    )


@dataclass(frozen=True, slots=True)
class _Compiled:
    template: Any
    called: frozenset[str]  # the template's own names (`range`...) it calls


@functools.lru_cache(maxsize=256)
def _compiled(source: str) -> _Compiled:
    environment = _environment()
    tree = environment.parse(source)
    own = environment.globals.keys()
    called = frozenset(
        call.node.name
        for call in tree.find_all(nodes.Call)
        if isinstance(call.node, nodes.Name) and call.node.name in own
    )
    return _Compiled(environment.from_string(tree), called)


def check_template(source: str) -> str | None:
    """None if `source` compiles, else the error to report."""
    try:
        _compiled(source)
    except TemplateError as exc:
        return f"template error: {exc}"
    return None


@dataclass(frozen=True, slots=True)
class Rendered:
    """A template's output, and the fields it printed as "" because the payload lacked
    them (each name once, in the order met; the first MAX_MISSING, each whole)."""

    text: str
    missing: tuple[str, ...] = ()


# The name under which a template finds all of what it is given: a field that one of the
# template's own names (`range`, `dict`...) hides is `fields.range` (or `fields["range"]`).
FIELDS = "fields"


def _fields(context: Mapping[str, Any], called: frozenset[str]) -> dict[str, Any]:
    """What a template reads: its context, bar the keys that would hide one of the
    template's own names it calls (a payload's `range` made `range(3)` a call of its
    number, a template failure), and all of it as FIELDS. A name the template only
    prints is the payload's (`{{ namespace }}` of a Kubernetes payload printed
    "<class 'jinja2.utils.Namespace'>" when the template's own name won everywhere)."""
    fields = counted(dict(context))
    reserved = called | {FIELDS}
    own = {key: value for key, value in fields.items() if key not in reserved}
    return {**own, FIELDS: fields}


def render_noting(source: str, context: Mapping[str, Any]) -> Rendered:
    """Render or raise TemplateError (callers fall back to their default text)."""
    noting = _missing.set([])
    try:
        with budget():
            # One mapping, not keywords: a payload key `self` would clash with render's own.
            compiled = _compiled(source)
            text = read_bounded(compiled.template.generate(_fields(context, compiled.called)))
        _check_encodable(text)
        # Each name once before any is read whole: a loop may look one up 250,000 times.
        names = islice(dict.fromkeys(_missing.get() or ()), MAX_MISSING)
        return Rendered(text, tuple(dict.fromkeys(map(_utf8, names))))
    except TemplateError as exc:
        if (why := _utf8(str(exc))) != str(exc):
            raise TemplateError(why) from exc
        raise
    except Exception as exc:  # a filter or attribute blew up inside the sandbox
        raise TemplateError(_utf8(f"{type(exc).__name__}: {exc}")) from exc
    finally:
        _missing.reset(noting)


def _utf8(text: str) -> str:
    """`text` (a name the template looked up, an error quoting one) as UTF-8 can write
    it: a lone surrogate the template made of a payload's number (`"%c" | format(55296)`)
    as its escape, `\\ud800`. Raw, the 202, the console's page and the store failed on it."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _check_encodable(text: str) -> None:
    """A TemplateError if UTF-8 cannot write `text`: a lone surrogate the template made
    of a payload's number is no character a phone can show, and the text failed where it
    was first encoded (its dedupe key: a 500 on every retry, nothing stored). Failed, the
    template's text gives way to the default text, and the sender hears why."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        char = f"\\u{ord(text[exc.start]):04x}"
        raise TemplateError(
            f"it rendered a lone surrogate, {char}, which no phone can show"
        ) from None


def render(source: str, context: Mapping[str, Any]) -> str:
    """Render or raise TemplateError (callers fall back to their default text). An
    output that shows nothing (`bridge.text.is_blank`) is ""."""
    return render_noting(source, context).text
