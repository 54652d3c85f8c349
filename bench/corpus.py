"""Replay a folder of real payloads and mails through a bridge; print the SMS each became.

Run by hand:

    python bench/corpus.py [CORPUS_DIR]        # default ../shared/corpus

It starts `sms-bridge serve` in a process of its own (sandbox provider, dedupe off, routes
`am`, `grafana`, `github` and `gitlab` with the secrets below), then sends every input the
way its sender would: `*.eml` over SMTP (envelope sender from `Return-Path`, `<>` for a
bounce), `*.json` to the route named by its folder with the headers and signature that
sender uses, `*.jsonl` as one delivery per line (`body` of each envelope). For each input
it prints the state and text of every message stored. `tests/test_corpus.py` drives the
same functions against a bridge in the test process and asserts the texts.
"""

from __future__ import annotations

import argparse
import email
import email.policy
import hashlib
import hmac
import json
import os
import re
import smtplib
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

RCPT = "+12025550143@sms.localhost"
FALLBACK_SENDER = "replay@example.org"
AM_TOKEN = "replay-am-token-0123"
GRAFANA_SECRET = "replay-grafana-0123"
GITHUB_SECRET = "replay-github-01234"
GITLAB_TOKEN = "replay-gitlab-01234"
ROUTES = f"""
[dedupe]
window = 0
[routes.am]
format = "alertmanager"
to = ["+12025550143"]
token = "{AM_TOKEN}"
[routes.grafana]
format = "grafana"
to = ["+12025550143"]
secret = "{GRAFANA_SECRET}"
[routes.github]
format = "github"
to = ["+12025550143"]
secret = "{GITHUB_SECRET}"
[routes.gitlab]
format = "gitlab"
to = ["+12025550143"]
secret = "{GITLAB_TOKEN}"
"""
# GitHub's event name from the payload's own keys, most specific first (the header is not
# kept in most published payloads).
GITHUB_EVENTS = (
    "deployment_status",
    "workflow_job",
    "workflow_run",
    "check_run",
    "check_suite",
    "zen",
    "pusher",
)
GITLAB_EVENTS = {
    "pipeline": "Pipeline Hook",
    "build": "Job Hook",
    "deployment": "Deployment Hook",
    "merge_request": "Merge Request Hook",
    "push": "Push Hook",
}


@dataclass
class Delivery:
    """One request or mail to send, and what the bridge answered."""

    name: str  # file name, with `#N` for the Nth line of a .jsonl
    kind: str  # smtp | hook
    route: str = ""
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    mail_from: str = ""
    answer: str = ""  # SMTP reply or HTTP status and JSON
    ids: list[int] = field(default_factory=list)


def envelope_sender(raw: bytes) -> str:
    """The envelope sender a final MTA recorded (`Return-Path`), else the From address."""
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    for name in ("Return-Path", "From"):
        value = msg.get(name)
        if value is not None:
            found = re.search(r"<([^<>]*)>", str(value))
            address = found.group(1) if found else str(value).strip()
            if name == "Return-Path" or "@" in address:
                return address
    return FALLBACK_SENDER


def _headers_file(path: Path) -> dict[str, str]:
    """`NAME: value` lines of a `*.headers.derived.txt` next to a captured body."""
    sibling = path.with_name(path.name.replace(".body.derived.json", ".headers.derived.txt"))
    if not sibling.is_file():
        return {}
    pairs = (line.split(":", 1) for line in sibling.read_text().splitlines() if ":" in line)
    return {k.strip().lower(): v.strip() for k, v in pairs}


def _github(body: bytes, captured: dict[str, str]) -> dict[str, str]:
    payload = json.loads(body)
    event = captured.get("x-github-event") or next(
        (e for e in GITHUB_EVENTS if e in payload),
        "status" if {"sha", "state", "context"} <= payload.keys() else "",
    )
    event = {"zen": "ping", "pusher": "push"}.get(event, event)
    signature = hmac.new(GITHUB_SECRET.encode(), body, hashlib.sha256).hexdigest()
    return {
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": captured.get("x-github-delivery", "replay"),
        "X-Hub-Signature-256": f"sha256={signature}",
    }


def _gitlab(body: bytes, captured: dict[str, str]) -> dict[str, str]:
    kind = json.loads(body).get("object_kind", "")
    event = captured.get("x-gitlab-event") or GITLAB_EVENTS.get(kind, kind)
    return {"X-Gitlab-Event": event, "X-Gitlab-Token": GITLAB_TOKEN}


