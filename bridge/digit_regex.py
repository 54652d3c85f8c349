"""The phone metadata's regular expressions read into a tree (pure): the subset they use.

phonenumbers' national number patterns are regular expressions over the ten digits and
nothing else: digits, classes of digits (`[2-9]`, `[135]`, `[^0]`, `\\d`), groups
(`(...)`, `(?:...)`), alternation `|`, and greedy repeats (`?`, `*`, `+`, `{n}`, `{n,}`,
`{n,m}`). `bridge.digits` turns such a tree into an automaton. The reader is ours, not
CPython's `re._parser`: that module is private, and its node kinds and names have
changed between Python versions (`sre_parse` became `re._parser` in 3.11), so an
upgrade of Python could break the premium check at its first unknown number.

Anything outside the subset (a lookahead, a backreference, a lazy repeat, a letter...)
raises `Unsupported` naming the construct and where it is; `bridge.ranges` then reads
that one pattern with `re` itself. The tree matches what `re.fullmatch` matches on
strings of ASCII digits (the only strings it is asked about: national numbers), which a
test checks for every pattern of the installed metadata.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DIGITS = "0123456789"
ANY_DIGIT = frozenset(DIGITS)
MAX_REPEAT = 64  # a repeat is copied into the automaton this many times at most;
# numbers have at most 17 digits, and a pattern past it is read by `re` instead
_BOUNDS = re.compile(r"\{(\d+)(?:(,)(\d*))?\}")
_GROUPS = {  # what follows "(?" -> the construct, for the message
    "=": "a lookahead (?=...)",
    "!": "a negative lookahead (?!...)",
    "<": "a lookbehind or a named group (?<...)",
    "P": "a named group or a named backreference (?P...)",
    ">": "an atomic group (?>...)",
    "#": "a comment (?#...)",
    "(": "a conditional group (?(...)...)",
}


class Unsupported(ValueError):
    """A pattern with a construct outside the subset: digits, digit classes, groups,
    alternation and greedy repeats. The message names the construct."""


@dataclass(frozen=True, slots=True)
class Digit:
    """One digit among `allowed` (empty: none can be here, e.g. `[^0-9]`)."""

    allowed: frozenset[str]


@dataclass(frozen=True, slots=True)
class Concat:
    parts: tuple[Node, ...]  # one after the other; () matches the empty string


@dataclass(frozen=True, slots=True)
class Alternation:
    options: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Repeat:
    body: Node
    low: int
    high: int | None  # None: no upper bound


Node = Digit | Concat | Alternation | Repeat


def parse(pattern: str) -> Node:
    """The tree of `pattern`, or Unsupported."""
    reader = _Reader(pattern)
    node = reader.alternation()
    if reader.pos < len(pattern):  # an alternation stops early only at a ")"
        raise reader.unsupported("an unmatched ')'", reader.pos)
    return node


class _Reader:
    """Recursive descent over the grammar:

    alternation := sequence ("|" sequence)*
    sequence    := (atom repeat?)*
    atom        := digit | "\\d" | "[" class "]" | "(" ("?:")? alternation ")"
    repeat      := "?" | "*" | "+" | "{n}" | "{n,}" | "{n,m}"
    """

    def __init__(self, text: str) -> None:
        self.text, self.pos = text, 0

    def peek(self, ahead: int = 0) -> str:
        return self.text[self.pos + ahead : self.pos + ahead + 1]  # "" past the end

    def take(self) -> str:
        char = self.peek()
        self.pos += 1
        return char

    def unsupported(self, what: str, at: int) -> Unsupported:
        shown = self.text[at : at + 16]  # metadata patterns run to 1,400 characters
        return Unsupported(f"{what} at position {at} ({shown!r}) of a phone number pattern")

    def alternation(self) -> Node:
        options = [self.sequence()]
        while self.peek() == "|":
            self.pos += 1
            options.append(self.sequence())
        return options[0] if len(options) == 1 else Alternation(tuple(options))

    def sequence(self) -> Node:
        parts: list[Node] = []
        while self.peek() not in ("", "|", ")"):
            parts.append(self.repeat(self.atom()))
        return parts[0] if len(parts) == 1 else Concat(tuple(parts))

    def atom(self) -> Node:
        start, char = self.pos, self.take()
        if char in DIGITS:
            return Digit(frozenset(char))
        if char == "\\":
            return Digit(self.escape(start))
        if char == "[":
            return self.digit_class(start)
        if char == "(":
            if self.peek() == "?":
                if self.peek(1) != ":":
                    raise self.unsupported(_GROUPS.get(self.peek(1), "inline flags (?...)"), start)
                self.pos += 2
            inner = self.alternation()
            if self.take() != ")":
                raise self.unsupported("an unclosed group", start)
            return inner  # capturing or not, a group matches the same strings
        if char in "?*+{":
            raise self.unsupported(f"a repeat {char!r} of nothing", start)
        raise self.unsupported(f"the character {char!r}", start)  # . ^ $ letters...

    def escape(self, start: int) -> frozenset[str]:
        char = self.take()
        if char == "d":
            return ANY_DIGIT
        if char in DIGITS and char:
            raise self.unsupported(f"a backreference or octal escape \\{char}", start)
        raise self.unsupported(f"the escape \\{char}" if char else "a trailing '\\'", start)

    def digit_class(self, start: int) -> Digit:
        negate = self.peek() == "^"
        self.pos += negate
        allowed: set[str] = set()
        while self.peek() != "]" or not allowed:  # "]" first is a literal in `re`
            at, char = self.pos, self.take()
            if char == "\\":
                allowed |= self.escape(at)
            elif char not in DIGITS or not char:
                what = "an unclosed class" if not char else f"{char!r} in a class"
                raise self.unsupported(what, at if char else start)
            elif self.peek() == "-" and self.peek(1) not in ("]", ""):
                end = self.text[self.pos + 1]
                if end not in DIGITS or end < char:
                    raise self.unsupported(f"the range {char}-{end} in a class", at)
                self.pos += 2
                allowed.update(DIGITS[int(char) : int(end) + 1])
            else:
                allowed.add(char)
        self.pos += 1
        return Digit(ANY_DIGIT - allowed if negate else frozenset(allowed))

    def repeat(self, node: Node) -> Node:
        start, char = self.pos, self.peek()
        if char in ("?", "*", "+"):
            self.pos += 1
            low, high = {"?": (0, 1), "*": (0, None), "+": (1, None)}[char]
        elif char == "{":
            bounds = _BOUNDS.match(self.text, self.pos)
            if bounds is None:
                raise self.unsupported("a '{' that is not a repeat {n}, {n,} or {n,m}", start)
            self.pos = bounds.end()
            low = int(bounds[1])
            high = low if not bounds[2] else int(bounds[3]) if bounds[3] else None
            if max(low, high or 0) > MAX_REPEAT or (high is not None and high < low):
                raise self.unsupported(f"the repeat {bounds[0]}", start)
        else:
            return node
        if self.peek() and self.peek() in "?*+{":  # `re` reads *? and *+ as lazy, possessive
            raise self.unsupported("a lazy, possessive or repeated repeat", start)
        return Repeat(node, low, high)
