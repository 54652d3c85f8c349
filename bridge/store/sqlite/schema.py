"""The store's schema: forward migrations, and the layout of a message row as inserted.

Applied by the store's writer at open (sqlite-utils migrations, recorded in the
database); never edited once released, only followed by new ones.
"""

from __future__ import annotations

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from bridge.store.rows import INSERTED

migrations = Migrations("sms_bridge")


@migrations(name="0001_messages_events_requests")
def _initial_schema(db: Database) -> None:
    db.execute("""
        CREATE TABLE messages (
            id INTEGER PRIMARY KEY,
            recipient TEXT NOT NULL,
            text TEXT NOT NULL,
            source TEXT NOT NULL,
            sender_id TEXT NOT NULL,
            message_type INTEGER NOT NULL,
            parts INTEGER NOT NULL,
            route TEXT,
            dedupe_key TEXT,
            schedule_time TEXT,
            state TEXT NOT NULL,
            reason TEXT,
            attempts INTEGER NOT NULL DEFAULT 0,
            provider_message_id TEXT,
            cost REAL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            next_attempt_at REAL NOT NULL,
            claimed_at REAL,
            sent_at REAL,
            solo INTEGER NOT NULL DEFAULT 0
        )""")
    db.execute("CREATE INDEX messages_due ON messages(state, next_attempt_at, id)")
    db.execute(
        "CREATE INDEX messages_dedupe ON messages(dedupe_key, recipient, created_at)"
        " WHERE dedupe_key IS NOT NULL"
    )
    db.execute("""
        CREATE TABLE events (
            id INTEGER PRIMARY KEY,
            message_id INTEGER NOT NULL,
            at REAL NOT NULL,
            state TEXT NOT NULL,
            attempts INTEGER NOT NULL,
            detail TEXT
        )""")
    db.execute("CREATE INDEX events_message ON events(message_id, id)")
    db.execute("""
        CREATE TRIGGER messages_insert_event AFTER INSERT ON messages BEGIN
            INSERT INTO events(message_id, at, state, attempts, detail)
            VALUES (new.id, new.updated_at, new.state, new.attempts, new.reason);
        END""")
    db.execute("""
        CREATE TRIGGER messages_state_event AFTER UPDATE OF state ON messages
        WHEN old.state != new.state BEGIN
            INSERT INTO events(message_id, at, state, attempts, detail)
            VALUES (new.id, new.updated_at, new.state, new.attempts, new.reason);
        END""")
    # Timestamps of provider requests: the sliding rate window survives a restart.
    db.execute("CREATE TABLE provider_requests (at REAL NOT NULL, kind TEXT NOT NULL)")
    db.execute("CREATE INDEX provider_requests_at ON provider_requests(at)")


@migrations(name="0002_storm_control_and_costs")
def _storm_and_costs(db: Database) -> None:
    # topic: what a digest counts ("HighLatency"); reason_kind: why suppressed or held,
    # for grouping (duplicate, storm, loop, budget); estimated_cost from the price list.
    for column in ("topic TEXT", "reason_kind TEXT", "estimated_cost REAL"):
        db.execute(f"ALTER TABLE messages ADD COLUMN {column}")
    db.execute("CREATE INDEX messages_recipient ON messages(recipient, created_at)")
    db.execute("CREATE INDEX messages_sent_at ON messages(sent_at) WHERE sent_at IS NOT NULL")


@migrations(name="0003_instance")
def _instance(db: Database) -> None:
    # What a storm digest names besides the topic: "(api-1, db-2...)".
    db.execute("ALTER TABLE messages ADD COLUMN instance TEXT")


@migrations(name="0004_unknown_resends")
def _unknown_resends(db: Database) -> None:
    # Resends after an outcome /logs could not settle: capped by
    # provider.max_unknown_resends, so an unreadable provider cannot become a spam cannon.
    db.execute("ALTER TABLE messages ADD COLUMN unknown_resends INTEGER NOT NULL DEFAULT 0")


