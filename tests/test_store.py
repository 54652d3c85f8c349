"""The store through its interface (`bridge.store.api.Store`), on every backend in
tests/stores.py: group commit, the event log, ingest with policy lookups, claims, the
rate window, budgets, digests, retention, migrations."""

from __future__ import annotations

import asyncio
import random

import pytest

from bridge.models import NewMessage, State
from bridge.policy.decide import Rules
from bridge.pricing import BILLED_MAX_FOR
from bridge.store import Store
from bridge.store.api import Held, IngestQuestions, Lookups, OriginalQuestion, Pause
from tests.stores import AS_GIVEN, BACKENDS, FACTORIES, aggregated, reported, seed

MESSAGE = NewMessage("+12025550143", "hi", "http", "SMS", 1, 1)
OWNER = {"owner": "test:1", "lease_until": 1e12}


async def test_concurrent_ingests_share_transactions(store: Store) -> None:
    before = store.stats()
    ids = await asyncio.gather(*[seed(store, [MESSAGE], 1.0) for _ in range(200)])
    assert sorted(i for [i] in ids) == list(range(1, 201))
    after = store.stats()
    assert after.writes - before.writes == 200
    # group commit: fewer commits than acknowledgements, and at least one
    assert 0 < after.transactions - before.transactions < 200
    assert (await store.counts()) == {"queued": 200}


async def test_every_state_change_is_logged(store: Store) -> None:
    [mid] = await seed(store, [MESSAGE], 1.0)
    await store.claim([mid], 2.0, **OWNER)
    await store.requeue([mid], 3.0, owner=OWNER["owner"], at=10.0, reason="retrying: HTTP 500")
    await store.claim([mid], 11.0, **OWNER)
    await store.mark_sent([(mid, "p-1", 0.5)], 12.0, owner=OWNER["owner"])
    await store.record_status([(mid, State.DELIVERED, None)], 20.0)
    events = await store.events(mid)
    assert [(e["state"], e["attempts"]) for e in events] == [
        ("queued", 0),
        ("sending", 1),
        ("queued", 1),
        ("sending", 2),
        ("sent", 2),
        ("delivered", 2),
    ]
    assert events[2]["detail"] == "retrying: HTTP 500"
    message = await store.get(mid)
    assert message is not None
    assert message.provider_message_id == "p-1" and message.cost == 0.5


async def test_set_based_updates_give_each_row_its_own_values(store: Store) -> None:
    ids = await seed(store, [MESSAGE] * 4, 1.0)
    assert await store.claim(list(reversed(ids)), 2.0, **OWNER) == list(reversed(ids))
    await store.mark_sent(
        [(ids[0], "p-0", 0.25), (ids[1], "p-1", None), (ids[2], "p-2", 1.5)],
        3.0,
        owner=OWNER["owner"],
    )
    await store.requeue([ids[3]], 3.0, owner=OWNER["owner"], at=9.0, reason="retrying: HTTP 503")
    await store.record_status(
        [(ids[0], State.DELIVERED, None), (ids[1], State.FAILED, "expired")], 4.0
    )
    got = {i: await store.get(i) for i in ids}
    assert [(got[i].state, got[i].provider_message_id, got[i].cost) for i in ids] == [
        (State.DELIVERED, "p-0", 0.25),
        (State.FAILED, "p-1", None),
        (State.SENT, "p-2", 1.5),
        (State.QUEUED, None, None),
    ]
    assert got[ids[1]].reason == "expired" and got[ids[3]].next_attempt_at == 9.0
    assert got[ids[3]].reason == "retrying: HTTP 503" and got[ids[2]].sent_at == 3.0


async def test_a_late_send_keeps_a_later_state_and_is_noted_on_the_message(
    store: Store,
) -> None:
    """A send the provider accepted after the row moved on (another instance took the
    claim over, sent it, the poller saw it delivered): the row keeps its state and the
    other send's provider id, and its history says this send happened too."""
    mine, delivered, requeued, found = await seed(store, [MESSAGE] * 4, 1.0)
    await store.claim([mine, delivered, requeued, found], 2.0, **OWNER)
    # What happened meanwhile (on both backends; the takeover itself is PostgreSQL's, in
    # test_pg_cluster.py): one sent and delivered, one put back in the queue, one found
    # in /logs with this very send's provider id ("p-found").
    await store.mark_sent(
        [(delivered, "p-other", 0.3), (found, "p-found", 0.1)], 3.0, owner=OWNER["owner"]
    )
    await store.record_status([(delivered, State.DELIVERED, None)], 4.0)
    await store.requeue(
        [requeued], 4.0, owner=OWNER["owner"], at=9.0, reason="not in /logs: sending again"
    )
    late = await store.mark_sent(
        [
            (mine, "p-1", 0.1),
            (delivered, "p-late", 0.1),
            (requeued, "p-2", 0.1),
            (found, "p-found", 0.1),
        ],
        5.0,
        owner=OWNER["owner"],
    )
    assert late == [delivered]
    got = {i: await store.get(i) for i in (mine, delivered, requeued, found)}
    assert [(got[i].state, got[i].provider_message_id, got[i].cost) for i in got] == [
        (State.SENT, "p-1", 0.1),
        (State.DELIVERED, "p-other", 0.3),
        (State.SENT, "p-2", 0.1),  # nobody held it: sent, not sent again
        (State.SENT, "p-found", 0.1),
    ]
    last = (await store.events(delivered))[-1]
    assert (last["state"], last["at"]) == ("delivered", 5.0)
    assert (
        last["detail"] == "sent also by test:1 after its claim was taken over: provider id p-late"
    )
    assert [e["state"] for e in await store.events(found)] == ["queued", "sending", "sent"]


