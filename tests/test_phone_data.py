"""The phonenumbers library failing on its own metadata (bridge.phone, bridge.phone_patterns).

The library compiles its metadata's patterns at every call and the dependency is not
pinned, so a release with a pattern `re` cannot compile makes it raise on the numbers
that reach that pattern: a 500 over HTTP, a 500 to the MTA. Each test ships such a
pattern into the installed metadata (a Java construct, `\\p{Nd}`, that `re` refuses) and
goes through the real listeners on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re

import httpx
import phonenumbers
import pytest
from phonenumbers import PhoneMetadata, PhoneNumberDesc, PhoneNumberType

from bridge import phone, phone_patterns
from bridge.clock import ManualClock
from bridge.phone import facts
from bridge.ranges import COSTLY_KINDS, OTHER_KINDS
from tests.helpers import SetPattern, bridge_config, running_bridge
from tests.test_firewall import (
    COSTLY,
    UNKNOWN_BUT_ORDINARY,
    _example_numbers,
    _library_facts,
    config_problems,
    rcpt,
)
from tests.test_smtp import send, smtp_listening

CANADA = ["+16135550100", "+14165550123"]
FRANCE = "+33612345678"


def not_for_re(old: str) -> str:
    """`old` behind a lookahead for a digit, written as Java writes it: the same numbers
    to the metadata's authors, `re.error` ("bad escape \\p") to `re`."""
    return f"(?=\\p{{Nd}})(?:{old})"


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "bridge.phone"]


async def test_a_broken_pattern_of_one_country_leaves_the_others_of_its_code_served(
    tmp_path, clock: ManualClock, sandbox_url: str, set_pattern: SetPattern, caplog
) -> None:
    """The US fixed-line pattern broken: the library raises for every +1 number that its
    US question reaches, Canada's among them (+1 asks the US first). Their facts are
    read pattern by pattern instead: Canada is still told apart (allowed_countries), a
    premium number is still refused, over HTTP and SMTP; one warning names the pattern."""
    set_pattern("US", "fixed_line", not_for_re)
    with pytest.raises(re.error):  # what the bridge meets: the library itself fails
        phonenumbers.number_type(phonenumbers.parse(CANADA[0]))
    extra = '[phone]\nallowed_countries = ["CA"]\n[smtp]\ndomains = ["sms.localhost"]\n'
    config = bridge_config(tmp_path, sandbox_url, extra)
    caplog.set_level(logging.WARNING, logger="bridge.phone")
    async with (
        running_bridge(config, clock) as (bridge, url),
        smtp_listening(bridge) as port,
        httpx.AsyncClient() as http,
    ):
        endpoint = f"{url}/api/v1/messages"
        canada = await http.post(endpoint, json={"to": CANADA, "message": "x"})
        premium = await http.post(endpoint, json={"to": "+19005550123", "message": "x"})
        britain = await http.post(endpoint, json={"to": "+442079460000", "message": "x"})
        code, message = await asyncio.to_thread(rcpt, port, "+15145550123@sms.localhost")
    assert canada.status_code == 202, canada.text
    assert len(canada.json()["ids"]) == 2
    assert premium.status_code == 400 and "premium-rate" in premium.json()["error"]
    assert britain.status_code == 400 and "a number in GB" in britain.json()["error"]
    assert code == 250, message
    [warning] = warnings_of(caplog)
    assert "+1" in warning and "US fixed_line" in warning and "bad escape" in warning


async def test_a_broken_costly_pattern_refuses_only_the_unknown_numbers_of_its_code(
    tmp_path, clock: ManualClock, sandbox_url: str, set_pattern: SetPattern
) -> None:
    """Germany's premium-rate pattern broken: read pattern by pattern, a German 0900
    number is of no known kind, and the range check cannot see its range either. Rather
    than text it, unknown German numbers are refused while this lasts; known German
    numbers and other countries' go."""
    set_pattern("DE", "premium_rate", not_for_re)
    example = phonenumbers.example_number_for_type("DE", PhoneNumberType.PREMIUM_RATE)
    premium = phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.E164)
    with pytest.raises(re.error):
        phonenumbers.number_type(example)
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (_, url), httpx.AsyncClient() as http:
        endpoint = f"{url}/api/v1/messages"
        refused = [
            await http.post(endpoint, json={"to": number, "message": "x"})
            for number in (premium, "+4990012345678")
        ]
        known = ["+4915123456789", "+4930123456", FRANCE]
        ok = await http.post(endpoint, json={"to": known, "message": "x"})
    for answer in refused:
        assert answer.status_code == 400, answer.text
        assert "whether it is costly cannot be told" in answer.json()["error"]
        assert "premium_rate pattern for +49" in answer.json()["error"]
    assert ok.status_code == 202 and len(ok.json()["ids"]) == 3, ok.text


def test_no_example_of_a_costly_kind_is_of_another_kind_too() -> None:
    """What lets known numbers go while a costly pattern is broken (bridge.firewall): the
    kinds' patterns do not overlap there, so a number read as mobile is not a 0900 one."""

    def matches(desc: PhoneNumberDesc | None, number: str) -> bool:
        if desc is None or not desc.national_number_pattern:
            return False
        if desc.possible_length and len(number) not in desc.possible_length:
            return False
        return re.fullmatch(desc.national_number_pattern, number) is not None

    overlaps, examples = [], 0
    for region in phonenumbers.SUPPORTED_REGIONS:
        meta = PhoneMetadata.metadata_for_region(region)
        for costly in COSTLY_KINDS:
            example = getattr(getattr(meta, costly), "example_number", None)
            examples += bool(example)
            for other in (*OTHER_KINDS, *(k for k in COSTLY_KINDS if k != costly)):
                if example and matches(getattr(meta, other), example):
                    overlaps.append((region, costly, other, example))
    assert examples > 200 and overlaps == []


