"""Shared test plumbing: real servers on loopback, configs from TOML text, a pump."""

from __future__ import annotations

import asyncio
import contextlib
import textwrap
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
from starlette.applications import Starlette

from bridge import phone, phone_automaton, phone_patterns, ranges
from bridge.app import build as build_bridge
from bridge.clock import ManualClock
from bridge.config import Config, HttpConfig, LiveConfig, load_config
from bridge.firewall import refusal
from bridge.models import State
from bridge.service import Bridge, uvicorn_server
from bridge.sockets import bind_socket
from bridge.store import Store


@contextlib.asynccontextmanager
async def served(
    app: Starlette,
    http: HttpConfig | None = None,
    *,
    listen: str = "127.0.0.1:0",
    live: LiveConfig | None = None,
) -> AsyncIterator[str]:
    """Serve `app` with uvicorn on `listen` (an ephemeral port); yield a base URL on
    127.0.0.1 (which a dual-stack `[::]` listener takes too).

    `http` is the listener's config as `serve` applies it (proxies, TLS); its listen
    address is ignored. With `live`, under the `[http]` connection limits as `serve` is.
    """
    sock = bind_socket(listen)
    port = sock.getsockname()[1]
    server = uvicorn_server(app, http=http, live=live)
    scheme = "https" if http is not None and http.tls_cert else "http"
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.005)
    try:
        yield f"{scheme}://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


def write_config(tmp_path: Path, body: str, name: str = "bridge.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return path


# Where the configs of `bridge_config` put the store: "" = SQLite in the test's tmp_path;
# the `backend` fixture (tests/conftest.py) sets a PostgreSQL database of the test's own.
STORE_URL = {"url": ""}


def bridge_config(tmp_path: Path, provider_url: str, extra: str = "", **provider: object) -> Config:
    lines = [f'base_url = "{provider_url}/api/v1"', 'api_key = "test-key"']
    lines += [
        f"{k} = {v!r}".replace("'", '"') if isinstance(v, str) else f"{k} = {v}"
        for k, v in provider.items()
    ]
    url = f'url = "{STORE_URL["url"]}"\n' if STORE_URL["url"] else ""
    body = (
        f'[store]\npath = "{tmp_path / "bridge.db"}"\n{url}[provider]\n'
        + "\n".join(lines)
        + "\n"
        + textwrap.dedent(extra)
    )
    return load_config(write_config(tmp_path, body), env={})


class ToProvider(httpx.AsyncBaseTransport):
    """The real HTTP transport to the provider, for a test's subclass to bend where a
    live server cannot play the fault (a timeout after the provider took a request, a
    slow arrival on the manual clock): `inner` carries the requests, `aclose` ends it."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


@contextlib.asynccontextmanager
async def running_bridge(
    config: Config,
    clock: ManualClock,
    store: Store | None = None,
    *,
    listen: str = "127.0.0.1:0",
    transport: httpx.AsyncBaseTransport | None = None,
) -> AsyncIterator[tuple[Bridge, str]]:
    """A bridge built as `serve` builds it, its web app on `listen` under the `[http]`
    connection limits as `serve` serves it, dispatcher not started; on `store` when given
    (unopened: e.g. tests.stores.faulty_store); its provider calls through `transport`
    when given (a fault a live server cannot play)."""
    async with (
        build_bridge(config, clock=clock, store=store, transport=transport) as bridge,
        served(bridge.app, config.http, listen=listen, live=bridge.live) as url,
    ):
        await bridge.dispatcher.load_budget()
        yield bridge, url


async def pump(
    bridge: Bridge,
    clock: ManualClock,
    until: Callable[[], object],
    *,
    max_seconds: float = 3600,
    step_cap: float = 5.0,
) -> None:
    """Run dispatcher and poller steps, moving the clock to whichever wants to run next.

    `until` may be a coroutine function. Stops when it is true; fails after `max_seconds`
    of simulated time.
    """
    start = clock.now()
    while True:
        result = until()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if clock.now() - start > max_seconds:
            raise AssertionError(f"condition not reached in {max_seconds}s of simulated time")
        wait = min(
            await bridge.dispatcher.run_once(),
            await bridge.poller.run_once(),
            await bridge.digests.run_once(),
            step_cap,
        )
        clock.advance(max(wait, 0.01))


async def pump_until_state(
    bridge: Bridge, clock: ManualClock, message_id: int, state: State, *, max_seconds: float
) -> None:
    """`pump` until message `message_id` is in `state`."""

    async def reached() -> bool:
        message = await bridge.store.get(message_id)
        return message is not None and message.state == state

    await pump(bridge, clock, reached, max_seconds=max_seconds)


def max_in_window(times: list[float], window: float = 60.0) -> int:
    """The most requests that fall in any half-open window of `window` seconds."""
    times = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while times[lo] <= t - window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


SetPattern = Callable[[str, str, Callable[[str], str]], str]  # tests.conftest's set_pattern fixture


def forget_the_metadata() -> None:
    """Empty every cache that holds a reading of the phone metadata, and its warnings."""
    ranges.costly_range.cache_clear()
    ranges._automata.cache_clear()
    refusal.cache_clear()
    phone.normalise_number.cache_clear()
    phone._facts.clear()
    phone._plain_codes.clear()
    phone._plain_metadata.clear()
    phone._plain_lengths.clear()
    phone._warned.clear()
    phone_patterns.read.cache_clear()
    phone_automaton.reader.cache_clear()