async def test_a_late_outcome_keeps_a_later_state_and_is_noted_on_the_message(
    store: Store,
) -> None:
    """An outcome (a refusal) that comes after the row moved on (another instance took
    the claim over and the text was delivered) leaves the row as it is and says what it
    was in the message's history; a row still held, or queued (a daily cap met before the
    claim), takes it. A delivery report only moves a `sent` row."""
    mine, queued, delivered = await seed(store, [MESSAGE] * 3, 1.0)
    await store.claim([mine, delivered], 2.0, **OWNER)
    await store.mark_sent([(delivered, "p-1", 0.1)], 3.0, owner=OWNER["owner"])
    await store.record_status([(delivered, State.DELIVERED, None)], 4.0)
    late = await store.finish(
        [
            (mine, State.FAILED, "provider refused: bad number"),
            (delivered, State.FAILED, "provider refused: late"),
        ],
        5.0,
        owner=OWNER["owner"],
    )
    assert late == [delivered]
    capped = [(queued, State.FAILED, "daily budget reached")]
    assert await store.finish(capped, 5.0, owner=OWNER["owner"], queued=True) == []
    again = {"owner": OWNER["owner"], "at": 9.0, "reason": "retrying: HTTP 500"}
    assert await store.requeue([delivered, queued], 5.5, **again) == [delivered, queued]
    # An unknown outcome is settled only where the owner still holds the claim.
    who = {"owner": OWNER["owner"]}
    assert await store.note_unknown([delivered], 5.6, "outcome unknown: timeout", "unknown", **who)
    assert await store.resend_unknown([delivered, queued], 5.7, "not in /logs", **who) == [
        delivered,
        queued,
    ]
    assert await store.settle_unknown([delivered], 5.8, "outcome unknown: given up", **who)
    await store.record_status([(mine, State.DELIVERED, None)], 6.0)  # failed: not sent
    got = [await store.get(i) for i in (mine, queued, delivered)]
    assert [(m.state, m.reason) for m in got] == [
        (State.FAILED, "provider refused: bad number"),
        (State.FAILED, "daily budget reached"),
        (State.DELIVERED, None),
    ]
    by = "not applied, test:1 no longer held it"
    assert [(e["state"], e["at"], e["detail"]) for e in (await store.events(delivered))[-5:]] == [
        ("delivered", 5.0, f"{by}: failed: provider refused: late"),
        ("delivered", 5.5, f"{by}: queued again: retrying: HTTP 500"),
        ("delivered", 5.6, f"{by}: outcome unknown: timeout"),
        ("delivered", 5.7, f"{by}: not in /logs"),
        ("delivered", 5.8, f"{by}: outcome unknown: given up"),
    ]


async def test_a_late_retry_leaves_a_row_another_put_back_in_the_queue_as_it_is(
    store: Store,
) -> None:
    """a's lease lapsed while it waited for the provider; b took the message over and
    put it back in the queue (its retry: its schedule, its reason, the attempt count it
    reads for backoff). a's late word (a 429, whose attempt is refunded; a refusal) is
    an event: it neither takes an attempt off b's count nor moves b's schedule, nor
    fails the message. Only a decision on rows never claimed (a daily cap, `queued`)
    writes queued rows, and only those."""
    mid, capped, claimed = await seed(store, [MESSAGE] * 3, 1.0)
    assert await store.claim([mid], 2.0, owner="a", lease_until=32.0) == [mid]
    assert [m.id for m in await store.unsettled(40.0, owner="b", lease_until=70.0)] == [mid]
    b_retry = "retrying: HTTP 503"
    assert await store.requeue([mid], 41.0, owner="b", at=60.0, reason=b_retry) == []
    limited = "rate limited by the provider (HTTP 429)"
    late = await store.requeue([mid], 42.0, owner="a", at=42.0, reason=limited, refund_attempt=True)
    assert late == [mid]
    refused = [(mid, State.FAILED, "provider refused: invalid number")]
    assert await store.finish(refused, 43.0, owner="a") == [mid]
    got = await store.get(mid)
    assert (got.state, got.attempts, got.next_attempt_at, got.reason) == (
        State.QUEUED,
        1,
        60.0,
        b_retry,
    )
    by = "not applied, a no longer held it"
    assert [e["detail"] for e in (await store.events(mid))[-2:]] == [
        f"{by}: queued again: {limited}",
        f"{by}: failed: provider refused: invalid number",
    ]
    # The daily cap: written on a queued row, not on one claimed meanwhile.
    assert await store.claim([claimed], 44.0, owner="b", lease_until=74.0) == [claimed]
    waiting = {"owner": "a", "at": 86_400.0, "reason": "daily budget reached", "queued": True}
    assert await store.requeue([capped, claimed], 45.0, **waiting) == [claimed]
    assert [(await store.get(i)).state for i in (capped, claimed)] == [
        State.QUEUED,
        State.SENDING,
    ]
    assert (await store.get(capped)).next_attempt_at == 86_400.0
    # a never held it: the event says what a found, not that a lost it.
    assert (await store.events(claimed))[-1]["detail"] == (
        "not applied, a found it no longer queued: queued again: daily budget reached"
    )
    failing = [(claimed, State.FAILED, "daily budget reached")]
    assert await store.finish(failing, 46.0, owner="a", queued=True) == [claimed]
    assert (await store.events(claimed))[-1]["detail"] == (
        "not applied, a found it no longer queued: failed: daily budget reached"
    )


