"""SQLite's durability behind the writer (`bridge.store.sqlite.engine`): the writer commits
with `synchronous=NORMAL`, the syncer's fdatasync of the WAL makes the commit durable, and
only then may SMTP say 250 and HTTP 202. A slow disk (`tests.stores.HeldDisk`) holds the
answer, never the commit; the file synced is the WAL SQLite really writes; a stop waits for
the sync under way and answers what it covered.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import time
from pathlib import Path

import httpx
import pytest

from bridge.clock import ManualClock
from bridge.provider.sandbox import SandboxState
from bridge.service import Bridge
from bridge.store.sqlite import SqliteStore
from tests.helpers import bridge_config, pump, running_bridge
from tests.stores import HeldDisk, faulty_store
from tests.test_smtp import DEFAULT_RCPT, SMTP_BASE, send, smtp_listening

MAIL = "Subject: UPS on battery\r\n\r\nmains lost in rack 4\r\n"


async def held_while_committed(bridge: Bridge, disk: HeldDisk, answer: asyncio.Future) -> None:
    """Wait until the message is committed (a reader sees it) and its sync is held; then
    the answer must still be pending."""
    for _ in range(200):
        if disk.synced and await bridge.store.counts() == {"queued": 1}:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)
    assert not answer.done(), f"answered before the WAL was synced: {answer}"


async def held_post(
    bridge: Bridge, disk: HeldDisk, http: httpx.AsyncClient, url: str
) -> asyncio.Future[httpx.Response]:
    """An alert posted while `disk` holds every sync: its answer, still pending once the
    alert is committed and its sync under way."""
    post = asyncio.ensure_future(
        http.post(f"{url}/api/v1/messages", json={"to": "+12025550143", "message": "x"})
    )
    await held_while_committed(bridge, disk, post)
    return post


def linked_elsewhere(path: Path) -> Path:
    """Make `path` a symbolic link to a new empty store in another directory: that file."""
    real = path.parent / "volume" / path.name
    real.parent.mkdir()
    real.touch(mode=0o600)
    path.symlink_to(real)
    return real


async def test_an_alert_is_acknowledged_only_once_the_wal_is_on_disk(
    tmp_path: Path, clock: ManualClock, sandbox_url: str
) -> None:
    """The writer commits with `synchronous=NORMAL` and goes on to the next group; the
    syncer's fdatasync of the WAL makes the commit durable, and only then comes the 202.
    A slow disk here holds the answer, not the commit."""
    config = bridge_config(tmp_path, sandbox_url)
    store = faulty_store(config)
    disk = HeldDisk()
    async with running_bridge(config, clock, store) as (bridge, url), httpx.AsyncClient() as http:
        store.fail_syncs(disk)
        post = await held_post(bridge, disk, http, url)
        assert disk.synced == [f"{config.store.path}-wal"]  # tmp_path is resolved already
        disk.release()
        assert (await post).status_code == 202


async def test_a_store_reached_by_a_symlink_is_acknowledged_after_its_real_wal_is_synced(
    tmp_path: Path, clock: ManualClock, sandbox_url: str
) -> None:
    """SQLite follows a symbolic link and keeps the WAL next to the file it reached: a
    store path that is a link (a volume mounted elsewhere, `/var/lib/x/store.db` -> `/data`)
    has no WAL next to the link. The syncer syncs the WAL SQLite writes, before the 202."""
    config = bridge_config(tmp_path, sandbox_url)
    real = linked_elsewhere(Path(config.store.path))
    store = faulty_store(config)
    disk = HeldDisk()
    async with running_bridge(config, clock, store) as (bridge, url), httpx.AsyncClient() as http:
        store.fail_syncs(disk)
        post = await held_post(bridge, disk, http, url)
        disk.release()
        assert (await post).status_code == 202
    assert disk.synced[0] == f"{real}-wal", disk.synced


async def test_an_smtp_250_comes_only_once_the_wal_is_on_disk(
    tmp_path: Path, clock: ManualClock, sandbox_url: str
) -> None:
    config = bridge_config(tmp_path, sandbox_url, SMTP_BASE)
    store = faulty_store(config)
    disk = HeldDisk()
    async with running_bridge(config, clock, store) as (bridge, _), smtp_listening(bridge) as port:
        store.fail_syncs(disk)
        mail = asyncio.ensure_future(
            asyncio.to_thread(send, port, "ups@example.org", [DEFAULT_RCPT], MAIL)
        )
        await held_while_committed(bridge, disk, mail)
        disk.release()
        assert await mail == {}  # 250: no recipient refused
    assert disk.synced[0] == f"{config.store.path}-wal"


async def test_nothing_is_sent_before_its_ingest_is_on_disk(
    tmp_path: Path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """The dispatcher reads the queue on a reader connection, which sees a commit before
    its sync; but the claim that precedes every send is a write, committed after the
    ingest and settled by a sync that covers both: no text leaves for a message a power
    loss could still take back (its sender, told nothing, would send it again)."""
    config = bridge_config(tmp_path, sandbox_url)
    store = faulty_store(config)
    disk = HeldDisk()
    async with running_bridge(config, clock, store) as (bridge, url), httpx.AsyncClient() as http:
        store.fail_syncs(disk)
        post = await held_post(bridge, disk, http, url)
        step = asyncio.ensure_future(bridge.dispatcher.run_once())
        await asyncio.sleep(0.3)
        assert sandbox_state.entries == [], "sent before the ingest was on disk"
        disk.release()
        assert (await post).status_code == 202
        await step
        await pump(bridge, clock, lambda: sandbox_state.entries, max_seconds=60)
    assert len(sandbox_state.entries) == 1


async def test_a_stop_waits_for_the_sync_under_way_and_answers_what_it_covered(
    tmp_path: Path, clock: ManualClock, sandbox_url: str
) -> None:
    """The bridge stops while the disk holds the sync of a mail's commit: the stop waits
    for it (no syncer thread left behind, blocked or not), the client gets its 250, and
    the mail is in the store the next start reads."""
    config = bridge_config(tmp_path, sandbox_url, SMTP_BASE)
    store = faulty_store(config)
    disk = HeldDisk()
    hold = 0.5
    async with running_bridge(config, clock, store) as (bridge, _), smtp_listening(bridge) as port:
        syncers = [t for t in threading.enumerate() if t.name == "store-sync"]
        store.fail_syncs(disk)
        mail = asyncio.ensure_future(
            asyncio.to_thread(send, port, "ups@example.org", [DEFAULT_RCPT], MAIL)
        )
        await held_while_committed(bridge, disk, mail)
        threading.Timer(hold, disk.release).start()
        stopping = time.monotonic()
    assert time.monotonic() - stopping >= hold * 0.9, "the stop did not wait for the sync"
    assert not any(t.is_alive() for t in syncers)
    assert await mail == {}
    reopened = SqliteStore(config.store.path)
    await reopened.open()
    try:
        assert await reopened.counts() == {"queued": 1}
    finally:
        await reopened.close()


def read_only_open_on(fd: int, path: str) -> bool:
    """Whether descriptor `fd` of this process is open on `path`, read-only (the syncer's:
    SQLite opens its files read-write)."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
        with open(f"/proc/self/fdinfo/{fd}") as info:
            flags = next(int(v, 8) for k, v in (line.split() for line in info) if k == "flags:")
    except FileNotFoundError:
        return False
    return target == path and flags & os.O_ACCMODE == os.O_RDONLY


