"""Hostile input against a running bridge: random JSON at every endpoint never gets a 500,
and SMTP abuse (thousands of RCPTs, idle clients, junk) gets answers, not a crash."""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import hashlib
import hmac
import itertools
import json
import os
import smtplib
import socket
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tests.properties  # noqa: F401  (the suite's Hypothesis profile)
from bridge.clock import ManualClock
from bridge.errors import HttpError
from bridge.ingress.http.bodies import JSONAnswer, accepted_response, parse_json
from bridge.ingress.ingest import Accepted
from bridge.models import State
from tests.helpers import bridge_config, running_bridge
from tests.processes import ANY_PORT, SEND_TOKEN, clean_env, process, sender_config, wait_for

pytestmark = pytest.mark.slow

ROUTES = """
[smtp]
listen = "{smtp}"
max_recipients = 50
idle_timeout = "1s"
[http]
listen = "{http}"
max_body_bytes = 131072
header_timeout = "1s"
body_timeout = "1s"
max_concurrency = 8
max_connections_per_client = 12
[store]
path = "{db}"
[groups]
oncall = ["+12025550101"]
[routes.am]
format = "alertmanager"
to = ["oncall"]
[routes.grafana]
format = "grafana"
to = ["oncall"]
[routes.generic]
format = "generic"
allow_payload_to = true
[routes.github]
format = "github"
to = ["oncall"]
secret = "hostile-secret-0123"
[routes.grafana-signed]
format = "grafana"
to = ["oncall"]
secret = "hostile-secret-0123"
timestamp_header = "X-Grafana-Alerting-Signature-Timestamp"
[routes.gitlab]
format = "gitlab"
to = ["oncall"]
secret = "hostile-secret-0123"
"""


@pytest.fixture(scope="module")
def bridge(tmp_path_factory) -> Iterator[tuple[str, int]]:
    tmp = tmp_path_factory.mktemp("hostile")
    path = tmp / "bridge.toml"
    path.write_text(ROUTES.format(smtp=ANY_PORT, http=ANY_PORT, db=tmp / "bridge.db"))
    with process(["serve", "--config", str(path)], tmp, clean_env(), tmp / "serve.log") as proc:
        url, smtp_port = proc.url(), proc.port("SMTP")
        wait_for(lambda: httpx.get(f"{url}/healthz").status_code == 200)
        yield url, smtp_port
        assert proc.poll() is None, "the bridge died"
    assert "Traceback" not in (tmp / "serve.log").read_text()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=20,
)
shaped = st.fixed_dictionaries(
    {},
    optional={
        "to": json_values | st.sampled_from(["+12025550143", "oncall", ["+12025550143"], "x"]),
        "message": json_values | st.text(max_size=200),
        "status": st.sampled_from(["firing", "resolved", "other"]) | json_values,
        "alerts": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "status": json_values,
                    "labels": json_values
                    | st.dictionaries(
                        st.sampled_from(["alertname", "instance"]), st.text(max_size=10)
                    ),
                    "annotations": json_values,
                    "fingerprint": json_values,
                    "values": json_values,
                },
            ),
            max_size=4,
        )
        | json_values,
        "truncatedAlerts": json_values,
        "commonLabels": json_values,
        "sender_id": json_values,
        "dedupe_key": json_values,
        "schedule_time": json_values,
    },
)
paths = st.sampled_from(
    [
        "/api/v1/messages",
        "/hooks/am",
        "/hooks/grafana",
        "/hooks/generic",
        "/hooks/generic?to=oncall",
        "/hooks/github",
        "/hooks/gitlab",
        "/hooks/nope",
    ]
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    path=paths,
    body=shaped | json_values,
    headers=st.sampled_from(
        [
            {},
            {"X-GitHub-Event": "workflow_run"},
            {"X-Gitlab-Event": "Pipeline Hook", "X-Gitlab-Token": "hostile-secret-0123"},
        ]
    ),
)
def test_random_json_never_gets_a_500(bridge, path: str, body: object, headers: dict) -> None:
    url, _ = bridge
    response = _post(url, path, json.dumps(body).encode(), **headers)
    assert response.status_code in (200, 202, 400, 401, 404), response.text
    assert "error" in response.json() or response.status_code in (200, 202)