async def test_a_resend_or_settle_of_unknown_outcomes_answers_just_the_rows_it_left(
    store: Store,
) -> None:
    """a reconciles a batch of unknown outcomes; b took some over meanwhile (a's lease
    lapsed on those) and resent or settled them itself. a's calls write the rows it
    still holds and answer exactly the others, in the order given: what the reconciler
    logs as resent or given up, and warns the admin of, is counted from that answer."""
    kept, resent, lost_resent, lost_settled = await seed(store, [MESSAGE] * 4, 1.0)
    await store.claim([kept, resent], 2.0, owner="a", lease_until=1e12)
    await store.claim([lost_resent, lost_settled], 2.0, owner="a", lease_until=32.0)
    everyone = [kept, resent, lost_resent, lost_settled]
    unknown = ("outcome unknown: timeout", "unknown")
    assert await store.note_unknown(everyone, 3.0, *unknown, owner="a") == []
    # When the outcome became unknown: the reconciler's wait for /logs counts from it.
    assert {(await store.get(i)).updated_at for i in everyone} == {3.0}
    # b's sweep past the lapsed lease (PostgreSQL takes those over; SQLite, one process,
    # lists every row in `sending`), and its own verdicts on them.
    swept = {m.id for m in await store.unsettled(40.0, owner="b", lease_until=70.0)}
    assert {lost_resent, lost_settled} <= swept
    assert await store.resend_unknown([lost_resent], 41.0, "b: resent", owner="b") == []
    assert await store.settle_unknown([lost_settled], 41.0, "b: given up", owner="b") == []
    late = await store.resend_unknown([lost_resent, resent], 42.0, "a: resent", owner="a")
    assert late == [lost_resent]
    late = await store.settle_unknown([lost_settled, kept], 42.0, "a: given up", owner="a")
    assert late == [lost_settled]
    got = {i: await store.get(i) for i in everyone}
    assert [(got[i].state, got[i].reason, got[i].unknown_resends) for i in everyone] == [
        (State.SENT, "a: given up", 0),
        (State.QUEUED, "a: resent", 1),
        (State.QUEUED, "b: resent", 1),  # one resend, b's: a's is an event
        (State.SENT, "b: given up", 0),
    ]
    by = "not applied, a no longer held it"
    assert [(await store.events(i))[-1]["detail"] for i in (lost_resent, lost_settled)] == [
        f"{by}: a: resent",
        f"{by}: a: given up",
    ]


async def test_sends_without_an_id_are_listed_for_reconciliation(store: Store) -> None:
    """What reconciliation keeps its hands off in /logs: the sends to these recipients
    the provider took without naming an id, in the span asked, oldest first; not a send
    with an id, one to another number, one outside the span, nor one ended "outcome
    unknown" (the provider never said it took it)."""
    other = NewMessage("+12025550144", "hi", "http", "SMS", 1, 1)
    ids = await seed(store, [MESSAGE, MESSAGE, MESSAGE, other, MESSAGE, MESSAGE], 1.0)
    late, early, with_id, elsewhere, after, unknown = ids
    for at, i in enumerate(ids):
        await store.claim([i], 10.0 + at, **OWNER)
    await store.mark_sent([(late, None, None)], 20.0, owner=OWNER["owner"])
    await store.mark_sent([(early, None, None)], 15.0, owner=OWNER["owner"])
    await store.mark_sent([(with_id, "p-1", None)], 16.0, owner=OWNER["owner"])
    await store.mark_sent([(elsewhere, None, None)], 17.0, owner=OWNER["owner"])
    await store.mark_sent([(after, None, None)], 90.0, owner=OWNER["owner"])
    await store.settle_unknown([unknown], 18.0, "outcome unknown", owner=OWNER["owner"])
    got = await store.sent_without_id([MESSAGE.recipient], since=12.0, until=60.0)
    assert [m.id for m in got] == [early, late]
    assert await store.sent_without_id([], since=0.0, until=1e12) == []


async def test_claim_only_takes_queued_messages_and_books_one_request(store: Store) -> None:
    ids = await seed(store, [MESSAGE] * 3, 1.0)
    assert await store.claim(ids[:2], 2.0, **OWNER) == ids[:2]
    assert await store.claim(ids, 3.0, **OWNER) == ids[2:]
    assert await store.claim(ids, 4.0, **OWNER, request_kind="send") == []
    assert [(b.at, b.kind) for b in await store.request_rows(0)] == [
        (2.0, "send"),
        (3.0, "send"),
        (4.0, "send"),
    ]
    assert [m.id for m in await store.unsettled(5.0, **OWNER)] == ids


async def test_concurrent_claims_never_share_a_message(store: Store) -> None:
    ids = await seed(store, [MESSAGE] * 6, 1.0)
    got = await asyncio.gather(
        *[store.claim(ids, 2.0, owner=f"i{n}", lease_until=40.0) for n in range(4)]
    )
    assert sorted(i for claimed in got for i in claimed) == ids


@pytest.mark.parametrize("backend", BACKENDS)
async def test_reopen_keeps_data_and_migrations_run_once(request, backend: str) -> None:
    factory = FACTORIES[backend]
    async with factory(request) as first:
        await first.open()
        applied = await first.migrate()
        # SQLite migrates at open (and reports it here); the PostgreSQL test database is
        # a copy of a migrated template (a fresh schema: tests/test_pg_schema.py).
        assert len(applied) >= (5 if backend == "sqlite" else 0)
        assert len(set(applied)) == len(applied)
        await seed(first, [MESSAGE], 1.0)
        await first.close()
    async with factory(request) as second:
        await second.open()
        try:
            assert await second.counts() == {"queued": 1}
            assert await second.migrate() == []  # none again on reopen
        finally:
            await second.close()


class Exploding:
    def questions(self, pending):
        return IngestQuestions()

    def decide(self, lookups, pending, ids):
        raise ValueError("policy bug")


async def test_one_bad_ingest_does_not_spoil_its_group(store: Store) -> None:
    results = await asyncio.gather(
        seed(store, [MESSAGE], 1.0),
        store.ingest([(MESSAGE, 1.0)], Exploding()),
        seed(store, [MESSAGE], 1.0),
        return_exceptions=True,
    )
    assert isinstance(results[1], ValueError)
    assert await store.counts() == {"queued": 2}


