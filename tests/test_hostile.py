"""Hostile input against a running bridge: random JSON at every endpoint never gets a 500,
and SMTP abuse (thousands of RCPTs, idle clients, junk) gets answers, not a crash."""

from __future__ import annotations

import json
import smtplib
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_serve import clean_env, free_port, process, wait_for

pytestmark = pytest.mark.slow

ROUTES = """
[smtp]
listen = "127.0.0.1:{smtp}"
max_recipients = 50
idle_timeout = "1s"
[http]
listen = "127.0.0.1:{http}"
max_body_bytes = 65536
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
secret = "s"
[routes.gitlab]
format = "gitlab"
to = ["oncall"]
secret = "s"
"""


@pytest.fixture(scope="module")
def bridge(tmp_path_factory) -> Iterator[tuple[str, int]]:
    tmp = tmp_path_factory.mktemp("hostile")
    http_port, smtp_port = free_port(), free_port()
    path = tmp / "bridge.toml"
    path.write_text(ROUTES.format(smtp=smtp_port, http=http_port, db=tmp / "bridge.db"))
    with process(["serve", "--config", str(path)], tmp, clean_env(), tmp / "serve.log") as proc:
        url = f"http://127.0.0.1:{http_port}"
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
            {"X-Gitlab-Event": "Pipeline Hook", "X-Gitlab-Token": "s"},
        ]
    ),
)
def test_random_json_never_gets_a_500(bridge, path: str, body: object, headers: dict) -> None:
    url, _ = bridge
    response = httpx.post(
        url + path,
        content=json.dumps(body),
        headers={"content-type": "application/json", **headers},
        timeout=10,
    )
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
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("abuser")
        client.mail("a@example.org")
        codes = [client.rcpt(f"+1202555{i:04d}@sms.localhost")[0] for i in range(2000)]
        client.rset()
    assert codes[:50] == [250] * 50 and set(codes[50:]) == {452}


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