@settings(max_examples=100, deadline=None)
@given(
    raw=st.binary(max_size=2000),
    ctype=st.sampled_from(["application/json", "text/plain", "", "application/x+json"]),
)
def test_random_bytes_never_get_a_500(bridge, raw: bytes, ctype: str) -> None:
    url, _ = bridge
    response = httpx.post(
        f"{url}/api/v1/messages", content=raw, headers={"content-type": ctype}, timeout=10
    )
    assert response.status_code in (202, 400, 415), response.text


def test_thousands_of_rcpts_get_452_beyond_the_limit(bridge) -> None:
    _, port = bridge
    codes: list[int] = []
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("abuser")
        client.mail("a@example.org")
        # Refusals are not progress: past smtp.idle_timeout (1 s here) of nothing but 452s
        # the server may drop the session, which a loaded machine reaches before 2000.
        with contextlib.suppress(smtplib.SMTPServerDisconnected):
            for i in range(2000):
                codes.append(client.rcpt(f"+1202555{i:04d}@sms.localhost")[0])
    assert codes[:50] == [250] * 50 and set(codes[50:]) == {452} and len(codes) > 100


def test_idle_clients_are_dropped_and_junk_answered(bridge) -> None:
    _, port = bridge
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        assert sock.recv(1024).startswith(b"220")
        time.sleep(1.5)  # longer than smtp.idle_timeout
        sock.settimeout(5)
        data = b""
        while chunk := sock.recv(1024):
            data += chunk
        assert data == b""  # closed by the server (aiosmtpd closes without a 421)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.recv(1024)
        sock.sendall(b"\x00\xff\xfe junk \r\n" + b"A" * 3000 + b"\r\n")
        time.sleep(0.3)
        reply = sock.recv(4096)
        assert reply.startswith(b"500")


def test_pipelined_commands_are_answered_in_order(bridge) -> None:
    _, port = bridge
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        reader = sock.makefile("rb")
        reader.readline()
        sock.sendall(
            b"EHLO x\r\nMAIL FROM:<a@example.org>\r\n"
            b"RCPT TO:<+12025550143@sms.localhost>\r\nRCPT TO:<1@evil.example>\r\n"
            b"DATA\r\nSubject: pipelined\r\n\r\nbody\r\n.\r\nQUIT\r\n"
        )
        codes = []
        while line := reader.readline():
            if line[3:4] != b"-":
                codes.append(int(line[:3]))
    assert codes == [250, 250, 250, 550, 354, 250, 221]


def test_addresses_that_crash_the_parser_are_malformed_not_500(bridge) -> None:
    _, port = bridge
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("abuser")
        code, text = client.docmd("MAIL FROM:0@")
        assert (code, b"malformed address" in text) == (553, True)
        assert client.mail("a@example.org")[0] == 250
        code, text = client.docmd("RCPT TO:0@")
        assert (code, b"malformed address" in text) == (553, True)


def _signed(body: bytes, secret: str = "hostile-secret-0123") -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


_SOURCES = itertools.count()


def _post(url: str, path: str, content: bytes, **headers: str | bytes) -> httpx.Response:
    """POST from a fresh loopback address each time (127.1.x.y): a fuzzer presenting
    wrong credentials is a guesser, and ten of them lock its address out (503), which
    would leave the rest of the run unexercised."""
    n = next(_SOURCES) % 65_000
    transport = httpx.HTTPTransport(local_address=f"127.1.{n // 250}.{n % 250 + 1}")
    with httpx.Client(transport=transport, timeout=30) as client:
        return client.post(
            url + path, content=content, headers={"content-type": "application/json", **headers}
        )


def _refused(response: httpx.Response, status: int, words: str) -> None:
    assert response.status_code == status, response.text
    assert words in response.json()["error"], response.json()


def test_json_nested_50000_deep_is_a_400(bridge) -> None:
    url, _ = bridge
    deep = b"[" * 50_000 + b"]" * 50_000
    for path in ("/api/v1/messages", "/hooks/generic"):
        _refused(_post(url, path, deep), 400, "nested too deeply")
    # Under the parser's recursion limit but past any real payload: still refused.
    medium = b'{"to": "+12025550143", "message": "x", "n": ' + b"[" * 500 + b"]" * 500 + b"}"
    _refused(_post(url, "/api/v1/messages", medium), 400, "nested deeper than 64")