async def test_ingest_answers_policy_inside_its_transaction(store: Store) -> None:
    """Concurrent ingests of one alert: decided as one, the repeats name the original."""
    rules = Rules(dedupe_window=600.0, per_recipient=2, per_recipient_window=600.0)
    alert = MESSAGE._replace(dedupe_key="api:disk-full")
    other = [MESSAGE._replace(text=f"t{i}", dedupe_key=f"api:{i}") for i in range(3)]
    stored = await asyncio.gather(*[store.ingest([(alert, 10.0)], rules) for _ in range(5)])
    states = [s.message.state for [s] in stored]
    assert states.count(State.QUEUED) == 1 and states.count(State.SUPPRESSED) == 4
    original = next(s.id for [s] in stored if s.message.state == State.QUEUED)
    for [s] in stored:
        if s.message.state == State.SUPPRESSED:
            assert s.message.reason == f"duplicate of message {original} within 600s"
    # Later ingests see it stored: a repeat is suppressed, the third text held (storm).
    [again] = await store.ingest([(alert, 20.0)], rules)
    assert again.message.state == State.SUPPRESSED
    later = await store.ingest([(m, 30.0) for m in other], rules)
    assert [s.message.state for s in later] == [State.QUEUED, State.HELD, State.HELD]
    assert (await store.get(later[1].id)).state == State.HELD


async def test_the_store_answers_what_policy_asks(store: Store) -> None:
    keyed = MESSAGE._replace(dedupe_key="k")
    [first, _, failed] = await seed(store, [keyed, keyed, keyed._replace(text="x")], 5.0)
    await store.finish([(failed, State.FAILED, "refused")], 6.0, owner=OWNER["owner"], queued=True)
    [held] = await seed(store, [keyed._replace(recipient="+12025550144", state=State.HELD)], 7.0)
    # Scheduled texts count at their time (1970-01-01 00:01:40 UTC is 100 s), not at 5.
    await seed(
        store,
        [
            MESSAGE._replace(text="soon", schedule_time="1970-01-01 00:01:40"),
            MESSAGE._replace(text="later", schedule_time="1970-01-01 00:03:20"),
            MESSAGE._replace(
                recipient="+447700900123", state=State.HELD, schedule_time="1970-01-01 00:03:20"
            ),
        ],
        5.0,
    )
    seen: list[Lookups] = []
    mine, theirs, uk = MESSAGE.recipient, "+12025550144", "+447700900123"

    class Asking:
        def questions(self, pending):
            return IngestQuestions(
                originals=[
                    OriginalQuestion("k", MESSAGE.recipient, 0.0),
                    OriginalQuestion("k", MESSAGE.recipient, 5.5),
                ],
                storms=[
                    (mine, 8.0, 100.0, 0.0),
                    (theirs, 8.0, 100.0, 0.0),
                    (uk, 8.0, 100.0, 0.0),  # held at 200 s: a storm then, not now
                    (uk, 250.0, 100.0, 150.0),
                ],
            )

        def decide(self, lookups, pending, ids):
            seen.append(lookups)
            return [m for m, _ in pending]

    await store.ingest([(MESSAGE, 8.0)], Asking())
    assert seen[0].originals == {OriginalQuestion("k", MESSAGE.recipient, 0.0): first}
    assert seen[0].storms == {
        (mine, 8.0, 100.0, 0.0): (False, (5.0, 5.0, 100.0)),  # not the failed one
        (theirs, 8.0, 100.0, 0.0): (True, ()),
        (uk, 8.0, 100.0, 0.0): (False, ()),
        (uk, 250.0, 100.0, 150.0): (True, ()),
    }
    assert held > first


async def test_the_store_answers_a_scopes_last_word_to_the_phone_when_asked(store: Store) -> None:
    """`last_of`: with an original found, the key of the newest message from that scope
    to the phone (a key the bridge derived repeats only while it is the last word)."""
    down, up = (MESSAGE._replace(text=t, dedupe_key=f"route@k:text:{t}") for t in ("d", "u"))
    # One moment: the newest is the one stored last (by id).
    [first, change, _, _] = await seed(store, [down, up, down, down], 5.0)
    [failed] = await seed(store, [up], 6.0)  # not a word: it never reached the phone
    await store.finish([(failed, State.FAILED, "refused")], 6.5, owner=OWNER["owner"], queued=True)
    elsewhere = [  # another scope's word, another phone's: neither is this scope's
        MESSAGE._replace(text="u", dedupe_key="route@kuma:text:u"),
        up._replace(recipient="+12025550144"),
    ]
    await seed(store, elsewhere, 7.0)
    questions = [
        OriginalQuestion("route@k:text:d", MESSAGE.recipient, 0.0, "route@k:"),
        OriginalQuestion("route@k:text:u", MESSAGE.recipient, 0.0, "route@k:"),
        OriginalQuestion("route@k:text:d", MESSAGE.recipient, 0.0),  # not asked
        OriginalQuestion("route@k:text:x", MESSAGE.recipient, 0.0, "route@k:"),  # no original
        OriginalQuestion("route@kuma:text:u", MESSAGE.recipient, 0.0, "route@kuma:"),
    ]
    seen: list[Lookups] = []

    class Asking:
        def questions(self, pending):
            return IngestQuestions(originals=questions)

        def decide(self, lookups, pending, ids):
            seen.append(lookups)
            return [m for m, _ in pending]

    await store.ingest([(MESSAGE, 8.0)], Asking())
    assert seen[0].originals == {
        questions[0]: first,
        questions[1]: change,
        questions[2]: first,
        questions[4]: failed + 1,
    }
    assert seen[0].last_words == {
        questions[0]: "route@k:text:d",
        questions[1]: "route@k:text:d",
        questions[4]: "route@kuma:text:u",
    }


