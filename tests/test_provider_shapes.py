"""The client reads every answer shape the sandbox can take; the sandbox is an oracle of
its own; /logs matching tolerates how a provider writes numbers, texts and times."""

from __future__ import annotations

from datetime import UTC, datetime

import httpx
import pytest

from bridge.clock import ManualClock, zone
from bridge.errors import (
    PermanentSendError,
    ProviderAccountError,
    ProviderInactiveError,
    TransientSendError,
)
from bridge.provider.client import ProviderClient, ProviderFailed, TransientUnknownOutcome
from bridge.provider.logmatch import LogMatcher, provider_time, same_number, same_text
from bridge.provider.sandbox import VARIANTS, Fault, SandboxState, sms_parts
from bridge.text import shape

KEY = {"X-API-Key": "test-key"}
NUMBERS = ["+12025550152", "+447911123456"]


def client_for(http: httpx.AsyncClient, url: str, clock: ManualClock) -> ProviderClient:
    return ProviderClient(http=http, base_url=f"{url}/api/v1", api_key="test-key", clock=clock)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
async def test_the_client_reads_every_variant_as_a_success(
    variant: str, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    sandbox_state.shape = VARIANTS[variant]
    async with httpx.AsyncClient() as http:
        client = client_for(http, sandbox_url, clock)
        one = await client.send("+12025550143", "hello")
        bulk = await client.send_bulk(NUMBERS, "hi all")
        page = await client.logs()
    by_id = {str(e.message_id): e for e in sandbox_state.entries}
    if VARIANTS[variant].send_answer == "id":
        assert one.message_ids == {"+12025550143": str(sandbox_state.entries[0].message_id)}
    else:
        assert one.message_ids == {}
    # Bulk ids are keyed by our numbers, whatever form the provider wrote them in, and the
    # batch id is never one of them.
    for number, mid in bulk.message_ids.items():
        assert by_id[mid].to == number
    if VARIANTS[variant].bulk_answer == "ids":
        assert set(bulk.message_ids) == set(NUMBERS)
    assert bulk.batch_id not in bulk.message_ids.values()
    assert bulk.cost == pytest.approx(0.5 + 0.8)
    # /logs entries come out the same whatever the keys and number format.
    entries = {e.id: e for e in page.entries}
    for entry in sandbox_state.entries:
        got = entries[str(entry.message_id)]
        assert same_number(entry.to, got.recipient) and got.message == entry.message
        assert got.status == "pending"
        # Each entry's cost, whatever its key: `price` in the other keys' shape (what
        # that message cost, as a bulk answer's `price` is each message's).
        assert got.cost == entry.cost
        stamp = provider_time(got.created_at, zone(VARIANTS[variant].timezone))
        assert stamp == pytest.approx(entry.created_at, abs=1)


async def test_201_counts_as_200(
    clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    sandbox_state.shape = VARIANTS["created-201"]
    async with httpx.AsyncClient() as http:
        raw = await http.post(
            f"{sandbox_url}/api/v1/send", headers=KEY, json={"to": "+12025550143", "message": "x"}
        )
        result = await client_for(http, sandbox_url, clock).send("+12025550144", "y")
    assert raw.status_code == 201
    assert result.message_ids == {"+12025550144": str(sandbox_state.entries[1].message_id)}


async def test_status_classification(
    clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    async with httpx.AsyncClient() as http:
        client = client_for(http, sandbox_url, clock)
        sandbox_state.faults.append(Fault(status=403, path="/send"))
        with pytest.raises(ProviderInactiveError):
            await client.send("+12025550143", "x")
        sandbox_state.faults.append(Fault(status=404, path="/logs"))
        with pytest.raises(TransientSendError) as missing:
            await client.logs()
        assert missing.value.status == 404
        sandbox_state.faults.append(Fault(status=503, path="/send"))
        with pytest.raises(ProviderFailed):  # the provider's own error body
            await client.send("+12025550143", "x")
        sandbox_state.faults.append(Fault(status=502, path="/send", body="<html>gateway</html>"))
        with pytest.raises(TransientUnknownOutcome):  # a gateway's: it may have gone
            await client.send("+12025550143", "x")
        for words in ("Daily limit reached", "Please try again"):
            body = f'{{"success": false, "message": "{words}"}}'
            sandbox_state.faults.append(Fault(status=200, path="/send", body=body))
            with pytest.raises(TransientSendError) as transient:
                await client.send("+12025550143", "x")
            assert not isinstance(transient.value, PermanentSendError)
        # The account's words, on a 200 or a 402: the account waits, not the text fails.
        for status in (200, 402):
            body = '{"success": false, "message": "Insufficient balance"}'
            sandbox_state.faults.append(Fault(status=status, path="/send", body=body))
            with pytest.raises(ProviderAccountError):
                await client.send("+12025550143", "x")
        sandbox_state.faults.append(
            Fault(status=200, path="/send", body='{"success": false, "message": "Bad sender"}')
        )
        with pytest.raises(PermanentSendError):
            await client.send("+12025550143", "x")
        # A bulk answer that accepts fewer than it was given, without ids: unknown.
        sandbox_state.faults.append(
            Fault(status=200, path="/send-bulk", body='{"success": true, "data": {"total": 1}}')
        )
        with pytest.raises(TransientUnknownOutcome, match="1 of 2"):
            await client.send_bulk(NUMBERS, "x")


async def test_strict_sandbox_refuses_what_the_real_api_may(
    clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    sandbox_state.shape = VARIANTS["strict"]
    past = datetime.fromtimestamp(clock.now() - 60, UTC).strftime("%Y-%m-%d %H:%M:%S")
    future = datetime.fromtimestamp(clock.now() + 3600, UTC)
    unpadded = f"{future.year}-{future.month}-{future.day} {future.hour}:{future.minute}:00"
    refused = [
        {"to": "12025550143", "message": "x"},
        {"to": "+12025550143", "message": "x", "schedule_time": past},
        {"to": "+12025550143", "message": "x", "flash": True},
    ]
    if unpadded != future.strftime("%Y-%m-%d %H:%M:00"):
        refused.append({"to": "+12025550143", "message": "x", "schedule_time": unpadded})
    async with httpx.AsyncClient(base_url=f"{sandbox_url}/api/v1", headers=KEY) as http:
        for body in refused:
            answer = await http.post("/send", json=body)
            assert answer.status_code == 400, body
        sandbox_state.balance = 0.4
        broke = await http.post("/send", json={"to": "+12025550143", "message": "x"})
        assert broke.status_code == 200 and broke.json()["success"] is False
        assert "balance" in broke.json()["message"]
    assert sandbox_state.entries == [] and sandbox_state.balance == 0.4


def test_the_sandbox_agrees_with_the_bridge_on_parts() -> None:
    # Two tables written apart (tests/test_imports.py keeps the sandbox off bridge.text)
    # agree on what a text costs: a part-count bug on either side shows here.
    samples = ["x" * 160, "x" * 161, "{}" * 80, "€" * 81, "é" * 200, "héllo ☃", "مرحبا" * 20]
    for text in samples:
        form = shape(text)
        assert sms_parts(text, form.message_type) == form.parts, text


def test_numbers_texts_and_times_match_however_written() -> None:
    assert same_number("+12025550152", "12025550152")
    assert same_number("+12025550152", "0012025550152")
    assert same_number("+12025550152", "+1 (202) 555-0152")
    assert same_number("+447911123456", "07911123456")  # national
    assert not same_number("+447911123456", "07911123457")
    assert not same_number("+12025550152", "2")
    text = "disk full on db-2: /var at 98%, writes failing since 02:14"
    assert same_text(text, text.replace(" ", "  "))
    assert same_text(text, text[:40] + "...")
    assert not same_text(text, text[:5])  # too short a cut to tell
    assert not same_text(text, "disk full on db-3")
    beirut = zone("Asia/Beirut")
    at = datetime(2026, 11, 30, 2, 0, tzinfo=UTC).timestamp()
    assert provider_time("2026-11-30 04:00:00", beirut) == at  # UTC+2 in winter
    assert provider_time("2026-11-30T02:00:00Z", beirut) == at
    assert provider_time(at, beirut) == at and provider_time(at * 1000, beirut) == at
    assert provider_time("yesterday", beirut) is None


def test_log_matcher_takes_each_entry_once() -> None:
    class M:
        def __init__(self, recipient: str, text: str) -> None:
            self.recipient, self.text = recipient, text

    a, b = M("+12025550152", "same text"), M("+12025550152", "same text")
    matcher: LogMatcher[M, str] = LogMatcher([a, b])
    assert matcher.offer("e2", "12025550152", "same  text", None)
    assert matcher.offer("e1", "12025550152", "same text", None)
    assert not matcher.offer("e0", "12025550152", "other text", None)
    assert matcher.pairs() == [("e1", a), ("e2", b)] and not matcher
    assert matcher.offer("e3", "12025550152", "same text", None)  # collected, unpaired
    assert matcher.pairs() == [("e3", a), ("e1", b)] and not matcher.remaining()


def test_log_matcher_pairs_repeats_in_time_order() -> None:
    """/logs is newest first: settled as read, the newest entry went to the oldest of two
    repeats. Paired over all entries, the oldest entry goes to the oldest message; an
    entry older than a message went (less CLOCK_SKEW) is never that message's."""

    class M:
        def __init__(self, at: float) -> None:
            self.recipient, self.text, self.at = "+12025550152", "same text", at

    a, b = M(1000.0), M(1020.0)
    matcher: LogMatcher[M, str] = LogMatcher([a, b], since=lambda m: m.at)
    for entry, created in (("e2", 1021.0), ("e1", 1001.0)):  # newest first, as read
        assert matcher.offer(entry, "12025550152", "same text", created)
    assert matcher.pairs() == [("e1", a), ("e2", b)]
    late: LogMatcher[M, str] = LogMatcher([M(2000.0)], since=lambda m: m.at)
    assert not late.offer("e1", "12025550152", "same text", 1001.0)  # 999 s before it went
    assert late.remaining() and late.reach(late.remaining()[0]) == 2000.0 - 120


def test_log_matcher_pairs_over_every_entry_not_as_read() -> None:
    """Id-less sends E0 at 0 and E1 at 120, then M claimed at 240 (same phone and text),
    timed out; the provider logged all three. Read newest first and settled as read, the
    entry at 240 went to E0, the one at 120 to E1, and the one at 0, too old for M (0 <
    240 - CLOCK_SKEW), to none: M "not found", resent, a second SMS. Every entry is
    collected, then the oldest paired first: M gets the entry at 240."""

    class M:
        def __init__(self, name: str, at: float) -> None:
            self.recipient, self.text = "+12025550152", "FIRING: HighCPU"
            self.name, self.at = name, at

        def __repr__(self) -> str:
            return self.name

    e0, e1, m = M("E0", 0.0), M("E1", 120.0), M("M", 240.0)
    matcher: LogMatcher[M, str] = LogMatcher([e0, e1, m], since=lambda x: x.at)
    assert matcher.offer("@240", "12025550152", "FIRING: HighCPU", 240.0)
    assert matcher.remaining() == [e1, m]  # so far: the entry at 240 is E0's
    assert matcher.reach(m) == 0.0 - 120  # older entries still bear on M: read on
    assert matcher.offer("@120", "12025550152", "FIRING: HighCPU", 120.0)
    assert matcher.offer("@0", "12025550152", "FIRING: HighCPU", 0.0)
    assert matcher.pairs() == [("@0", e0), ("@120", e1), ("@240", m)]
    assert not matcher.remaining()
    # Two sends suffice: E1 at 100, M at 300.
    e1, m = M("E1", 100.0), M("M", 300.0)
    two: LogMatcher[M, str] = LogMatcher([e1, m], since=lambda x: x.at)
    for entry, created in (("@300", 300.0), ("@100", 100.0)):
        assert two.offer(entry, "12025550152", "FIRING: HighCPU", created)
    assert two.pairs() == [("@100", e1), ("@300", m)]


def test_log_matcher_reach_counts_earlier_sends_of_any_text_to_the_number() -> None:
    """An entry fits a message whose text it begins: M "Backup failed on host db1"'s
    entry fits A "Backup failed on host db1 (retry 2)", sent 200 s before M. A takes it
    (it went first), and A's own entry is older than M's claim less CLOCK_SKEW. How deep
    the walk reads for M asked only of sends of M's own text: it stopped before A's
    entry, and M, "not found", was sent again. Every earlier send to the number counts."""

    class M:
        def __init__(self, text: str, at: float) -> None:
            self.recipient, self.text, self.at = "+12025550152", text, at

    a = M("Backup failed on host db1 (retry 2)", 0.0)
    m = M("Backup failed on host db1", 200.0)
    matcher: LogMatcher[M, str] = LogMatcher([a, m], since=lambda x: x.at)
    assert matcher.offer("@200", "12025550152", "Backup failed on host db1", 200.0)
    assert matcher.remaining() == [m]  # so far: M's entry is A's
    assert matcher.reach(m) == 0.0 - 120  # A's entry bears on M: read on


def test_a_send_went_at_its_claim_when_the_answer_came_later() -> None:
    """`sent_at` is when the answer came back, after the provider logged the request: an
    id-less send whose answer took 200 s could not take its own entry (created more than
    CLOCK_SKEW before it "went"). It went at its claim, or its send if earlier."""
    from types import SimpleNamespace

    from bridge.delivery.poller import _went as polled_went
    from bridge.delivery.reconcile import _went
    from bridge.models import State

    slow = SimpleNamespace(state=State.SENT, claimed_at=1000.0, sent_at=1200.0)
    sending = SimpleNamespace(state=State.SENDING, claimed_at=1300.0, sent_at=1200.0)
    no_claim = SimpleNamespace(state=State.SENT, claimed_at=None, sent_at=1200.0)
    assert _went(slow) == polled_went(slow) == 1000.0  # type: ignore[arg-type]
    assert _went(sending) == 1300.0  # type: ignore[arg-type]
    assert _went(no_claim) == polled_went(no_claim) == 1200.0  # type: ignore[arg-type]


def test_new_provider_keys_are_checked(tmp_path) -> None:
    from bridge.config import load_config
    from bridge.errors import ConfigError
    from tests.helpers import write_config

    body = (
        '[provider]\nmax_unknown_resends = 9\ntimezone = "Mars/Olympus"\n'
        '[sandbox]\nvariant = "kind"\n'
    )
    with pytest.raises(ConfigError) as bad:
        load_config(write_config(tmp_path, body), env={})
    keys = {key for key, _ in bad.value.problems}
    assert keys == {"provider.max_unknown_resends", "provider.timezone", "sandbox.variant"}
    good = '[provider]\nmax_unknown_resends = 0\ntimezone = "Asia/Beirut"\n'
    config = load_config(write_config(tmp_path, good, "good.toml"), env={})
    assert config.provider.timezone == "Asia/Beirut" and config.sandbox.variant == "documented"
