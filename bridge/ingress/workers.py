"""A few threads that run blocking calls for the event loop, with a deadline per call.

What `loop.run_in_executor` on a `ThreadPoolExecutor` under `asyncio.timeout` did for
mail parsing, with less on every call: a job is a plain tuple on a `SimpleQueue` and its
answer an asyncio future settled through one `call_soon_threadsafe`, where the executor
built a concurrent future (a Condition and its locks), a work item, an idle semaphore
turn, a second future chained to the first, and the timeout a context object. Measured
under the distinct SMTP benchmark (BENCHMARKS.md, issue #16): those added ~35 us of CPU
to each mail, about as much as the parse itself.

The bounds are the executor's: `count` threads, so a slow call holds one of them and
never the loop; a call whose deadline passes before a thread took it is never run.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
_Job = tuple[Callable[[], Any], "asyncio.Future[Any]", asyncio.AbstractEventLoop]


class Workers:
    """`count` daemon threads taking jobs in arrival order; `close()` ends them."""

    def __init__(self, count: int, name: str) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}_{i}", daemon=True)
            for i in range(count)
        ]
        for thread in self._threads:
            thread.start()

    async def run(self, fn: Callable[[], T], within: float) -> T:
        """`fn()` in a worker thread; TimeoutError once `within` seconds have passed,
        whether `fn` is still waiting for a thread or running (it then runs on, its
        answer dropped: `fn` must bound itself, as the mail parser does)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put((fn, future, loop))
        timer = loop.call_later(within, _expire, future) if within > 0 else None
        try:
            return await future
        finally:
            if timer is not None:
                timer.cancel()

    def close(self) -> None:
        """Stop the threads once their current job is done; jobs not started are
        cancelled (a thread in a job finishes it first: `fn` is bounded)."""
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                _, future, loop = job
                with contextlib.suppress(RuntimeError):  # the loop is already closed
                    loop.call_soon_threadsafe(future.cancel)
        for _ in self._threads:
            self._jobs.put(None)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, future, loop = job
            # Expired or cancelled before a thread took it: never run. (Reading the state
            # from this thread is a hint only; the loop settles the future, see _settle.)
            if future.done():
                continue
            result: Any = None
            error: BaseException | None = None
            try:
                result = fn()
            except BaseException as exc:  # handed to the awaiting task, as an executor does
                error = exc
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
                loop.call_soon_threadsafe(_settle, future, result, error)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # expired or cancelled while the job ran: the answer is dropped
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())