async def test_the_store_answers_a_batch_of_many_questions_whole(store: Store) -> None:
    """More questions than one statement takes (SQLite asks in chunks): each answered,
    and the batch's ids still follow the stored ones."""
    phones = [f"+1202555{n:04d}" for n in range(400)]
    stored = await seed(
        store,
        [MESSAGE._replace(recipient=p, dedupe_key=f"k{n}") for n, p in enumerate(phones)],
        5.0,
    )
    seen: list[Lookups] = []

    class Asking:
        def questions(self, pending):
            return IngestQuestions(
                # every other key is stored; the storms ask about 350 phones, 300 known
                originals=[
                    OriginalQuestion(f"k{n}" if n % 2 else f"new{n}", p, 0.0)
                    for n, p in enumerate(phones)
                ],
                storms=[(p, 8.0, 60.0, 0.0) for p in phones[100:]]
                + [(f"+1303555{n:04d}", 8.0, 60.0, 0.0) for n in range(50)],
            )

        def decide(self, lookups, pending, ids):
            seen.append(lookups)
            return [m for m, _ in pending]

    [after] = await store.ingest([(MESSAGE, 8.0)], Asking())
    assert after.id == stored[-1] + 1
    assert seen[0].originals == {
        OriginalQuestion(f"k{n}", p, 0.0): stored[n] for n, p in enumerate(phones) if n % 2
    }
    assert seen[0].storms == {
        **{(p, 8.0, 60.0, 0.0): (False, (5.0,)) for p in phones[100:]},
        **{(f"+1303555{n:04d}", 8.0, 60.0, 0.0): (False, ()) for n in range(50)},
    }


async def test_book_request_never_books_past_the_limit(store: Store) -> None:
    waits = await asyncio.gather(
        *[store.book_request(100.0 + i / 10, "cli:balance", limit=3, window=60.0) for i in range(8)]
    )
    assert sorted(waits)[:3] == [0.0, 0.0, 0.0] and all(w > 0 for w in sorted(waits)[3:])
    assert len(await store.request_rows(0)) == 3
    # When the oldest booking leaves the window there is room again, and not before.
    booked = [b.at for b in await store.request_rows(0)]
    assert await store.book_request(booked[0] + 59.9, "x", limit=3, window=60.0) > 0
    assert await store.book_request(booked[0] + 60.0, "x", limit=3, window=60.0) == 0.0
    rows = await store.request_rows(0, "cli", after=0)
    assert [b.kind for b in rows] == ["cli:balance"] * 3
    # The cursor is the highest seq seen (bookings made at once may not be in `at` order).
    assert await store.request_rows(0, "cli", after=max(b.seq for b in rows)) == []
    await store.prune_requests(booked[-1])
    assert [b.kind for b in await store.request_rows(0)] == ["x"]


async def test_a_booking_restamped_when_its_call_came_back_counts_from_then(store: Store) -> None:
    """The provider counts a request when it arrives, after its booking: the booking is
    moved to when its call came back. One booking of that time and kind moves, keeping
    its seq (a cursor sees no new row); the others, and a move of one already moved or
    pruned, change nothing. The window counts it from its new time."""
    for at, kind in [(100.0, "send"), (100.0, "send"), (100.0, "status"), (101.0, "send")]:
        assert await store.book_request(at, kind, limit=10, window=60.0) == 0.0
    before = {b.seq: (b.at, b.kind) for b in await store.request_rows(0)}
    await store.restamp_request(100.0, "send", 102.5)
    after = {b.seq: (b.at, b.kind) for b in await store.request_rows(0)}
    assert after.keys() == before.keys()
    assert sorted(after.values()) == [
        (100.0, "send"),
        (100.0, "status"),
        (101.0, "send"),
        (102.5, "send"),
    ]
    await store.restamp_request(100.0, "send", 103.0)
    await store.restamp_request(100.0, "send", 104.0)  # none left at 100.0: nothing
    assert sorted(b.at for b in await store.request_rows(0)) == [100.0, 101.0, 102.5, 103.0]
    # 60 s after the first stamps, the moved ones still count.
    assert await store.book_request(160.0, "x", limit=3, window=60.0) > 0
    assert await store.book_request(161.0, "x", limit=3, window=60.0) == 0.0


async def test_a_pause_holds_every_booking_until_it_ends(store: Store) -> None:
    assert await store.requests_paused_until(0.0) is None
    await store.pause_requests(145.0, "429 from the provider")
    await store.pause_requests(120.0, "an earlier one")  # changes nothing: the later holds
    assert await store.requests_paused_until(100.0) == Pause(145.0, "429 from the provider")
    assert await store.book_request(100.0, "cli:balance", limit=5, window=60.0) == 45.0
    ids = await seed(store, [MESSAGE] * 2, 1.0)
    window = {"limit": 5, "window": 60.0}
    assert await store.claim(ids, 144.9, **OWNER, **window) == []
    assert await store.request_rows(0) == []  # nothing booked while paused
    assert await store.requests_paused_until(145.0) is None  # over at its end
    assert await store.claim(ids, 145.0, **OWNER, **window) == ids
    assert await store.book_request(145.0, "cli:balance", limit=5, window=60.0) == 0.0
    assert [b.kind for b in await store.request_rows(0)] == ["send", "cli:balance"]


async def test_due_of_the_first_texts_keeps_the_full_reads_order_and_rows(store: Store) -> None:
    """`due(texts=N)`: the rows of the first N texts (text, sender, type) among the oldest
    `limit` due, each text placed by its first row (by due time, then id), in the order
    the full read gives them: the dispatcher's plan sees each call it can make whole."""

    at: dict[tuple[str, str, float], int] = {}
    for body, sender, now in [
        ("t1", "SMS", 1.0),
        ("t2", "SMS", 2.0),
        ("t1", "SMS", 3.0),
        ("t1", "OPS", 3.5),  # another sender: another text
        ("t3", "SMS", 4.0),
        ("t2", "SMS", 5.0),
        ("t4", "SMS", 0.5),  # the last id, due first (a retry's time, say)
    ]:
        phone = f"+120255501{len(at):02d}"
        [at[body, sender, now]] = await seed(
            store, [NewMessage(phone, body, "http", sender, 1, 1)], now
        )

    def ids(*keys: tuple[str, str, float]) -> list[int]:
        return [at[k] for k in keys]

    async def read(now: float, limit: int, texts: int) -> list[int]:
        return [m.id for m in await store.due(now, limit, texts=texts)]

    t1, t1b = ("t1", "SMS", 1.0), ("t1", "SMS", 3.0)
    t2, t2b, t4 = ("t2", "SMS", 2.0), ("t2", "SMS", 5.0), ("t4", "SMS", 0.5)
    assert await read(10.0, 100, 2) == ids(t4, t1, t1b)
    assert await read(10.0, 100, 3) == ids(t4, t1, t2, t1b, t2b)
    assert await read(10.0, 100, 4) == ids(t4, t1, t2, t1b, ("t1", "OPS", 3.5), t2b)
    assert await read(10.0, 3, 10) == ids(t4, t1, t2)  # within the oldest `limit` only
    assert await read(2.5, 100, 2) == ids(t4, t1)  # due ones only
    every = [m.id for m in await store.due(10.0, 100)]
    assert await read(10.0, 100, 100) == every and len(every) == 7


