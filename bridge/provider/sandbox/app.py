"""The sandbox provider's web app: the provider's v1 API under /api/v1, guarded as the
real one is, and the test controls under /_sandbox.

It is what `serve` talks to when `provider.base_url` is empty, what `sms-bridge sandbox`
runs standalone, and what the tests send to. The guard keeps the documented behaviour
every endpoint shares: the key check (`X-API-Key` or `Bearer`, either accepted; the
scheme is recorded), 100 requests per sliding minute per key with 429 and `Retry-After`,
400 with a message for invalid parameters; and it plays the queued faults. The endpoints
are in api.py, the memory in state.py, the faults in faults.py.
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable
from dataclasses import asdict

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bridge.provider.sandbox.api import ProviderApi
from bridge.provider.sandbox.faults import Fault, error, parse_faults, take_fault
from bridge.provider.sandbox.state import RequestRecord, SandboxState, auth_scheme
from bridge.provider.sandbox.validation import BadRequest, Refused

Handler = Callable[[Request], Awaitable[Response]]


def create_sandbox_app(state: SandboxState) -> Starlette:
    """The provider's API under /api/v1 and the test controls under /_sandbox."""
    provider = ProviderApi(state)

    async def guarded(request: Request, handler: Handler) -> Response:
        # Recorded on arrival, so a request whose answer stalls is already on the list.
        record = RequestRecord(
            state.clock.now(),
            request.method,
            request.url.path,
            500,
            auth_scheme(request),
            dict(request.query_params),
        )
        state.requests.append(record)
        fault = take_fault(state.faults, request.url.path, request.query_params)
        if fault is not None and fault.stalls_after_taking:
            # Taken and logged first, then the answer stalls: the client's read timeout
            # fires on a request the provider has acted on (an unknown outcome).
            response = await answer(request, handler, None)
            record.status = response.status_code
            await fault.stall()
            return response
        if fault is not None and fault.stalls:  # a stall before anything is taken
            await fault.stall()
        if fault is not None and fault.taken:
            await answer(request, handler, None)
        response = await answer(request, handler, fault)
        record.status = response.status_code
        return response

    async def answer(request: Request, handler: Handler, fault: Fault | None) -> Response:
        if fault is not None and fault.status:
            return fault.response()
        key = request.headers.get("x-api-key") or ""
        auth = request.headers.get("authorization", "")
        if not key and auth.lower().startswith("bearer "):
            key = auth[7:].strip()
        if key != state.api_key:
            return error(401, "Invalid or missing API key.")
        wait = state.admit()
        if wait is not None:
            headers = {"Retry-After": str(math.ceil(wait))} if state.send_retry_after else None
            return error(429, "Too many requests.", headers)
        try:
            return await handler(request)
        except BadRequest as exc:
            return error(400, exc.message)
        except Refused as exc:
            return error(200, exc.message)

    def api(handler: Handler) -> Handler:
        async def endpoint(request: Request) -> Response:
            return await guarded(request, handler)

        return endpoint

    # -- controls for tests and trials (not part of the provider's API) ---------------
    async def control_requests(request: Request) -> Response:
        return JSONResponse([asdict(r) for r in state.requests])

    async def control_entries(request: Request) -> Response:
        return JSONResponse([state.to_log(e) for e in state.entries])

    async def control_faults(request: Request) -> Response:
        try:
            state.faults.extend(parse_faults(json.loads(await request.body())))
        except (ValueError, TypeError) as exc:
            return JSONResponse({"error": f"bad fault: {exc}"}, 400)
        return JSONResponse({"queued": len(state.faults)})

    return Starlette(
        routes=[
            Route("/api/v1/send", api(provider.send), methods=["POST"]),
            Route("/api/v1/send-bulk", api(provider.send_bulk), methods=["POST"]),
            Route("/api/v1/balance", api(provider.balance), methods=["GET"]),
            Route("/api/v1/logs", api(provider.logs), methods=["GET"]),
            Route("/api/v1/pricing", api(provider.pricing), methods=["GET"]),
            Route("/api/v1/calculate", api(provider.calculate), methods=["POST"]),
            Route("/api/v1/account", api(provider.account), methods=["GET"]),
            Route("/_sandbox/requests", control_requests, methods=["GET"]),
            Route("/_sandbox/entries", control_entries, methods=["GET"]),
            Route("/_sandbox/faults", control_faults, methods=["POST"]),
        ]
    )
