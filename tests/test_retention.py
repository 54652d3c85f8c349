"""The leader's hourly step (`Bridge.retention`) on a running bridge and the manual
clock: it purges finished messages older than `store.retention`, and runs the store's
upkeep whether retention is on or off."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from datetime import UTC, datetime

import httpx
import pytest

from bridge.clock import ManualClock
from bridge.config import Config, load_config
from bridge.errors import ConfigError, StoreUnavailable
from bridge.models import NewMessage, State
from bridge.service import RETENTION_INTERVAL, Bridge
from tests.helpers import bridge_config, pump_until_state, running_bridge, write_config
from tests.stores import FaultySqliteStore, seed
from tests.test_cli import run
from tests.test_reload import reloaded

DAY = 86400.0
DONE = NewMessage("+12025550143", "old alert", "http", "SMS", 1, 1, state=State.SUPPRESSED)


class CountingStore(FaultySqliteStore):
    upkeeps = 0

    async def upkeep(self) -> None:
        self.upkeeps += 1
        await super().upkeep()


async def asleep_until(clock: ManualClock, at: float) -> None:
    """Wait until a sleeper of `clock` waits for `at`: the step ran and is asleep again."""
    for _ in range(500):
        if at in clock.wakes():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"no sleeper for {at}: {clock.wakes()}")


def kept_for(config: Config, retention: float) -> Config:
    """`config` with `store.retention` set."""
    return dataclasses.replace(config, store=dataclasses.replace(config.store, retention=retention))


async def one_hourly_step(bridge: Bridge, clock: ManualClock) -> None:
    """Run the retention step once: started, then asleep until the next hour."""
    stop = asyncio.Event()
    step = asyncio.create_task(bridge.retention(stop))
    try:
        await asleep_until(clock, clock.now() + RETENTION_INTERVAL)
    finally:
        stop.set()
        await step


@pytest.mark.parametrize("retention", [DAY, 0.0])
async def test_the_hourly_step_purges_and_keeps_the_store(
    tmp_path, clock: ManualClock, sandbox_url: str, retention: float
) -> None:
    config = bridge_config(tmp_path, sandbox_url)
    config = dataclasses.replace(
        config, store=dataclasses.replace(config.store, retention=retention)
    )
    store = CountingStore(config.store.path)
    async with running_bridge(config, clock, store) as (bridge, _):
        [old] = await seed(store, [DONE], clock.now() - 2 * DAY)
        [recent] = await seed(store, [DONE], clock.now())
        stop = asyncio.Event()
        step = asyncio.create_task(bridge.retention(stop))
        try:
            await asleep_until(clock, clock.now() + RETENTION_INTERVAL)
            assert store.upkeeps == 1
            kept = {m.id for m in await store.query(limit=10)}
            assert kept == ({recent} if retention else {old, recent})
            clock.advance(RETENTION_INTERVAL)  # an hour later: again
            await asleep_until(clock, clock.now() + RETENTION_INTERVAL)
            assert store.upkeeps == 2
        finally:
            stop.set()
            await step


async def test_the_upkeep_runs_when_the_purge_fails(
    tmp_path, clock: ManualClock, sandbox_url: str
) -> None:
    """A purge that fails every hour (a big one past the store's statement limit) must
    not stop the fold of the totals: the step logs the failure and tries again."""

    class FailingPurge(CountingStore):
        async def purge(self, before: float) -> int:
            raise StoreUnavailable("purge took too long")

    config = bridge_config(tmp_path, sandbox_url)
    store = FailingPurge(config.store.path)
    async with running_bridge(config, clock, store) as (bridge, _):
        stop = asyncio.Event()
        step = asyncio.create_task(bridge.retention(stop))
        try:
            await asleep_until(clock, clock.now() + RETENTION_INTERVAL)
            assert store.upkeeps == 1
        finally:
            stop.set()
            await step


async def test_a_message_sent_today_is_kept_however_old_its_queueing(
    tmp_path, clock: ManualClock, sandbox_url: str, backend: str
) -> None:
    """Retention counts from when a message reached its end, not from when it was queued:
    one that waited two days (the provider down, its key refused) and went out just now
    stays, in its history and in what today's caps count as sent."""
    config = kept_for(bridge_config(tmp_path, sandbox_url), DAY)
    async with running_bridge(config, clock) as (bridge, _):
        store = bridge.store
        [late] = await seed(store, [DONE._replace(state=State.QUEUED)], clock.now() - 2 * DAY)
        await pump_until_state(bridge, clock, late, State.SENT, max_seconds=60)
        sent_today = await store.used_since(clock.now() - 3600, "budget")
        assert sent_today == (1, 1)
        await one_hourly_step(bridge, clock)
        message = await store.get(late)
        assert message is not None and message.state == State.SENT
        assert await store.used_since(clock.now() - 3600, "budget") == sent_today


async def test_a_purge_of_the_newest_messages_never_lets_their_ids_be_given_again(
    tmp_path, clock: ManualClock, sandbox_url: str, backend: str
) -> None:
    """SQLite numbered a message max(id) + 1: when retention purged the newest messages
    (every one, on a quiet bridge), the next ones got their ids again, and
    `GET /api/v1/messages/ID` answered a caller given that id earlier with another text.
    Ids now continue after the highest ever given, on both stores, and retention purges
    the newest message too (SQLite kept it for its id, past its retention)."""
    config = kept_for(bridge_config(tmp_path, sandbox_url), DAY)
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        given = await seed(bridge.store, [DONE, DONE, DONE], clock.now() - 2 * DAY)
        await one_hourly_step(bridge, clock)
        for old in given:
            assert (await http.get(f"{url}/api/v1/messages/{old}")).status_code == 404
        answer = await http.post(
            f"{url}/api/v1/messages", json={"to": "+12025550143", "message": "new"}
        )
        [new] = answer.json()["ids"]
        assert new > max(given)
        assert (await http.get(f"{url}/api/v1/messages/{max(given)}")).status_code == 404


async def test_a_text_scheduled_past_the_retention_is_kept_until_its_time(
    tmp_path, clock: ManualClock, sandbox_url: str, backend: str
) -> None:
    """A reminder scheduled ten days ahead goes to the provider at once and is `sent`
    until its delivery report. With `store.retention` = 1 day, the hourly purge took
    `sent` for finished and deleted it a day later: its delivery state was never
    recorded, `GET /api/v1/messages/ID` answered 404 for a text not yet delivered, and
    storm control no longer counted it at its time. A `sent` text is kept until its
    schedule_time has passed (then retention counts as for any other)."""
    config = kept_for(bridge_config(tmp_path, sandbox_url), DAY)
    when = clock.now() + 10 * DAY
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        body = {
            "to": "+12025550143",
            "message": "renew the certificate",
            "schedule_time": datetime.fromtimestamp(when, UTC).isoformat(),
        }
        [reminder] = (await http.post(f"{url}/api/v1/messages", json=body)).json()["ids"]
        await pump_until_state(bridge, clock, reminder, State.SENT, max_seconds=60)
        clock.advance(3 * DAY)
        await one_hourly_step(bridge, clock)
        kept = await http.get(f"{url}/api/v1/messages/{reminder}")
        assert kept.status_code == 200 and kept.json()["state"] == "sent"
        clock.advance(when - clock.now())
        await pump_until_state(bridge, clock, reminder, State.DELIVERED, max_seconds=600)
        clock.advance(2 * DAY)  # delivered two days ago: retention takes it now
        await one_hourly_step(bridge, clock)
        assert (await http.get(f"{url}/api/v1/messages/{reminder}")).status_code == 404


# -- retention under the windows the stored messages are read for ----------------------
ROUTE_TOKEN = 'token = "route-token-0123456789abcdef"\nto = ["+12025550143"]\n'
WINDOWS = [
    # (the config, a retention under its longest window, the key named, the minimum)
    ('[dedupe]\nwindow = "1h"\n', "5m", "dedupe.window", "1h"),
    (
        f'[routes.gh]\nformat = "github"\nsecret = "0123456789abcdef0123456789"\n{ROUTE_TOKEN}',
        "2d",
        "routes.gh",
        "7d",
    ),
    (
        f'[routes.am]\nformat = "alertmanager"\n{ROUTE_TOKEN}dedupe_window = "3h"\n',
        "2h",
        "routes.am.dedupe_window",
        "3h",
    ),
    (
        '[limits]\nper_recipient = 3\nper_recipient_window = "2h"\n',
        "1h",
        "limits.per_recipient_window",
        "2h",
    ),
    ('[budget]\nadmin = ["+12025550101"]\nlow_balance = 5000.0\n', "1h", "budget.admin", "1d"),
]


@pytest.mark.parametrize(("extra", "short", "key", "minimum"), WINDOWS)
def test_a_retention_under_a_window_the_store_is_read_for_is_refused(
    tmp_path, sandbox_url: str, extra: str, short: str, key: str, minimum: str
) -> None:
    """Dedupe, a GitHub route's signed replay window, storm control and the admin's
    once-a-day warnings all look back at the stored messages: with `dedupe.window = 1h`
    and `store.retention = 5m`, the original was purged and the same dedupe_key six
    minutes later was texted again (the daily warning went twice a day; a GitHub
    delivery replayed after two days was taken). Refused, naming the key and the
    minimum; the minimum itself and 0 (keep everything) load."""

    def load(retention: str) -> Config:
        text = (
            f'[store]\npath = "{tmp_path / "bridge.db"}"\nretention = {retention}\n'
            f'[provider]\nbase_url = "{sandbox_url}/api/v1"\napi_key = "test-key"\n{extra}'
        )
        return load_config(write_config(tmp_path, text), env={})

    with pytest.raises(ConfigError) as refused:
        load(f'"{short}"')
    assert "store.retention" in str(refused.value)
    assert key in str(refused.value) and f"use {minimum} or more" in str(refused.value)
    for retention in (f'"{minimum}"', "0"):
        load(retention)


@pytest.mark.slow  # runs the CLI as a process
async def test_a_manual_purge_under_the_dedupe_window_is_refused(
    tmp_path, clock: ManualClock, sandbox_url: str
) -> None:
    """`sms-bridge purge --older-than 5m` under `dedupe.window = 1h` was done, and the
    same alert (its dedupe_key) was texted again six minutes after the first: refused
    now (exit 2, naming the window and the minimum, the store untouched)."""
    config = bridge_config(tmp_path, sandbox_url, '[dedupe]\nwindow = "1h"\n')
    texted = DONE._replace(state=State.DELIVERED, dedupe_key="api:db-2-disk")
    async with running_bridge(config, clock) as (bridge, _):
        # Six minutes ago by the real clock, which the command reads.
        await seed(bridge.store, [texted], time.time() - 360)
    path = tmp_path / "bridge.toml"
    short = run("purge", "--older-than", "5m", "--config", str(path), cwd=tmp_path)
    assert short.returncode == 2, short.stdout
    assert "dedupe.window" in short.stderr and "use 1h or more" in short.stderr
    assert "delivered" in run("messages", "--config", str(path), cwd=tmp_path).stdout
    kept = run("purge", "--older-than", "1h", "--config", str(path), cwd=tmp_path)
    assert kept.returncode == 0, kept.stderr


async def test_a_reload_lengthening_the_dedupe_window_past_the_retention_is_refused(
    tmp_path, clock: ManualClock, sandbox_url: str
) -> None:
    """The store (and its retention) waits for a restart: a reload lengthening the
    dedupe window past it is judged against the retention that keeps running."""
    config = kept_for(bridge_config(tmp_path, sandbox_url), 3600.0)
    async with running_bridge(config, clock) as (bridge, _):
        with pytest.raises(ConfigError) as refused:
            reloaded(bridge, tmp_path, sandbox_url, '[dedupe]\nwindow = "2h"\n')
        assert bridge.config.dedupe.window == 600.0
    assert "store.retention" in str(refused.value) and "dedupe.window" in str(refused.value)