@migrations(name="0005_readiness_heartbeat")
def _heartbeat(db: Database) -> None:
    # One row /readyz rewrites: its probe is a real write, so a disk that refuses writes
    # turns readiness red as it turns POST into 503 (an empty transaction wrote nothing).
    db.execute("CREATE TABLE heartbeat (id INTEGER PRIMARY KEY CHECK (id = 1), at REAL NOT NULL)")


@migrations(name="0006_rate_pause")
def _rate_pause(db: Database) -> None:
    # The pause every provider request honours (a 429's Retry-After, a refused key): in
    # the file, so that a restart and the CLI honour it as the running dispatcher does.
    db.execute(
        "CREATE TABLE rate_pause (id INTEGER PRIMARY KEY CHECK (id = 1),"
        " until REAL NOT NULL, reason TEXT NOT NULL)"
    )


@migrations(name="0007_token")
def _token(db: Database) -> None:
    # Which [tokens.NAME] sent a message (its name; NULL for mail, routes and an open
    # bridge): `tokens.NAME.texts_per_day` counts what it sent today, in the file, so a
    # restart does not hand a token a fresh day.
    db.execute("ALTER TABLE messages ADD COLUMN token TEXT")
    db.execute(
        "CREATE INDEX messages_token_sent_at ON messages(token, sent_at)"
        " WHERE token IS NOT NULL AND sent_at IS NOT NULL"
    )


@migrations(name="0008_created_at_provider_id")
def _created_at_and_provider_id(db: Database) -> None:
    # Found on a store of a million messages (BENCHMARKS.md, "A store after months"):
    # retention and the overview's last hour select by created_at, and walked every
    # finished message through messages_due without it; the poller asks which provider
    # ids are known, a full scan without the second (PostgreSQL has had it since 1).
    db.execute("CREATE INDEX messages_created_at ON messages(created_at)")
    db.execute(
        "CREATE INDEX messages_provider_id ON messages(provider_message_id)"
        " WHERE provider_message_id IS NOT NULL"
    )


# Running totals of the messages table, kept by triggers in the same transaction as the
# change: /metrics and /api/v1/stats read a few dozen rows instead of aggregating every
# message at each scrape (0.8-1.4 s on a million). One row per (source, state, reason
# kind or 'other', sent_at set); n: messages stored there now; parts and cost: of every
# message that was ever there and is gone by deletion (retention) too, so that "parts
# and cost sent" never go down when old messages are purged. Cost in whole millionths
# (COST_MICROS, the same in PostgreSQL): a message moving between rows (sent ->
# delivered) moves an integer, where floats summed in another order made "cost sent"
# drop by a rounding error, which Prometheus reads as a counter reset.
TOTALS_KEY = "source, state, reason_kind, sent"


def cost_micros(cost: str) -> str:
    """SQL for a message's `cost` in whole millionths, rounded half up, held within
    0..1e9 (what the provider client stores, bridge.provider.responses.MAX_COST: no row
    may make a sum overflow or a backend round a negative number its own way)."""
    return f"CAST(min(max(coalesce({cost}, 0), 0), 1e9) * 1000000 + 0.5 AS INTEGER)"


REBUILD_TOTALS = (
    "DELETE FROM message_totals",
    f"INSERT INTO message_totals ({TOTALS_KEY}, n, parts, cost_micros)"
    " SELECT source, state, coalesce(reason_kind, 'other'), sent_at IS NOT NULL, count(*),"
    f" sum(parts), coalesce(sum({cost_micros('cost')}), 0) FROM messages GROUP BY 1, 2, 3, 4",
)


def _add_to_totals(row: str, sign: str, *, parts_and_cost: bool = True) -> str:
    """The upsert that adds (sign "+") or takes away ("-") the message `row` (new, old)."""
    parts, cost = (f"{sign}{row}.parts", f"{sign}{cost_micros(f'{row}.cost')}")
    if not parts_and_cost:
        parts, cost = "0", "0"
    return (
        f"INSERT INTO message_totals ({TOTALS_KEY}, n, parts, cost_micros) VALUES ({row}.source,"
        f" {row}.state, coalesce({row}.reason_kind, 'other'), {row}.sent_at IS NOT NULL,"
        f" {sign}1, {parts}, {cost}) ON CONFLICT ({TOTALS_KEY}) DO UPDATE SET"
        " n = n + excluded.n, parts = parts + excluded.parts,"
        " cost_micros = cost_micros + excluded.cost_micros;"
    )


