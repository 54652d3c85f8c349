"""HTTP connection limits: header size, header-read time and concurrency, read live.

uvicorn 0.54 with httptools (its parser whenever httptools is installed, as here) arms
no timer on a new connection until a first response is sent, and httptools takes
headers of any size: a client trickling headers held a connection for 71 s, and 4 MB
of headers were parsed and served. This protocol is uvicorn's httptools protocol with
three additions, each answered in the bridge's JSON error shape:

- `http.header_timeout`: the request line and headers must arrive within it, from the
  connection's start or the first byte of the next request on a kept-alive one: 408.
- `http.body_timeout`: the body must arrive within it once the headers have: 408 (before
  any answer), else the connection is closed. A client trickling its body would hold a
  connection and a place under `max_concurrency` for as long as it liked.
- `http.max_header_bytes`: request line and headers together: 431.
- `http.max_concurrency`: requests in flight; beyond it 503 (never 429: webhook
  senders retry 5xx and drop 4xx); its last quarter goes one request to a client
  (`_reserved`), so a few clients cannot hold it all, except `/healthz`: a liveness probe (Kubernetes',
  Docker's HEALTHCHECK) refused for load had the bridge restarted in the middle of the
  storm it was working through; it costs nothing, and /readyz still says busy. Idle kept-alive connections do not count: uvicorn's
  own check counts them, so 100 idle sockets (re-opened after each header timeout) made
  every request, `/healthz` included, a 503. Nor do answered requests whose task has
  not yet returned: counted by uvicorn's task set, a client that sends its next request
  as soon as it has the answer (every load generator, every busy sender) was counted
  twice, and 64 such connections were refused at a limit of 100.
- `http.max_connections_per_client`: open connections from one client (an IPv4 address
  or an IPv6 /64, as `bridge.ingress.throttle.client_key`); past it the new connection
  gets a 503 and is closed at once, so one client cannot hold every file descriptor.
  Peers in `http.trusted_proxies` are not counted: behind a proxy every connection
  comes from it, and the proxy must limit its own clients.

Every connection reads the limits in force when it is made, so SIGHUP applies them
to new connections. Over HTTPS a connection is counted (and its handshake timed) before
this protocol is made: `bridge.ingress.http.handshake`. `http.keep_alive_timeout` is uvicorn's idle time between requests.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import http
import json
import logging
from collections.abc import Callable
from typing import Any, ClassVar

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from bridge.addresses import Network, in_networks, parse_network
from bridge.clock import SystemClock
from bridge.config import HttpConfig, LiveConfig
from bridge.ingress.throttle import QuietLog, client_key, reserved

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=16)  # one per config in force
def _networks(cidrs: tuple[str, ...]) -> tuple[Network, ...]:
    return tuple(parse_network(c) for c in cidrs)


def is_trusted_proxy(host: str, cidrs: tuple[str, ...]) -> bool:
    if not cidrs:
        return False
    return in_networks(host, _networks(cidrs))


def _body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def refusal_app(status: int, message: str, headers: tuple[tuple[bytes, bytes], ...] = ()) -> Any:
    """An ASGI app answering `status` with a JSON error and closing the connection."""
    body = _body(message)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                    *headers,
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return app


LIVENESS = b"/healthz"  # served past max_concurrency (see above)


class LimitedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits above; `live` is set per server."""

    live: LiveConfig
    per_client: ClassVar[collections.Counter[str]]  # open connections by client, per server
    in_flight: ClassVar[set[Any]]  # admitted requests not yet answered, per server (cycles)
    busy: ClassVar[collections.Counter[str]]  # requests in `in_flight` by counted client
    quiet: ClassVar[QuietLog]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        limits = self.live.current.http
        self.max_header_bytes = limits.max_header_bytes
        self.header_timeout = limits.header_timeout
        self.body_timeout = limits.body_timeout
        self.max_concurrency = limits.max_concurrency
        self.reserve = reserved(limits.max_concurrency, limits.max_connections_per_client)
        self.timeout_keep_alive = limits.keep_alive_timeout  # type: ignore[assignment]
        self.limit_concurrency = None  # ours answers in JSON; uvicorn's would be text
        self.reading_headers = True
        self.header_bytes = 0  # what arrived since the current request began
        self.header_size = 0  # request line and headers as parsed
        # One timer a connection for both deadlines, set by moving these (a timer armed
        # and cancelled per request cost ~2 us, an asyncio.timeout ~3.4 us: 3 % of an
        # alert's whole cost); it fires at least every min(header, body timeout) while a
        # request is being read, and re-arms for what is then due.
        self.headers_due: float | None = None  # loop time the headers must be in by
        self.body_due: float | None = None  # loop time the body must be in by
        self.deadline_timer: asyncio.TimerHandle | None = None
        self.counted_as: str | None = None  # the key in `per_client` while counted
        # Set over HTTPS (bridge.ingress.http.handshake): its count of this connection
        # during the handshake, released as this one counts itself.
        self.handed_over: Callable[[], None] | None = None
        self.admitted: list[Any] = []  # this connection's requests in `in_flight`

    # -- connections -----------------------------------------------------------------
    @classmethod
    def admit(cls, host: str, limits: HttpConfig) -> tuple[str | None, str | None]:
        """Count a connection from `host` in `per_client`: (its key, None); or (None,
        why not) past `http.max_connections_per_client`. A trusted proxy's, and one
        with no address, are not counted: (None, None)."""
        if not host or is_trusted_proxy(host, limits.trusted_proxies):
            return None, None
        key, most = client_key(host), limits.max_connections_per_client
        if cls.per_client[key] >= most:
            cls.quiet.warning("connections", host, "HTTP: too many connections from %s", key)
            why = f"too many connections from {host} (at most {most}, "
            return None, why + "http.max_connections_per_client); retry"
        cls.per_client[key] += 1
        return key, None

    @classmethod
    def release(cls, key: str) -> None:
        """Count out a connection `admit` counted in as `key`."""
        cls.per_client[key] -= 1
        if cls.per_client[key] <= 0:
            del cls.per_client[key]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if self.handed_over is not None:  # the TLS listener's count: this one counts itself now
            self.handed_over()
        super().connection_made(transport)
        self.counted_as, refusal = self.admit(
            self.client[0] if self.client else "", self.live.current.http
        )
        if refusal is not None:
            self._refuse(503, refusal)
            return
        self._expect_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.deadline_timer is not None:
            self.deadline_timer.cancel()
            self.deadline_timer = None
        self.in_flight.difference_update(self.admitted)  # no answer can be sent now
        self._settled(len(self.admitted))
        self.admitted.clear()
        if self.counted_as is not None:
            self.release(self.counted_as)
            self.counted_as = None
        super().connection_lost(exc)

    # -- time ------------------------------------------------------------------------

    def _expect_headers(self) -> None:
        if self.headers_due is None:
            self.headers_due = self.loop.time() + self.header_timeout
            self._arm(self.headers_due)

    def _expect_body(self) -> None:
        self.body_due = self.loop.time() + self.body_timeout
        self._arm(self.body_due)

    def _arm(self, due: float) -> None:
        """Fire by `due` and by the nearest any later request can set: a deadline set
        after this never needs the timer moved."""
        if self.deadline_timer is None:
            at = min(due, self.loop.time() + min(self.header_timeout, self.body_timeout))
            self.deadline_timer = self.loop.call_at(at, self._deadline)

    def _deadline(self) -> None:
        self.deadline_timer = None
        if self.transport.is_closing():
            return
        now = self.loop.time()
        cycle = self.cycle
        if self.headers_due is not None and self.headers_due <= now:
            if cycle is not None and not cycle.response_complete:
                return  # its answer first: on_response_complete looks again
            log.info("HTTP client %s too slow to send its headers: closed", self.client)
            self._too_slow(True, f"request headers not received within {self.header_timeout:g}s")
        elif self.body_due is not None and self.body_due <= now:
            if any(other is not cycle and not other.response_complete for other in self.admitted):
                # Pipelined: an earlier request is still being answered. A 408 now would
                # be taken for its answer, and closing would lose it (read, acted on):
                # on_response_complete looks again once it is out.
                return
            log.info("HTTP client %s too slow to send its body: closed", self.client)
            # `cycle` is this request's: a 408 unless its answer has begun
            unanswered = cycle is not None and not cycle.response_started
            self._too_slow(unanswered, f"request body not received within {self.body_timeout:g}s")
        else:  # moved on since it was armed: wait for what is due now, if anything
            pending = [due for due in (self.headers_due, self.body_due) if due is not None]
            if pending:
                self._arm(min(pending))

    def _too_slow(self, may_answer: bool, message: str) -> None:
        if may_answer:
            self._refuse(408, message)
        else:
            self.transport.close()

    # -- size ------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.reading_headers:
            self._expect_headers()  # first byte of a request on a kept-alive connection
            self.header_bytes += len(data)
        self._parse(data)
        # Headers still incomplete past the limit: httptools would keep buffering.
        if (
            self.reading_headers
            and self.header_bytes > self.max_header_bytes
            and not self.transport.is_closing()
        ):
            self._refuse(431, f"request headers larger than {self.max_header_bytes} bytes")

    def _parse(self, data: bytes) -> None:
        """uvicorn's `data_received`, but for what it logged: a WARNING for every malformed
        request (two for every `Upgrade:` one), so anyone who reached the port wrote the
        log as fast as they could send, and journald's rate limit then dropped the
        bridge's own lines. A malformed request is answered in JSON with what the parser
        found, and logged once a minute per client; an `Upgrade` is not taken (the
        bridge has no WebSocket endpoint: with a WebSocket library installed, uvicorn
        would pass a websocket scope that the Host check and the lockout let through)
        and the request is served as plain HTTP, as uvicorn serves it without one."""
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            host = self.client[0] if self.client else ""
            self.quiet.warning("malformed", host, "HTTP: malformed request from %s: %s", host, exc)
            self._refuse(400, f"malformed HTTP request: {exc}")
        except httptools.HttpParserUpgrade:
            pass

    def _should_upgrade(self) -> bool:
        return False  # no upgrade taken, whatever is installed (see _parse)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.header_size = 0
        # A request's first byte, wherever it falls in a read: its headers are timed from
        # here, and the idle timer of the one before it no longer applies.
        self._unset_keepalive_if_required()
        self._expect_headers()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self.header_size += len(url) + 16  # method, version, line end

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self.header_size += len(name) + len(value) + 4

    def on_headers_complete(self) -> None:
        self.headers_due = None
        self.reading_headers = False
        limit = self.max_concurrency
        if self.header_size > self.max_header_bytes:  # arrived whole, in one read
            self.app = refusal_app(
                431, f"request headers larger than {self.max_header_bytes} bytes"
            )
        elif len(self.in_flight) >= limit and self.url.partition(b"?")[0] != LIVENESS:
            self.quiet.warning(
                "overload", "*", "HTTP overloaded (%d requests in flight): 503", limit
            )
            self.app = refusal_app(503, f"overloaded: more than {limit} requests; retry")
        elif (reserve := self._reserved(limit)) and self.url.partition(b"?")[0] != LIVENESS:
            key = self.counted_as
            self.quiet.warning("share", key or "*", "HTTP: %s past its share: 503", key)
            self.app = refusal_app(
                503,
                f"too many requests in flight from {key}: the last {reserve} of {limit} "
                "are kept for clients with none (http.max_concurrency); retry",
            )
        else:
            self.app = self.config.loaded_app
        super().on_headers_complete()
        if self.app is self.config.loaded_app:  # refusals are cheap: never counted
            self.in_flight.add(self.cycle)
            self.admitted.append(self.cycle)
            if self.counted_as is not None:
                self.busy[self.counted_as] += 1
        if not self.pipeline:  # cleared when the message is complete, often in this read
            self._expect_body()
        # else queued behind an unanswered request: uvicorn reads no more until that is
        # answered, so the body's time starts when this request is served (below)

    def on_response_complete(self) -> None:
        # With pipelining `self.cycle` is the newest request, not the one answered.
        answered = [cycle for cycle in self.admitted if cycle.response_complete]
        self.in_flight.difference_update(answered)
        self._settled(len(answered))
        self.admitted = [cycle for cycle in self.admitted if not cycle.response_complete]
        queued = bool(self.pipeline)
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if self.headers_due is not None and self.deadline_timer is None:
            self._arm(self.headers_due)
        if self.cycle is None or not self.cycle.more_body:
            return
        if self.body_due is None:
            if queued:  # reading resumes: a pipelined request's body may come now
                self._expect_body()
        elif self.deadline_timer is None:  # overdue while this answer was to come: now
            self._arm(self.body_due)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.body_due = None
        if (
            self.cycle is not None
            and self.cycle.response_complete
            and not self.pipeline
            and self.timeout_keep_alive_task is None
            and not self.transport.is_closing()
        ):  # answered before its body was in: data_received cancelled keep-alive
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )
        self.reading_headers = True
        self.header_bytes = 0

    def _reserved(self, limit: int) -> int:
        """The reserve this request would eat into: the last quarter of `limit`
        (`throttle.reserved`) goes one request to a client, so one that has a request in flight
        already is refused there (0: it is not). Four clients of 25 slow bodies to a
        signed route (read before its signature is checked) held every place, and
        every sender's alert got 503. A trusted proxy's are not counted: its clients
        are many."""
        reserve = self.reserve
        if not reserve or self.counted_as is None or not self.busy[self.counted_as]:
            return 0
        return reserve if limit - len(self.in_flight) <= reserve else 0

    def _settled(self, answered: int) -> None:
        """`answered` of this connection's requests left `in_flight`."""
        key = self.counted_as
        if key is None or not answered:
            return
        self.busy[key] -= answered
        if self.busy[key] <= 0:
            del self.busy[key]

    def _refuse(self, status: int, message: str) -> None:
        body = _body(message)
        head = (
            f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n"
            "content-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        self.transport.write(head.encode() + body)
        self.transport.close()


def limited_protocol(live: LiveConfig) -> type[LimitedHttpProtocol]:
    """The protocol class for one server, reading limits from `live`."""
    attributes = {
        "live": live,
        "per_client": collections.Counter(),
        "in_flight": set(),
        "busy": collections.Counter(),
        "quiet": QuietLog(log, SystemClock()),
    }
    return type("LimitedHttpProtocol", (LimitedHttpProtocol,), attributes)
