"""The range of a number the phone metadata does not know (bridge.ranges), now read by
automata over digits (bridge.digits): the same answers as asking `re` pattern by
pattern, at a bounded cost, so a request naming many new unknown numbers cannot hold
the event loop (before: ~0.4-1 s for 100 on a loaded machine; BENCHMARKS.md)."""

from __future__ import annotations

import contextlib
import cProfile
import logging
import pstats
import random
import re

import httpx
import phonenumbers
import pytest

from bridge import ranges
from bridge.clock import ManualClock
from bridge.digit_regex import Unsupported, parse
from bridge.errors import InputError
from bridge.firewall import Firewall
from bridge.ranges import COSTLY_KINDS, OTHER_KINDS, costly_range, kind_patterns
from tests.helpers import SetPattern, bridge_config, running_bridge

CODES = sorted(phonenumbers.COUNTRY_CODE_TO_REGION_CODE)


# -- the oracle: the reading the automata replace, one `re.fullmatch` at a time --------------
def _reference_patterns(code: int) -> dict[str, list[tuple[re.Pattern[str], tuple[int, ...]]]]:
    return {
        kind: [(re.compile(pattern), lengths) for pattern, lengths in found]
        for kind, found in kind_patterns(code).items()
    }


def reference(code: int, national: str) -> str | None:
    kinds = _reference_patterns(code)

    def whole(kind: str, digits: str) -> bool:
        return any(len(digits) in ls and rx.fullmatch(digits) for rx, ls in kinds[kind])

    def shares(kind: str, prefix: str) -> bool:
        return any(
            n >= len(prefix) and rx.fullmatch(prefix + d * (n - len(prefix)))
            for rx, ls in kinds[kind]
            for n in ls
            for d in "0123456789"
        )

    for cut in range(len(national) - 1, 2, -1):
        known = [k for k in kinds if whole(k, national[:cut])]
        if known:
            return next((COSTLY_KINDS[k] for k in known if k in COSTLY_KINDS), None)
    for cut in range(len(national) - 1, 1, -1):
        costly = [k for k in COSTLY_KINDS if shares(k, national[:cut])]
        ordinary = any(shares(k, national[:cut]) for k in OTHER_KINDS)
        if costly:
            return None if ordinary else COSTLY_KINDS[costly[0]]
        if ordinary:
            return None
    return None


@pytest.mark.parametrize("seed", [1, 2])
def test_the_automata_answer_as_the_patterns_do_for_every_calling_code(seed: int) -> None:
    rng = random.Random(seed)
    cases = [
        (code, str(rng.randint(10**14, 10**15))[: rng.randint(3, 15)])
        for code in CODES
        for _ in range(8)
    ]
    cases += [(49, "90012345678"), (44, "7012345678"), (1, "9005550123"), (39, "8991234567")]
    found = [(code, n, costly_range.__wrapped__(code, n)) for code, n in cases]
    assert [f for f in found if f[2] != reference(f[0], f[1])] == []
    assert sum(1 for f in found if f[2]) > 10  # the costly reading is exercised, not only None


def _unknown(rng: random.Random, count: int, *, assigned: bool = False) -> list[str]:
    out: list[str] = []
    while len(out) < count:
        e164 = f"+{(1, 44, 49)[len(out) % 3]}{rng.randint(10**9, 10**10 - 1)}"
        number = phonenumbers.parse(e164, None)
        known = phonenumbers.number_type(number) != phonenumbers.PhoneNumberType.UNKNOWN
        if phonenumbers.is_possible_number(number) and known == assigned:
            out.append(e164)
    return out


def _calls(numbers: list[str]) -> int:
    """Python calls made to put `numbers` through the firewall: a measure of work that
    load on the machine does not blur (timing would)."""
    firewall, profile = Firewall(), cProfile.Profile()
    profile.enable()
    for number in numbers:
        with contextlib.suppress(InputError):
            firewall.number(number)
    profile.disable()
    return int(pstats.Stats(profile).total_calls)  # type: ignore[attr-defined]


def test_new_unknown_numbers_cost_a_few_times_a_known_one_not_fifty() -> None:
    rng = random.Random(4)
    _calls(_unknown(rng, 30) + _unknown(rng, 30, assigned=True))  # +1, +44, +49 first used
    unknown = _calls(_unknown(rng, 100))
    known = _calls(_unknown(rng, 100, assigned=True))
    # Pattern by pattern it was ~45 times (1.5 million calls for 100 numbers).
    assert unknown < 8 * known, (unknown, known)