@migrations(name="0009_message_totals")
def _message_totals(db: Database) -> None:
    db.execute(f"""
        CREATE TABLE message_totals (
            source TEXT NOT NULL,
            state TEXT NOT NULL,
            reason_kind TEXT NOT NULL,
            sent INTEGER NOT NULL,
            n INTEGER NOT NULL,
            parts INTEGER NOT NULL,
            cost_micros INTEGER NOT NULL,
            PRIMARY KEY ({TOTALS_KEY})
        ) WITHOUT ROWID""")
    db.execute(
        f"CREATE TRIGGER messages_totals_insert AFTER INSERT ON messages BEGIN"
        f" {_add_to_totals('new', '+')} END"
    )
    # Only when a figure moves: most updates (claims' leases, provider ids) change none.
    db.execute(
        "CREATE TRIGGER messages_totals_update"
        " AFTER UPDATE OF source, state, reason_kind, sent_at, parts, cost ON messages"
        " WHEN old.source IS NOT new.source OR old.state IS NOT new.state"
        " OR old.reason_kind IS NOT new.reason_kind"
        " OR (old.sent_at IS NULL) IS NOT (new.sent_at IS NULL)"
        " OR old.parts IS NOT new.parts OR old.cost IS NOT new.cost BEGIN"
        f" {_add_to_totals('old', '-')} {_add_to_totals('new', '+')} END"
    )
    # Retention: the message leaves the count, what it cost stays sent.
    db.execute(
        "CREATE TRIGGER messages_totals_delete AFTER DELETE ON messages BEGIN"
        f" {_add_to_totals('old', '-', parts_and_cost=False)} END"
    )
    for sql in REBUILD_TOTALS[1:]:
        db.execute(sql)
    # The routes page asks each configured route for its newest message (index order:
    # route, then rowid), and the list filtered by route reads that route's rows only.
    db.execute("CREATE INDEX messages_route ON messages(route) WHERE route IS NOT NULL")


# The N of the first " message N" in a reason: what a duplicate ("duplicate of message N
# within 600s") and a folded storm ("... folded into digest message N") name. A message's
# page lists those that name it (mentioned_by); written as 0010's index is, or SQLite
# does not use it (tests/test_query_plans.py checks that it does).
MENTIONED = "CAST(substr(reason, instr(reason, ' message ') + 9) AS INTEGER)"
MENTIONS = "state = 'suppressed' AND instr(reason, ' message ') > 0"


@migrations(name="0010_mentions")
def _mentions(db: Database) -> None:
    # mentioned_by matched `reason LIKE '% message N%'` on every suppressed message
    # (60-120 ms on a million at each message page); now one step into this index.
    db.execute(
        "CREATE INDEX messages_mentions ON messages"
        "(CAST(substr(reason, instr(reason, ' message ') + 9) AS INTEGER))"
        " WHERE state = 'suppressed' AND instr(reason, ' message ') > 0"
    )


@migrations(name="0011_failed")
def _failed(db: Database) -> None:
    # The console overview's recent failures, the latest failure first: through
    # messages_due they sorted every failed message (~100 ms on a million, at each
    # overview). A partial index: only a message that fails is written to it.
    db.execute("CREATE INDEX messages_failed ON messages(updated_at) WHERE state = 'failed'")


@migrations(name="0012_scheduled")
def _scheduled(db: Database) -> None:
    # Storm control counts a scheduled text at its time (bridge.policy.decide): a phone's
    # texts scheduled near a time, however long ago they were stored, in one step.
    db.execute(
        "CREATE INDEX messages_scheduled ON messages(recipient, schedule_time)"
        " WHERE schedule_time IS NOT NULL"
    )


