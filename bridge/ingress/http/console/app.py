"""The web console's pages at `/ui/`: server-rendered over the store's queries.

Every page is plain HTML that works without script (a small same-origin script only
refreshes live figures and asks before a cancel), and every page is also JSON at the
same path with `.json` appended (Datasette's convention), with the same data. Who may
see and do what, and how a browser signs in, is `bridge.ingress.http.console.gate`.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route, Router
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from bridge.clock import Clock
from bridge.config import LiveConfig
from bridge.errors import InputError, Unavailable
from bridge.firewall import cap_recipients
from bridge.health import ProviderHealth
from bridge.ingress.http.auth import token_name
from bridge.ingress.http.bulk import Cancelled, Waiting, cancel_waiting, phone_number
from bridge.ingress.http.changes import CANCEL, RETRY, why_not
from bridge.ingress.http.console import chart
from bridge.ingress.http.console.activity import RouteActivity
from bridge.ingress.http.console.gate import (
    HERE,
    Caller,
    Gate,
    Refused,
    SecureHeaders,
    SlashlessPosts,
)
from bridge.ingress.http.console.routes import (
    authentication,
    encoding_name,
    postfix_snippet,
    preview,
    sample_payload,
    snippets,
)
from bridge.ingress.http.filters import ListQuery, given, read_list_query
from bridge.ingress.ingest import Ingestor
from bridge.models import SMTP_SENDER, SOURCES, Message, State
from bridge.phone import PhoneError, normalise_number
from bridge.policy.budgets import day_bounds, smtp_token
from bridge.policy.shaping import Draft
from bridge.store import Store
from bridge.text import split_parts

log = logging.getLogger(__name__)
PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
MAX_TEST_TEXT = 1000
CHART_MINUTES = 180
DELIVERY_WINDOW = 86400.0
RECENT_FAILURES = 10
# The storms card's queued piles: phones with this many of the queue's next texts due
# (store.queued_piles says why only so many are read).
QUEUED_PILE_SCAN = 2000
QUEUED_PILE_MIN = 10
MENTIONS_LISTED = 200  # on a message's page: what suppressed it or was folded into it
# The list's filters as typed, kept in its pager's links: the form's, and those a link
# from the overview sets (its "N failed": since the day's start, cancelled left out).
LIST_FILTERS = ("state", "recipient", "route", "source", "q", "reason", "not_reason", "since")


def whole_number(text: str) -> str | None:
    """The number a phone's page searches for, when `text` is one written with its
    calling code (`+1 202-555-0142` too): looked up exactly, through the index. Digits
    alone stay a substring search: `2025550142` is a US number's national part here and
    a whole Egyptian number (+20) to the library."""
    if not text.startswith("+"):
        return None
    try:
        return normalise_number(text)
    except (PhoneError, Unavailable):  # a part of a number, or one unreadable now
        return None


# Who a message without a token came from, by its source.
_UNSIGNED = {
    "hook": "its route (a route's own credentials are no API token)",
    "smtp": "an SMTP client that did not log in",
    "digest": "the bridge (a storm's digest)",
    "budget": "the bridge (a budget warning)",
}


def sender_of(token: str | None, source: str) -> dict[str, str | None]:
    """Who sent a message, as its page shows it: the `[tokens.NAME]` or the SMTP login it
    carries (a name, never a secret), else what its source says of it."""
    if token is None:
        return {"kind": None, "name": None, "text": _UNSIGNED.get(source, "no token (open bridge)")}
    if token.startswith(SMTP_SENDER):
        login = token[len(SMTP_SENDER) :]
        return {"kind": "smtp", "name": login, "text": f"SMTP login {login}"}
    return {"kind": "token", "name": token, "text": f"API token {token}"}


# Where a phone's held or queued message found by a bulk cancel went before its write,
# those the dispatcher is sending now aside (told as being handed to the provider).
_LEFT = {
    State.QUEUED: "already sent, or ended",
    State.HELD: "folded into a digest, or ended",
}


def cancel_note(done: Cancelled, state: State, number: str) -> str:
    """What a phone's "Cancel all" did, as the page it goes back to says it. Texts the
    dispatcher claimed between the read and the write are told as such: "Nothing was
    queued" said of them told the operator there had been nothing to stop."""
    waiting = str(state)
    plural = "" if done.cancelled == 1 else "s"
    if done.cancelled:
        note = f"Cancelled {done.cancelled} {waiting} message{plural} to {number}."
    elif done.gone or done.taken:
        note = "Nothing cancelled."
    else:
        note = f"Nothing was {waiting} for {number}: nothing cancelled."
    if done.gone:
        were = "was" if done.gone == 1 else "were"
        note += f" {done.gone} found {waiting} {were} no longer {waiting} ({_LEFT[state]})."
    if done.in_flight:
        # Those taken between the read and the write are among them: counted once.
        taken = f" ({done.taken} taken after this cancel found them)" if done.taken else ""
        # A count cut at its bound is a floor: "500" of 800 read as all there were.
        count = f"{done.in_flight} or more" if done.in_flight_more else str(done.in_flight)
        note += f" {count} being handed to the provider now{taken}: too late to cancel."
    if done.more:
        note += " More may be left: cancel again."
    return note


