"""Phone-number patterns as automata over the ten digits (pure, bounded caches).

`bridge.ranges` asks, of every leading part of an unknown number, two questions of
each kind's patterns: is it a whole number of the kind (`accepts`), and can it be made
one by repeating a digit to a possible length (`completes`)? Asked with `re`, that was
one `fullmatch` per pattern, length and digit at each cut: ~1 ms per number, up to
~20 ms on a loaded machine, for +1's 25 regions of patterns. Here the patterns of one
kind become one automaton (the metadata's regexes are plain regular expressions over
digits, read with the `re` module's own parser), run once along the number; each state
met is remembered with both answers, so a later number that shares it pays a dict
lookup. The states are few (the metadata's patterns are prefix lists), and the memo is
cleared past `MAX_STATES`, so no stream of numbers makes it grow without bound.
"""

from __future__ import annotations

import re._constants as sre  # the parser's node kinds
import re._parser as sre_parse  # Python's own regex parser: the same reading as `re`
from collections.abc import Iterable, Sequence
from typing import Any

DIGITS = "0123456789"
_NONE: frozenset[int] = frozenset()
MAX_STATES = 20_000  # remembered states of one automaton; beyond, the memo starts over


class Unsupported(ValueError):
    """A pattern with something other than digits, classes, groups and repeats."""


class _Nfa:
    """Thompson's construction: states with digit edges and empty edges."""

    def __init__(self) -> None:
        self.edges: list[list[tuple[frozenset[str], int]]] = []
        self.empty: list[list[int]] = []

    def state(self) -> int:
        self.edges.append([])
        self.empty.append([])
        return len(self.edges) - 1

    def build(self, nodes: Iterable[tuple[Any, Any]]) -> tuple[int, int]:
        start = end = self.state()
        for op, arg in nodes:
            first, last = self._node(op, arg)
            self.empty[end].append(first)
            end = last
        return start, end

    def _node(self, op: Any, arg: Any) -> tuple[int, int]:
        if op is sre.LITERAL or op is sre.IN:
            start, end = self.state(), self.state()
            allowed = _digit_set([(op, arg)] if op is sre.LITERAL else arg)
            if allowed:
                self.edges[start].append((allowed, end))
            return start, end
        if op is sre.SUBPATTERN:
            return self.build(arg[-1])
        if op is sre.BRANCH:
            start, end = self.state(), self.state()
            for branch in arg[1]:
                first, last = self.build(branch)
                self.empty[start].append(first)
                self.empty[last].append(end)
            return start, end
        if op is sre.MAX_REPEAT or op is sre.MIN_REPEAT:
            low, high, body = arg
            start = end = self.state()
            for _ in range(low):
                first, last = self.build(body)
                self.empty[end].append(first)
                end = last
            if high is sre.MAXREPEAT:  # a loop: any number more
                first, last = self.build(body)
                self.empty[end].append(first)
                self.empty[last].append(end)
                return start, end
            optional_ends = [end]
            for _ in range(high - low):
                first, last = self.build(body)
                self.empty[end].append(first)
                end = last
                optional_ends.append(end)
            final = self.state()
            for e in optional_ends:
                self.empty[e].append(final)
            return start, final
        raise Unsupported(f"regex node {op} is not a digit pattern")


def _digit_set(items: Sequence[tuple[Any, Any]]) -> frozenset[str]:
    out: set[str] = set()
    negate = False
    for op, arg in items:
        if op is sre.LITERAL:
            out.add(chr(arg))
        elif op is sre.RANGE:
            out.update(chr(c) for c in range(arg[0], arg[1] + 1))
        elif op is sre.CATEGORY and arg is sre.CATEGORY_DIGIT:
            out.update(DIGITS)
        elif op is sre.NEGATE:
            negate = True
        else:
            raise Unsupported(f"class item {op} is not a digit")
    digits = out & set(DIGITS)
    return frozenset(set(DIGITS) - digits if negate else digits)


