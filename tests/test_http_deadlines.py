"""The HTTP connection's two deadlines (bridge.ingress.http.limits): the request line and
headers within `http.header_timeout`, the body within `http.body_timeout`, kept by one
timer a connection. Real sockets against a bridge served as `serve` serves it; the
deadlines are the event loop's (real time), so they are set short."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator

import pytest

from bridge.clock import ManualClock
from tests.helpers import bridge_config, running_bridge
from tests.stores import faulty_store

POST_HEAD = (
    b"POST /api/v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
)
BODY = b'{"to": "+12025550143", "message": "disk full on db-2"}'


async def _answer(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    return head, await asyncio.wait_for(reader.readexactly(length), 10)


async def _everything(reader: asyncio.StreamReader) -> bytes:
    """What the server sends until it closes or is silent for 3 s; how it ended, marked."""
    answer, started = b"", time.monotonic()
    while True:
        try:
            chunk = await asyncio.wait_for(reader.read(65536), 3)
        except (TimeoutError, ConnectionResetError) as exc:
            return answer + f"<{type(exc).__name__} at {time.monotonic() - started:.2f}s>".encode()
        if not chunk:
            return answer + f"<EOF at {time.monotonic() - started:.2f}s>".encode()
        answer += chunk


@contextlib.asynccontextmanager
async def _stalled(
    tmp_path, sandbox_url: str, clock: ManualClock, extra: str, seconds: float
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A connection to a bridge whose every store write stalls `seconds` (an fsync, a
    PostgreSQL failover): its requests are answered late, as a busy server's are."""
    config = bridge_config(tmp_path, sandbox_url, extra)
    store = faulty_store(config)
    async with running_bridge(config, clock, store=store) as (_, url):
        store.fail_commits(lambda: time.sleep(seconds))
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            yield reader, writer
        finally:
            writer.close()
            store.fail_commits(None)


async def test_a_late_request_on_a_kept_alive_connection_is_cut_at_the_header_timeout(
    tmp_path, sandbox_url: str, clock: ManualClock
) -> None:
    """The timer that waited for a body (5 s away) must not make the next request's
    headers (due in 0.3 s) wait with it: a deadline set later but due sooner is kept."""
    extra = '[http]\nheader_timeout = "300ms"\nbody_timeout = "5s"\n'
    config = bridge_config(tmp_path, sandbox_url, extra)
    async with running_bridge(config, clock) as (_, url):
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(POST_HEAD % len(BODY))  # headers now, the body after the first timer
        await asyncio.sleep(0.45)
        writer.write(BODY)
        head, _ = await _answer(reader)
        assert head.startswith(b"HTTP/1.1 202"), head
        writer.write(b"GET /healthz HTTP/1.1\r\n")  # and the rest never comes
        started = time.monotonic()
        answer = await asyncio.wait_for(reader.read(), 10)  # to the server's close
        waited = time.monotonic() - started
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408") and b"headers not received within 0.3s" in answer
    assert 0.2 < waited < 2, waited


async def test_a_trickled_body_is_cut_at_the_body_timeout_whatever_the_endpoint(
    tmp_path, sandbox_url: str, clock: ManualClock
) -> None:
    """The API's body deadline (408 before any answer), and an endpoint that answers
    without reading the body: the connection is closed at the deadline all the same,
    not held for as long as the client trickles."""
    extra = '[http]\nheader_timeout = "5s"\nbody_timeout = "300ms"\n'
    config = bridge_config(tmp_path, sandbox_url, extra)
    async with running_bridge(config, clock) as (_, url):
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(POST_HEAD % 1000 + b"{")
        started = time.monotonic()
        answer = await asyncio.wait_for(reader.read(), 10)
        waited = time.monotonic() - started
        writer.close()
        assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
        assert b"body not received within 0.3s" in answer and 0.2 < waited < 2, waited

        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(  # /healthz answers a GET only: 405 at once, the body never read
            b"POST /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n{"
        )
        head, _ = await _answer(reader)
        started = time.monotonic()
        rest = await asyncio.wait_for(reader.read(), 10)  # closed at the deadline
        waited = time.monotonic() - started
        writer.close()
    assert head.startswith(b"HTTP/1.1 405") and rest == b"", rest
    assert waited < 2, waited


READYZ = b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


async def test_a_pipelined_body_is_not_timed_while_the_server_does_not_read_it(
    tmp_path, sandbox_url: str, clock: ManualClock
) -> None:
    """Request 1 (GET /readyz: a store write) is slow on the server's side: the store
    stalls 1 s (an fsync, a PostgreSQL failover). Request 2 is pipelined behind it, its
    body's end in a segment 100 ms later. uvicorn stops reading while request 2 waits
    its turn (request 1 never calls receive() to resume it), so the body cannot arrive:
    the 300 ms body deadline then measures the server's slowness, not the client's.
    The first answer on the wire must be request 1's, not a 408 written ahead of it
    (which the client takes for request 1's answer) -- and request 2 must be served."""
    extra = '[http]\nheader_timeout = "5s"\nbody_timeout = "300ms"\n'
    stall = _stalled(tmp_path, sandbox_url, clock, extra, 1.0)
    async with stall as (reader, writer):
        writer.write(READYZ + POST_HEAD % len(BODY) + BODY[:5])
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(BODY[5:])  # the rest of request 2, 100 ms later: well within 300 ms
        await writer.drain()
        answer = await _everything(reader)
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert answer.count(b"HTTP/1.1 ") == 2 and b"HTTP/1.1 202" in answer, answer


