"""The ingest endpoints called straight from the middleware stack (ASGI middleware).

Every request through Starlette's router goes through its ExceptionMiddleware (a
Request built, two closures, a hop for each message sent), the router's routes tried
in turn, and the route's own copy of the same exception wrapper, before the handler
runs: ~9 % of the instructions the event loop spent on an alert (BENCHMARKS.md, issue
#16). The two ingest endpoints, `POST /api/v1/messages` and `POST /hooks/{name}`, raise
none of the exceptions those wrappers handle (Starlette's HTTPException: the bridge's
handlers answer their errors themselves, and anything else goes on to the 500 handler
around the whole app, as before), so this layer, last of the bridge's middleware, calls
them directly. Every other request, and these paths with another method or under a
`root_path`, takes the router's way as before: the same 404, 405 and redirects. A
trailing slash on them is served as the path without (`app.posted` says why).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

Handler = Callable[[Request], Awaitable[Response]]
HOOKS = "/hooks/"  # POST /hooks/{name}: a name is one path segment, as the router reads it


class HotRoutes:
    """`POST` to a path of `exact`, or to `/hooks/{name}` (`hook`), without the router."""

    def __init__(self, app: ASGIApp, exact: Mapping[str, Handler], hook: Handler) -> None:
        self.app = app
        self.exact = dict(exact)
        self.hook = hook

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
            path: str = scope["path"]
            handler = self.exact.get(path)
            if handler is not None:
                scope["path_params"] = {}
            elif (
                path.startswith(HOOKS)
                # `/hooks/NAME/` is `/hooks/NAME`, as the router serves it (app.posted)
                and (name := path[len(HOOKS) :].removesuffix("/"))
                and "/" not in name
            ):
                handler = self.hook
                scope["path_params"] = {"name": name}
            if handler is not None:
                response = await handler(Request(scope, receive, send))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
