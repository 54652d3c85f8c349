"""What a text costs in parts: the bridge's count (bridge.text) against the sandbox's bill.

The provider documents 160 septets in one SMS, 153 per part when split, two septets per
extension character; UCS-2 70, then 67 (docs sms-api.md, "Message types and length").
3GPP TS 23.040 9.2.3.24.1 adds that a character is never split in the middle: an escape
pair or (UTF-16 carrying emoji) a surrogate pair that would straddle a part's edge starts
the next part, so that part carries 152 septets or 66 units. Budgets, cost estimates,
the console and the provider client all take the bridge's count, so it must be the bill.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from itertools import groupby
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

import tests.properties  # noqa: F401  (the suite's Hypothesis profile)
from bridge.clock import ManualClock
from bridge.models import Message
from bridge.pricing import PriceBook
from bridge.provider.client import ProviderClient
from bridge.provider.sandbox import SandboxState, sms_parts
from bridge.text import count_parts, shape, split_parts
from tests.helpers import bridge_config, pump, running_bridge

TO = "+12025550152"

# Worked out by hand from the rules above, apart from both implementations.
# (text, arabic_type the bridge is configured with, parts)
BOUNDARIES = [
    ("a" * 160, 2, 1),
    ("a" * 158 + "€", 2, 1),  # 160 septets
    ("a" * 159 + "€", 2, 2),  # 161
    ("a" * 306, 2, 2),
    ("a" * 307, 2, 3),
    ("a" * 151 + "€" + "a" * 153, 2, 2),  # the pair ends part 1: 153 + 153
    ("a" * 153 + "€" + "a" * 151, 2, 2),  # the pair starts part 2: 153 + 153
    ("a" * 152 + "€" + "a" * 152, 2, 3),  # 306 septets, the pair would straddle: 152 + 153 + 1
    ("a" * 152 + "{" + "a" * 152, 2, 3),
    ("a" * 152 + "\f" + "a" * 152, 2, 3),  # form feed: the extension table's page break
    ("[" * 152, 2, 2),  # 304 septets: 76 pairs a part
    ("[" * 153, 2, 3),  # 306 septets: 76 + 76 + 1 pairs
    ("a" * 305 + "€" + "a" * 152, 2, 4),  # 459 septets: 153 + 152 + 153 + 1
    ("ł" * 70, 2, 1),
    ("ł" * 68 + "😀", 2, 1),  # 70 UTF-16 units
    ("ł" * 69 + "😀", 2, 2),  # 71
    ("ł" * 134, 2, 2),
    ("ł" * 135, 2, 3),
    ("ł" * 65 + "😀" + "ł" * 67, 2, 2),  # the pair ends part 1: 67 + 67
    ("ł" * 66 + "😀" + "ł" * 66, 2, 3),  # 134 units, the pair would straddle: 66 + 67 + 1
    ("a" * 66 + "😀" + "a" * 66, 2, 3),  # GSM letters, but the emoji makes it UCS-2
    ("😀" * 66, 2, 2),  # 132 units: 33 pairs a part
    ("😀" * 67, 2, 3),  # 134 units: 33 + 33 + 1 pairs
    ("ش" * 66 + "😀" + "ش" * 66, 4, 3),  # the Arabic type is billed as UCS-2
]


def runs(text: str) -> str:
    """A readable ASCII test id: "a*152 U+20AC*1 a*152"."""

    def name(ch: str) -> str:
        return ch if ch.isascii() and ch.isprintable() else f"U+{ord(ch):04X}"

    return " ".join(f"{name(ch)}*{len(list(group))}" for ch, group in groupby(text))


@pytest.mark.parametrize(
    ("text", "arabic_type", "parts"), BOUNDARIES, ids=[runs(case[0]) for case in BOUNDARIES]
)
def test_the_boundary_table(text: str, arabic_type: int, parts: int) -> None:
    form = shape(text, arabic_type=arabic_type)
    assert form.parts == count_parts(text) == len(split_parts(text)) == parts
    assert sms_parts(text, form.message_type) == parts


GSM_BASIC = "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./:;<=>?¡ÄÖÑÜ§¿äöñüà" + "aZ09"
GSM_EXTENSION = "^{}\\[~]|€\f"
OUTSIDE_GSM = "łç☃\u2019ش\u00a0" + "😀🎉𝄞🇫"  # BMP, then astral (a surrogate pair each)


def cost(ch: str, gsm: bool) -> int:
    """Septets (GSM) or UTF-16 code units (UCS-2) of one character."""
    return 2 if (ch in GSM_EXTENSION if gsm else ord(ch) > 0xFFFF) else 1


@st.composite
def near_a_boundary(draw: st.DrawFn) -> str:
    """A text whose cost is within 3 units of a one-SMS limit or a multiple of a part;
    half of them with a two-unit character placed to straddle the end of a part."""
    gsm = draw(st.booleans())
    single, per_part = (160, 153) if gsm else (70, 67)
    parts = draw(st.integers(1, 4))
    edge = single if parts == 1 else per_part * parts
    target = edge + draw(st.just(0) | st.integers(-3, 3))
    pool = GSM_BASIC + GSM_EXTENSION * 3
    if not gsm:
        pool += OUTSIDE_GSM * 6
    chars = draw(st.lists(st.sampled_from(pool), min_size=target, max_size=target))
    if not gsm:  # one character outside GSM 03.38, early enough to survive the cut
        chars.insert(draw(st.integers(0, 30)), draw(st.sampled_from(OUTSIDE_GSM)))
    if draw(st.booleans()):  # at random, the straddle is rare (about 2 in 100)
        wide = [ch for ch in GSM_EXTENSION + OUTSIDE_GSM if cost(ch, gsm) == 2]
        end, used = per_part * draw(st.integers(1, max(1, parts - 1))), 0
        for index, ch in enumerate(chars):
            if used == end - 1:
                chars[index] = draw(st.sampled_from(wide))
                break
            used += cost(ch, gsm)
    used, cut = 0, 0
    for ch in chars:  # the longest prefix costing at most `target` in its alphabet
        used += cost(ch, gsm)
        if used > target:
            break
        cut += 1
    return "".join(chars[:cut])


@pytest.fixture
async def provider(sandbox_url: str, clock: ManualClock) -> AsyncIterator[ProviderClient]:
    """The bridge's provider client on the sandbox, one for all a test's examples."""
    async with httpx.AsyncClient() as http:
        yield ProviderClient(
            http=http, base_url=f"{sandbox_url}/api/v1", api_key="test-key", clock=clock
        )


@settings(max_examples=200, deadline=None)
@given(text=near_a_boundary(), arabic_type=st.sampled_from([2, 4]))
def test_the_sandbox_bills_the_parts_the_bridge_counts(text: str, arabic_type: int) -> None:
    form = shape(text, arabic_type=arabic_type)
    assert sms_parts(text, form.message_type) == form.parts


# Fixtures are set up once for all the examples, as wanted here: the sandbox's rate
# window and balance are renewed by hand. No shrinking: each step is three requests,
# and the test above shrinks the same texts without them.
@settings(
    max_examples=100,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(text=near_a_boundary(), arabic_type=st.sampled_from([2, 4]))
@example(text="a" * 152 + "€" + "a" * 152, arabic_type=2)
@example(text="ł" * 66 + "😀" + "ł" * 66, arabic_type=2)
async def test_the_bridge_estimate_is_what_the_sandbox_bills(
    text: str,
    arabic_type: int,
    provider: ProviderClient,
    sandbox_state: SandboxState,
    clock: ManualClock,
) -> None:
    """The parts and cost estimate the bridge stores for a message (policy/shaping.py:
    shape, then the price book read from the provider) against the sandbox's bill for
    the send, and its calculator, both over loopback HTTP through the bridge's client."""
    clock.advance(60)  # a fresh rate window (100 requests a minute)
    sandbox_state.balance = 1000.0
    form = shape(text, arabic_type=arabic_type)
    prices = PriceBook()
    prices.load(await provider.pricing())
    estimate = prices.estimate(TO, form.parts)
    sent = await provider.send(TO, text, message_type=form.message_type)
    assert sent.cost == estimate, (form, sent)
    calculated = await provider.calculate([TO], text)
    assert calculated["parts"] == form.parts and calculated["cost"] == estimate