async def test_the_wal_is_synced_through_one_descriptor_held_open_from_sync_to_sync(
    tmp_path: Path, clock: ManualClock, sandbox_url: str
) -> None:
    """Linux reports a failed write-back to each descriptor open when it failed, but to
    one opened after it only if no descriptor saw it yet, and SQLite's own (a checkpoint's
    fsync) may have: a descriptor opened for each sync could succeed over pages the kernel
    dropped, and the 202 follow. The syncer keeps one open from one sync to the next."""
    config = bridge_config(tmp_path, sandbox_url)
    store = faulty_store(config)
    synced: list[int] = []
    async with running_bridge(config, clock, store) as (_, url), httpx.AsyncClient() as http:
        store.fail_syncs(synced.append)
        for text in ("disk 91% on db-2", "disk 97% on db-2"):
            body = {"to": "+12025550143", "message": text}
            assert (await http.post(f"{url}/api/v1/messages", json=body)).status_code == 202
        held = [read_only_open_on(fd, f"{config.store.path}-wal") for fd in synced]
    assert len(synced) >= 2 and len(set(synced)) == 1, synced
    assert all(held), "the WAL's descriptor was closed between syncs"


async def test_what_was_queued_to_the_writer_before_a_failed_sync_is_never_written(
    tmp_path: Path, clock: ManualClock, sandbox_url: str
) -> None:
    """A sync fails while the writer holds the next alert (queued before anyone knew):
    that alert is refused (503) and not written, as every write after it, not written
    and then answered 503 (a retried alert would meet its own ghost after the restart)."""
    config = bridge_config(tmp_path, sandbox_url)
    store = faulty_store(config)
    synced, failing = threading.Event(), threading.Event()
    writer_busy, go_on = threading.Event(), threading.Event()

    def failing_disk(fd: int) -> None:
        synced.set()
        failing.wait(10)
        raise OSError(5, "Input/output error")

    def held_writer() -> None:
        writer_busy.set()
        go_on.wait(10)

    alert = {"to": "+12025550143", "message": "first"}
    async with running_bridge(config, clock, store) as (bridge, url), httpx.AsyncClient() as http:
        store.fail_syncs(failing_disk)
        first = asyncio.create_task(http.post(f"{url}/api/v1/messages", json=alert))
        await asyncio.to_thread(synced.wait, 10)  # committed, its sync under way
        store.fail_commits(held_writer)
        second = asyncio.create_task(
            http.post(f"{url}/api/v1/messages", json={**alert, "message": "second"})
        )
        await asyncio.to_thread(writer_busy.wait, 10)  # queued, the writer holding it
        failing.set()
        assert (await first).status_code == 503  # the failure is known from here on
        go_on.set()
        answers = [first.result(), await second]
        store.fail_commits(None)
        texts = [m.text for m in await bridge.store.query(limit=10)]
    assert [a.status_code for a in answers] == [503, 503], [a.text for a in answers]
    assert texts == ["first"], texts