def test_json_nesting_is_refused_from_65_levels_as_the_bytes_count_them() -> None:
    """parse_json checks the depth only of a body with more than 64 `[` and `{` bytes."""
    deepest = b'{"a": ' + b"[" * 63 + b"]" * 63 + b"}"  # 64 levels: 64 marks
    assert parse_json(deepest) == json.loads(deepest)
    with pytest.raises(HttpError, match="nested deeper than 64"):
        parse_json(b"[" + deepest + b"]")
    # Brackets in strings count as well (towards the check, never past it).
    as_text = b'{"a": "[[[[", ' + b'"b": ' + b"[" * 63 + b"]" * 63 + b"}"
    assert parse_json(as_text) == json.loads(as_text)


_PAD = 2**20 - 100  # a body within the default http.max_body_bytes, with its fields
# A megabyte of items of each cheap shape: 350,000 to 520,000 items, 1.4 to 2.1 items a
# byte, where real payloads hold under 0.08.
ITEM_FLOODS = {
    "numbers": b"[" + b"0," * (_PAD // 2 - 1) + b"0]",
    "lists": b"[" + b"[]," * (_PAD // 3 - 1) + b"[]]",
    "objects": b"[" + b"{}," * (_PAD // 3 - 1) + b"{}]",
    "pairs": b"{" + b",".join(b'"%x":0' % n for n in range(_PAD // 10)) + b"}",
}


def _cpu_seconds(pid: int) -> float:
    """The process's user and system CPU time so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _healthz_waits(url: str, stop: threading.Event, waits: list[float]) -> None:
    """Ask /healthz over and over until `stop`, each answer's wait in `waits`."""
    with httpx.Client(base_url=url, timeout=30) as client:
        while not stop.is_set():
            started = time.monotonic()
            assert client.get("/healthz").status_code == 200
            waits.append(time.monotonic() - started)
            time.sleep(0.005)


def _post_floods(url: str, path: str, fields: bytes) -> list[httpx.Response]:
    """Each of ITEM_FLOODS twice, beside `fields`, posted to `path` at once by one client."""
    headers = {"content-type": "application/json", "authorization": f"Bearer {SEND_TOKEN}"}
    bodies = [b"{" + fields + b',"pad":' + flood + b"}" for flood in ITEM_FLOODS.values()] * 2
    assert max(map(len, bodies)) <= 2**20  # within the default http.max_body_bytes

    def post(body: bytes) -> httpx.Response:
        return httpx.post(url + path, content=body, headers=headers, timeout=30)

    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(post, bodies))


def test_a_megabyte_of_json_items_is_a_413_that_holds_no_one_up(tmp_path) -> None:
    """Parsing and checking a JSON body runs on the event loop, ~0.1 to 0.3 us an item
    whatever the item: a megabyte of `[0,0,...]`, `[[],[],...]` or `{"0":0,...}` (within
    `http.max_body_bytes`), to a public route or with a send token, held every request,
    `/healthz` too, 70 to 300 ms each. Measured here, eight at once from one client:
    `/healthz` waited 125 to 380 ms and the bridge spent ~50 ms of CPU a post; now 15 to
    55 ms (the machine's own noise) and 2 to 4 ms. Counted in the raw bytes now, the
    body is refused before it is parsed, saying why. The CPU a post is the bound the
    machine's load does not move; /healthz's wait is bounded above what the same probes
    wait with nothing posted (idle, 5 ms here; 200 ms once, on 2 cores shared by three
    test runs)."""
    config = sender_config(tmp_path)  # the default limits
    log = tmp_path / "serve.log"
    fields = {
        "/hooks/open": b'"message":"x"',
        "/api/v1/messages": b'"to":"+12025550143","message":"x"',
    }
    answers, spent, waits, stop = [], 0.0, [], threading.Event()
    with process(["serve", "--config", str(config)], tmp_path, clean_env(), log) as proc:
        url = proc.url()
        wait_for(lambda: httpx.get(f"{url}/healthz").status_code == 200)
        idle: list[float] = []
        prober = threading.Thread(target=_healthz_waits, args=(url, stop, idle))
        prober.start()
        time.sleep(0.5)
        stop.set()
        prober.join()
        stop.clear()
        prober = threading.Thread(target=_healthz_waits, args=(url, stop, waits))
        prober.start()
        try:
            for path, head in fields.items():
                before = _cpu_seconds(proc.pid)
                posted = _post_floods(url, path, head)
                spent = max(spent, (_cpu_seconds(proc.pid) - before) / len(posted))
                answers += posted
                time.sleep(0.05)  # a few probes between
        finally:
            stop.set()
            prober.join()
        small = b'{"to":"+12025550143","message":"disk full"}'
        auth = {"authorization": f"Bearer {SEND_TOKEN}", "content-type": "application/json"}
        taken = httpx.post(f"{url}/api/v1/messages", content=small, headers=auth)
    waited, noise = max(waits), max(idle)
    print(
        f"/healthz waited up to {waited * 1000:.1f} ms ({noise * 1000:.1f} idle),"
        f" a post took {spent * 1000:.1f} ms CPU"
    )
    assert waited < 0.100 + noise, f"/healthz waited up to {waited * 1000:.0f} ms"
    assert spent < 0.030, f"{spent * 1000:.0f} ms of CPU a post"
    assert [a.status_code for a in answers] == [413] * len(answers), answers[0].text
    assert all("(http.max_json_items)" in a.json()["error"] for a in answers)
    assert taken.status_code == 202, taken.text
    assert "Traceback" not in log.read_text()


async def test_a_body_of_many_items_under_long_keys_costs_no_memory_to_check(
    tmp_path, sandbox_url: str, clock: ManualClock
) -> None:
    """The JSON check held the path of every item at once (an f-string each, as long as
    the keys above it): 200,000 numbers under 60 keys of 2,000 characters, a 520 KB
    body any `send` token may post, took the bridge to 22 GB, killed by the kernel.
    Here 20,000 under keys of 100 characters: 120 MB before, a few now."""
    pad = "[" + ",".join(["0"] * 20_000) + "]"
    for depth in range(60):
        pad = f'{{"{chr(97 + depth % 26) * 100}": {pad}}}'
    body = f'{{"to": "+12025550143", "message": "disk full", "pad": {pad}}}'
    async with (
        running_bridge(bridge_config(tmp_path, sandbox_url), clock) as (_, url),
        httpx.AsyncClient(base_url=url) as http,
    ):
        tracemalloc.start()
        try:
            response = await http.post(
                "/api/v1/messages", content=body, headers={"content-type": "application/json"}
            )
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert response.status_code == 202, response.text
    assert peak < 40_000_000, f"{peak:,} bytes at the peak"


def test_a_lone_surrogate_is_a_400_naming_the_field(bridge) -> None:
    url, _ = bridge
    body = b'{"to": "+12025550143", "message": "disk \\ud800 full"}'
    response = _post(url, "/api/v1/messages", body)
    _refused(response, 400, "lone surrogate")
    assert response.json()["field"] == "message"
    nested = b'{"message": "ok", "to": "+12025550143", "x": {"y": ["\\udfff"]}}'
    response = _post(url, "/hooks/generic", nested)
    _refused(response, 400, "lone surrogate")
    assert response.json()["field"] == "x.y[0]"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'"\\ud800"', "body"),
        (b'["ok", "\\ud800"]', "[1]"),
        (b'{"\\ud800": 1}', "body"),
        (b'{"a": {"\\udc00": 1}}', "a"),
        (b'{"": ["\\ud800"]}', "[0]"),
        (b'{"a": [{"b": ["x", {"c": "\\udfff"}]}]}', "a[0].b[1].c"),
        (b'{"a": "\\uDBFF"}', "a"),  # an escape's hex digits in either case
        # Not escaped: json.loads decodes with 'surrogatepass', so one in UTF-8's form,
        # or a code unit of a UTF-16 or UTF-32 body, with or without its BOM
        (b'{"a": "disk \xed\xa0\x80 full"}', "a"),
        ('{"a": ["\ud800"]}'.encode("utf-16", "surrogatepass"), "a[0]"),
        ('{"a": "\udc00"}'.encode("utf-16-be", "surrogatepass"), "a"),
        ('{"a": "\udfff"}'.encode("utf-32-le", "surrogatepass"), "a"),
    ],
)
def test_a_lone_surrogate_anywhere_is_named_by_its_path(body: bytes, field: str) -> None:
    """Where check_json says the bad text is (its paths are spelt out only for an error)."""
    with pytest.raises(HttpError) as refused:
        parse_json(body)
    assert refused.value.status == 400 and "lone surrogate" in refused.value.message
    assert refused.value.field == field


@pytest.mark.parametrize(
    "body",
    [
        b'{"to": "+12025550143", "message": "disk full"}',
        b'{"message": "\\u00e9t\xc3\xa9 \xed\x95\x9c \\ud83d\\ude00"}',  # Hangul is ED 95..
        b'{"message": "a path C:\\\\udev"}',  # an escaped backslash, then "udev"
    ],
)
def test_bodies_without_a_lone_surrogate_parse(body: bytes) -> None:
    """The search that spares most bodies the full check errs only towards checking."""
    assert parse_json(body) == json.loads(body)


# What JSON can carry. Not infinities: the encoder refuses them (both ways alike, the
# old answer raising first), and a report holds a bool and names (`template_report`).
_JSONISH = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)
_ROWS = st.lists(
    st.builds(
        Accepted,
        st.integers(1, 2**63 - 1),
        st.text(),  # a template's name made of a payload's value: any text, surrogates too
        st.sampled_from(State),
        st.none() | st.text(),
    ),
    max_size=4,
)