@migrations(name="0013_due_at")
def _due_at(db: Database) -> None:
    # When a message became due (bridge.models.Message.due_at), kept rather than worked
    # out again from created_at and schedule_time: a text a daily cap held until 00:00
    # lost its hold's end at its claim, and counted its age (retries given up, the
    # oldest queued age) from when it was stored. The rows stored before: the expression
    # the oldest queued age used until now (bridge.store.totals).
    db.execute("ALTER TABLE messages ADD COLUMN due_at REAL")
    db.execute(
        "UPDATE messages SET due_at = max(created_at,"
        " coalesce(CAST(strftime('%s', schedule_time) AS REAL), 0),"
        " CASE WHEN reason_kind = 'budget' THEN next_attempt_at ELSE 0 END)"
    )


@migrations(name="0014_billed_prices")
def _billed_prices(db: Database) -> None:
    # What a part to each country was billed (bridge.pricing.PriceBook.billed), kept:
    # in memory only, a restart with no price list counted the day's texts at nothing
    # until a bill came, and let a whole bulk call past the cost cap. Country code 0 (no
    # country has it) holds the most any part was billed, a call to several countries
    # included.
    db.execute(
        "CREATE TABLE billed_prices (country_code INTEGER PRIMARY KEY,"
        " price REAL NOT NULL, billed_at REAL NOT NULL)"
    )


@migrations(name="0015_resent")
def _resent(db: Database) -> None:
    # The cost cap counts every attempt of an unknown outcome that was sent again (the
    # provider may have billed each): found by its latest claim, among the few resent.
    db.execute("CREATE INDEX messages_resent ON messages(claimed_at) WHERE unknown_resends > 0")


# The highest message id ever given, kept as AUTOINCREMENT's sqlite_sequence would be
# (messages cannot be rebuilt with it: a table rewrite of every row). Ids were
# max(id) + 1: a message deleted from the top (retention, an operator's DELETE) had its
# id given again, and an id a caller held (a 202's, an alert's "message 42", a console
# link) later showed another text. Raised by the insert itself (a trigger, in the same
# statement: the two-trip ingest's guarded INSERT stays one statement); the next id is
# one past the higher of this and max(id), so a load with the triggers off
# (bench/big_store.py) cannot make it give an id twice either.
NEXT_ID = (
    "(SELECT max(coalesce((SELECT max(id) FROM messages), 0),"
    " coalesce((SELECT last FROM message_ids), 0)) + 1)"
)
SYNC_IDS = "UPDATE message_ids SET last = max(last, (SELECT coalesce(max(id), 0) FROM messages))"


@migrations(name="0016_message_ids")
def _message_ids(db: Database) -> None:
    db.execute(
        "CREATE TABLE message_ids (id INTEGER PRIMARY KEY CHECK (id = 1), last INTEGER NOT NULL)"
    )
    # An existing store keeps its ids and continues after its newest.
    db.execute("INSERT INTO message_ids (id, last) SELECT 1, coalesce(max(id), 0) FROM messages")
    db.execute(
        "CREATE TRIGGER messages_ids AFTER INSERT ON messages BEGIN"
        " UPDATE message_ids SET last = new.id WHERE last < new.id; END"
    )


# Columns an ingest sets (bridge.store.rows). Rows per INSERT statement: 21
# parameters each stays under SQLite's oldest variable limit (999).
INSERT_COLUMNS = ", ".join(INSERTED)
ROW_MARKS = "(" + ",".join("?" * len(INSERT_COLUMNS.split(","))) + ")"
ROWS_PER_INSERT = 999 // len(INSERTED)
# Many rows changed by one statement: ids (or rows) passed as one JSON parameter, exact
# for integers and strings; each statement is one trip into SQLite, not one per row.
# Filters on state are written `+state` so that SQLite looks the ids up by rowid rather
# than walking every queued message through the state index.
JSON_IDS = "(SELECT value FROM json_each(?))"
# What a bulk load with the triggers off (bench/big_store.py) must run after it to make
# the tables the triggers maintain (besides events) agree with the rows again.
REBUILDS: tuple[str, ...] = (*REBUILD_TOTALS, SYNC_IDS)