async def test_a_bounded_claim_books_within_the_window_or_claims_nothing(store: Store) -> None:
    ids = await seed(store, [MESSAGE] * 4, 1.0)
    window = {"limit": 2, "window": 60.0}
    assert await store.book_request(10.0, "status", **window) == 0.0
    assert await store.claim(ids[:1], 20.0, **OWNER, **window) == ids[:1]
    # The window is full: nothing claimed, nothing booked, the messages stay queued.
    assert await store.claim(ids[1:], 30.0, **OWNER, **window) == []
    assert {m.id for m in await store.due(31.0, 10)} == set(ids[1:])
    # A claim that gets no id (taken already) books nothing: no request will be made.
    assert await store.claim(ids[:1], 70.5, **OWNER, **window) == []
    assert [b.at for b in await store.request_rows(0)] == [10.0, 20.0]
    assert await store.claim(ids[1:], 70.5, **OWNER, **window) == ids[1:]
    assert [b.at for b in await store.request_rows(0)] == [10.0, 20.0, 70.5]


async def test_warnings_queue_once_and_digests_fold_held_messages(store: Store) -> None:
    warning = MESSAGE._replace(source="budget", dedupe_key="budget:cap:2024-01-01")
    assert await store.queue_once([warning], 1.0) is True
    assert await store.queue_once([warning], 2.0) is False
    held = MESSAGE._replace(recipient="+12025550199", state=State.HELD, topic="Disk")
    ids = await seed(store, [held, held._replace(topic="Load")], 3.0)
    assert await store.held_phones() == [("+12025550199", 3.0)]
    folded: list[list[Held]] = []

    def digest(messages: list[Held]) -> NewMessage:
        folded.append(messages)
        return MESSAGE._replace(recipient="+12025550199", text="+2 more", source="digest")

    digest_id, count = await store.fold_held("+12025550199", 9.0, digest, lambda i: f"in {i}")
    assert count == 2 and [h.id for h in folded[0]] == ids
    assert [h.topic for h in folded[0]] == ["Disk", "Load"]
    assert [(await store.get(i)).reason for i in ids] == [f"in {digest_id}"] * 2
    assert (await store.get(digest_id)).state == State.QUEUED
    assert await store.held_phones() == []
    assert await store.fold_held("+12025550199", 10.0, digest, str) is None


async def test_budgets_and_metrics_count_what_was_sent(store: Store) -> None:
    a, b, warning = await seed(
        store,
        [
            MESSAGE._replace(parts=2, route="r", estimated_cost=0.3, token="ci"),
            MESSAGE._replace(parts=1),
            MESSAGE._replace(source="budget"),
        ],
        1.0,
    )
    await store.claim([a, b, warning], 2.0, **OWNER)
    await store.mark_sent(
        [(a, "p", None), (b, "q", 0.2), (warning, "w", 0.1)], 100.0, owner=OWNER["owner"]
    )
    spent, unpriced = await store.spent_since(50.0, "budget")
    assert spent == pytest.approx(0.5) and unpriced == []
    assert await store.used_since(50.0, "budget") == (2, 3)
    assert await store.used_since(50.0, "budget", "r") == (1, 2)
    assert await store.used_since(50.0, "budget", token="ci") == (1, 2)  # per API token
    assert await store.used_since(50.0, "budget", token="other") == (0, 0)
    assert (await store.get(a)).token == "ci" and (await store.get(b)).token is None
    assert await store.used_since(100.5, "budget") == (0, 0)
    counts = await store.counts_for_metrics()
    assert counts.parts_sent == 4 and counts.cost == pytest.approx(0.3)
    assert sorted(counts.by_source_state) == [("budget", "sent", 1), ("http", "sent", 2)]


async def test_budgets_count_a_claim_in_flight_as_sent(store: Store) -> None:
    """Another instance's call under way spends the same day's caps: a claim in flight
    counts until it is settled, even one made before the day began (its send will be
    stamped today)."""
    old, today, queued = await seed(
        store,
        [
            MESSAGE._replace(parts=1, estimated_cost=0.1),
            MESSAGE._replace(parts=2, estimated_cost=0.3, route="r", token="ci"),
            MESSAGE._replace(parts=4, estimated_cost=0.5),
        ],
        1.0,
    )
    await store.claim([old], 10.0, **OWNER)  # yesterday, still in flight
    await store.claim([today], 60.0, **OWNER)  # today: in flight
    spent, unpriced = await store.spent_since(50.0, "budget")
    assert spent == pytest.approx(0.4) and unpriced == []
    assert await store.used_since(50.0, "budget") == (2, 3)
    assert await store.used_since(50.0, "budget", "r", token="ci") == (1, 2)
    await store.requeue([today], 70.0, owner=OWNER["owner"], at=80.0, reason="retrying")
    assert await store.used_since(50.0, "budget") == (1, 1)  # back in the queue: unspent
    assert (await store.get(queued)).state == State.QUEUED


async def test_purge_keeps_what_is_not_finished(store: Store) -> None:
    done, queued = await seed(store, [MESSAGE._replace(state=State.SUPPRESSED), MESSAGE], 1.0)
    assert await store.purge(2.0) == 1
    assert await store.get(done) is None and await store.events(done) == []
    assert (await store.get(queued)).state == State.QUEUED