@pytest.mark.parametrize(
    "text",
    [
        "a" * 152 + "€" + "a" * 150 + " " + "word " * 60,  # an escape pair at part 1's edge
        "ł" * 66 + "😀" + "ł" * 200,  # a surrogate pair at part 1's edge
    ],
)
async def test_a_cut_text_is_billed_no_more_than_max_parts(
    text: str, tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """limits.max_parts = 2: the cut counted 2 x 153 septets (2 x 67 units), but a pair
    that would straddle a part's edge starts the next part, so what was sent was billed
    3 parts. The stored text, its count and the bill stay within max_parts."""
    config = bridge_config(tmp_path, sandbox_url, "[limits]\nmax_parts = 2\n")
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        response = await http.post(f"{url}/api/v1/messages", json={"to": TO, "message": text})
        [mid] = response.json()["ids"]
        await pump(bridge, clock, lambda: sandbox_state.entries, max_seconds=60)
        stored = await bridge.store.get(mid)
    assert stored is not None and stored.parts == count_parts(stored.text) <= 2, stored
    assert stored.text.endswith(("...", "…")) and len(stored.text) > 120  # cut, not gutted
    assert [e.parts for e in sandbox_state.entries] == [stored.parts]
    assert sms_parts(stored.text, stored.message_type) == stored.parts


async def test_look_alikes_are_replaced_only_where_that_makes_the_text_gsm(
    tmp_path, clock: ManualClock, sandbox_url: str
) -> None:
    """limits.transliterate removed every zero-width joiner and non-joiner, in texts that
    stay UCS-2 whatever it does: Persian words lost the ZWNJ their spelling needs
    (پایگاه‌داده, "database") and emoji sequences fell apart (🧑‍💻 became 🧑 and 💻).
    Such texts are kept as written; a text the replacement makes GSM still gets it."""
    persian = "\u062e\u0637\u0627: \u067e\u0627\u06cc\u06af\u0627\u0647\u200c\u062f\u0627\u062f\u0647 \u0642\u0637\u0639 \u0627\u0633\u062a"
    emoji = "Deploy by \U0001f9d1\u200d\U0001f4bb done \u2014 \u201cok\u201d"
    plain = "It\u2019s \u201cdone\u201d \u2013 really\u2026"
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        stored = []
        for text in (persian, emoji, plain):
            response = await http.post(f"{url}/api/v1/messages", json={"to": TO, "message": text})
            [mid] = response.json()["ids"]
            stored.append(await bridge.store.get(mid))
    assert [m.text for m in stored] == [persian, emoji, 'It\'s "done" - really...']
    assert [m.message_type for m in stored] == [2, 2, 1]


async def stored_as(
    tmp_path: Path, clock: ManualClock, sandbox_url: str, text: str, extra: str = ""
) -> Message:
    """The message `text` is stored as, posted to a bridge configured with `extra`."""
    config = bridge_config(tmp_path, sandbox_url, extra)
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        response = await http.post(f"{url}/api/v1/messages", json={"to": TO, "message": text})
        [mid] = response.json()["ids"]
        stored = await bridge.store.get(mid)
    assert stored is not None, response.text
    return stored


async def test_a_long_text_whose_look_alikes_and_emoji_lie_past_the_cut_goes_as_gsm(
    tmp_path, clock: ManualClock, sandbox_url: str
) -> None:
    """A long cron log with a curly quote near its start and a checkmark at its end was
    judged on the whole text: neither the replacement nor the GSM alphabet applied, so it
    was cut to 3 x 67 units. What is sent (the head) is GSM once its quote is replaced:
    3 x 153 septets of it go, at the same parts."""
    text = (
        "Backup \u201cnightly\u201d failed: " + "rsync error code 23 on /srv/data " * 30 + "\u2714"
    )
    stored = await stored_as(tmp_path, clock, sandbox_url, text)
    assert stored.text.startswith('Backup "nightly" failed: rsync') and stored.text.endswith("...")
    assert (stored.message_type, stored.parts) == (1, 3) and len(stored.text) > 400


@pytest.mark.parametrize("septets", [158, 305])
async def test_a_text_gsm_up_to_just_before_a_full_cut_still_goes_as_gsm(
    tmp_path, clock: ManualClock, sandbox_url: str, septets: int
) -> None:
    """A GSM head that fit the parts but not the GSM ellipsis beside it (158 septets of 160,
    305 of 306) was judged on the whole text: cut as UCS-2, a 1-part text kept 65 of its
    158 characters, all of them GSM, only the '…' making it UCS-2. Cut as GSM, before
    the checkmark, it keeps ~155 at the same parts."""
    parts = 1 if septets <= 160 else 2
    text = ("rsync error code 23 on /srv/data " * 20)[:septets] + "\u2714 done"
    stored = await stored_as(tmp_path, clock, sandbox_url, text, f"[limits]\nmax_parts = {parts}\n")
    assert stored.text.startswith("rsync error") and stored.text.endswith("...")
    assert (stored.message_type, stored.parts) == (1, parts)
    assert len(stored.text) > septets - 12


FLAG = "\U0001f1fa\U0001f1f8"  # 🇺🇸: two regional indicators, a surrogate pair each


@pytest.mark.parametrize("before", ["Status: x", "Status: xx"])
async def test_a_text_of_flags_is_cut_between_flags(
    before: str, tmp_path, clock: ManualClock, sandbox_url: str
) -> None:
    """Cut at limits.max_parts a code point at a time, a text of flags ended in half of
    one (a lone regional indicator: a letter in a box on the phone) whenever the budget
    left room for an odd number of them: with "xx" before the flags here."""
    text = before + FLAG * 40
    stored = await stored_as(tmp_path, clock, sandbox_url, text, "[limits]\nmax_parts = 1\n")
    flags = stored.text.removeprefix(before).removesuffix("…")
    assert stored.text.startswith(before) and stored.text.endswith("…") and stored.parts == 1
    assert flags == FLAG * (len(flags) // 2) and len(flags) >= 28, stored.text
