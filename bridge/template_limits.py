"""What a route's template may cost: the sizes it may build and the steps it may take.

The values a template reads come from whoever posts to a route (anyone, on a public one),
so the sandbox also bounds what a value can make it build: a string or list repeated
with `*`, or a power, past `MAX_OUTPUT_CHARS` is an error, and the output is read only
up to that many characters (`read_bounded`: an SMS is at most 10 parts; the rest would
be cut anyway, after a character-by-character count over all of it that held the event
loop for seconds). Likewise every size a template passes to what pads or fills
(`center(n)`, `indent(n)`, a `%*s` or `{:>{n}}` width or precision, `ljust`, `zfill`,
`slice(n)`, `tojson(n)`...) above `MAX_OUTPUT_CHARS`, and what grows a text by more than
that (`replace`, `join`'s separators, `indent`'s and `wordwrap`'s strings,
`expandtabs`): each built its whole result, a gigabyte for `{"n": 1000000000}`, before
the output was cut.

And what it can make it do: a render runs on the event loop, so it has `MAX_STEPS`
(`budget`). An item of a payload's list or object iterated (`counted`), an item of
anything else a `{% for %}` walks (a string's characters too), a number of `range()`,
an attribute, item or call each take one, and so does each character or item a filter
walks in Python (`title`, `wordwrap`, `urlize`, `unique`, `map`... on a payload's
megabyte of text were seconds); past them the render is an error (a loop over a
payload's list inside another over it, with a long list, was minutes of a stopped
bridge). `lipsum` is gone: no SMS wants lorem ipsum, and a payload's number of
paragraphs was seconds each.

`BoundedEnvironment` is the sandbox with all of these; `bridge.templates` renders with it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from collections.abc import Callable, Iterable, Iterator, MappingView
from contextvars import ContextVar
from typing import Any

from jinja2 import filters, nodes, pass_environment, pass_eval_context
from jinja2.exceptions import SecurityError, UndefinedError
from jinja2.nodes import EvalContext
from jinja2.runtime import ChainableUndefined, Context, LoopContext, Undefined
from jinja2.sandbox import SandboxedEnvironment, SandboxedFormatter, safe_range

from bridge.text import blank_prefix

__all__ = [
    "MAX_OUTPUT_CHARS",
    "MAX_POWER_BITS",
    "MAX_STEPS",
    "BoundedEnvironment",
    "budget",
    "counted",
    "read_bounded",
]

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
            raise SecurityError(
                f"more than {MAX_STEPS} steps (loops over loops, or filters over a long text?)"
            )


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


def counted(value: Any) -> Any:
    """`value` with its lists and objects (JSON's, as parsed) counting their iteration."""
    if type(value) is dict:
        return _Dict((key, counted(item)) for key, item in value.items())
    if type(value) is list:
        return _List(counted(item) for item in value)
    return value


def _range(*args: int) -> range:
    numbers = safe_range(*args)  # at most MAX_RANGE numbers
    _step(len(numbers))
    return numbers


def _iterated(value: Any) -> Any:
    """What a `{% for %}` walks, each item a step: a string's characters were none (a
    loop over a payload's text inside another was millions of unbudgeted turns). A
    payload's list or object charges itself when iterated (its `.items()` too: a view
    of a dict the template made holds what the template wrote), and `range()` when
    made; anything else sized (a string, a list a filter built) is charged up front, as
    they are; the rest item by item."""
    if isinstance(value, _List | _Dict | Undefined | range | MappingView):
        return value
    if isinstance(value, str | list | tuple | dict | set | frozenset):
        _step(len(value))
        return value
    return _stepping(value)


def _stepping(items: Iterable[Any]) -> Iterator[Any]:
    for item in items:
        _step()
        yield item


def _counting_loops(template: nodes.Template) -> nodes.Template:
    """Every `{% for %}` of `template` walks its iterable through `_iterated`."""
    for loop in template.find_all(nodes.For):
        loop.iter = nodes.Call(
            nodes.EnvironmentAttribute("iterated"), [loop.iter], [], None, None
        ).set_lineno(loop.lineno)
    return template


# -- sizes a template passes to what pads, fills or grows a text ---------------------


def _check_size(size: Any, what: str) -> None:
    """Refuse a width or count past MAX_OUTPUT_CHARS: no SMS needs it, and the whole of
    it was built before the output was cut."""
    if isinstance(size, int) and size > MAX_OUTPUT_CHARS:
        raise SecurityError(f"{what} of {size} (limit {MAX_OUTPUT_CHARS})")


def _check_growth(size: int, what: str) -> None:
    """Refuse a result more than MAX_OUTPUT_CHARS longer than what it was made from."""
    if size > MAX_OUTPUT_CHARS:
        raise SecurityError(f"{what} adds {size} characters (limit {MAX_OUTPUT_CHARS})")


# A printf conversion: mapping key, flags, width, precision, length modifier, type.
_PRINTF = re.compile(r"%(\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d*))?[hlL]?(.?)", re.DOTALL)


def _check_printf(template: str, arguments: Any) -> None:
    """The widths and precisions of a `%` format, `*` ones read from its arguments."""
    values = list(arguments) if isinstance(arguments, tuple) else [arguments]
    position = 0
    for match in _PRINTF.finditer(template):
        key, width, precision, kind = match.groups()
        if kind == "%":
            continue
        for size in (width, precision):
            if size == "*":
                _check_size(values[position] if position < len(values) else 0, "a % width")
                position += 1
            elif size:
                _check_size(int(size), "a % width or precision")
        position += key is None


def _check_format_spec(spec: str) -> None:
    """The width and precision of a `str.format` field, nested fields already filled."""
    for number in re.findall(r"\d+", spec):
        _check_size(int(number), "a format width or precision")


class _Formatter(SandboxedFormatter):
    def format_field(self, value: Any, format_spec: str) -> Any:
        _check_format_spec(format_spec)
        return super().format_field(value, format_spec)


def _checked_str_method(method: Any, args: tuple[Any, ...]) -> None:
    """The str methods that pad or grow: `'x'.center(n)`, `sep.join(xs)`..."""
    owner, name = getattr(method, "__self__", None), getattr(method, "__name__", "")
    if not isinstance(owner, str):
        return
    if name in ("center", "ljust", "rjust", "zfill") and args:
        _check_size(args[0], f"a width for {name}")
    elif name == "expandtabs":
        tab = args[0] if args and isinstance(args[0], int) else 8
        _check_growth(owner.count("\t") * max(tab, 0), "expandtabs")
    elif name == "replace" and len(args) >= 2:
        _check_replace(owner, args[0], args[1], args[2] if len(args) > 2 else -1)
    elif name == "join" and args:
        _check_join(args[0], owner)


def _check_replace(value: str, old: Any, new: Any, count: Any) -> None:
    if not (isinstance(old, str) and isinstance(new, str)):
        return
    found = len(value) + 1 if not old else value.count(old)
    if isinstance(count, int) and count >= 0:
        found = min(found, count)
    _check_growth(found * (len(new) - len(old)), "a replace")


def _check_join(items: Any, separator: Any) -> None:
    if isinstance(separator, str) and hasattr(items, "__len__"):
        _check_growth(max(len(items) - 1, 0) * len(separator), "a join's separators")


def _lines(value: str) -> int:
    return value.count("\n") + 1


def _center(value: Any, width: Any = 80) -> str:
    _check_size(width, "a width for center")
    return filters.do_center(value, width)


def _format(value: Any, *args: Any, **kwargs: Any) -> str:
    _check_printf(str(value), kwargs or args)
    return filters.do_format(value, *args, **kwargs)


def _indent(value: Any, width: Any = 4, first: bool = False, blank: bool = False) -> str:
    _check_size(width, "a width for indent")
    indention = len(width) if isinstance(width, str) else width
    if isinstance(value, str) and isinstance(indention, int):
        _check_growth(_lines(value) * indention, "an indent")
    return filters.do_indent(value, width, first, blank)


@pass_eval_context
def _replace(eval_ctx: EvalContext, value: Any, old: Any, new: Any, count: Any = None) -> str:
    if isinstance(value, str):
        _check_replace(value, old, new, -1 if count is None else count)
    return filters.do_replace(eval_ctx, value, old, new, count)


@pass_eval_context
def _join(eval_ctx: EvalContext, value: Any, d: str = "", attribute: Any = None) -> str:
    _check_join(value, d)
    return filters.sync_do_join(eval_ctx, value, d, attribute)


@pass_environment
def _wordwrap(environment: Any, value: Any, width: Any = 79, *args: Any, **kwargs: Any) -> str:
    wrapstring = kwargs.get("wrapstring", args[1] if len(args) > 1 else None)
    if isinstance(value, str) and isinstance(width, int) and isinstance(wrapstring, str):
        lines = len(value) // max(width, 1) + _lines(value)
        _check_growth(lines * len(wrapstring), "a wordwrap")
    return filters.do_wordwrap(environment, value, width, *args, **kwargs)


def _slice(value: Any, slices: Any, fill_with: Any = None) -> Iterator[list[Any]]:
    _check_size(slices, "a count for slice")
    return filters.sync_do_slice(value, slices, fill_with)


def _batch(value: Any, linecount: Any, fill_with: Any = None) -> Iterator[list[Any]]:
    if fill_with is not None:
        _check_size(linecount, "a count for batch")
    return filters.do_batch(value, linecount, fill_with)


def _dumps(value: Any, **options: Any) -> str:
    """`json.dumps` for `tojson`: an `indent` (a payload's number, or a string) put
    before every line, each time once per level, past MAX_OUTPUT_CHARS more than the
    compact JSON is refused, as it is built."""
    indent = options.get("indent")
    if indent is None:
        return json.dumps(value, **options)
    _check_size(len(indent) if isinstance(indent, str) else indent, "an indent for tojson")
    limit = len(json.dumps(value, **{**options, "indent": None})) + MAX_OUTPUT_CHARS
    chunks: list[str] = []
    size = 0
    for chunk in json.JSONEncoder(**options).iterencode(value):
        size += len(chunk)
        if size > limit:
            _check_growth(size - limit + MAX_OUTPUT_CHARS, "a tojson indent")
        chunks.append(chunk)
    return "".join(chunks)


def _charge(value: Any, weight: int) -> None:
    """`weight` steps per item of what a filter walks item by item in Python: a string's
    characters (or words), a list a filter built. A payload's list or object charges
    itself when walked; what a filter yields lazily was charged at its source."""
    if isinstance(value, _List | _Dict | Undefined):
        return
    if isinstance(value, str | list | tuple | dict | set | frozenset):
        _step(len(value) * weight)


def _walking(function: Callable[..., Any], weight: int) -> Callable[..., Any]:
    """`function` (a filter) charging its value first (`_charge`)."""
    passed = 1 if hasattr(function, "jinja_pass_arg") else 0  # context or environment first

    @functools.wraps(function)  # and its `jinja_pass_arg`, so Jinja passes the same
    def walk(*args: Any, **kwargs: Any) -> Any:
        if len(args) > passed:
            _charge(args[passed], weight)
        return function(*args, **kwargs)

    return walk


# The filters that walk their value in Python, not C, and the steps each item costs
# them (about a step's time: measured on a payload's megabyte of words, `urlize` held
# the event loop 5 s, `wordwrap(80)` and `unique` 2 s, `title` 1 s, the others less).
_WALKING_FILTERS = {
    "urlize": 8,
    "wordwrap": 4,
    "unique": 4,
    "title": 2,
    **dict.fromkeys(("urlencode", "wordcount", "striptags", "list", "map", "select"), 1),
    **dict.fromkeys(("reject", "selectattr", "rejectattr", "groupby", "sort", "batch"), 1),
    **dict.fromkeys(("slice", "sum", "min", "max", "random"), 1),
}

_BOUNDED_FILTERS: dict[str, Callable[..., Any]] = {
    "center": _center,
    "format": _format,
    "indent": _indent,
    "replace": _replace,
    "join": _join,
    "wordwrap": _wordwrap,
    "slice": _slice,
    "batch": _batch,
}


def _repeated_size(value: Any, times: Any) -> int:
    """len(value * times) for a sequence and a count, else 0."""
    if isinstance(value, str | list | tuple) and isinstance(times, int):
        return len(value) * max(times, 0)
    return 0


def _missing_chained(value: Any) -> bool:
    """Whether `value` is a missing field whose attributes and items are as missing:
    returned as it is, without the sandbox's checks of an attribute it makes up (they
    made a step of `missing.a.b` 2.4 times a step of a real field's)."""
    return isinstance(value, ChainableUndefined) and value._undefined_exception is UndefinedError


class BoundedEnvironment(SandboxedEnvironment):
    """Jinja's sandbox, bounded in what a template builds and in its steps: `range` and
    the filters that pad, grow or walk a text replaced by bounded ones, `lipsum` gone.
    A render takes its steps from a `budget()`."""

    intercepted_binops = frozenset(("*", "**", "%"))
    iterated = staticmethod(_iterated)

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.globals["range"] = _range
        del self.globals["lipsum"]
        self.filters.update(_BOUNDED_FILTERS)
        for name, weight in _WALKING_FILTERS.items():
            self.filters[name] = _walking(self.filters[name], weight)
        self.policies["json.dumps_function"] = _dumps

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        return _counting_loops(super()._parse(source, name, filename))

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        # As the sandbox's own, with a formatter that checks each field's width.
        wrapped = super().wrap_str_format(value)
        if wrapped is None or type(value.__self__) is not str:  # a Markup's escapes stay
            return wrapped
        template, formatter = value.__self__, _Formatter(self)

        def checked(*args: Any, **kwargs: Any) -> str:
            if value.__name__ != "format_map":
                return formatter.vformat(template, args, kwargs)
            if kwargs or len(args) != 1:
                raise TypeError("format_map() takes exactly one argument")
            return formatter.vformat(template, (), args[0])

        return checked

    def getattr(self, obj: Any, attribute: str) -> Any:
        _step()
        if _missing_chained(obj):
            return obj
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _step()
        if _missing_chained(obj):
            return obj
        return super().getitem(obj, argument)

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        _step()
        _checked_str_method(obj, args)
        if isinstance(obj, LoopContext) and args:  # a recursive loop's `loop(children)`
            args = (_iterated(args[0]), *args[1:])
        return super().call(context, obj, *args, **kwargs)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            size = max(_repeated_size(left, right), _repeated_size(right, left))
            if size > MAX_OUTPUT_CHARS:
                raise SecurityError(f"repetition of {size} items (limit {MAX_OUTPUT_CHARS})")
        elif operator == "%" and isinstance(left, str):
            _check_printf(left, right)
        elif (
            operator == "**"
            and isinstance(left, int)
            and isinstance(right, int)
            and abs(left) > 1
            and left.bit_length() * right > MAX_POWER_BITS
        ):
            raise SecurityError(f"power too large ({left} ** {right})")
        return super().call_binop(context, operator, left, right)


@contextlib.contextmanager
def budget() -> Iterator[None]:
    """MAX_STEPS for the render run inside (in this thread or task)."""
    steps = _steps_left.set([MAX_STEPS])
    try:
        yield
    finally:
        _steps_left.reset(steps)


def read_bounded(chunks: Any) -> str:
    """The stripped output of a render's generator, read up to MAX_OUTPUT_CHARS past its
    leading blanks (white space, and what else a phone shows as nothing:
    `bridge.text.is_blank`; 16 KiB of zero-width spaces before a payload's words were
    all that was read, a blank text)."""
    kept: list[str] = []
    size = 0
    try:
        for chunk in chunks:
            if not kept:
                chunk = chunk[blank_prefix(chunk) :]
                if not chunk:
                    continue
            kept.append(chunk[: MAX_OUTPUT_CHARS - size])
            size += len(kept[-1])
            if size >= MAX_OUTPUT_CHARS:
                break
    finally:
        chunks.close()
    return "".join(kept).strip()
