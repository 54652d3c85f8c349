"""What each webhook route was last asked and answered, for the console's route page.

Kept in memory (one small record per configured route, so a caller cannot grow it by
inventing route names): a restart forgets it, and the route page then shows the route's
newest stored message instead, which the store keeps.

Only a call that passed its route's checks (network, credentials, signature: the hook
endpoint says so in the request's scope) is the route's last call: a refused one by
anyone who knows the name hid the genuine sender's last call behind a 401. Refused calls
are counted apart, the last of them kept beside the count, so a sender that lost its
secret still shows.

What a call was answered may quote its payload (a recipient as written, a template's
error): masked as the log is, then cut, as `templated.told` tells it. Cut first, a
secret across the cut kept the part before it, and nothing masked the rest.
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
from bridge.ingress.http.hooks import AUTHENTICATED, REFUSAL
from bridge.ingress.templated import told

MAX_ANSWER_CHARS = 200


@dataclass(frozen=True, slots=True)
class Call:
    at: float
    status: int
    answer: str  # what the sender was told: the error, or the ids stored
    client: str


def _answer(response: Response) -> str:
    """What the sender was told, uncut and unmasked (the caller does both, in order)."""
    try:
        body = json.loads(bytes(response.body))
    except (ValueError, AttributeError):
        return ""
    if not isinstance(body, dict):
        return ""
    if "error" in body:
        return str(body["error"])
    if "ignored" in body:
        return f"ignored: {body['ignored']}"
    ids = body.get("ids")
    if isinstance(ids, list):
        states = [m.get("state") for m in body.get("messages", []) if isinstance(m, dict)]
        summary = ", ".join(f"{states.count(s)} {s}" for s in dict.fromkeys(states))
        return f"stored {len(ids)}: {summary}"
    return ""


@dataclass(frozen=True, slots=True)
class Refusals:
    """Calls refused before they passed the route's checks, since the bridge started."""

    count: int
    last: Call


class RouteActivity:
    """The last call of each route that passed its checks, and its refused ones, by name."""

    def __init__(self, *, live: LiveConfig, clock: Clock) -> None:
        self.live = live
        self.clock = clock
        self.last: dict[str, Call] = {}
        self.refused: dict[str, Refusals] = {}

    def record(self, name: str, call: Call, *, authenticated: bool = True) -> None:
        if name not in self.live.current.routes:
            return
        if authenticated:
            self.last[name] = call
        else:
            before = self.refused.get(name)
            self.refused[name] = Refusals((before.count if before else 0) + 1, call)

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
                    # A refusal's real reason: the caller may have been told less.
                    answer=told(
                        str(request.scope.get(REFUSAL, "")) or _answer(response),
                        self.live.secrets,
                        MAX_ANSWER_CHARS,
                    ),
                    client=client_name(request.client.host) if request.client else "",
                ),
                authenticated=bool(request.scope.get(AUTHENTICATED)),
            )
            return response

        return observed
