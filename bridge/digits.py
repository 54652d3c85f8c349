"""Phone-number patterns as automata over the ten digits (pure, bounded caches).

`bridge.ranges` asks, of every leading part of an unknown number, two questions of
each kind's patterns: is it a whole number of the kind (`accepts`), and can it be made
one by repeating a digit to a possible length (`completes`)? Asked with `re`, that was
one `fullmatch` per pattern, length and digit at each cut: ~1 ms per number, up to
~20 ms on a loaded machine, for +1's 25 regions of patterns. Here the patterns of one
kind become one automaton (the metadata's regexes are plain regular expressions over
digits, read into trees by `bridge.digit_regex`), run once along the number; each state
met is remembered with both answers, so a later number that shares it pays a dict
lookup. The states are few (the metadata's patterns are prefix lists), and the memo is
cleared past `MAX_STATES`, so no stream of numbers makes it grow without bound.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from bridge.digit_regex import DIGITS, Alternation, Concat, Digit, Node

_NONE: frozenset[int] = frozenset()
_ZERO = ord("0")
MAX_STATES = 20_000  # remembered states of one automaton; beyond, the memo starts over


class Nfa:
    """Thompson's construction: states with digit edges and empty edges."""

    def __init__(self) -> None:
        self.edges: list[list[tuple[frozenset[str], int]]] = []
        self.empty: list[list[int]] = []
        self._closures: dict[int, frozenset[int]] = {}

    def closure(self, state: int) -> frozenset[int]:
        """`state` and the states its empty edges reach (asked once the NFA is built)."""
        found = self._closures.get(state)
        if found is None:
            seen, todo = {state}, [state]
            while todo:
                for nxt in self.empty[todo.pop()]:
                    if nxt not in seen:
                        seen.add(nxt)
                        todo.append(nxt)
            found = self._closures[state] = frozenset(seen)
        return found

    def step(self, states: frozenset[int], digit: str) -> frozenset[int]:
        """The states `digit` leads to from `states`, with their closures."""
        reached: set[int] = set()
        for s in states:
            for allowed, nxt in self.edges[s]:
                if digit in allowed:
                    reached |= self.closure(nxt)
        return frozenset(reached)

    def state(self) -> int:
        self.edges.append([])
        self.empty.append([])
        return len(self.edges) - 1

    def chain(self, nodes: Iterable[Node]) -> tuple[int, int]:
        """(start, end) of `nodes` one after the other."""
        start = end = self.state()
        for node in nodes:
            first, last = self.build(node)
            self.empty[end].append(first)
            end = last
        return start, end

    def build(self, node: Node) -> tuple[int, int]:
        if isinstance(node, Digit):
            start, end = self.state(), self.state()
            if node.allowed:
                self.edges[start].append((node.allowed, end))
            return start, end
        if isinstance(node, Concat):
            return self.chain(node.parts)
        if isinstance(node, Alternation):
            start, end = self.state(), self.state()
            for option in node.options:
                first, last = self.build(option)
                self.empty[start].append(first)
                self.empty[last].append(end)
            return start, end
        start, end = self.chain([node.body] * node.low)  # a Repeat: its required copies
        if node.high is None:  # a loop: any number more
            first, last = self.build(node.body)
            self.empty[end].append(first)
            self.empty[last].append(end)
            return start, end
        final = self.state()
        self.empty[end].append(final)
        for _ in range(node.high - node.low):  # each optional copy may end the repeat
            first, last = self.build(node.body)
            self.empty[end].append(first)
            end = last
            self.empty[end].append(final)
        return start, final


class Automaton:
    """Patterns, each with the number lengths it allows, as one automaton over digits.

    `answers(number)` gives, for each cut `c` of `number` (0 to its length), whether
    `number[:c]` is a whole number of some pattern at a length it allows, and whether it
    is the start of one completed by one repeated digit (`re.fullmatch(prefix + d * (L -
    c))` for a digit d and a length L >= c: `bridge.ranges`' reading of "shares").
    """

    def __init__(self, patterns: Iterable[tuple[Node, Sequence[int]]]) -> None:
        self._nfa = Nfa()
        self._accept: dict[int, frozenset[int]] = {}  # final NFA state -> its lengths
        starts = []
        for tree, lengths in patterns:  # trees of `bridge.digit_regex.parse`
            start, end = self._nfa.build(tree)
            starts.append(start)
            self._accept[end] = self._accept.get(end, frozenset()) | frozenset(lengths)
        self._finals = frozenset(self._accept)
        self.longest = max((max(v) for v in self._accept.values() if v), default=0)
        self._steps: dict[tuple[frozenset[int], str], frozenset[int]] = {}
        self._facts: dict[frozenset[int], tuple[frozenset[int], frozenset[int]]] = {}
        self.start = frozenset().union(*(self._nfa.closure(s) for s in starts))

    def step(self, states: frozenset[int], digit: str) -> frozenset[int]:
        key = (states, digit)
        found = self._steps.get(key)
        if found is None:
            if len(self._steps) >= MAX_STATES:  # bounded: an odd stream only clears it
                self._steps.clear()
                self._facts.clear()
            found = self._steps[key] = self._nfa.step(states, digit)
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


class Matcher:
    """Which of many patterns match a string of digits whole, in one walk along it.

    The patterns become one automaton over digits, made deterministic as strings walk
    it: each set of pattern states met is numbered, with a row of its ten successors
    filled in as digits first lead out of it, and the patterns accepting there. A walk
    along a string whose every step is known costs a list index a digit, however many
    patterns there are (+1's 25 regions hold ~300). Past `MAX_STATES` sets the rows
    start over, so no stream of strings makes them grow without bound.
    """

    def __init__(self, patterns: Sequence[Node]) -> None:
        self._nfa = Nfa()
        self._tag: dict[int, int] = {}  # final NFA state -> index of its pattern
        starts = []
        for index, tree in enumerate(patterns):  # trees of `bridge.digit_regex.parse`
            start, end = self._nfa.build(tree)
            starts.append(start)
            self._tag[end] = index
        self._finals = frozenset(self._tag)
        self._start = frozenset().union(*(self._nfa.closure(s) for s in starts))
        self._reset()

    def _reset(self) -> None:
        self._ids: dict[frozenset[int], int] = {}
        self._sets: list[frozenset[int]] = []
        self._rows: list[list[int]] = []  # state -> successor by digit, -1: not yet known
        self._accepting: list[frozenset[int]] = []  # state -> the patterns matched there
        self._number(self._start)

    @property
    def states(self) -> int:
        """How many states are remembered (`MAX_STATES` bounds them)."""
        return len(self._sets)

    def _number(self, states: frozenset[int]) -> int:
        found = self._ids.get(states)
        if found is None:
            found = self._ids[states] = len(self._sets)
            self._sets.append(states)
            self._rows.append([-1] * 10)
            self._accepting.append(frozenset(self._tag[s] for s in states & self._finals))
        return found

    def _successor(self, state: int, digit: int) -> int:
        found = self._number(self._nfa.step(self._sets[state], DIGITS[digit]))
        self._rows[state][digit] = found
        return found

    def matching(self, digits: str) -> frozenset[int]:
        """The indexes of the patterns that match `digits` (ASCII digits only) whole."""
        if len(self._sets) >= MAX_STATES:  # checked between walks: one adds at most a
            self._reset()  # state a digit, so the bound is passed by 17 at most
        rows, state = self._rows, 0
        for byte in digits.encode():
            nxt = rows[state][byte - _ZERO]
            state = nxt if nxt >= 0 else self._successor(state, byte - _ZERO)
        return self._accepting[state]
