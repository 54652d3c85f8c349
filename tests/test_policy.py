"""Policy decided for a whole transaction at once answers as one message at a time would.

Run on SQLite's ingest transaction itself (`ingest_all`, the batch its writer runs for
concurrent ingests), on an in-memory database: hundreds of examples in seconds.
"""

from __future__ import annotations

import sqlite3

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlite_utils import Database

import tests.properties  # noqa: F401  (the suite's Hypothesis profile)
from bridge.models import NewMessage, State
from bridge.policy.decide import Rules, content_hash, scoped_key, text_key
from bridge.store.sqlite.schema import migrations
from bridge.store.sqlite.store import ingest_all, ingest_unlocked


def fresh_db() -> Database:
    db = Database(sqlite3.connect(":memory:", isolation_level=None))
    migrations.apply(db)
    return db


def store_all(
    db: Database, pending: list[tuple[NewMessage, float]], rules: Rules
) -> list[tuple[int, str, str | None]]:
    [stored] = ingest_all(db, [(pending, rules)])
    return [(s.id, str(s.message.state), s.message.reason) for s in stored]


# Keys as ingest makes them: a scope's text keys (`scope` for `scoped_key(scope,
# text_key(text))`) and a mail's content in a Date slot (`mail@N`: slot N): their
# repeats are duplicates only while their key (a slot's: its neighbours') is the scope's
# last word to the phone, which a scope's message with any other key ends; a scope's own
# key (`api:b`), and unscoped ones.
SCOPED_TEXT = ("api", "route@kuma")
MAIL_SLOTS = ("mail@0", "mail@1", "mail@2", "mail@3")


def _key(key: str | None, text: str) -> str | None:
    if key in MAIL_SLOTS:
        content = f"sent:{content_hash(' '.join(text.split()).casefold())}"
        return scoped_key("mail", f"{content}@slot300:{key[-1]}")
    return scoped_key(key, text_key(text)) if key in SCOPED_TEXT else key


messages = st.builds(
    lambda phone, text, key, route, gap: (
        NewMessage(
            recipient=f"+1202555010{phone}",
            text=text,
            source="http",
            sender_id="Bridge",
            message_type=1,
            parts=1,
            route=route,
            dedupe_key=_key(key, text),
        ),
        gap,
    ),
    phone=st.integers(0, 2),
    text=st.sampled_from(["disk full", "Disk  FULL", "load high", "back to normal"]),
    key=st.sampled_from([None, None, "a", "b", *SCOPED_TEXT, *SCOPED_TEXT, "api:b", *MAIL_SLOTS]),
    route=st.sampled_from([None, "quick", "never"]),
    gap=st.sampled_from([0.0, 0.5, 30.0, 400.0]),
)
rules_cases = st.builds(
    lambda window, per_recipient, storm_window: Rules(
        dedupe_window=window,
        per_recipient=per_recipient,
        per_recipient_window=storm_window,
        route_windows={"quick": 60.0, "never": 0.0},
    ),
    window=st.sampled_from([0.0, 0.2, 600.0]),
    per_recipient=st.sampled_from([0, 1, 3]),
    storm_window=st.sampled_from([0.2, 600.0]),
)


@pytest.mark.slow  # over ~2 s
@settings(max_examples=300, deadline=None)
@given(
    history=st.lists(messages, max_size=12),
    batch=st.lists(messages, min_size=1, max_size=25),
    rules=rules_cases,
    looped=st.sets(st.integers(0, 24), max_size=4),
)
def test_a_batch_is_decided_as_one_at_a_time(history, batch, rules, looped) -> None:
    now, timed_history = 1_000_000.0, []
    for message, gap in history:
        now += gap
        timed_history.append((message, now))
    now += 1.0
    arrivals = []
    for index, (message, gap) in enumerate(batch):
        now += gap / 1000  # one transaction's submits arrive within moments (or not: 0.4 s)
        if index in looped:  # stored as suppressed by the ingest itself (a bounce)
            message = message._replace(state=State.SUPPRESSED, reason="auto-submitted mail")
        arrivals.append((message, now))
    together, alone, unlocked = fresh_db(), fresh_db(), fresh_db()
    for db in (together, alone, unlocked):
        for one in timed_history:
            store_all(db, [one], rules)
    batched = store_all(together, arrivals, rules)
    sequential = [row for one in arrivals for row in store_all(alone, [one], rules)]
    assert batched == sequential
    # The writer's form of the batch outside a transaction (the lookups, then the insert
    # that commits itself) decides and stores exactly as the transaction's.
    outside = ingest_unlocked(unlocked, [(arrivals, rules)])
    assert outside is not None
    assert [(s.id, str(s.message.state), s.message.reason) for s in outside[0]] == batched
    rows = "SELECT id, state, reason, dedupe_key, created_at FROM messages ORDER BY id"
    assert together.execute(rows).fetchall() == alone.execute(rows).fetchall()
    assert unlocked.execute(rows).fetchall() == alone.execute(rows).fetchall()


def test_a_text_is_crowded_only_by_a_window_that_holds_it() -> None:
    """Storm control's count around a text's time (a scheduled text counts at it): some
    window of `window` seconds holding the text would pass `limit` with it."""
    from bridge.policy.decide import crowded

    at, w = 1000.0, 600.0
    assert crowded([at - 500, at - 10], at, w, 2)  # as before: two in the last window
    assert not crowded([at - 601, at - 10], at, w, 2)  # one left it
    assert crowded([at - 300, at + 290], at, w, 2)  # one window holds all three
    assert not crowded([at - 540, at + 540], at, w, 2)  # no window holds all three
    assert crowded([at + 10, at + 600], at, w, 2)  # texts scheduled after it count too
    assert not crowded([at + 601], at, w, 1)


# The characters `\s` matches in a str pattern (str.isspace's), and some that are not.
_SPACES = "".join(c for c in map(chr, range(0x3001)) if c.isspace())


@given(st.text(alphabet=st.sampled_from([*_SPACES, "a", "B", "ß", "\x00", "\ud800", "😀"])))
def test_a_text_key_reads_spacing_as_the_regex_did(text: str) -> None:
    """`text_key` collapses runs of white space (any str.isspace character) into one
    space and drops them at the ends, as `re.sub(r"\\s+", " ", text).strip()` did before
    it was written with `split`: a stored text's key, and so its duplicates, unchanged."""
    import hashlib
    import re

    from bridge.policy.decide import text_key

    before = re.sub(r"\s+", " ", text).strip().casefold()
    digest = hashlib.sha256(before.encode("utf-8", "surrogatepass")).hexdigest()[:24]
    if "\ud800" not in text:  # encode() refuses a lone surrogate, before and after alike
        assert text_key(text) == "text:" + digest
    assert text_key("  Disk\u00a0 full\n") == text_key("disk full")
