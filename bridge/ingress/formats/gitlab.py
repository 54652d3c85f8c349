"""GitLab webhooks: pipeline, job and deployment events, checked by `X-Gitlab-Token`.

A failed pipeline names its failed jobs, a failed job its failure reason.

By default only failures are texted; `conclusions` (GitLab statuses) and `branches`
change that per route. The dedupe key is `Idempotency-Key` (GitLab 17.4+: the same on
every retry of one event), else `X-Gitlab-Event-UUID` (older GitLab), else the object, its
id and status.
"""

from __future__ import annotations

from typing import Any

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

DEFAULT_STATUSES = ("failed",)
SAMPLE_HEADERS = {"X-Gitlab-Event": "Pipeline Hook"}
SAMPLE = {
    "object_kind": "pipeline",
    "object_attributes": {
        "id": 31,
        "ref": "main",
        "sha": "bcbb5ec396a2c0f828686f14fac9b80b780504f2",
        "status": "failed",
        "source": "push",
    },
    "user": {"username": "alice"},
    "project": {"path_with_namespace": "group/project"},
}


TOKEN_HEADER = "x-gitlab-token"  # the route's secret as is: it passes a lockout once verified


def verify(request: HookRequest, now: float) -> None:
    token = request.headers.get(TOKEN_HEADER, "")
    if not token:
        raise Unauthorized("missing X-Gitlab-Token")
    if not same_secret(token, request.route.secret):
        raise Unauthorized("X-Gitlab-Token does not match")


def _project(payload: dict[str, Any]) -> str:
    named = field_of(payload, "project", "path_with_namespace")
    if named:
        return str(named)
    return str(
        payload.get("project_name") or field_of(payload, "repository", "name") or "?"
    ).replace(" / ", "/")


SHOWN_JOBS = 2


def _sha(sha: Any) -> str:
    """` (SHORT_SHA)`, or nothing when the payload has none."""
    return f" ({str(sha)[:8]})" if sha else ""


def _failed_jobs(payload: dict[str, Any]) -> str:
    """`; failed job: test (unit)` from a pipeline's `builds`, two named at most."""
    builds = payload.get("builds") or []
    failed = [
        text_field(b.get("name"), "builds[].name", "job")
        + (f" ({b['stage']})" if isinstance(b.get("stage"), str) and b["stage"] else "")
        for b in (builds if isinstance(builds, list) else [])
        if isinstance(b, dict) and b.get("status") == "failed" and not b.get("allow_failure")
    ]
    if not failed:
        return ""
    more = f" +{len(failed) - SHOWN_JOBS}" if len(failed) > SHOWN_JOBS else ""
    label = "failed job" if len(failed) == 1 else "failed jobs"
    return f"; {label}: {', '.join(failed[:SHOWN_JOBS])}{more}"


def parse(request: HookRequest) -> list[HookMessage]:
    event = request.headers.get("x-gitlab-event", "")
    payload = obj(request.payload, "body")
    kind = payload.get("object_kind")
    user = text_field(field_of(payload, "user", "username"), "user.username")
    by = f" by {user}" if user else ""
    if event == "Pipeline Hook" or kind == "pipeline":
        attrs = obj(payload.get("object_attributes"), "object_attributes")
        status = text_field(attrs.get("status"), "object_attributes.status")
        ref = text_field(attrs.get("ref"), "object_attributes.ref")
        check_filters(request.route, status, ref, DEFAULT_STATUSES)
        text = (
            f"GitLab {_project(payload)}: pipeline #{attrs.get('id')} {status} on {ref}"
            f"{_sha(attrs.get('sha'))}{by}{_failed_jobs(payload)}"
        )
        key = f"pipeline:{attrs.get('id')}:{status}"
    elif event == "Job Hook" or kind == "build":
        status = text_field(payload.get("build_status"), "build_status")
        ref = text_field(payload.get("ref"), "ref")
        check_filters(request.route, status, ref, DEFAULT_STATUSES)
        name = text_field(payload.get("build_name"), "build_name", "job")
        # Its pipeline does not fail for it (GitLab shows a warning), as a pipeline's text
        # leaves such jobs out.
        if status == "failed" and payload.get("build_allow_failure") is True:
            raise Ignored(f"job {name} is allowed to fail")
        stage = text_field(payload.get("build_stage"), "build_stage")
        reason = text_field(payload.get("build_failure_reason"), "build_failure_reason")
        reason = "" if reason in ("", "unknown_failure") or status != "failed" else reason
        text = (
            f"GitLab {_project(payload)}: job {name}"
            + (f" ({stage})" if stage else "")
            + f" {status} on {ref}{_sha(payload.get('sha'))}"
            + (f": {reason.replace('_', ' ')}" if reason else "")
        )
        key = f"job:{payload.get('build_id')}:{status}"
    elif event == "Deployment Hook" or kind == "deployment":
        status = text_field(payload.get("status"), "status")
        ref = text_field(payload.get("ref"), "ref")
        check_filters(request.route, status, ref, DEFAULT_STATUSES)
        environment = text_field(payload.get("environment"), "environment", "?")
        where = ", ".join(p for p in (ref, str(payload.get("short_sha") or "")) if p)
        text = (
            f"GitLab {_project(payload)}: deployment to {environment} {status}"
            + (f" ({where})" if where else "")
            + by
        )
        key = f"deployment:{payload.get('deployment_id')}:{status}"
    else:
        raise Ignored(f"event {event or kind or '(none)'} is not texted")
    # Not X-Gitlab-Event-UUID first: GitLab makes one per request, so each retry of an
    # event carries a new one (and was texted again); Idempotency-Key is kept across them.
    uuid = request.headers.get("idempotency-key") or request.headers.get("x-gitlab-event-uuid")
    return [
        HookMessage(
            text=text,
            context={"event": event, **payload},
            dedupe_key=f"gitlab:{uuid or key}",
            topic=f"{_project(payload)} {key.split(':')[0]}",
        )
    ]