async def test_heartbeat_is_a_write(store: Store) -> None:
    before = store.stats().writes
    await store.heartbeat(5.0)
    assert store.stats().writes == before + 1


async def test_seeding_keeps_the_given_states(store: Store) -> None:
    [i] = await store.ingest([(MESSAGE._replace(state=State.FAILED), 1.0)], AS_GIVEN)
    assert (await store.get(i.id)).state == State.FAILED
    assert await store.retry([i.id], 2.0, by="ops") == [i.id]


async def test_in_state_answers_which_ids_are_in_a_state_in_one_read(store: Store) -> None:
    """What a bulk cancel asks of those it found but could not cancel, a chunk at once:
    only rows in the state, none for ids no row can have (0, past a bigint)."""
    states = [State.SENDING, State.QUEUED, State.SENDING, State.SENT]
    ids = await seed(store, [MESSAGE._replace(state=s) for s in states], 1.0)
    asked = [*ids, 0, -1, 2**63, ids[-1] + 1000]
    assert await store.in_state(asked, "sending") == {ids[0], ids[2]}
    assert await store.in_state(asked, "queued") == {ids[1]}
    assert await store.in_state([], "sending") == set()


async def test_a_numbers_messages_are_looked_up_newest_created_first(store: Store) -> None:
    """The phone's page (`number`): that recipient only, not one it is a part of, newest
    by creation time, pages going on in that order even where the clock stepped back."""
    [first] = await seed(store, [MESSAGE], 10.0)
    [latest] = await seed(store, [MESSAGE], 30.0)
    [stepped_back] = await seed(store, [MESSAGE], 20.0)  # a higher id, created earlier
    await seed(store, [NewMessage("+120255501430", "hi", "http", "SMS", 1, 1)], 40.0)
    number = MESSAGE.recipient
    assert [m.id for m in await store.query(number=number)] == [latest, stepped_back, first]
    pages, before = [], None
    while page := await store.query(number=number, before_id=before, limit=1):
        pages.append(page[0].id)
        before = page[0].id
    assert pages == [latest, stepped_back, first]
    # a cursor since purged: after it by id alone
    assert [m.id for m in await store.query(number=number, before_id=99)] == pages


async def test_running_totals_follow_every_change_and_keep_what_was_sent(store: Store) -> None:
    """/metrics and /api/v1/stats read running totals kept by the store: after each kind
    of write they say what an aggregate over every row says, except that parts and cost
    sent stay counted when retention purges the messages (they never go down)."""
    duplicate = MESSAGE._replace(
        state=State.SUPPRESSED, reason="duplicate of message 1", reason_kind="duplicate"
    )
    held = MESSAGE._replace(recipient="+12025550199", state=State.HELD, reason_kind="storm")
    ids = await seed(
        store,
        [
            MESSAGE._replace(parts=2, route="r"),
            MESSAGE._replace(source="smtp", parts=3),
            MESSAGE._replace(source="hook", route="r"),
            MESSAGE,
            duplicate,
            held,
            held._replace(text="again"),
            MESSAGE._replace(source="budget"),
        ],
        1.0,
    )
    a, b, c, d, _, _, _, warning = ids
    assert await reported(store) == await aggregated(store)
    steps = [
        lambda: store.claim([a, b, c, warning], 2.0, **OWNER),
        lambda: store.mark_sent([(a, "p-a", 0.25), (b, "p-b", None)], 3.0, owner="test:1"),
        lambda: store.requeue([c], 3.0, owner="test:1", at=5.0, reason="HTTP 500"),
        lambda: store.finish([(warning, State.FAILED, "refused")], 3.0, owner="test:1"),
        lambda: store.record_status([(a, State.DELIVERED, None), (b, State.FAILED, "x")], 4.0),
        lambda: store.cancel([d], 4.0, by="admin"),
        lambda: store.retry(None, 5.0, by="admin"),
        lambda: store.fold_held("+12025550199", 6.0, _digest, lambda i: f"into message {i}"),
        lambda: store.claim([c, d], 7.0, **OWNER),
        lambda: store.note_unknown([c], 7.5, "timeout", "timeout", owner="test:1"),
        lambda: store.settle_unknown([c], 8.0, "outcome unknown", owner="test:1"),
        lambda: store.mark_sent([(d, "p-d", 0.5)], 8.0, owner="test:1"),
        lambda: store.set_provider_ids([(c, "p-c")]),
    ]
    for step in steps:
        await step()
        assert await reported(store) == await aggregated(store), step
    before, sent_before = await store.query(limit=100), (await reported(store))[3]
    assert await store.purge(1e9) > 0  # everything finished goes
    kept = {m.id for m in await store.query(limit=100)}
    gone = [m for m in before if m.id not in kept and m.sent_at is not None]
    gone_parts, gone_cost = sum(m.parts for m in gone), sum(m.cost or 0 for m in gone)
    after = await reported(store)
    assert gone_parts > 0 and after == await aggregated(store, gone_parts, gone_cost)
    assert after[3] == sent_before  # purged, still sent: the figure never goes down


async def test_cost_sent_never_goes_down_while_messages_are_delivered(store: Store) -> None:
    """Delivery moves a message from the `sent` row of the totals to the `delivered` one.
    Summed as floats in another order, "cost sent" then dropped by a rounding error
    (8.116999999999999 -> ...997 on these costs), which Prometheus reads as a counter
    reset: cost is counted in whole millionths."""
    costs = [0.0075, 0.0079, 0.0375, 0.1, 0.2, 0.3, 0.7, 0.0512, 0.045]
    ids = await seed(store, [MESSAGE._replace(text=f"t{i}") for i in range(50)], 1.0)
    await store.claim(ids, 2.0, **OWNER)
    await store.mark_sent([(i, f"p{i}", costs[i % 9]) for i in ids], 3.0, owner="test:1")
    seen = [(await store.counts_for_metrics()).cost]
    for i in ids:
        await store.record_status([(i, State.DELIVERED, None)], 4.0)
        seen.append((await store.counts_for_metrics()).cost)
    assert seen == [seen[0]] * len(seen)
    assert seen[0] == pytest.approx(sum(costs[i % 9] for i in ids))


