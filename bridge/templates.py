"""Jinja2 text templates for SMS, sandboxed: a template from config can read, not act.

The values it reads come from whoever posts to a route (anyone, on a public one), so the
sandbox also bounds what a value can make it build: a string or list repeated with `*`,
or a power, past `MAX_OUTPUT_CHARS` is an error, and the output is read only up to that
many characters (an SMS is at most 10 parts; the rest would be cut anyway, after a
character-by-character count over all of it that held the event loop for seconds).

And what it can make it do: a render runs on the event loop, so it has `MAX_STEPS`. An
item of a payload's list or object iterated, a number of `range()`, an attribute, item
or call each take one; past them the render is an error (a loop over a payload's list
inside another over it, with a long list, was minutes of a stopped bridge). `lipsum` is
gone: no SMS wants lorem ipsum, and a payload's number of paragraphs was seconds each.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any

from jinja2 import TemplateError
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context
from jinja2.sandbox import SandboxedEnvironment, safe_range

__all__ = ["MAX_OUTPUT_CHARS", "MAX_STEPS", "TemplateError", "check_template", "render"]

# Far above the longest SMS (limits.max_parts <= 10: 1530 GSM septets), far below a size
# whose counting and cutting is noticed.
MAX_OUTPUT_CHARS = 16 * 1024
MAX_POWER_BITS = 64 * 1024  # an integer power this large is no SMS figure
# About a tenth of a second of the event loop at worst (measured: a loop in a loop
# reading an attribute each time, 0.1 s to its end); an alert template over a group
# of 2,000 alerts and their labels takes thousands.
MAX_STEPS = 250_000

# The steps left to the render running in this thread or task (None outside a render).
_steps_left: ContextVar[list[int] | None] = ContextVar("template_steps_left", default=None)


def _step(count: int = 1) -> None:
    left = _steps_left.get()
    if left is not None:
        left[0] -= count
        if left[0] < 0:
            raise SecurityError(f"more than {MAX_STEPS} steps (loops over loops?)")


class _List(list[Any]):
    """A payload's list: iterating it takes a step per item, charged up front."""

    def __iter__(self) -> Any:
        _step(len(self))
        return super().__iter__()


class _Dict(dict[str, Any]):
    """A payload's object: iterating it, or its keys, values or items, likewise."""

    def __iter__(self) -> Any:
        _step(len(self))
        return super().__iter__()

    def keys(self) -> Any:
        _step(len(self))
        return super().keys()

    def values(self) -> Any:
        _step(len(self))
        return super().values()

    def items(self) -> Any:
        _step(len(self))
        return super().items()


def _counted(value: Any) -> Any:
    """`value` with its lists and objects (JSON's, as parsed) counting their iteration."""
    if type(value) is dict:
        return _Dict((key, _counted(item)) for key, item in value.items())
    if type(value) is list:
        return _List(_counted(item) for item in value)
    return value


def _range(*args: int) -> range:
    numbers = safe_range(*args)  # at most MAX_RANGE numbers
    _step(len(numbers))
    return numbers


def _repeated_size(value: Any, times: Any) -> int:
    """len(value * times) for a sequence and a count, else 0."""
    if isinstance(value, str | list | tuple) and isinstance(times, int):
        return len(value) * max(times, 0)
    return 0


class _Environment(SandboxedEnvironment):
    intercepted_binops = frozenset(("*", "**"))

    def getattr(self, obj: Any, attribute: str) -> Any:
        _step()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _step()
        return super().getitem(obj, argument)

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        _step()
        return super().call(context, obj, *args, **kwargs)

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
    environment = _Environment(autoescape=False, trim_blocks=True, lstrip_blocks=True)
    environment.globals["range"] = _range
    del environment.globals["lipsum"]
    return environment


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
    steps = _steps_left.set([MAX_STEPS])
    try:
        # One mapping, not keywords: a payload key `self` would clash with render's own.
        return _bounded(_compiled(source).generate(_counted(dict(context))))
    except TemplateError:
        raise
    except Exception as exc:  # a filter or attribute blew up inside the sandbox
        raise TemplateError(f"{type(exc).__name__}: {exc}") from exc
    finally:
        _steps_left.reset(steps)
