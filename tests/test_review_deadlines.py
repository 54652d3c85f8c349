"""Review proofs (not for merge as is): the connection's body deadline and pipelining."""

from __future__ import annotations

import asyncio
import time

from bridge.clock import ManualClock
from tests.helpers import bridge_config, running_bridge
from tests.stores import faulty_store
from tests.test_http_deadlines import BODY, POST_HEAD

READYZ = b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


async def test_a_pipelined_body_is_not_timed_while_the_server_does_not_read_it(
    tmp_path, sandbox_url: str, clock: ManualClock
) -> None:
    """Request 1 (GET /readyz: a store write) is slow on the server's side: the store
    stalls 1 s (an fsync, a PostgreSQL failover). Request 2 is pipelined behind it, its
    body's end in a segment 100 ms later. uvicorn stops reading while request 2 waits
    its turn (request 1 never calls receive() to resume it), so the body cannot arrive:
    the 300 ms body deadline then measures the server's slowness, not the client's.
    Before 53f0874 the body's time ran from when its endpoint read it (read_bounded).
    The first answer on the wire must be request 1's, not a 408 written ahead of it
    (which the client takes for request 1's answer) -- and request 2 must be served."""
    extra = '[http]\nheader_timeout = "5s"\nbody_timeout = "300ms"\n'
    config = bridge_config(tmp_path, sandbox_url, extra)
    store = faulty_store(config)
    async with running_bridge(config, clock, store=store) as (_, url):
        store.fail_commits(lambda: time.sleep(1.0))  # the writer thread stalls
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(READYZ + POST_HEAD % len(BODY) + BODY[:5])
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(BODY[5:])  # the rest of request 2, 100 ms later: well within 300 ms
        await writer.drain()
        answer = b""
        started = time.monotonic()
        while True:  # everything until the server closes or 3 s of silence
            try:
                chunk = await asyncio.wait_for(reader.read(65536), 3)
            except (TimeoutError, ConnectionResetError) as exc:
                answer += f"<{type(exc).__name__} at {time.monotonic() - started:.2f}s>".encode()
                break
            if not chunk:
                answer += f"<EOF at {time.monotonic() - started:.2f}s>".encode()
                break
            answer += chunk
        writer.close()
        store.fail_commits(None)
    print("ANSWER:", answer)
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert answer.count(b"HTTP/1.1 ") == 2 and b"HTTP/1.1 202" in answer, answer
