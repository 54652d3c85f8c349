"""A number's region and kind told by one automaton per calling code (bridge.phone_automaton)
instead of the library's `re` calls: the library's answers, for every example number of
its metadata and for any digits of any calling code; a pattern the automaton cannot hold
leaves its calling code to the library; the remembered states stay bounded."""

from __future__ import annotations

import random

import httpx
import phonenumbers
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from phonenumbers import PhoneNumberType

import tests.properties  # noqa: F401  (the suite's Hypothesis profile)
from bridge import digits, phone, phone_automaton, phone_patterns
from bridge.clock import ManualClock
from tests.helpers import SetPattern, bridge_config, running_bridge
from tests.test_firewall import _example_numbers

CODES = sorted(phonenumbers.COUNTRY_CODE_TO_REGION_CODE)


def _number(code: int, national: str) -> phonenumbers.PhoneNumber:
    """The library's number of `code` whose national significant number is `national`
    (leading zeros kept as the library keeps them: Italy's, Côte d'Ivoire's)."""
    zeros = len(national) - len(str(int(national)))
    number = phonenumbers.PhoneNumber(country_code=code, national_number=int(national))
    if zeros:
        number.italian_leading_zero, number.number_of_leading_zeros = True, zeros
    assert phonenumbers.national_significant_number(number) == national
    return number


def _both(code: int, national: str) -> tuple[tuple[str | None, int, bool], ...]:
    """(the automaton's answers, the library's): region, kind, and validity."""
    reader = phone_automaton.reader(code)
    assert reader is not None, f"+{code} has no automaton"
    region, kind = reader.facts(national)
    number = _number(code, national)
    library = (
        phonenumbers.region_code_for_number(number),
        phonenumbers.number_type(number),
        phonenumbers.is_valid_number(number),
    )
    return (region, kind, kind != PhoneNumberType.UNKNOWN), library


def test_every_example_number_reads_as_the_library_reads_it(forgetful: None) -> None:
    """An example of every kind of every region, and of the non-geographic codes: each
    read by its calling code's automaton (every code of the installed metadata has one)."""
    numbers = [phonenumbers.parse(e164) for e164 in _example_numbers()]
    assert len(numbers) > 1000
    assert [code for code in CODES if phone_automaton.reader(code) is None] == []
    wrong = []
    for number in numbers:
        code, national = number.country_code, phonenumbers.national_significant_number(number)
        mine, library = _both(code, national)
        if mine != library:
            wrong.append((code, national, mine, library))
    assert wrong == []


@settings(max_examples=1000, deadline=None)
@given(code=st.sampled_from(CODES), national=st.text("0123456789", min_size=1, max_size=19))
@example(code=1, national="2025550143")  # a US number
@example(code=1, national="8765550123")  # Jamaica, told by its leading digits
@example(code=44, national="1624456789")  # the Isle of Man, by its leading digits
@example(code=7, national="7012345678")  # Kazakhstan
@example(code=39, national="0612345678")  # Italy's leading zero
@example(code=49, national="90012345678")  # German premium, a digit too many
@example(code=1, national="20255501430000000")  # too long
def test_any_digits_of_any_code_read_as_the_library_reads_them(code: int, national: str) -> None:
    """Random digits, mostly in no assigned range, too short or too long: the same
    region, kind and validity as `region_code_for_number`, `number_type` and
    `is_valid_number` of the same number."""
    mine, library = _both(code, national)
    assert mine == library


def test_readings_of_many_numbers_agree_in_any_order(forgetful: None) -> None:
    """The decision remembered for a state is right for the next number reaching it: a
    thousand numbers of the shared codes, most in ranges many others share."""
    rng = random.Random(16)
    wrong = []
    for _ in range(1000):
        code = rng.choice((1, 7, 44, 262, 590, 599))
        national = str(rng.randint(10**8, 10**10))
        mine, library = _both(code, national)
        if mine != library:
            wrong.append((code, national, mine, library))
    assert wrong == []