@given(rows=_ROWS, with_reports=st.booleans(), data=st.data())
def test_the_202_is_written_as_the_encoder_wrote_it(
    rows: list[Accepted], with_reports: bool, data: st.DataObject
) -> None:
    """An ingest's 202, written without the JSON encoder (`accepted_response`), is the
    same bytes and headers as the JSONAnswer of the same content it replaced."""
    reports = data.draw(st.lists(st.none() | _JSONISH, min_size=len(rows), max_size=len(rows)))
    messages = []
    for row, report in zip(rows, reports, strict=True):
        message = {"id": row.id, "to": row.recipient, "state": str(row.state), "reason": row.reason}
        if with_reports and report is not None:
            message["template"] = report
        messages.append(message)
    before = JSONAnswer({"ids": [row.id for row in rows], "messages": messages}, 202)
    after = accepted_response(rows, reports if with_reports else None)
    assert (after.status_code, after.body, after.raw_headers) == (
        before.status_code,
        before.body,
        before.raw_headers,
    )


def test_the_ingest_paths_neighbours_get_the_routers_answers(bridge) -> None:
    """The ingest endpoints are called past the router (bridge.ingress.http.hot): a path
    or method that is not exactly theirs still gets the router's answer."""
    url, _ = bridge
    alert = b'{"to": "+12025550143", "message": "the neighbours"}'
    assert _post(url, "/api/v1/messages", alert).status_code == 202
    assert _post(url, "/hooks/generic", alert).status_code == 202
    _refused(_post(url, "/hooks/nope", alert), 404, "no route named 'nope'")
    for path in ("/hooks/generic/x", "/hooks/", "/hooks//generic", "/hooks", "/api/v1/message"):
        _refused(_post(url, path, alert), 404, "no such endpoint")
    # A trailing slash is served as the path without (app.posted), not the router's 307.
    for path in ("/api/v1/messages/", "/hooks/generic/"):
        assert _post(url, path, alert).status_code == 202, path
    for path in ("/hooks/generic//", "/api/v1/messages//"):  # two: the router's, as before
        assert _post(url, path, alert).status_code == 307, path
    for method, path in (
        ("GET", "/hooks/generic"),
        ("PUT", "/api/v1/messages"),
        ("PUT", "/api/v1/messages/"),
        ("GET", "/hooks/generic/"),
    ):
        response = httpx.request(method, url + path, content=alert, timeout=10)
        _refused(response, 405, f"{method} not allowed")