def _hook(name: str, route: str, body: bytes, captured: dict[str, str]) -> Delivery:
    headers = {"content-type": "application/json"}
    if route == "am":
        headers["authorization"] = f"Bearer {AM_TOKEN}"
    elif route == "grafana":
        mac = hmac.new(GRAFANA_SECRET.encode(), body, hashlib.sha256).hexdigest()
        headers["X-Grafana-Alerting-Signature"] = mac
    elif route == "github":
        headers.update(_github(body, captured))
    elif route == "gitlab":
        headers.update(_gitlab(body, captured))
    return Delivery(name=name, kind="hook", route=route, body=body, headers=headers)


def deliveries(folder: Path) -> Iterator[Delivery]:
    """Every input of a corpus folder as the request or mail its sender would make.

    A capture kept both whole and as `*.body.derived.json` is sent once, from the exact
    body bytes; notes (`*.txt`, `*.md`) are not inputs.
    """
    routes = {"alertmanager": "am", "grafana": "grafana", "github": "github", "gitlab": "gitlab"}
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        if path.suffix == ".eml":
            # As an MTA would carry it: CRLF lines (a bare LF is not a line end in SMTP).
            raw = re.sub(rb"\r?\n", b"\r\n", path.read_bytes())
            yield Delivery(name=name, kind="smtp", body=raw, mail_from=envelope_sender(raw))
            continue
        route = routes.get(path.parent.name)
        if route is None or path.suffix not in (".json", ".jsonl"):
            continue
        if path.suffix == ".jsonl":
            for index, line in enumerate(path.read_text().splitlines()):
                if line.strip():
                    envelope = json.loads(line)
                    body = json.dumps(envelope["body"]).encode()
                    yield _hook(f"{name}#{index + 1}", route, body, {})
            continue
        if path.with_name(path.stem + ".body.derived.json").is_file():
            continue  # the whole capture: its body is sent from the derived file
        yield _hook(name, route, path.read_bytes(), _headers_file(path))


def send(delivery: Delivery, http_url: str, smtp_port: int, smtp_host: str = "127.0.0.1") -> None:
    """Send one delivery (blocking) and record the answer and the stored message ids."""
    if delivery.kind == "smtp":
        try:
            with smtplib.SMTP(smtp_host, smtp_port, timeout=30) as client:
                client.ehlo("replay.example.org")
                client.mail(delivery.mail_from)
                client.rcpt(RCPT)
                code, reply = client.data(delivery.body)
            delivery.answer = f"{code} {reply.decode(errors='replace')}"
        except smtplib.SMTPException as exc:
            delivery.answer = f"SMTP error: {exc}"
        found = re.search(r"stored as message ([\d,]+)", delivery.answer)
        delivery.ids = [int(i) for i in found.group(1).split(",")] if found else []
        return
    response = httpx.post(
        f"{http_url}/hooks/{delivery.route}",
        content=delivery.body,
        headers=delivery.headers,
        timeout=30,
    )
    delivery.answer = f"{response.status_code} {response.text}"
    if response.status_code == 202:
        delivery.ids = list(response.json()["ids"])


def show(delivery: Delivery, http_url: str) -> str:
    """One block per input: its name, and each stored message's state, reason and text."""
    lines = [f"== {delivery.name}"]
    if not delivery.ids:
        lines.append(f"   answer: {delivery.answer.strip()[:300]}")
    for message_id in delivery.ids:
        message = httpx.get(f"{http_url}/api/v1/messages/{message_id}", timeout=30).json()
        reason = f" ({message['reason']})" if message.get("reason") else ""
        lines.append(f"   {message['state']}{reason}")
        lines.extend("   | " + line for line in str(message.get("text", "")).split("\n"))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default = Path(__file__).resolve().parents[2] / "shared" / "corpus"
    parser.add_argument("corpus", nargs="?", default=str(default))
    args = parser.parse_args()
    folder = Path(args.corpus)
    if not folder.is_dir():
        print(f"no corpus folder at {folder}", file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(__file__).parent))
    from common import free_port, server

    http_port, smtp_port = free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "bridge.toml"
        config.write_text(
            textwrap.dedent(f"""
            [smtp]
            listen = "127.0.0.1:{smtp_port}"
            [http]
            listen = "127.0.0.1:{http_port}"
            [store]
            path = "{tmp}/replay.db"
            """)
            + ROUTES
        )
        args_ = [sys.executable, "-m", "bridge", "serve", "--config", str(config)]
        root = str(Path(__file__).resolve().parents[1])
        with server(args_, http_port, dict(os.environ), root):
            url = f"http://127.0.0.1:{http_port}"
            for delivery in deliveries(folder):
                send(delivery, url, smtp_port)
                print(show(delivery, url))
    return 0


if __name__ == "__main__":
    sys.exit(main())