class Automaton:
    """Patterns, each with the number lengths it allows, as one automaton over digits.

    `answers(number)` gives, for each cut `c` of `number` (0 to its length), whether
    `number[:c]` is a whole number of some pattern at a length it allows, and whether it
    is the start of one completed by one repeated digit (`re.fullmatch(prefix + d * (L -
    c))` for a digit d and a length L >= c: `bridge.ranges`' reading of "shares").
    """

    def __init__(self, patterns: Iterable[tuple[str, Sequence[int]]]) -> None:
        self._nfa = _Nfa()
        self._accept: dict[int, frozenset[int]] = {}  # final NFA state -> its lengths
        starts = []
        for pattern, lengths in patterns:
            start, end = self._nfa.build(sre_parse.parse(pattern))
            starts.append(start)
            self._accept[end] = self._accept.get(end, frozenset()) | frozenset(lengths)
        self._finals = frozenset(self._accept)
        self.longest = max((max(v) for v in self._accept.values() if v), default=0)
        self._closures: dict[int, frozenset[int]] = {}
        self._steps: dict[tuple[frozenset[int], str], frozenset[int]] = {}
        self._facts: dict[frozenset[int], tuple[frozenset[int], frozenset[int]]] = {}
        self.start = frozenset().union(*(self._closure(s) for s in starts))

    def _closure(self, state: int) -> frozenset[int]:
        found = self._closures.get(state)
        if found is None:
            seen, todo = {state}, [state]
            while todo:
                for nxt in self._nfa.empty[todo.pop()]:
                    if nxt not in seen:
                        seen.add(nxt)
                        todo.append(nxt)
            found = self._closures[state] = frozenset(seen)
        return found

    def step(self, states: frozenset[int], digit: str) -> frozenset[int]:
        key = (states, digit)
        found = self._steps.get(key)
        if found is None:
            if len(self._steps) >= MAX_STATES:  # bounded: an odd stream only clears it
                self._steps.clear()
                self._facts.clear()
            reached: set[int] = set()
            for s in states:
                for allowed, nxt in self._nfa.edges[s]:
                    if digit in allowed:
                        reached |= self._closure(nxt)
            found = self._steps[key] = frozenset(reached)
        return found

    def _lengths(self, states: frozenset[int]) -> frozenset[int]:
        """The total lengths at which a string that leads to `states` is a whole number."""
        finals = states & self._finals  # few states are final: a set intersection in C
        if not finals:
            return _NONE
        return frozenset().union(*(self._accept[s] for s in finals))

    def facts(self, states: frozenset[int]) -> tuple[frozenset[int], frozenset[int]]:
        """(the prefix lengths that are whole numbers here, the prefix lengths a repeated
        digit completes from here) for a prefix that led to `states`."""
        found = self._facts.get(states)
        if found is None:
            if len(self._facts) >= MAX_STATES:
                self._facts.clear()
            completes: set[int] = set()
            for digit in DIGITS:
                here, steps = states, 0
                while here and steps <= self.longest:
                    # a whole number of length n after `steps` more digits: a prefix of
                    # length n - steps that got here is completed by them
                    completes.update(n - steps for n in self._lengths(here) if n >= steps)
                    here, steps = self.step(here, digit), steps + 1
            found = self._facts[states] = (self._lengths(states), frozenset(completes))
        return found

    def answers(self, number: str) -> list[tuple[bool, bool]]:
        """(whole, completes) for `number[:c]`, c from 0 to len(number)."""
        out, here = [], self.start
        for cut in range(len(number) + 1):
            if not here:  # no pattern goes on: neither, at every longer cut
                out.extend([(False, False)] * (len(number) + 1 - cut))
                break
            whole, completes = self.facts(here)
            out.append((cut in whole, cut in completes))
            if cut < len(number):
                here = self.step(here, number[cut])
        return out