async def test_new_numbers_are_read_without_the_librarys_pattern_calls(
    tmp_path, clock: ManualClock, sandbox_url: str, monkeypatch: pytest.MonkeyPatch, forgetful: None
) -> None:
    """Over HTTP, new numbers of shared and single codes: a Canadian and a Jamaican number
    go under allowed_countries, a US premium-rate and a UK personal number are refused,
    a French number is not a country allowed; the library's type check (its `re` calls,
    per pattern and region) is never asked."""
    asked = []
    helper = phone._number_type_helper

    def spy(national: str, metadata: object) -> int:
        asked.append(national)
        return helper(national, metadata)

    monkeypatch.setattr(phone, "_number_type_helper", spy)
    extra = '[phone]\nallowed_countries = ["CA", "JM", "US", "GB"]\n'
    config = bridge_config(tmp_path, sandbox_url, extra)
    async with running_bridge(config, clock) as (_, url), httpx.AsyncClient() as http:
        endpoint = f"{url}/api/v1/messages"

        async def post(to: str) -> httpx.Response:
            return await http.post(endpoint, json={"to": to, "message": "x"})

        ok = await post(["+16135550100", "+18765550123", "+12025550143", "+447400123456"])
        premium = await post("+19005550123")
        personal = await post("+447011234567")
        france = await post("+33612345678")
    assert ok.status_code == 202 and len(ok.json()["ids"]) == 4, ok.text
    assert premium.status_code == 400 and "premium-rate" in premium.json()["error"]
    assert personal.status_code == 400 and "personal number" in personal.json()["error"]
    assert france.status_code == 400 and "a number in FR" in france.json()["error"]
    assert asked == []


async def test_a_pattern_outside_the_automatons_reach_leaves_its_code_to_the_library(
    tmp_path, clock: ManualClock, sandbox_url: str, set_pattern: SetPattern
) -> None:
    """Germany's premium pattern behind a lookahead, which `re` reads and the automaton
    cannot: +49 is read by the library again (the same answers: its premium number is
    refused, a mobile goes), the other codes keep their automata."""
    set_pattern("DE", "premium_rate", lambda old: f"(?=\\d)(?:{old})")
    premium = phonenumbers.example_number_for_type("DE", PhoneNumberType.PREMIUM_RATE)
    assert phonenumbers.number_type(premium) == PhoneNumberType.PREMIUM_RATE
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (_, url), httpx.AsyncClient() as http:
        endpoint = f"{url}/api/v1/messages"
        e164 = phonenumbers.format_number(premium, phonenumbers.PhoneNumberFormat.E164)
        refused = await http.post(endpoint, json={"to": e164, "message": "x"})
        ok = await http.post(
            endpoint, json={"to": ["+4915123456789", "+33612345678"], "message": "x"}
        )
    assert refused.status_code == 400 and "premium-rate" in refused.json()["error"], refused.text
    assert ok.status_code == 202, ok.text
    assert phone_automaton.reader(49) is None and phone_automaton.reader(33) is not None


def test_the_remembered_states_and_decisions_stay_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stream of new numbers past the bounds starts the memo over: the automaton's
    states never pass MAX_STATES by more than one number's digits, the decisions never
    pass MAX_ANSWERS, and the answers stay the library's."""
    monkeypatch.setattr(digits, "MAX_STATES", 40)
    monkeypatch.setattr(phone_automaton, "MAX_ANSWERS", 3)
    reader = phone_automaton.Reader(phone_patterns.read(1))  # a fresh one, not the cache's
    rng = random.Random(5)
    most_states = most_answers = 0
    for _ in range(400):
        national = str(rng.randint(2 * 10**9, 10**10 - 1))
        number = _number(1, national)
        library = (phonenumbers.region_code_for_number(number), phonenumbers.number_type(number))
        assert reader.facts(national) == library, national
        most_states = max(most_states, reader.states)
        most_answers = max(most_answers, reader.decisions)
    assert 40 <= most_states <= 40 + 10 and most_answers == 3