async def test_a_number_the_library_cannot_read_is_retried_later_and_others_go(
    tmp_path, clock: ManualClock, sandbox_url: str, set_pattern: SetPattern, caplog
) -> None:
    """Germany's national prefix pattern broken: no German number can be read at all.
    The sender is not at fault and an alert refused for good would be lost, so it is
    a 503 (HTTP, naming the metadata) and a 451 for that recipient (SMTP, the rest of
    the mail goes) that names it only in the log, never to an unauthenticated client;
    one warning per region or calling code."""
    set_pattern("DE", "national_prefix_for_parsing", not_for_re)
    with pytest.raises(re.error):
        phonenumbers.parse("+4930123456")
    extra = """
    [dedupe]
    window = 0
    [smtp]
    domains = ["sms.localhost", "de.sms.localhost"]
    regions = {"de.sms.localhost" = "DE"}
    """
    config = bridge_config(tmp_path, sandbox_url, extra)
    caplog.set_level(logging.WARNING, logger="bridge.phone")
    caplog.set_level(logging.WARNING, logger="bridge.ingress.smtp")
    async with (
        running_bridge(config, clock) as (bridge, url),
        smtp_listening(bridge) as port,
        httpx.AsyncClient() as http,
    ):
        endpoint = f"{url}/api/v1/messages"
        german = [
            await http.post(endpoint, json={"to": [FRANCE, "+4930123456"], "message": "x"})
            for _ in range(2)
        ]
        french = await http.post(endpoint, json={"to": FRANCE, "message": "x"})
        rcpts = ["030123456@de.sms.localhost", f"{FRANCE}@sms.localhost"]
        refused = await asyncio.to_thread(send, port, "ups@example.org", rcpts, "Subject: x\n\nx")
        assert await bridge.store.counts() == {"queued": 2}
    for answer in german:
        assert answer.status_code == 503, answer.text
        error = answer.json()["error"]
        assert "'+4930123456' cannot be read now" in error and "+49" in error
        assert f"phonenumbers {phonenumbers.__version__}" in error and "bad escape" in error
    assert french.status_code == 202
    [(code, message)] = refused.values()
    # the client is told what is wrong, not which phonenumbers runs here: that is logged
    assert code == 451 and message == (
        b"4.3.0 <030123456@de.sms.localhost>: cannot read this number now; try again later"
    )
    [logged] = [r.getMessage() for r in caplog.records if r.name == "bridge.ingress.smtp"]
    assert "<030123456@de.sms.localhost>" in logged and "'030123456'" in logged
    assert "metadata of DE" in logged and f"phonenumbers {phonenumbers.__version__}" in logged
    assert sorted(w.split(" (")[0] for w in warnings_of(caplog)) == [
        "phonenumbers fails reading numbers of +49",
        "phonenumbers fails reading numbers of DE",
    ]


def test_a_configured_number_the_library_cannot_read_is_a_warning_not_a_problem(
    tmp_path, set_pattern: SetPattern, caplog: pytest.LogCaptureFixture
) -> None:
    """An upgrade of phonenumbers that breaks one country must not stop the bridge, and
    with it every other country's alerts: the config loads, the log names the number."""
    set_pattern("DE", "national_prefix_for_parsing", not_for_re)
    with caplog.at_level(logging.WARNING, logger="bridge.config.validate"):
        problems = config_problems(tmp_path, f'[groups]\noncall = ["{FRANCE}", "+4930123456"]\n')
    assert problems == {}
    [warning] = [r.getMessage() for r in caplog.records if r.name == "bridge.config.validate"]
    assert warning.startswith("groups.oncall[1]: ") and "metadata of +49" in warning


def test_facts_read_pattern_by_pattern_are_the_librarys_answers(
    monkeypatch: pytest.MonkeyPatch, forgetful: None
) -> None:
    """With the library failing on every number, `phone.facts` reads the metadata itself:
    the same region and kind as the library's, for an example of every kind of every
    region and for random digits of every calling code (mostly in no known range, where
    the shared codes' regions are told by their leading digits)."""
    rng = random.Random(9)
    numbers = [*_example_numbers(), *COSTLY, *UNKNOWN_BUT_ORDINARY]
    for code in phonenumbers.COUNTRY_CODE_TO_REGION_CODE:
        numbers += [f"+{code}{rng.randint(10**3, 10**13)}" for _ in range(10)]
    expected = {}
    for e164 in numbers:
        with contextlib.suppress(phonenumbers.NumberParseException):  # too long, say
            expected[e164] = _library_facts(e164)

    def failing(number: phonenumbers.PhoneNumber) -> int:
        raise re.error("shaped by the test")

    read_by_pattern = []
    by_pattern = phone_patterns.CallingCode.facts

    def spy(self: phone_patterns.CallingCode, national: str) -> tuple[str | None, int]:
        read_by_pattern.append(national)
        return by_pattern(self, national)

    # Where the library's region and kind are asked (its helpers fail as its public
    # calls would, on the same broken pattern).
    monkeypatch.setattr(phone, "_region_and_kind", failing)
    monkeypatch.setattr(phone_patterns.CallingCode, "facts", spy)
    assert len(expected) > 2500
    assert [n for n, known in expected.items() if tuple(facts(n)) != known] == []
    assert len(read_by_pattern) >= len(expected)  # every answer came from the patterns
