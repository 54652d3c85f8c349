"""Webhook payload formats: each module turns one sender's JSON into SMS messages.

A format exposes `parse(request) -> list[HookMessage]`, may expose `verify(request)` (a
signature check over the raw body, raising `Unauthorized`), and has a `SAMPLE` payload
that `check-config` renders each route's template against. Payload problems raise
`InputError` naming the field; events a route does not text raise `Ignored`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from bridge.config import RouteConfig
from bridge.errors import BridgeError, InputError


class Unauthorized(BridgeError):
    """Missing or wrong token, basic auth or signature: 401, nothing stored."""


class Ignored(BridgeError):
    """A valid request that sends nothing (a ping, a filtered event): 200 with the reason."""


@dataclass(frozen=True, slots=True)
class HookRequest:
    route: RouteConfig
    headers: Mapping[str, str]  # case-insensitive (Starlette's Headers)
    body: bytes
    payload: Any
    query: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class HookMessage:
    text: str  # the format's default text
    context: dict[str, Any]  # what a route's template sees
    dedupe_key: str | None = None
    recipients: tuple[str, ...] = ()  # recipients named by the payload itself
    topic: str | None = None  # what a storm digest counts it as (e.g. the alert name)
    instance: str | None = None  # what a storm digest names besides (e.g. the host)


def obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InputError(where, "must be a JSON object")
    return value


def field_of(payload: dict[str, Any], key: str, inner: str, where: str = "") -> Any:
    """`payload[key][inner]`, None when `payload[key]` is absent or null.

    An optional sub-object that is not an object (`"actor": "str"`) is a 400 naming it,
    like every other field of the wrong type, not an AttributeError on `.get`.
    """
    return obj(payload.get(key) or {}, where or key).get(inner)


def text_field(value: Any, where: str, default: str = "") -> str:
    if value is None:
        return default
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise InputError(where, "must be a string")
    return str(value)


def dig(payload: Any, path: str) -> Any:
    """`a.b.0.c` through objects and lists; None where the path does not lead."""
    current = payload
    for part in path.split(".") if path else []:
        if isinstance(current, dict):
            current = current.get(part)
        elif isinstance(current, list) and part.isdigit() and int(part) < len(current):
            current = current[int(part)]
        else:
            return None
    return current


def check_filters(
    route: RouteConfig, outcome: str, branch: str, default_outcomes: tuple[str, ...]
) -> None:
    """CI formats: text only the route's outcomes (default: failures) on its branches."""
    if outcome not in (route.conclusions or default_outcomes):
        raise Ignored(f"{outcome or 'no outcome'} is not texted by this route")
    if route.branches and branch not in route.branches:
        raise Ignored(f"branch {branch} is not texted by this route")


def registry() -> dict[str, ModuleType]:
    from bridge.formats import alertmanager, generic, github, gitlab, grafana

    return {
        "alertmanager": alertmanager,
        "grafana": grafana,
        "github": github,
        "gitlab": gitlab,
        "generic": generic,
    }


def template_problems(
    routes: Mapping[str, RouteConfig],
    render: Callable[[str, Mapping[str, Any]], str],
    warnings: list[tuple[str, str]] | None = None,
) -> list[tuple[str, str]]:
    """Render each route's template against its format's sample payload.

    A format whose payload has a fixed shape (Alertmanager, GitHub...) makes any failure a
    problem. A `generic` route receives whatever JSON its sender posts, so the sample is
    only an example: a template that fails on it (say `{{ build.number }}` for Jenkins) is
    reported in `warnings`, and only a template that cannot compile is a problem.
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
        try:
            for message in module.parse(sample):
                render(route.template, message.context)
        except Ignored:
            continue
        except Exception as exc:
            why = f"fails on a sample {route.format} payload: {type(exc).__name__}: {exc}"
            example_only = getattr(module, "SAMPLE_IS_EXAMPLE", False)
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
    return problems