async def test_a_request_of_100_new_unknown_numbers_is_served_and_costly_ones_refused(
    tmp_path, clock: ManualClock, sandbox_url: str
) -> None:
    rng = random.Random(5)
    allowed = []
    for number in _unknown(rng, 140):
        try:
            Firewall().number(number)
        except InputError:
            continue
        allowed.append(number)
    config = bridge_config(tmp_path, sandbox_url, "[dedupe]\nwindow = 0\n")
    async with running_bridge(config, clock) as (_, url), httpx.AsyncClient() as http:
        endpoint = f"{url}/api/v1/messages"
        ok = await http.post(endpoint, json={"to": allowed[:100], "message": "x"})
        premium = await http.post(endpoint, json={"to": ["+4990012345678"], "message": "x"})
    assert ok.status_code == 202 and len(ok.json()["ids"]) == 100
    assert premium.status_code == 400
    assert "in the range of a premium-rate number" in premium.json()["error"]


# -- a pattern our reader cannot hold: read with `re`, never a 500 ----------------------------
def test_patterns_read_with_re_answer_as_the_automata_would(
    monkeypatch: pytest.MonkeyPatch, forgetful: None
) -> None:
    """Half the patterns (of every kind, every code) made unreadable: each kind then mixes
    its automaton with `re`, and the answers are still the patterns' own."""

    def half(pattern: str) -> object:
        if len(pattern) % 2:
            raise Unsupported("shaped by the test")
        return parse(pattern)

    monkeypatch.setattr(ranges, "parse", half)
    rng = random.Random(6)
    cases = [(code, str(rng.randint(10**14, 10**15))[: rng.randint(4, 13)]) for code in CODES]
    cases += [(49, "90012345678"), (44, "7012345678"), (1, "9005550123"), (39, "8991234567")]
    found = [(code, n, costly_range(code, n)) for code, n in cases]
    assert [f for f in found if f[2] != reference(f[0], f[1])] == []
    assert sum(1 for f in found if f[2]) >= 4


def test_a_pattern_that_is_no_regex_matches_nothing_and_raises_nothing(
    monkeypatch: pytest.MonkeyPatch, forgetful: None
) -> None:
    real = ranges.kind_patterns

    def with_a_broken_one(code: int) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
        found = real(code)
        found["premium_rate"] = [("(?=9", (11,)), *found["premium_rate"]]
        return found

    monkeypatch.setattr(ranges, "kind_patterns", with_a_broken_one)
    assert costly_range(49, "90012345678") == "a premium-rate number"  # the other patterns
    assert costly_range(49, "30123456789") is None


@pytest.fixture
def lookahead_in_german_premium(set_pattern: SetPattern) -> str:
    """Germany's premium-rate pattern behind a lookahead that changes no number: as a
    phonenumbers release might ship it (the library itself reads it with `re`)."""
    pattern = set_pattern("DE", "premium_rate", lambda old: f"(?=[19])(?:{old})")
    with pytest.raises(Unsupported, match="lookahead"):
        parse(pattern)
    return pattern


async def test_a_calling_code_with_an_unreadable_pattern_is_still_checked_over_http(
    tmp_path,
    clock: ManualClock,
    sandbox_url: str,
    lookahead_in_german_premium: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rng, ordinary = random.Random(8), []
    while len(ordinary) < 20:
        e164 = f"+49{rng.randint(10**9, 10**10 - 1)}"
        number = phonenumbers.parse(e164, None)
        if phonenumbers.is_possible_number(number) and not phonenumbers.is_valid_number(number):
            national = phonenumbers.national_significant_number(number)
            if reference(49, national) is None:
                ordinary.append(e164)
    config = bridge_config(tmp_path, sandbox_url, "[dedupe]\nwindow = 0\n")
    caplog.set_level(logging.WARNING, logger="bridge.ranges")
    async with running_bridge(config, clock) as (_, url), httpx.AsyncClient() as http:
        endpoint = f"{url}/api/v1/messages"
        premium = await http.post(endpoint, json={"to": ["+4990012345678"], "message": "x"})
        ok = await http.post(endpoint, json={"to": ordinary, "message": "x"})
        again = await http.post(endpoint, json={"to": ["+4990012345679"], "message": "x"})
    assert premium.status_code == 400, premium.text
    assert "in the range of a premium-rate number" in premium.json()["error"]
    assert ok.status_code == 202 and len(ok.json()["ids"]) == 20
    assert again.status_code == 400
    warnings = [r.getMessage() for r in caplog.records if r.name == "bridge.ranges"]
    assert len(warnings) == 1 and "+49" in warnings[0] and "lookahead" in warnings[0]
