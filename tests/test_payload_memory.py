"""What a request's parsed payload costs the bridge's memory while its ingest waits for
the store, through a real `serve` process and its public route and API."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from tests.processes import SEND_TOKEN, clean_env, process, sender_config, wait_for

pytestmark = pytest.mark.slow

AT_ONCE = 16  # requests in flight from one client (under max_connections_per_client)
# ~1 MiB (the default http.max_body_bytes) of empty lists: ~25 MB of objects parsed.
PAD = b"[]," * 349_000 + b"[]"


def _high_water_mb(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


async def _post_at_once(url: str, path: str, fields: bytes) -> list[int]:
    body = b"{" + fields + b',"pad":[' + PAD + b"]}"
    headers = {"content-type": "application/json", "authorization": f"Bearer {SEND_TOKEN}"}
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        answers = await asyncio.gather(
            *(client.post(path, content=body, headers=headers) for _ in range(AT_ONCE))
        )
    return [answer.status_code for answer in answers]


@pytest.mark.parametrize(
    ("path", "fields"),
    [
        ("/hooks/open", b'"message":"disk full"'),
        ("/api/v1/messages", b'"to":"+12025550143","message":"disk full"'),
    ],
)
def test_parsed_payloads_do_not_wait_for_the_store(
    tmp_path: Path, path: str, fields: bytes
) -> None:
    """Every request in flight kept its parsed payload (a megabyte of `[]` is ~25 MB of
    objects) until its ingest was done: 30 such posts at once to a public route took the
    bridge from 95 MB to 850 MB, and `http.max_concurrency` (100) allowed some 2.5 GB.
    The payload is let go once the drafts are made, before the store is waited for."""
    # the payload's memory is measured here, not the refusal of its items
    config = sender_config(tmp_path, "max_json_items = 0")
    log = tmp_path / "serve.log"
    with process(["serve", "--config", str(config)], tmp_path, clean_env(), log) as proc:
        url = proc.url()
        wait_for(lambda: httpx.get(f"{url}/healthz").status_code == 200)
        before = _high_water_mb(proc.pid)
        statuses = asyncio.run(_post_at_once(url, path, fields))
        grown = _high_water_mb(proc.pid) - before
    assert statuses == [202] * AT_ONCE
    # One payload parsed at a time (~25 MB, on the event loop) and the bodies in flight
    # (16 MB): well under the ~400 MB of sixteen payloads held at once.
    assert grown < 150, f"the bridge grew {grown:.0f} MB"
    assert "Traceback" not in log.read_text()
