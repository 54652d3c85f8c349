"""What each webhook route was last asked and answered, for the console's route page.

Kept in memory (one small record per configured route, so a caller cannot grow it by
inventing route names): a restart forgets it, and the route page then shows the route's
newest stored message instead, which the store keeps.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

from bridge.addresses import client_name
from bridge.clock import Clock
from bridge.config import LiveConfig

MAX_ANSWER_CHARS = 200


@dataclass(frozen=True, slots=True)
class Call:
    at: float
    status: int
    answer: str  # what the sender was told: the error, or the ids stored
    client: str


def _answer(response: Response) -> str:
    try:
        body = json.loads(bytes(response.body))
    except (ValueError, AttributeError):
        return ""
    if not isinstance(body, dict):
        return ""
    if "error" in body:
        return str(body["error"])[:MAX_ANSWER_CHARS]
    if "ignored" in body:
        return f"ignored: {body['ignored']}"[:MAX_ANSWER_CHARS]
    ids = body.get("ids")
    if isinstance(ids, list):
        states = [m.get("state") for m in body.get("messages", []) if isinstance(m, dict)]
        summary = ", ".join(f"{states.count(s)} {s}" for s in dict.fromkeys(states))
        return f"stored {len(ids)}: {summary}"[:MAX_ANSWER_CHARS]
    return ""


class RouteActivity:
    """The last call of each route, by route name."""

    def __init__(self, *, live: LiveConfig, clock: Clock) -> None:
        self.live = live
        self.clock = clock
        self.last: dict[str, Call] = {}

    def record(self, name: str, call: Call) -> None:
        if name in self.live.current.routes:
            self.last[name] = call

    def observe(
        self, endpoint: Callable[[Request], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        """`endpoint` (the hook endpoint, errors already turned into answers), recorded."""

        async def observed(request: Request) -> Response:
            response = await endpoint(request)
            self.record(
                request.path_params.get("name", ""),
                Call(
                    at=self.clock.now(),
                    status=response.status_code,
                    answer=_answer(response),
                    client=client_name(request.client.host) if request.client else "",
                ),
            )
            return response

        return observed