def test_message_ids_and_cursors_outside_sqlite_integers_are_400(bridge) -> None:
    url, _ = bridge
    for path, field in (
        ("/api/v1/messages/%C2%B2", "id"),  # "²": str.isdigit() says yes, int() says no
        ("/api/v1/messages/99999999999999999999999", "id"),
        ("/api/v1/messages?before=99999999999999999999999", "before"),
        ("/api/v1/messages?before=%C2%B2", "before"),
        ("/api/v1/messages?limit=1e3", "limit"),
    ):
        response = httpx.get(url + path, timeout=10)
        _refused(response, 400, "must be an integer")
        assert response.json()["field"] == field
    assert httpx.get(f"{url}/api/v1/messages/9223372036854775807").status_code == 404


def test_non_ascii_signatures_are_401_not_500(bridge) -> None:
    url, _ = bridge
    body = b'{"action": "completed"}'
    response = _post(
        url,
        "/hooks/github",
        body,
        **{
            "X-GitHub-Event": "workflow_run",
            "X-Hub-Signature-256": "sha256=\u00e9t\u00e9".encode(),
        },
    )
    _refused(response, 401, "does not match")
    raw_headers = [
        (b"content-type", b"application/json"),
        (b"x-hub-signature-256", b"sha256=\xc3\xa9\xff"),
        (b"x-github-event", b"workflow_run"),
    ]
    response = httpx.post(f"{url}/hooks/github", content=body, headers=raw_headers, timeout=10)
    _refused(response, 401, "does not match")
    stamp = str(int(time.time()))
    grafana = b'{"status": "firing", "alerts": []}'
    for signature, stamp_value, words in (
        (("\u00e9" * 64).encode(), stamp, "does not match"),
        (
            _signed(f"{stamp}:".encode() + grafana),
            "\u00b2".encode(),
            "malformed",
        ),  # superscript two
        (
            _signed(f"{stamp}:".encode() + grafana),
            b"9" * 5000,  # int() refuses past 4300 digits: once a 500
            "malformed",
        ),
    ):
        response = _post(
            url,
            "/hooks/grafana-signed",
            grafana,
            **{
                "X-Grafana-Alerting-Signature": signature,
                "X-Grafana-Alerting-Signature-Timestamp": stamp_value,
            },
        )
        _refused(response, 401, words)


