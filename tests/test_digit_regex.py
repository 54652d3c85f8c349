"""Our reader of the phone metadata's patterns (bridge.digit_regex) against `re` itself:
it reads every pattern of the installed phonenumbers, its automata match what
`re.fullmatch` matches, and what it cannot read it refuses by name."""

from __future__ import annotations

import random
import re

import phonenumbers
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from phonenumbers import PhoneMetadata, PhoneNumberDesc

import tests.properties  # noqa: F401  (the suite's Hypothesis profile)
from bridge.digit_regex import DIGITS, Alternation, Concat, Digit, Node, Repeat, Unsupported, parse
from bridge.digits import Automaton


def _every_pattern() -> list[str]:
    """Every national number pattern of every kind (general, fixed line, mobile, premium,
    short code...) of every region of every calling code, non-geographic ones too."""
    metas = [
        PhoneMetadata.metadata_for_region_or_calling_code(code, region)
        for code, regions in phonenumbers.COUNTRY_CODE_TO_REGION_CODE.items()
        for region in regions
    ]
    found = {
        desc.national_number_pattern
        for meta in metas
        if meta is not None
        for desc in vars(meta).values()
        if isinstance(desc, PhoneNumberDesc) and desc.national_number_pattern
    }
    return sorted(found)


PATTERNS = _every_pattern()


LONGEST = 20  # the strings checked: national numbers have at most 17 digits


def _automaton(tree: Node) -> Automaton:
    return Automaton([(tree, range(LONGEST + 1))])  # every length: the pattern alone decides


def _matches(automaton: Automaton, text: str) -> list[bool]:
    """Whether each prefix of `text` (empty to whole) is a whole match."""
    assert len(text) <= LONGEST
    return [whole for whole, _ in automaton.answers(text)]


def _expected(pattern: str, text: str) -> list[bool]:
    rx = re.compile(pattern)
    return [bool(rx.fullmatch(text[:cut])) for cut in range(len(text) + 1)]


def _walk(tree: Node, rng: random.Random) -> str:
    """A string the tree matches (a random path through it)."""
    if isinstance(tree, Digit):
        return rng.choice(sorted(tree.allowed)) if tree.allowed else ""
    if isinstance(tree, Concat):
        return "".join(_walk(part, rng) for part in tree.parts)
    if isinstance(tree, Alternation):
        return _walk(rng.choice(tree.options), rng)
    count = rng.randint(tree.low, tree.low + 3 if tree.high is None else tree.high)
    return "".join(_walk(tree.body, rng) for _ in range(count))


def _near(text: str, rng: random.Random) -> list[str]:
    """`text` and its neighbours one edit away: where a wrong reading shows."""
    at = rng.randrange(len(text) + 1)
    other = rng.choice(DIGITS)
    return [
        text,
        text[:at] + other + text[at + 1 :],  # one digit changed
        text[:at] + other + text[at:],  # one digit more
        text[:at] + text[at + 1 :],  # one digit less
        text + other,
    ]


def test_the_reader_reads_every_pattern_of_the_installed_metadata() -> None:
    assert len(PATTERNS) > 1000  # every kind, not only those bridge.ranges asks about
    unread = []
    for pattern in PATTERNS:
        try:
            parse(pattern)
        except Unsupported as exc:
            unread.append(str(exc))
    assert unread == []


def test_every_pattern_matches_what_re_fullmatch_matches() -> None:
    """For every pattern: strings it matches (a path through the tree), their neighbours
    one edit away, and random digits, checked at every prefix against `re`."""
    rng = random.Random(7)
    wrong = []
    for pattern in PATTERNS:
        tree = parse(pattern)
        automaton = _automaton(tree)
        texts = [t[:LONGEST] for _ in range(12) for t in _near(_walk(tree, rng), rng)]
        texts += ["".join(rng.choices(DIGITS, k=rng.randint(0, 17))) for _ in range(8)]
        wrong += [(pattern, t) for t in texts if _matches(automaton, t) != _expected(pattern, t)]
    assert wrong == []


# Hypothesis reads the pattern on its own (with CPython's parser) to make the strings:
# strings our tree might miss are found from `re`'s side too.
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_strings_re_makes_from_a_pattern_are_matched_alike(data: st.DataObject) -> None:
    pattern = data.draw(st.sampled_from(PATTERNS))
    matching = st.from_regex(pattern, fullmatch=True, alphabet=DIGITS)
    text = data.draw(matching | matching.map(lambda t: t[:-1] + "0") | st.text(DIGITS))
    text = text[:LONGEST]
    assert _matches(_automaton(parse(pattern)), text) == _expected(pattern, text)


# Made-up patterns over the whole subset, against `re`: repeats of every shape, classes
# with ranges and negation, empty options.
@settings(max_examples=300, deadline=None)
@given(
    pattern=st.from_regex(
        r"(?:(?:[0-9]|\\d|\[\^?[0-4](?:-[5-9])?[0-9]?\]|\((?:\?:)?[0-9]{0,3}\|[0-9]{0,2}\))"
        r"(?:[?*+]|\{[0-3]\}|\{[0-2],[3-5]?\})?){1,4}",
        fullmatch=True,
    ),
    text=st.text(DIGITS, max_size=10),
)
def test_made_up_patterns_of_the_subset_match_as_re_does(pattern: str, text: str) -> None:
    assert _matches(_automaton(parse(pattern)), text) == _expected(pattern, text)


@pytest.mark.parametrize(
    ("pattern", "named"),
    [
        (r"(?=9)00\d{6}", "a lookahead (?=...)"),
        (r"(?!0)\d{7}", "a negative lookahead"),
        (r"(?<=1)2", "a lookbehind"),
        (r"(\d)\1{6}", r"a backreference or octal escape \1"),
        (r"(?P<a>\d)(?P=a)", "a named group"),
        (r"(?i)\d{7}", "inline flags"),
        (r"\d{2,5}?", "a lazy, possessive or repeated repeat"),
        (r"\d*+", "a lazy, possessive or repeated repeat"),
        (r"9.\d", "the character '.'"),
        (r"^900$", "the character '^'"),
        (r"\w{3}", r"the escape \w"),
        (r"[a-z]", "'a' in a class"),
        (r"[9-1]", "the range 9-1"),
        (r"[0-9", "an unclosed class"),
        (r"(900", "an unclosed group"),
        (r"900)", "an unmatched ')'"),
        (r"*9", "a repeat '*' of nothing"),
        (r"9{x}", "a '{' that is not a repeat"),
        (r"\d{1,1000}", "the repeat {1,1000}"),
        ("9\\", "a trailing '\\'"),
    ],
)
def test_a_construct_outside_the_subset_is_refused_by_name(pattern: str, named: str) -> None:
    with pytest.raises(Unsupported, match=re.escape(named)):
        parse(pattern)


def test_the_tree_is_what_the_pattern_says() -> None:
    any_digit = frozenset(DIGITS)
    assert parse(r"(?:[2-4]|9\d?)") == Alternation(
        (Digit(frozenset("234")), Concat((Digit(frozenset("9")), Repeat(Digit(any_digit), 0, 1))))
    )
    assert parse(r"[^0-8]{2,}") == Repeat(Digit(frozenset("9")), 2, None)
    assert parse("") == Concat(())