async def test_a_cost_past_what_the_totals_count_is_held_at_their_bound(store: Store) -> None:
    """The provider client stores no cost past 1e9 (bridge.provider.responses.MAX_COST);
    should one reach the store all the same, the totals count it as 1e9 instead of
    failing the write (PostgreSQL's bigint millionths overflowed at ~9.2e12)."""
    ids = await seed(store, [MESSAGE, MESSAGE._replace(text="b")], 1.0)
    await store.claim(ids, 2.0, **OWNER)
    await store.mark_sent([(ids[0], "p-0", 1e13), (ids[1], "p-1", -2.0)], 3.0, owner="test:1")
    assert (await store.counts_for_metrics()).cost == 1e9


@pytest.mark.parametrize(
    "number",
    [
        "9" * 140_000,  # past PostgreSQL's numeric
        # past a btree entry's size (random: a repeating run compresses to fit)
        "".join(random.Random(2).choices("0123456789", k=12_000)),
        # Arabic-Indic digits: `\d` matches them under an ICU collation (no number to
        # cast), not under this server's C.UTF-8: a guard here, not a reproduction
        "\u0661\u0662",
    ],
)
async def test_a_suppressed_reason_naming_any_number_is_stored(store: Store, number: str) -> None:
    """What a sender can put in a reason: a loop's reason quotes the Auto-Submitted
    header (encoded words decode to one run of digits). The index of the number a
    reason names must take it, or the mail is refused with 451 again and again."""
    reason = f"auto-submitted mail (Auto-Submitted: auto-replied message {number})"
    loop = MESSAGE._replace(state=State.SUPPRESSED, reason=reason, reason_kind="loop")
    stored, _ = await seed(store, [loop, MESSAGE._replace(text="after")], 1.0)
    assert (await store.get(stored)) is not None
    assert len(await store.query(limit=10)) == 2


def _digest(held: list[Held]) -> NewMessage:
    return MESSAGE._replace(recipient="+12025550199", source="digest", text=f"{len(held)} held")


async def test_mentioned_by_finds_what_names_the_message_as_a_whole_number(store: Store) -> None:
    """A message's page lists its duplicates and what a digest folded into it (found
    through an index of the number a reason names since SQLite 0010, PostgreSQL 6)."""
    suppressed = MESSAGE._replace(state=State.SUPPRESSED, reason_kind="duplicate")
    ids = await seed(
        store,
        [
            suppressed._replace(reason="duplicate of message 12 within 600s"),
            suppressed._replace(reason="duplicate of message 123 within 600s"),
            suppressed._replace(reason="storm control: folded into digest message 12"),
            suppressed._replace(reason="mail loop: message 12 of 99999999999999999999999"),
            MESSAGE._replace(reason="duplicate of message 12 within 600s"),  # queued
        ],
        1.0,
    )
    assert [m["id"] for m in await store.mentioned_by(12)] == [ids[0], ids[2], ids[3]]
    assert [m["id"] for m in await store.mentioned_by(123)] == [ids[1]]
    assert await store.mentioned_by(1) == [] and await store.mentioned_by(2**70) == []
    assert [m["id"] for m in await store.mentioned_by(12, limit=1)] == [ids[0]]


async def test_mentioned_by_answers_alike_on_both_stores(store: Store) -> None:
    """The number a reason names is the one after its first " message ", matched as a
    whole word in the case the bridge writes it. PostgreSQL took the first " message "
    followed by digits (a bounce's "a message to message 12" named 12 there, nothing on
    SQLite), and SQLite's LIKE ignored case ("message 12x ... MESSAGE 12 " named 12
    there, nothing on PostgreSQL)."""
    suppressed = MESSAGE._replace(state=State.SUPPRESSED, reason_kind="duplicate")
    ids = await seed(
        store,
        [
            suppressed._replace(reason="duplicate of a message to message 12 within 600s"),
            suppressed._replace(reason="duplicate of message 12x and MESSAGE 12 within 600s"),
            suppressed._replace(reason="duplicate of message 12 within 600s"),
        ],
        1.0,
    )
    assert [m["id"] for m in await store.mentioned_by(12)] == [ids[2]]


async def test_billed_prices_keep_each_countrys_last_and_the_most_any_part_cost(
    store: Store,
) -> None:
    """What bills taught (bridge.pricing.PriceBook.billed): a country's price is its last
    bill's (prices change); under 0, the most any part was billed, raised by a higher
    bill, and replaced by the next bill once it is a day old: raised only, a price cut
    by the provider never lowered it. Each with when it was billed."""

    async def billed_prices() -> dict[int, float]:
        return {code: price for code, (price, _) in (await store.billed_prices()).items()}

    assert await billed_prices() == {}
    await store.record_billed({0: 1.5, 961: 1.5}, 10.0)
    await store.record_billed({0: 0.5, 1: 0.5}, 20.0)
    await store.record_billed({0: 0.4, 961: 0.4}, 30.0)
    assert await billed_prices() == {0: 1.5, 1: 0.5, 961: 0.4}
    await store.record_billed({0: 0.3, 1: 0.3}, 10.0 + BILLED_MAX_FOR - 1)  # within the day
    assert (await billed_prices())[0] == 1.5
    await store.record_billed({0: 0.3, 1: 0.3}, 10.0 + BILLED_MAX_FOR)  # a day after it
    assert await billed_prices() == {0: 0.3, 1: 0.3, 961: 0.4}
    later = 10.0 + 2 * BILLED_MAX_FOR - 1
    await store.record_billed({0: 0.2, 1: 0.2}, later)  # a day after 1.5, not after 0.3
    assert (await billed_prices())[0] == 0.3
    await store.record_billed({0: 0.6, 44: 0.6}, later)  # a higher bill raises it at once
    assert (await billed_prices())[0] == 0.6
    assert (await store.billed_prices())[0] == (0.6, later)  # and when
