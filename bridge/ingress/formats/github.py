"""GitHub webhooks: workflow_run, workflow_job, check_run, check_suite, status and
deployment_status; ping answers 200.

Failures name the repository and what failed: the workflow (or, for a job, the job and
its first failing step; for a check run, the check and its output title), the branch and
the short SHA when the payload has one.

JSON or GitHub's default form encoding (the JSON in the field `payload`).
`X-Hub-Signature-256` (HMAC-SHA256 of the raw body with the route's secret) is required;
a hash of the signed body is the dedupe key, so neither GitHub's redeliveries nor a
replayed body under a new `X-GitHub-Delivery` text anybody twice. By
default only failures are texted; `conclusions` and `branches` change that per route.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from bridge.errors import InputError
from bridge.ingress.credentials import same_secret
from bridge.ingress.formats.base import (
    HookMessage,
    HookRequest,
    Ignored,
    Unauthorized,
    check_filters,
    field_of,
    obj,
    text_field,
)
from bridge.policy.decide import content_hash

DEFAULT_CONCLUSIONS = ("failure", "timed_out", "startup_failure")
DEFAULT_DEPLOYMENT_STATES = ("failure", "error")
DEFAULT_STATUS_STATES = ("failure", "error")  # the commit status API's failures
FAILED_STEPS = ("failure", "timed_out", "cancelled")
# GitHub's default content type, application/x-www-form-urlencoded, carries the JSON in
# this form field (bridge.ingress.http.hooks reads it; the signature covers the form).
FORM_FIELD = "payload"
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
    # bytes: headers are latin-1, and what the sender sent is compared byte for byte
    if not same_secret(signature.strip().encode("latin-1"), expected):
        raise Unauthorized("X-Hub-Signature-256 does not match the body")


def _short(sha: Any) -> str:
    return str(sha or "")[:7]


def _at(branch: str, sha: Any) -> str:
    """` on BRANCH (SHA)`, each part only where the payload has it."""
    return (f" on {branch}" if branch else "") + (f" ({_short(sha)})" if sha else "")


def _completed(payload: dict[str, Any], event: str) -> None:
    if payload.get("action") != "completed":
        raise Ignored(f"{event} {payload.get('action')} is not texted")


def _finished(
    request: HookRequest, payload: dict[str, Any], event: str
) -> tuple[dict[str, Any], str, str]:
    """A completed run, job or suite (`payload[event]`): it, its conclusion and branch,
    past the route's outcome and branch filters."""
    _completed(payload, event)
    item = obj(payload.get(event), event)
    outcome = text_field(item.get("conclusion"), f"{event}.conclusion")
    branch = text_field(item.get("head_branch"), f"{event}.head_branch")
    check_filters(request.route, outcome, branch, DEFAULT_CONCLUSIONS)
    return item, outcome, branch


def _failing_step(job: dict[str, Any]) -> str:
    """The first step that failed (or timed out, or was cancelled), by its name."""
    steps = job.get("steps") or []
    for step in steps if isinstance(steps, list) else []:
        if isinstance(step, dict) and step.get("conclusion") in FAILED_STEPS:
            return text_field(step.get("name"), "workflow_job.steps[].name")
    return ""


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
        run, outcome, branch = _finished(request, payload, event)
        actor = text_field(
            field_of(run, "actor", "login", "workflow_run.actor"), "workflow_run.actor.login"
        )
        title = text_field(run.get("display_title"), "workflow_run.display_title")
        workflow = obj(payload.get("workflow") or {}, "workflow")
        name = text_field(run.get("name"), "workflow_run.name") or text_field(
            workflow.get("name"), "workflow.name", "workflow"
        )
        text = (
            f"GitHub {repo}: {name} {outcome}{_at(branch, run.get('head_sha'))}"
            + (f" by {actor}" if actor else "")
            + (f": {title}" if title else "")
        )
    elif event == "workflow_job":
        job, outcome, branch = _finished(request, payload, event)
        workflow_name = text_field(job.get("workflow_name"), "workflow_job.workflow_name")
        name = text_field(job.get("name"), "workflow_job.name", "job")
        step = _failing_step(job)
        text = (
            f"GitHub {repo}: job {f'{workflow_name} / ' if workflow_name else ''}{name} {outcome}"
            f"{_at(branch, job.get('head_sha'))}" + (f", step: {step}" if step else "")
        )
    elif event == "check_run":
        _completed(payload, event)
        check = obj(payload.get("check_run"), "check_run")
        outcome = text_field(check.get("conclusion"), "check_run.conclusion")
        suite = obj(check.get("check_suite") or {}, "check_run.check_suite")
        branch = text_field(suite.get("head_branch"), "check_run.check_suite.head_branch")
        check_filters(request.route, outcome, branch, DEFAULT_CONCLUSIONS)
        name = text_field(check.get("name"), "check_run.name", "check")
        output = obj(check.get("output") or {}, "check_run.output")
        title = text_field(output.get("title"), "check_run.output.title")
        text = f"GitHub {repo}: check {name} {outcome}{_at(branch, check.get('head_sha'))}" + (
            f": {title}" if title else ""
        )
    elif event == "check_suite":
        suite, outcome, branch = _finished(request, payload, event)
        app = (
            text_field(field_of(suite, "app", "name", "check_suite.app"), "check_suite.app.name")
            or "checks"
        )
        text = f"GitHub {repo}: {app} {outcome}{_at(branch, suite.get('head_sha'))}"
    elif event == "status":
        outcome = text_field(payload.get("state"), "state")
        branches = payload.get("branches") or []
        if not isinstance(branches, list):  # iterated, a number was a 500
            raise InputError("branches", "must be a list of branches")
        names = [str(b["name"]) for b in branches if isinstance(b, dict) and b.get("name")] or [""]
        # a commit on several branches: the route's branch if it names one, else the first
        branch = next((b for b in names if b in request.route.branches), names[0])
        check_filters(request.route, outcome, branch, DEFAULT_STATUS_STATES)
        context = text_field(payload.get("context"), "context", "status")
        description = text_field(payload.get("description"), "description")
        text = f"GitHub {repo}: {context} {outcome}{_at(branch, payload.get('sha'))}" + (
            f": {description}" if description else ""
        )
    elif event == "deployment_status":
        deploy_status = obj(payload.get("deployment_status"), "deployment_status")
        deployment = obj(payload.get("deployment") or {}, "deployment")
        outcome = text_field(deploy_status.get("state"), "deployment_status.state")
        ref = text_field(deployment.get("ref"), "deployment.ref")
        check_filters(request.route, outcome, ref, DEFAULT_DEPLOYMENT_STATES)
        environment = text_field(
            deploy_status.get("environment") or deployment.get("environment"), "environment", "?"
        )
        where = ", ".join(p for p in (ref, _short(deployment.get("sha"))) if p)
        text = f"GitHub {repo}: deployment to {environment} {outcome}" + (
            f" ({where})" if where else ""
        )
        detail = text_field(deploy_status.get("description"), "deployment_status.description")
        text += f": {detail}" if detail else ""
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
