"""The human log format keeps every record on lines of its own: nothing a sender wrote
can start a line that passes for one of the bridge's records, tracebacks included."""

from __future__ import annotations

import io
import logging
import re
import sys
from collections.abc import Iterator

import httpx
import pytest

from bridge.clock import ManualClock
from bridge.ops.logs import CONTINUATION, setup_logging
from tests.helpers import bridge_config, running_bridge

FORGED = "2026-01-01 00:00:00,000 WARNING bridge: forged"
RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")


@pytest.fixture
def bridge_log(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """The log as `serve` sets it up (human format, secrets masked), written here."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    setup_logging("info", "human", ["test-key"])
    yield out
    root.handlers[:] = handlers
    root.setLevel(level)


def _records(text: str) -> list[list[str]]:
    """The log's records, each its lines: a record starts at a line with the time."""
    records: list[list[str]] = []
    for line in text.splitlines():
        if RECORD.match(line):
            records.append([line])
        else:
            assert records and line.startswith(CONTINUATION.rstrip()), line
            records[-1].append(line)
    return records


async def test_a_traceback_quoting_a_senders_line_breaks_forges_no_record(
    tmp_path, clock: ManualClock, sandbox_url: str, bridge_log: io.StringIO, monkeypatch
) -> None:
    """A fault no live server produces on cue (the store layer quoting the text it could
    not take, line breaks and all) reached through the real API: the 500's traceback is
    logged on continuation lines, and the line break in its message is escaped."""
    config = bridge_config(tmp_path, sandbox_url)
    text = f"disk full\r\n{FORGED}\u2028{FORGED}"
    async with running_bridge(config, clock) as (bridge, url):

        async def submit(drafts):  # a bug that quotes what it was given
            try:
                raise KeyError("the cause")
            except KeyError as cause:
                raise ValueError(f"cannot take {drafts[0].text}") from cause

        monkeypatch.setattr(bridge.ingestor, "submit", submit)
        async with httpx.AsyncClient() as http:
            response = await http.post(
                f"{url}/api/v1/messages", json={"to": "+12025550143", "message": text}
            )
    assert response.status_code == 500
    log = bridge_log.getvalue()
    assert not any(line.startswith(FORGED[:10]) for line in log.splitlines())
    [record] = [r for r in _records(log) if "unexpected error on /api/v1/messages" in r[0]]
    assert record[1] == "  | Traceback (most recent call last):"
    assert record[2].startswith('  |   File "') and record[3].startswith("  |     raise ")
    assert "  | The above exception was the direct cause of the following exception:" in record
    assert record[-1] == f"  | ValueError: cannot take disk full\\r\\n{FORGED}\\u2028{FORGED}"


def test_a_stack_and_a_masked_traceback_stay_continuations(bridge_log: io.StringIO) -> None:
    """stack_info, exception notes and groups, and a traceback the masking filter wrote
    (a secret in the message): every line after a record's first is a continuation."""
    log = logging.getLogger("bridge.test")
    log.warning("where\nnow", stack_info=True)
    try:
        raise ExceptionGroup(f"group\n{FORGED}", [ValueError(f"test-key\r{FORGED}")])
    except ExceptionGroup as exc:
        exc.add_note(f"note\n{FORGED}")
        log.exception("grouped")
    records = _records(bridge_log.getvalue())
    assert [r[0].partition(": ")[2] for r in records] == ["where\\nnow", "grouped"]
    assert records[0][1] == "  | Stack (most recent call last):"
    assert f"  |   | ExceptionGroup: group\\n{FORGED} (1 sub-exception)" in records[1]
    assert f"  |   | note\\n{FORGED}" in records[1]
    assert f"  |     | ValueError: ***\\r{FORGED}" in records[1]