class Console(Gate):
    def __init__(
        self,
        *,
        live: LiveConfig,
        store: Store,
        ingestor: Ingestor,
        health: ProviderHealth,
        clock: Clock,
        activity: RouteActivity,
        status: Callable[[], dict[str, Any]] | None = None,
        wake: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(live=live, clock=clock)
        self.store = store
        self.ingestor = ingestor
        self.health = health
        self.activity = activity
        # What only the running dispatcher knows (rate window, balance); None in tests
        # that build the app alone.
        self.status = status or (lambda: {})
        self.wake = wake or (lambda: None)

    # -- pages -------------------------------------------------------------------------
    async def overview(self, request: Request, caller: Caller) -> tuple[str, dict[str, Any]]:
        config = self.live.current
        now = self.clock.now()
        day_start, _, date = day_bounds(now)
        since = now - now % 60 - (CHART_MINUTES - 1) * 60  # the last bar is this minute
        summary = await self.store.overview(
            now=now, day_start=day_start, since=now - DELIVERY_WINDOW
        )
        activity = await self.store.activity(since, 60.0)
        requests = [0] * CHART_MINUTES
        for kind, series in activity.items():
            if kind != "messages":
                for index, count in series.items():
                    if 0 <= index < CHART_MINUTES:
                        requests[index] += count
        messages = [activity["messages"].get(i, 0) for i in range(CHART_MINUTES)]
        answers = summary["answers"]
        delivered, failed = answers.get("delivered", 0), answers.get("failed", 0)
        status = self.status()
        today = summary["today"]
        if today["cost"] is None and not today["texts"] and not today["warnings"]:
            # The store's sum over no rows: nothing sent today has cost nothing (unknown
            # is for texts sent whose price the provider has not reported yet).
            today = {**today, "cost": 0.0}
        # What was spent, as best known: the provider's prices, and the estimates of the
        # texts it has not priced yet; never the estimates of priced ones beside their
        # prices ("4.5 (estimated 0.5)" added two different sets of texts).
        unpriced = today["unpriced_estimated_cost"]
        spent = (
            None
            if today["cost"] is None and unpriced is None
            else (today["cost"] or 0.0) + (unpriced or 0.0)
        )
        today = {**today, "spent": spent}
        caps = {
            "texts_per_day": config.budget.texts_per_day,
            "parts_per_day": config.budget.parts_per_day,
            "cost_per_day": config.budget.cost_per_day,
            "on_exceeded": config.budget.on_exceeded,
            "routes": {
                name: {"cap": route.max_texts_per_day, "used": today["routes"].get(name, 0)}
                for name, route in config.routes.items()
                if route.max_texts_per_day
            },
            "tokens": {
                name: {"cap": token.texts_per_day, "used": today["tokens"].get(name, 0)}
                for name, token in config.tokens.items()
                if token.texts_per_day
            },
            "smtp_users": {
                login: {"cap": cap, "used": today["tokens"].get(smtp_token(login), 0)}
                for login, cap in config.smtp.user_texts_per_day.items()
                if cap
            },
        }
        storms = [
            {**s, "digest_at": s["first_at"] + config.limits.per_recipient_window}
            for s in await self.store.held_storms()
        ]
        # Texts piling up queued for one phone (storm control off, or a provider paused):
        # cancelled from the card as a held storm is. At least so many: only the queue's
        # next QUEUED_PILE_SCAN are counted ("+" on the card when there are more).
        piles = await self.store.queued_piles(QUEUED_PILE_SCAN, QUEUED_PILE_MIN)
        failures = await self.store.recent_failures(RECENT_FAILURES)
        queue = summary["queue"]
        data: dict[str, Any] = {
            "states": {str(s): 0 for s in State} | await self.store.counts(),
            "queue": {
                **queue,
                # How long the message due the longest has waited; none while every
                # queued one waits for its schedule or tomorrow's budget.
                "oldest_age_seconds": None
                if queue["oldest_due_at"] is None or queue["oldest_due_at"] > now
                else now - queue["oldest_due_at"],
            },
            "delivery": {
                "since_at": now - DELIVERY_WINDOW,
                "delivered": delivered,
                "failed": failed,
                "awaiting": answers.get("sent", 0),
                "ratio": delivered / (delivered + failed) if delivered + failed else None,
            },
            "rate": {
                "limit_per_minute": config.provider.requests_per_minute,
                "used_in_window": status.get("rate_used"),
                "paused_until_at": paused
                if (paused := status.get("paused_until")) and paused > now
                else None,
                "chart": {
                    "since_at": since,
                    "minutes": CHART_MINUTES,
                    "requests": requests,
                    "messages": messages,
                },
            },
            "provider": {
                "sandbox": config.uses_sandbox,
                "ready": self.health.ready,
                "problem": self._shown(self.health.auth_error) if self.health.auth_error else None,
                "problem_since_at": self.health.since,
                "last_success_at": self.health.last_success,
                "balance": status.get("balance"),
                "low_balance": config.budget.low_balance,
            },
            "today": {"date": date, **today, "caps": caps},
            "storms": storms,
            "queued_piles": piles,
            "failures": [
                {
                    "id": m.id,
                    "recipient": m.recipient,
                    "reason": m.reason,
                    "updated_at": m.updated_at,
                }
                for m in failures
            ],
        }
        data["queued_piles_partial"] = data["states"].get(str(State.QUEUED), 0) > QUEUED_PILE_SCAN
        if request.url.path.endswith(".json"):
            return "", data
        data["chart"] = chart.build(
            requests,
            messages,
            limit=config.provider.requests_per_minute,
            since=since,
            bucket=60.0,
        )
        return "overview.html", data

    async def messages(self, request: Request, caller: Caller) -> tuple[str, dict[str, Any]]:
        q = request.query_params
        config = self.live.current
        # Read as the API reads them, into the same 400s (bridge.ingress.http.filters).
        wanted = await read_list_query(
            q,
            default_limit=PAGE_SIZE,
            max_limit=MAX_PAGE_SIZE,
            routes=config.routes,
            store=self.store,
        )
        filters = {key: (q.get(key) or "").strip() for key in LIST_FILTERS}
        filters["state"] = wanted.state or ""  # the API's `status` too, shown as the state
        number = whole_number(filters["recipient"])
        part = wanted.recipient
        found = await self._messages(wanted, number, part, limit=wanted.limit + 1)
        if number and not found:
            # A part of a number may be a possible number itself (`+4930123456` of
            # `+493012345678`): found exactly, it would find only itself. Nothing found
            # exactly, its digits are searched for as a part. On every page, not only
            # the first: such a page's "older" cursor comes back here with the same text.
            part = number.lstrip("+")
            found = await self._messages(wanted, None, part, limit=wanted.limit + 1)
        page, more = found[: wanted.limit], len(found) > wanted.limit
        kept = {k: v for k, v in filters.items() if v}
        if given(q, "limit"):  # the next page as long as this one, as asked
            kept["limit"] = str(wanted.limit)
        older = urlencode({**kept, "before": page[-1].id}) if more and page else None
        routes = sorted(config.routes)
        removed = wanted.route if wanted.route and wanted.route not in config.routes else None
        return "messages.html", {
            "filters": filters,
            "since_at": wanted.since,
            "states": [str(s) for s in State],
            "routes": routes,
            # Chosen in the filter as any route is, or the form would say "any" over a
            # list of that route's messages (and lose it on the next Filter).
            "removed_route": removed,
            # A phone's held messages (the storms card links here), or its queued ones (a
            # storm of texts to one phone): cancelled in one go.
            "held_phone": number if wanted.state == str(State.HELD) and page else None,
            "queued_phone": number if wanted.state == str(State.QUEUED) and page else None,
            "sources": list(SOURCES),
            "messages": [m.to_json() for m in page],
            "older": f"?{older}" if older else None,
            "newest": f"?{urlencode(kept)}" if wanted.before else None,
        }

    async def _messages(
        self, wanted: ListQuery, number: str | None, part: str | None, *, limit: int
    ) -> list[Message]:
        """The page's messages: to `number` exactly (through its index) when given, else
        to any recipient holding `part`."""
        return await wanted.page(
            self.store,
            number=number,
            recipient=None if number else part,
            limit=limit,  # one more than shown tells whether there is an older page
        )

    async def message(self, request: Request, caller: Caller) -> tuple[str, dict[str, Any]]:
        message_id = request.path_params["message_id"]
        message = await self.store.get(message_id)
        if message is None:
            raise Refused(404, f"no message {message_id}", field="id")
        data = message.to_json()
        data["encoding"] = encoding_name(message.message_type)
        data["parts_text"] = split_parts(message.text)
        data["events"] = await self.store.events(message.id)  # `at` as every time here
        # One more than listed tells whether there are more: a storm's digest may fold
        # hundreds, and "(200)" beside "+250 more" would be a wrong count.
        mentions = await self.store.mentioned_by(message.id, MENTIONS_LISTED + 1)
        data["mentioned_by"] = mentions[:MENTIONS_LISTED]
        data["mentioned_by_more"] = len(mentions) > MENTIONS_LISTED
        data["sent_by"] = sender_of(message.token, message.source)
        data["can_retry"] = message.state == State.FAILED
        data["can_cancel"] = message.state in (State.QUEUED, State.HELD)
        return "message.html", data

    async def route_list(self, request: Request, caller: Caller) -> tuple[str, dict[str, Any]]:
        config = self.live.current
        stored = await self.store.route_last_messages(sorted(config.routes))
        base = str(request.base_url).rstrip("/")
        routes = []
        for name, route in sorted(config.routes.items()):
            call, refused = self.activity.last.get(name), self.activity.refused.get(name)
            routes.append(
                {
                    "name": name,
                    "url": f"{base}/hooks/{name}",
                    "format": route.format,
                    "to": list(route.to),
                    "authentication": authentication(route),
                    "last_call": None if call is None else dataclasses.asdict(call),
                    "refused": None if refused is None else dataclasses.asdict(refused),
                    "last_message": stored.get(name),
                }
            )
        return "routes.html", {
            "routes": routes,
            "postfix": postfix_snippet(config),
            "smtp_domains": list(config.smtp.domains),
        }

    def _route(self, name: str) -> Any:
        route = self.live.current.routes.get(name)
        if route is None:
            raise Refused(404, f"no route named {name!r}", field="name")
        return route

    async def route_page(
        self, request: Request, caller: Caller, result: Any = None
    ) -> tuple[str, dict[str, Any]]:
        name = request.path_params["name"]
        route = self._route(name)
        listing = (await self.route_list(request, caller))[1]
        [entry] = [r for r in listing["routes"] if r["name"] == name]
        entry["snippets"] = [{"title": t, "text": s} for t, s in snippets(route, entry["url"])]
        entry["sample"] = sample_payload(route)
        entry["event_header"] = {"github": "X-GitHub-Event", "gitlab": "X-Gitlab-Event"}.get(
            route.format
        )
        entry["preview"] = result
        return "route.html", entry

    async def route_preview(
        self, request: Request, caller: Caller, form: dict[str, str]
    ) -> Response:
        route = self._route(request.path_params["name"])
        payload = sample_payload(route) if "sample" in form else form.get("payload", "")
        result = preview(
            route,
            payload,
            event=form.get("event", "").strip(),
            config=self.live.current,
            resolver=self.live.recipients,
            ingestor=self.ingestor,
            secrets=self.live.secrets,  # a template's error (or a name) may quote a value
        )
        # A refusal or the reason a payload is ignored quotes the payload (or the event
        # typed), where someone may have pasted a secret.
        result.error = result.error and self._shown(result.error)
        result.ignored = result.ignored and self._shown(result.ignored)
        result.event = self._shown(result.event)  # shown again in its field, masked alike
        _, data = await self.route_page(request, caller, result)
        return self._render(request, caller, "route.html", data)

    # -- actions (admin) ---------------------------------------------------------------
    async def retry(self, request: Request, caller: Caller, form: dict[str, str]) -> Response:
        message_id, who = request.path_params["message_id"], self._who(request, caller)
        done = await self.store.retry([message_id], self.clock.now(), by=who)
        if not done:
            return await self._not_now(request, message_id, RETRY)
        self.wake()
        log.info("console: %s retried message %d", who, message_id)
        return self._back(
            caller, f"/ui/messages/{message_id}", f"Message {message_id} queued again."
        )

    async def cancel(self, request: Request, caller: Caller, form: dict[str, str]) -> Response:
        message_id, who = request.path_params["message_id"], self._who(request, caller)
        done = await self.store.cancel([message_id], self.clock.now(), by=who)
        if not done:
            return await self._not_now(request, message_id, CANCEL)
        log.info("console: %s cancelled message %d", who, message_id)
        return self._back(caller, f"/ui/messages/{message_id}", f"Message {message_id} cancelled.")

    def cancel_waiting(
        self, state: State
    ) -> Callable[[Request, Caller, dict[str, str]], Awaitable[Response]]:
        """Cancel every message to one phone in `state` (held or queued) at once: a flood
        that storm control holds back (no digest of it goes either), or a storm of texts
        queued for one phone faster than the provider takes them, cancelled at once
        rather than a message at a time. Each is failed as a single cancel fails it, with
        its reason ("cancelled by NAME") and an event of its own."""
        waiting = str(state)

        async def cancel(request: Request, caller: Caller, form: dict[str, str]) -> Response:
            written = form.get("recipient", "").strip()
            if not written:
                return self._error(
                    request, 400, f"'recipient': which phone's {waiting} messages?", as_json=False
                )
            try:
                number = phone_number(written)
            except InputError as exc:
                return self._error(request, 400, f"'recipient': {exc.message}", as_json=False)
            who = self._who(request, caller)
            done = await cancel_waiting(
                self.store, Waiting(states=(waiting,), number=number), self.clock.now, by=who
            )
            log.info(
                "console: %s cancelled %d %s messages to %s", who, done.cancelled, waiting, number
            )
            note = cancel_note(done, state, number)
            return self._back(caller, f"/ui/messages?{urlencode({'recipient': number})}", note)

        return cancel

    async def _not_now(self, request: Request, message_id: int, action: str) -> Response:
        message = await self.store.get(message_id)
        if message is None:
            return self._error(request, 404, f"no message {message_id}", as_json=False)
        return self._error(request, 409, why_not(action, message_id, message.state), as_json=False)

    async def send_form(self, request: Request, caller: Caller) -> tuple[str, dict[str, Any]]:
        return "send.html", {
            "to": "",
            "text": "Test from the sms-bridge console",
            "error": None,
            "groups": sorted(self.live.current.groups),
        }

    async def send(self, request: Request, caller: Caller, form: dict[str, str]) -> Response:
        config, resolver = self.live.current, self.live.recipients
        to, text = form.get("to", "").strip(), form.get("text", "").strip()
        data = {"to": to, "text": text, "error": None, "groups": sorted(config.groups)}
        try:
            if not to:
                raise InputError("to", "a phone number or a group name is needed")
            if not text or len(text) > MAX_TEST_TEXT:
                raise InputError("text", f"the text must be 1 to {MAX_TEST_TEXT} characters")
            targets = [t.strip() for t in to.split(",") if t.strip()]
            cap_recipients(targets, config.http.max_recipients)  # as the API caps them
            recipients = resolver.resolve(targets)
        except InputError as exc:
            data["error"] = self._shown(str(exc))
            return self._render(request, caller, "send.html", data, 400)
        accepted = await self.ingestor.submit(
            [
                Draft(
                    recipients=recipients,
                    text=text,
                    source="console",
                    sender_id=config.provider.sender_id,
                    # A test is meant to go, even when the same test went a minute ago.
                    dedupe_key=f"console-test:{secrets.token_hex(8)}",
                    token=token_name(caller.principal),  # its daily cap counts tests too
                )
            ]
        )
        ids = [a.id for a in accepted]
        who = self._who(request, caller)
        await self.store.note(ids, f"test message sent from the console by {who}", self.clock.now())
        log.info("console: %s sent a test message to %s", who, recipients)
        count = len(ids)
        return self._back(
            caller,
            f"/ui/messages/{ids[0]}" if count == 1 else "/ui/messages?source=console",
            f"Test message stored for {count} recipient{'s' if count != 1 else ''}.",
        )

    # -- the routes --------------------------------------------------------------------
    def routes(self) -> list[BaseRoute]:
        def both(path: str, scope: str, handler: Any) -> list[Route]:
            html, as_json = self.page(scope, handler)
            json_path = path.rstrip("/") + (".json" if path != "/" else "/overview.json")
            # JSON first: "/routes/{name}" would also match "/routes/x.json".
            return [
                Route(json_path, as_json, methods=["GET"]),
                Route(path, html, methods=["GET"]),
            ]

        async def to_slash(request: Request) -> Response:
            return RedirectResponse("/ui/", 308)

        inner: list[BaseRoute] = [
            *both("/", "read", self.overview),
            *both("/messages", "read", self.messages),
            *both("/messages/{message_id:int}", "read", self.message),
            *both("/routes", "read", self.route_list),
            *both("/routes/{name}", "read", self.route_page),
            Route("/send", self.page("admin", self.send_form)[0], methods=["GET"]),
            Route("/send", self.action("admin", self.send), methods=["POST"]),
            Route(
                "/messages/{message_id:int}/retry",
                self.action("admin", self.retry),
                methods=["POST"],
            ),
            Route(
                "/messages/{message_id:int}/cancel",
                self.action("admin", self.cancel),
                methods=["POST"],
            ),
            *(
                Route(
                    f"/{state}/cancel",
                    self.action("admin", self.cancel_waiting(state)),
                    methods=["POST"],
                )
                for state in (State.HELD, State.QUEUED)
            ),
            Route(
                "/routes/{name}/preview",
                self.action("read", self.route_preview),
                methods=["POST"],
            ),
            Route("/signin", self.signin_form, methods=["GET"]),
            Route("/signin", self.signin, methods=["POST"]),
            Route("/signout", self.action("read", self.signout), methods=["POST"]),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ]

        async def not_found(scope: Scope, receive: Receive, send: Send) -> None:
            request = Request(scope, receive)
            path = request.url.path
            answer = self._error(request, 404, f"no page {path}", as_json=path.endswith(".json"))
            await answer(scope, receive, send)

        return [
            Route("/ui", to_slash, methods=["GET"]),
            Mount(
                "/ui",
                app=SecureHeaders(SlashlessPosts(Router(routes=inner, default=not_found))),
            ),
        ]
