"""Webhook payload formats: each module turns one sender's JSON into SMS messages.

A format exposes `parse(request) -> list[HookMessage]`, may expose `verify(request, now)`
(a signature check over the raw body, raising `Unauthorized`; `now` for timestamped
signatures), may name a `FORM_FIELD` (the form field that holds the JSON when its sender
posts `application/x-www-form-urlencoded`), and has a `SAMPLE` payload that `check-config`
renders each route's template against. Payload problems raise `InputError` naming the field; events a route does not
text raise `Ignored`. The shared types live in `bridge.ingress.formats.base`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any

from bridge.config import RouteConfig
from bridge.ingress.formats import alertmanager, generic, github, gitlab, grafana
from bridge.ingress.formats.base import (
    HookMessage,
    HookRequest,
    Ignored,
    Unauthorized,
    check_filters,
    dig,
    field_of,
    obj,
    text_field,
)
from bridge.text import is_blank

if TYPE_CHECKING:
    from bridge.templates import Rendered

__all__ = [
    "HookMessage",
    "HookRequest",
    "Ignored",
    "Unauthorized",
    "check_filters",
    "dig",
    "field_of",
    "obj",
    "registry",
    "template_problems",
    "text_field",
]


def registry() -> dict[str, ModuleType]:
    return {
        "alertmanager": alertmanager,
        "grafana": grafana,
        "github": github,
        "gitlab": gitlab,
        "generic": generic,
    }


def template_problems(
    routes: Mapping[str, RouteConfig],
    render: Callable[[str, Mapping[str, Any]], Rendered],
    warnings: list[tuple[str, str]] | None = None,
) -> list[tuple[str, str]]:
    """Render each route's template against its format's sample payload.

    A format whose payload has a fixed shape (Alertmanager, GitHub...) makes any failure a
    problem. A `generic` route receives whatever JSON its sender posts, so the sample is
    only an example: a template that fails on it is reported in `warnings`, and only a
    template that cannot compile is a problem. A template that renders nothing on the
    sample is a warning: the default text goes out. So is one that prints as empty a
    field the sample lacks (say `{{ build.number }}` for Jenkins, or a typo: a missing
    field's attribute is missing too, no failure, so this is where a typo shows).
    """
    from jinja2 import TemplateSyntaxError

    problems = []
    formats = registry()
    for name, route in routes.items():
        if not route.template:
            continue
        module = formats[route.format]
        sample = HookRequest(
            route=route,
            headers=getattr(module, "SAMPLE_HEADERS", {}),
            body=b"",
            payload=module.SAMPLE,
        )
        example_only = getattr(module, "SAMPLE_IS_EXAMPLE", False)
        try:
            # each message rendered, so that a later one's failure is seen
            rendered = [render(route.template, m.context) for m in module.parse(sample)]
        except Ignored:
            continue
        except Exception as exc:
            why = f"fails on a sample {route.format} payload: {type(exc).__name__}: {exc}"
            if example_only and not isinstance(exc, TemplateSyntaxError):
                if warnings is not None:
                    warnings.append(
                        (
                            f"routes.{name}.template",
                            f"{why} (fine if your sender's JSON has these fields)",
                        )
                    )
                continue
            problems.append((f"routes.{name}.template", why))
            continue
        if warnings is None:
            continue
        missing = dict.fromkeys(field for r in rendered for field in r.missing)
        if missing:
            known = _keys([module.SAMPLE, *(m.context for m in module.parse(sample))])
            warnings.append(
                (
                    f"routes.{name}.template",
                    f"prints as empty what a sample {route.format} payload lacks:"
                    f" {', '.join(_guessed(field, known) for field in missing)}"
                    + (
                        " (fine if your sender's JSON has these fields)"
                        if example_only
                        # A fixed format's labels, annotations and many fields are the
                        # sender's own, beyond the sample's few: not all a typo.
                        else " (a misspelt field, or one your payloads have and the sample"
                        ' lacks: `| default("")` on one they may lack says so)'
                    ),
                )
            )
        if any(is_blank(r.text) for r in rendered):
            # Rendered as it may be meant (`{% if status == "resolved" %}`), but what
            # goes out then is the route's default text, not nothing.
            warnings.append(
                (
                    f"routes.{name}.template",
                    f"renders nothing on a sample {route.format} payload, and where it"
                    " renders nothing the route's default text goes out instead"
                    + (" (fine if your sender's JSON differs)" if example_only else ""),
                )
            )
    return problems


def _keys(values: list[Any]) -> list[str]:
    """Every key of `values`' objects, at any depth (a sample is small)."""
    keys: dict[str, None] = {}
    while values:
        value = values.pop()
        if isinstance(value, Mapping):
            keys.update(dict.fromkeys(str(key) for key in value))
            values.extend(value.values())
        elif isinstance(value, list):
            values.extend(value)
    return list(keys)


def _guessed(field: str, known: list[str]) -> str:
    """`field`, and the sample's key it may be a typo of (`commonLabel (commonLabels?)`)."""
    close = difflib.get_close_matches(field, known, n=1, cutoff=0.8)
    return f"{field} ({close[0]}?)" if close and close[0] != field else field