@pytest.mark.parametrize(
    ("event", "payload", "field"),
    [
        (
            "workflow_run",
            {
                "action": "completed",
                "workflow_run": {"conclusion": "failure", "head_branch": "main", "actor": "str"},
            },
            "workflow_run.actor",
        ),
        (
            "check_suite",
            {
                "action": "completed",
                "check_suite": {"conclusion": "failure", "head_branch": "main", "app": ["x"]},
            },
            "check_suite.app",
        ),
        (
            "workflow_run",
            {"action": "completed", "workflow_run": {"conclusion": "failure"}, "repository": 7},
            "repository",
        ),
    ],
)
def test_signed_github_payloads_of_the_wrong_shape_are_400(bridge, event, payload, field) -> None:
    url, _ = bridge
    body = json.dumps(payload).encode()
    response = _post(
        url,
        "/hooks/github",
        body,
        **{"X-GitHub-Event": event, "X-Hub-Signature-256": "sha256=" + _signed(body)},
    )
    _refused(response, 400, "must be")
    assert response.json()["field"] == field


def test_gitlab_payloads_of_the_wrong_shape_are_400(bridge) -> None:
    url, _ = bridge
    for payload, field in (
        ({"object_kind": "pipeline", "user": "str"}, "user"),
        (
            {
                "object_kind": "pipeline",
                "object_attributes": {"status": "failed", "ref": "main"},
                "repository": "str",
            },
            "repository",
        ),
    ):
        response = _post(
            url,
            "/hooks/gitlab",
            json.dumps(payload).encode(),
            **{"X-Gitlab-Token": "hostile-secret-0123"},
        )
        _refused(response, 400, "must be")
        assert response.json()["field"] == field


