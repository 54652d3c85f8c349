"""Scripted misbehaviour: faults queued through `/_sandbox/faults` make the real server
answer with an error, an odd body, or late, so tests meet failures a healthy provider
would not show on cue.

A stall either comes before the request is handled (the provider never saw it) or after
(`status=0`: the SMS is taken and logged, then the answer is late). Only the second is
what a client's read timeout hides, so it is the one the tests of "unknown outcome,
checked in /logs, not resent" queue. A stall may also last until an event the test sets
(`hold`, in-process only): an answer that must come after something else happened, on a
machine however starved, without a real delay long enough to guess.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from starlette.responses import JSONResponse, Response


@dataclass
class Fault:
    """One scripted misbehaviour: answer `status` (or stall `delay` s) `times` times."""

    status: int = 500
    times: int = 1
    path: str | None = None  # None: any API path
    # Only requests whose query has these values (/logs' page 2, say); None: any.
    query: dict[str, str] | None = None
    body: str | None = None  # raw body; None: the usual JSON error
    retry_after: str | None = None
    # More headers on the answer (a gateway's `Content-Encoding: gzip` over a body that
    # is not gzip, say).
    headers: dict[str, str] | None = None
    # Real seconds to stall. With status 0 the request is handled first (the SMS is
    # taken and logged) and the answer stalls: what a client's read timeout hides.
    delay: float = 0.0
    # Handle the request for real (the SMS is taken and logged), then answer with this
    # fault instead: a 502 from a gateway, a 200 that says nothing, after the fact.
    taken: bool = False
    # In-process tests only (not JSON): stall until the test sets it, as `delay` does.
    hold: asyncio.Event | None = None

    @property
    def stalls_after_taking(self) -> bool:
        return self.stalls and not self.status

    @property
    def stalls(self) -> bool:
        return bool(self.delay) or self.hold is not None

    async def stall(self) -> None:
        if self.hold is not None:
            await self.hold.wait()
        await asyncio.sleep(self.delay)  # real seconds: client timeouts are too

    def response(self) -> Response:
        """The answer this fault gives in place of the provider's."""
        headers = {"Retry-After": self.retry_after} if self.retry_after else {}
        headers.update(self.headers or {})
        if self.body is not None:
            return Response(self.body, self.status, headers=headers, media_type="application/json")
        return error(self.status, "injected fault", headers)


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The provider's error shape, `{"success": false, "message": why}`."""
    return JSONResponse({"success": False, "message": message}, status, headers=headers)


def take_fault(
    faults: deque[Fault], path: str, query: Mapping[str, str] | None = None
) -> Fault | None:
    """The first queued fault for `path` (and `query`), used up once (dropped when spent)."""
    for fault in faults:
        if (fault.path is None or path.endswith(fault.path)) and all(
            (query or {}).get(k) == v for k, v in (fault.query or {}).items()
        ):
            fault.times -= 1
            if fault.times <= 0:
                faults.remove(fault)
            return fault
    return None


def parse_faults(items: Any) -> list[Fault]:
    """Faults from a control request's JSON (one object or a list); TypeError if bad."""
    faults = [Fault(**item) for item in (items if isinstance(items, list) else [items])]
    if any(f.hold is not None for f in faults):
        raise TypeError("hold is for in-process tests only")
    return faults
