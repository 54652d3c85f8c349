"""Jinja2 text templates for SMS, sandboxed: a template from config can read, not act.

The values it reads come from whoever posts to a route (anyone, on a public one), so the
sandbox also bounds what a value can make it build: a string or list repeated with `*`,
or a power, past `MAX_OUTPUT_CHARS` is an error, and the output is read only up to that
many characters (an SMS is at most 10 parts; the rest would be cut anyway, after a
character-by-character count over all of it that held the event loop for seconds).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from jinja2 import TemplateError
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context
from jinja2.sandbox import SandboxedEnvironment

__all__ = ["MAX_OUTPUT_CHARS", "TemplateError", "check_template", "render"]

# Far above the longest SMS (limits.max_parts <= 10: 1530 GSM septets), far below a size
# whose counting and cutting is noticed.
MAX_OUTPUT_CHARS = 16 * 1024
MAX_POWER_BITS = 64 * 1024  # an integer power this large is no SMS figure


def _repeated_size(value: Any, times: Any) -> int:
    """len(value * times) for a sequence and a count, else 0."""
    if isinstance(value, str | list | tuple) and isinstance(times, int):
        return len(value) * max(times, 0)
    return 0


class _Environment(SandboxedEnvironment):
    intercepted_binops = frozenset(("*", "**"))

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            size = max(_repeated_size(left, right), _repeated_size(right, left))
            if size > MAX_OUTPUT_CHARS:
                raise SecurityError(f"repetition of {size} items (limit {MAX_OUTPUT_CHARS})")
        elif (
            operator == "**"
            and isinstance(left, int)
            and isinstance(right, int)
            and abs(left) > 1
            and left.bit_length() * right > MAX_POWER_BITS
        ):
            raise SecurityError(f"power too large ({left} ** {right})")
        return super().call_binop(context, operator, left, right)


@functools.lru_cache(maxsize=1)
def _environment() -> SandboxedEnvironment:
    # autoescape off: the output is an SMS, not HTML. trim_blocks keeps {% %} lines tidy.
    return _Environment(autoescape=False, trim_blocks=True, lstrip_blocks=True)


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


def _bounded(chunks: Any) -> str:
    """The stripped output, read up to MAX_OUTPUT_CHARS past its leading whitespace."""
    kept: list[str] = []
    size = 0
    try:
        for chunk in chunks:
            if not kept:
                chunk = chunk.lstrip()
                if not chunk:
                    continue
            kept.append(chunk[: MAX_OUTPUT_CHARS - size])
            size += len(kept[-1])
            if size >= MAX_OUTPUT_CHARS:
                break
    finally:
        chunks.close()
    return "".join(kept).strip()


def render(source: str, context: Mapping[str, Any]) -> str:
    """Render or raise TemplateError (callers fall back to their default text)."""
    try:
        # One mapping, not keywords: a payload key `self` would clash with render's own.
        return _bounded(_compiled(source).generate(dict(context)))
    except TemplateError:
        raise
    except Exception as exc:  # a filter or attribute blew up inside the sandbox
        raise TemplateError(f"{type(exc).__name__}: {exc}") from exc