async def test_a_slow_third_request_does_not_cost_the_second_its_answer(
    tmp_path, sandbox_url: str, clock: ManualClock
) -> None:
    """Requests 1 and 2 are whole, request 3's body never comes. When request 1 is
    answered, request 2 is served and request 3's body deadline is armed; it falls due
    while request 2 is still being served. Neither a 408 then (taken for request 2's
    answer) nor closing the connection (request 2, read whole and acted on, would never
    be answered and its sender would retry it): the 408 follows request 2's answer."""
    extra = '[http]\nheader_timeout = "5s"\nbody_timeout = "300ms"\n'
    stall = _stalled(tmp_path, sandbox_url, clock, extra, 0.6)
    async with stall as (reader, writer):
        writer.write(READYZ + READYZ + POST_HEAD % len(BODY) + BODY[:5])
        await writer.drain()
        answer = await _everything(reader)
    assert answer.count(b"HTTP/1.1 200") == 2, answer
    assert answer.index(b"HTTP/1.1 408") > answer.rindex(b"HTTP/1.1 200"), answer


EARLY = b"POST /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10\r\n\r\n"
SHORT = '[http]\nheader_timeout = "300ms"\nbody_timeout = "1s"\nkeep_alive_timeout = "300ms"\n'


async def _until_closed(reader: asyncio.StreamReader, limit: float) -> tuple[bytes, float]:
    started = time.monotonic()
    try:
        data = await asyncio.wait_for(reader.read(), limit)
    except TimeoutError:
        return b"<still open>", time.monotonic() - started
    return data, time.monotonic() - started


async def _answered_early(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection whose request (/healthz takes GET only) was answered, 405, before
    any of its 10-byte body was sent."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(EARLY)
    head, _ = await _answer(reader)
    assert head.startswith(b"HTTP/1.1 405"), head
    return reader, writer


async def test_the_next_request_begun_in_the_body_s_last_read_is_timed(
    tmp_path, sandbox_url: str, clock: ManualClock
) -> None:
    """The body's end and the first bytes of the next request in one read: its headers
    must be in within header_timeout, however the bytes fell (the deadline used to be
    set only for a read that began while headers were awaited: held for ever)."""
    async with running_bridge(bridge_config(tmp_path, sandbox_url, SHORT), clock) as (_, url):
        reader, writer = await _answered_early(url)
        writer.write(b"0123456789" + b"GET /healthz HTTP/1.1\r\n")  # and no more
        answer, waited = await _until_closed(reader, 4)
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408"), f"held {waited:.1f}s with half a request"


async def test_idle_after_a_body_answered_early_is_closed_at_keep_alive(
    tmp_path, sandbox_url: str, clock: ManualClock
) -> None:
    """The body of a request answered before it arrives completes, then nothing: an idle
    kept-alive connection, closed at keep_alive_timeout (uvicorn arms it only when an
    answer completes, and the body's bytes had cancelled it: held for ever)."""
    async with running_bridge(bridge_config(tmp_path, sandbox_url, SHORT), clock) as (_, url):
        reader, writer = await _answered_early(url)
        writer.write(b"0123456789")
        answer, waited = await _until_closed(reader, 4)
        writer.close()
    assert answer == b"" and waited < 2, f"idle connection held {waited:.1f}s"


async def test_a_slow_next_request_does_not_cost_the_one_being_answered_its_answer(
    tmp_path, sandbox_url: str, clock: ManualClock
) -> None:
    """Request 1 (a store write, stalled 1 s) is read and acted on; request 2's headers
    begin and never end. At the 300 ms header deadline the connection was closed and
    request 1's answer never sent (its sender retries what was done): its answer first,
    then the 408."""
    stall = _stalled(tmp_path, sandbox_url, clock, SHORT.replace('"1s"', '"5s"'), 1.0)
    async with stall as (reader, writer):
        writer.write(READYZ)
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"GET /healthz HTTP/1.1\r\n")  # and the rest never comes
        answer, _ = await _until_closed(reader, 4)
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert answer.index(b"HTTP/1.1 408") > 0, answer


async def test_malformed_requests_get_json_saying_why_and_a_line_a_minute_in_the_log(
    tmp_path, sandbox_url: str, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    """uvicorn answered a request its parser refused with plain text ("Invalid HTTP request
    received.") and logged a WARNING for each, two for each `Upgrade:` request: anyone who
    reached the port wrote the log as fast as they could send."""
    caplog.set_level("INFO")
    config = bridge_config(tmp_path, sandbox_url)
    malformed = (
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -1\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header: x\r\n\r\n",
        b"GET /\xff HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    )
    upgrade = (
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\n"
        b"Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )
    async with running_bridge(config, clock) as (_, url):
        host, port = url.removeprefix("http://").split(":")
        for request in malformed * 20 + (upgrade,) * 20:
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(request)
            head, body = await _answer(reader)
            writer.close()
            if request is upgrade:
                assert head.startswith(b"HTTP/1.1 200") and json.loads(body) == {"status": "ok"}
                continue
            assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head, head
            assert json.loads(body)["error"].startswith("malformed HTTP request: "), body
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "malformed request from 127.0.0.1" in warnings[0], warnings
