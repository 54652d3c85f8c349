"""Jinja2 text templates for SMS, sandboxed: a template from config can read, not act."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import SandboxedEnvironment

__all__ = ["TemplateError", "check_template", "render"]


@functools.lru_cache(maxsize=1)
def _environment() -> SandboxedEnvironment:
    # autoescape off: the output is an SMS, not HTML. trim_blocks keeps {% %} lines tidy.
    return SandboxedEnvironment(autoescape=False, trim_blocks=True, lstrip_blocks=True)


@functools.lru_cache(maxsize=256)
def _compiled(source: str) -> Any:
    return _environment().from_string(source)


def check_template(source: str) -> str | None:
    """None if `source` compiles, else the error to report."""
    try:
        _compiled(source)
    except TemplateError as exc:
        return f"template error: {exc}"
    return None


def render(source: str, context: Mapping[str, Any]) -> str:
    """Render or raise TemplateError (callers fall back to their default text)."""
    try:
        # One mapping, not keywords: a payload key `self` would clash with render's own.
        return str(_compiled(source).render(dict(context))).strip()
    except TemplateError:
        raise
    except Exception as exc:  # a filter or attribute blew up inside the sandbox
        raise TemplateError(f"{type(exc).__name__}: {exc}") from exc
