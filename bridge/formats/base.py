"""What every webhook format shares: the request and message types, the two outcomes
that are not messages (`Unauthorized`, `Ignored`) and small payload readers.

Apart from `bridge.formats` (the registry) so the format modules import this and the
registry imports them: one direction, no cycle.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
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