GITHUB_EVENTS = ("workflow_run", "check_suite", "deployment_status", "ping", "push")
GITLAB_EVENTS = ("Pipeline Hook", "Job Hook", "Deployment Hook", "Push Hook")
confused = st.fixed_dictionaries(
    {},
    optional={
        key: json_values | st.fixed_dictionaries({}, optional={k: json_values for k in inner})
        for key, inner in {
            "action": (),
            "workflow_run": ("conclusion", "head_branch", "actor", "name", "head_sha"),
            "check_suite": ("conclusion", "head_branch", "app", "head_sha"),
            "deployment_status": ("state", "environment", "description"),
            "deployment": ("ref", "environment", "sha"),
            "repository": ("full_name", "name"),
            "object_kind": (),
            "object_attributes": ("status", "ref", "id", "sha"),
            "user": ("username",),
            "project": ("path_with_namespace",),
            "build_status": (),
            "ref": (),
            "status": (),
            "alerts": (),
        }.items()
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    payload=confused,
    which=st.sampled_from(["github", "gitlab", "grafana-signed"]),
    event=st.sampled_from(GITHUB_EVENTS + GITLAB_EVENTS),
)
def test_signed_payloads_of_any_shape_never_get_a_500(bridge, payload, which, event) -> None:
    """Past the signature check every format reads sender-shaped JSON: no .get on a str."""
    url, _ = bridge
    if which == "github" and isinstance(payload.get("action"), str | None):
        payload = {**payload, "action": "completed"}
    body = json.dumps(payload).encode()
    stamp = str(int(time.time()))
    headers = {
        "github": {"X-GitHub-Event": event, "X-Hub-Signature-256": "sha256=" + _signed(body)},
        "gitlab": {"X-Gitlab-Event": event, "X-Gitlab-Token": "hostile-secret-0123"},
        "grafana-signed": {
            "X-Grafana-Alerting-Signature": _signed(f"{stamp}:".encode() + body),
            "X-Grafana-Alerting-Signature-Timestamp": stamp,
        },
    }[which]
    response = _post(url, f"/hooks/{which}", body, **headers)
    assert response.status_code in (200, 202, 400), response.text


def _http_reply(sock: socket.socket) -> tuple[int, dict]:
    """Status and JSON body of one response on a raw socket (the server closes after)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_a_client_trickling_headers_is_cut_with_408(bridge) -> None:
    url, _ = bridge
    port = int(url.rsplit(":", 1)[1])
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        with contextlib.suppress(OSError):  # the server closes while we trickle
            for _ in range(50):
                sock.sendall(b"X")
                time.sleep(0.1)
        status, body = _http_reply(sock)
    assert status == 408 and "within 1s" in body["error"]
    assert time.monotonic() - started < 3
    with socket.create_connection(("127.0.0.1", port), timeout=10) as silent:
        started = time.monotonic()
        status, _ = _http_reply(silent)  # a connection that never sends a byte
    assert status == 408 and 0.8 < time.monotonic() - started < 3


def test_a_client_trickling_its_body_gets_408(bridge) -> None:
    url, _ = bridge
    port = int(url.rsplit(":", 1)[1])
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"POST /api/v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
        )
        with contextlib.suppress(OSError):
            for _ in range(50):
                sock.sendall(b" ")
                time.sleep(0.1)
        status, body = _http_reply(sock)
    assert status == 408 and "body not received within 1s" in body["error"]
    assert time.monotonic() - started < 3
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(  # half a body, then gone: no traceback (the fixture checks the log)
            b"POST /api/v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
        )
        time.sleep(0.2)
    time.sleep(0.5)  # the server notices the disconnect before anything else runs


def test_4mb_of_headers_are_refused_with_431(bridge) -> None:
    url, _ = bridge
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with contextlib.suppress(OSError):  # refused and closed before we finish
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
            for _ in range(64):  # 4 MB, never finished: refused as it grows, not at the end
                sock.sendall(b"a" * 65536)
        status, body = _http_reply(sock)
    assert status == 431 and "larger than 16384 bytes" in body["error"]
    # Headers that arrive whole in one read are measured as parsed.
    response = httpx.get(f"{url}/healthz", headers={"X-Big": "a" * 20_000}, timeout=10)
    assert response.status_code == 431
    assert httpx.get(f"{url}/healthz", headers={"X-Ok": "a" * 8_000}).status_code == 200


def _held_post(port: int, source: str = "127.0.0.1") -> socket.socket:
    """A request in flight: headers and the start of a body that never comes whole."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    sock.sendall(
        b"POST /api/v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
    )
    return sock


