"""GitHub webhooks: workflow_run, check_suite and deployment_status; ping answers 200.

`X-Hub-Signature-256` (HMAC-SHA256 of the raw body with the route's secret) is required;
a hash of the signed body is the dedupe key, so neither GitHub's redeliveries nor a
replayed body under a new `X-GitHub-Delivery` text anybody twice. By
default only failures are texted; `conclusions` and `branches` change that per route.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from bridge.formats import (
    HookMessage,
    HookRequest,
    Ignored,
    Unauthorized,
    check_filters,
    obj,
    text_field,
)
from bridge.policy import content_hash

DEFAULT_CONCLUSIONS = ("failure", "timed_out", "startup_failure")
DEFAULT_DEPLOYMENT_STATES = ("failure", "error")
SAMPLE_HEADERS = {"X-GitHub-Event": "workflow_run", "X-GitHub-Delivery": "sample"}
SAMPLE = {
    "action": "completed",
    "workflow_run": {
        "name": "CI",
        "head_branch": "main",
        "head_sha": "a1b2c3d4e5f6",
        "conclusion": "failure",
        "status": "completed",
        "run_number": 42,
        "display_title": "Fix flaky test",
        "html_url": "https://github.com/o/r/1",
        "actor": {"login": "alice"},
    },
    "repository": {"full_name": "octo-org/api"},
}


def verify(request: HookRequest, now: float) -> None:
    signature = request.headers.get("x-hub-signature-256", "")
    if not signature.startswith("sha256="):
        raise Unauthorized("missing X-Hub-Signature-256")
    expected = (
        "sha256="
        + hmac.new(request.route.secret.encode(), request.body, hashlib.sha256).hexdigest()
    )
    if not hmac.compare_digest(expected, signature.strip()):
        raise Unauthorized("X-Hub-Signature-256 does not match the body")


def _short(sha: Any) -> str:
    return str(sha or "")[:7]


def parse(request: HookRequest) -> list[HookMessage]:
    event = request.headers.get("x-github-event", "")
    payload = obj(request.payload, "body")
    if event == "ping":
        raise Ignored("ping: pong")
    repo = text_field(
        obj(payload.get("repository") or {}, "repository").get("full_name"),
        "repository.full_name",
        "?",
    )
    if event == "workflow_run":
        if payload.get("action") != "completed":
            raise Ignored(f"workflow_run {payload.get('action')} is not texted")
        run = obj(payload.get("workflow_run"), "workflow_run")
        outcome = text_field(run.get("conclusion"), "workflow_run.conclusion")
        branch = text_field(run.get("head_branch"), "workflow_run.head_branch")
        check_filters(request.route, outcome, branch, DEFAULT_CONCLUSIONS)
        actor = (run.get("actor") or {}).get("login") or ""
        title = text_field(run.get("display_title"), "workflow_run.display_title")
        text = (
            f"GitHub {repo}: {run.get('name') or 'workflow'} {outcome} on {branch} "
            f"({_short(run.get('head_sha'))})"
            + (f" by {actor}" if actor else "")
            + (f": {title}" if title else "")
        )
    elif event == "check_suite":
        if payload.get("action") != "completed":
            raise Ignored(f"check_suite {payload.get('action')} is not texted")
        suite = obj(payload.get("check_suite"), "check_suite")
        outcome = text_field(suite.get("conclusion"), "check_suite.conclusion")
        branch = text_field(suite.get("head_branch"), "check_suite.head_branch")
        check_filters(request.route, outcome, branch, DEFAULT_CONCLUSIONS)
        app = (suite.get("app") or {}).get("name") or "checks"
        text = f"GitHub {repo}: {app} {outcome} on {branch} ({_short(suite.get('head_sha'))})"
    elif event == "deployment_status":
        status = obj(payload.get("deployment_status"), "deployment_status")
        deployment = obj(payload.get("deployment") or {}, "deployment")
        outcome = text_field(status.get("state"), "deployment_status.state")
        ref = text_field(deployment.get("ref"), "deployment.ref")
        check_filters(request.route, outcome, ref, DEFAULT_DEPLOYMENT_STATES)
        environment = status.get("environment") or deployment.get("environment") or "?"
        text = (
            f"GitHub {repo}: deployment to {environment} {outcome} "
            f"({ref}, {_short(deployment.get('sha'))})"
        )
        description = status.get("description")
        if description:
            text += f": {text_field(description, 'deployment_status.description')}"
    else:
        raise Ignored(f"event {event or '(none)'} is not texted")
    return [
        HookMessage(
            text=text,
            context={"event": event, **payload},
            # The signed body, not X-GitHub-Delivery (which the signature does not cover):
            # a redelivery repeats both, while a replayed body under a new delivery id
            # would otherwise text again.
            dedupe_key=f"github:{content_hash(request.body)}",
            topic=f"{repo} {event}",
        )
    ]