async def test_a_failed_sync_fails_what_it_covered_and_every_write_until_a_restart(
    tmp_path, clock: ManualClock, sandbox_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """After a failed fdatasync the kernel may have dropped the pages it could not write,
    and a later sync succeed without them: nothing may be acknowledged on that file until
    the bridge restarts and reads what is really on disk."""
    config = bridge_config(tmp_path, sandbox_url)
    store = faulty_store(config)

    def failing_disk(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    alert = {"to": "+12025550143", "message": "x"}
    async with running_bridge(config, clock, store) as (_, url), httpx.AsyncClient() as http:
        store.fail_syncs(failing_disk)
        failed = await http.post(f"{url}/api/v1/messages", json=alert)
        store.fail_syncs(None)  # the next sync would succeed: too late
        after = await http.post(f"{url}/api/v1/messages", json={**alert, "message": "y"})
        ready = await http.get(f"{url}/readyz")
        alive = await http.get(f"{url}/healthz")  # a liveness probe restarts it
    assert failed.status_code == 503 and "store sync failed" in failed.json()["error"]
    assert after.status_code == 503 and "restart" in after.json()["error"], after.text
    assert ready.status_code == 503
    assert alive.status_code == 503 and "restart" in alive.json()["problems"]["store"]
    assert "store sync failed, no more writes until a restart" in caplog.text
    async with running_bridge(config, clock) as (_, url), httpx.AsyncClient() as http:
        again = await http.post(f"{url}/api/v1/messages", json={**alert, "message": "y"})
    assert again.status_code == 202, again.text