def test_past_max_concurrency_requests_in_flight_get_a_503(bridge) -> None:
    """Eight requests in the handler (slow bodies, cut at body_timeout = 1 s): the ninth
    is refused; once they are answered (408) there is room again. The liveness probe is
    answered all along: refused, it had an orchestrator restart the bridge mid-storm."""
    url, _ = bridge
    port = int(url.rsplit(":", 1)[1])
    held = [_held_post(port) for _ in range(8)]
    try:
        time.sleep(0.2)  # the server has read all eight
        with socket.create_connection(("127.0.0.1", port), timeout=10) as extra:
            extra.sendall(b"GET /api/v1/stats HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            status, body = _http_reply(extra)
        assert status == 503 and "overloaded" in body["error"], body
        with socket.create_connection(("127.0.0.1", port), timeout=10) as probe:
            probe.sendall(b"GET /healthz?probe=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            status, body = _http_reply(probe)
        assert (status, body) == (200, {"status": "ok"})
        assert [_http_reply(sock)[0] for sock in held] == [408] * 8
    finally:
        for sock in held:
            sock.close()
    wait_for(lambda: httpx.get(f"{url}/healthz").status_code == 200, what="room again")


def test_clients_at_max_concurrency_sending_back_to_back_are_never_refused(bridge) -> None:
    """As many kept-alive clients as max_concurrency (8), each posting its next alert the
    moment it has the answer: never more than 8 requests in flight, so never a 503. (An
    answered request whose task had not yet returned was counted too: a busy sender's
    next request was refused, 246 of 4,300 in a 64-connection run at a limit of 100.)"""
    url, _ = bridge

    def sender(n: int) -> list[int]:
        with httpx.Client(base_url=url, timeout=10) as client:
            return [
                client.post(
                    "/api/v1/messages", json={"to": "+12025550143", "message": f"b2b {n} {i}"}
                ).status_code
                for i in range(60)
            ]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        statuses = collections.Counter(s for got in pool.map(sender, range(8)) for s in got)
    assert statuses == {202: 8 * 60}, statuses


def test_requests_whose_client_went_away_free_their_place(bridge) -> None:
    """Eight requests in flight (max_concurrency = 8) whose clients hang up before the
    body is whole: no answer can be sent, and their places are free at once."""
    url, _ = bridge
    port = int(url.rsplit(":", 1)[1])
    held = [_held_post(port) for _ in range(8)]
    time.sleep(0.2)  # the server has read all eight
    for sock in held:
        sock.close()
    wait_for(lambda: httpx.get(f"{url}/healthz").status_code == 200, what="room again")
    assert [httpx.get(f"{url}/healthz").status_code for _ in range(20)] == [200] * 20


def _still_open(sock: socket.socket) -> bool:
    """Whether the server still holds `sock` open: what it sent is read (the rest of an
    answer), without waiting, up to no more data (open) or the end of the stream."""
    sock.setblocking(False)  # with a timeout set, recv waits for data whatever its flags
    while True:
        try:
            if not sock.recv(65536):
                return False
        except BlockingIOError:
            return True


def test_idle_connections_of_one_client_never_refuse_others(bridge) -> None:
    """One client holding many idle connections (more than max_concurrency = 8) is cut
    at max_connections_per_client = 12 with a 503; /healthz, even a POST, from another
    client is answered all along (idle connections were once counted as requests)."""
    url, _ = bridge
    port = int(url.rsplit(":", 1)[1])
    request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    held, refused = [], []
    try:
        for _ in range(12):  # kept alive after an answer, then idle
            sock = socket.create_connection(
                ("127.0.0.1", port), timeout=10, source_address=("127.0.0.2", 0)
            )
            sock.sendall(request)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            held.append(sock)
        for _ in range(20):  # never sending a byte
            sock = socket.create_connection(
                ("127.0.0.1", port), timeout=10, source_address=("127.0.0.2", 0)
            )
            refused.append(_http_reply(sock))
            sock.close()
        assert {status for status, _ in refused} == {503}
        assert "too many connections from 127.0.0.2" in refused[0][1]["error"]
        assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
        response = httpx.post(
            f"{url}/api/v1/messages", json={"to": "+12025550143", "message": "x"}, timeout=10
        )
        assert response.status_code == 202, response.text
        # Answered while the idle ones were still held, not once their keep-alive timeout
        # let them go: each is still open now. (A bound of 1 s on the two requests stood
        # for this, and a loaded machine took 1.95 s.)
        assert all(_still_open(sock) for sock in held)
    finally:
        for sock in held:
            sock.close()


def test_openapi_described_requests_never_get_a_500(bridge) -> None:
    """Schemathesis, from the served /openapi.json: every operation with requests it
    generates (valid and not) is a 2xx/4xx with a JSON error, or the documented 503.

    Driven through hypothesis directly: schemathesis' own pytest plugin does not run
    under pytest 9 (it reads a private attribute that is gone).
    """
    import schemathesis  # here, not at the top: ~1 s to import, for this test only

    url, _ = bridge
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", timeout=10)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8
    seen: collections.Counter[tuple[str, str, int]] = collections.Counter()

    @settings(
        max_examples=300,  # about 15 s
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(data=st.data())
    def requests_never_500(data: st.DataObject) -> None:
        operation = data.draw(st.sampled_from(operations))
        mode = data.draw(st.sampled_from(list(schemathesis.GenerationMode)))
        case = data.draw(operation.as_strategy(generation_mode=mode))
        response = case.call(base_url=url, timeout=10)
        seen[(case.method, case.path, response.status_code)] += 1
        assert response.status_code < 500 or response.status_code == 503, (
            case.method,
            case.formatted_path,
            response.text,
        )
        if response.status_code >= 400:
            assert "error" in response.json(), response.text

    requests_never_500()
    assert len({(method, path) for method, path, _ in seen}) >= 8, seen  # not vacuous
