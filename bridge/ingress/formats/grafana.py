"""Grafana webhooks: unified alerting (alert groups as for Alertmanager, plus values) and
legacy alerting (Grafana 8-10 with legacy alerting on: one rule, `state`, `evalMatches`).

Optional HMAC-SHA256 signature (Grafana 12+): lowercase hex over the raw body, or over
`timestamp:body` when the contact point sets a timestamp header; the header names are
configurable per route because Grafana lets each contact point choose them.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from bridge.errors import InputError
from bridge.ingress.credentials import same_secret
from bridge.ingress.formats.alerts import NO_VALUE, summarize
from bridge.ingress.formats.base import (
    HookMessage,
    HookRequest,
    Ignored,
    Unauthorized,
    obj,
    text_field,
)

# Legacy alerting's notified states and how a text names them.
LEGACY_STATES = {"alerting": "ALERTING", "ok": "OK", "no_data": "NO DATA"}
SHOWN_MATCHES = 3

SAMPLE = {
    "receiver": "sms",
    "status": "firing",
    "orgId": 1,
    "version": "1",
    "groupKey": "{}:{}",
    "truncatedAlerts": 0,
    "title": "[FIRING:1] High CPU",
    "state": "alerting",
    "message": "**Firing**",
    "groupLabels": {},
    "commonLabels": {"alertname": "High CPU"},
    "commonAnnotations": {},
    "externalURL": "https://grafana.example/",
    "alerts": [
        {
            "status": "firing",
            "labels": {"alertname": "High CPU", "instance": "web-1"},
            "annotations": {"summary": "CPU above 90%"},
            "values": {"B": 93.2},
            "fingerprint": "c6eadffa33fcdf37",
            "dashboardURL": "",
            "panelURL": "",
            "silenceURL": "",
            "generatorURL": "",
            "startsAt": "2026-11-25T10:00:00Z",
            "endsAt": "0001-01-01T00:00:00Z",
        }
    ],
}


def verify(request: HookRequest, now: float) -> None:
    route = request.route
    if not route.secret:
        return
    signature = request.headers.get(route.signature_header, "")
    if not signature:
        raise Unauthorized(f"missing {route.signature_header} signature")
    signed = request.body
    if route.timestamp_header:
        stamp = request.headers.get(route.timestamp_header, "")
        # "²".isdigit() is True, and int() refuses past 4300 digits: a time is 10-13 of them
        if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= 20):
            raise Unauthorized(f"missing or malformed {route.timestamp_header}")
        if abs(now - int(stamp)) > route.max_timestamp_skew:
            raise Unauthorized(f"{route.timestamp_header} too far from now (replay?)")
        signed = stamp.encode() + b":" + request.body
    expected = hmac.new(route.secret.encode(), signed, hashlib.sha256).hexdigest()
    # bytes: headers are latin-1, and what the sender sent is compared byte for byte
    if not same_secret(signature.strip().lower().encode("latin-1"), expected):
        raise Unauthorized(f"{route.signature_header} does not match the body")


def _is_legacy(payload: Any) -> bool:
    """Legacy alerting has `state` and `ruleName` but no `status` (unified has both)."""
    return isinstance(payload, dict) and "status" not in payload and "state" in payload


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, int | float) else str(value)


def _matches(payload: dict[str, Any]) -> str:
    """` (metric=value, ... +N)` from `evalMatches`, the series that crossed the threshold."""
    matches = payload.get("evalMatches") or []
    if not isinstance(matches, list):
        raise InputError("evalMatches", "must be a list")
    shown = [
        f"{text_field(m.get('metric'), 'evalMatches[].metric', '?')}={_number(m.get('value'))}"
        for m in matches[:SHOWN_MATCHES]
        if isinstance(m, dict)
    ]
    if not shown:
        return ""
    more = f" +{len(matches) - SHOWN_MATCHES}" if len(matches) > SHOWN_MATCHES else ""
    return f" ({', '.join(shown)}{more})"


def legacy(request: HookRequest) -> HookMessage:
    """`[ALERTING] rule: message (metric=value)`, `[OK] rule: ...`, `[NO DATA] rule: ...`."""
    payload = obj(request.payload, "body")
    state = text_field(payload.get("state"), "state")
    if state not in LEGACY_STATES:
        if state in ("paused", "pending", "unknown"):
            raise Ignored(f"state {state} is not texted")
        raise InputError("state", 'must be "alerting", "ok" or "no_data" (legacy alerting)')
    tags = obj(payload.get("tags") or {}, "tags")
    match = request.route.match
    if match and not all(str(tags.get(k)) == v for k, v in match.items()):
        raise Ignored("the rule's tags do not match this route")
    rule = text_field(payload.get("ruleName"), "ruleName") or text_field(
        payload.get("title"), "title", "Grafana alert"
    )
    message = text_field(payload.get("message"), "message").replace(NO_VALUE, "?").strip()
    text = f"[{LEGACY_STATES[state]}] {rule}" + (f": {message}" if message else "")
    if state == "alerting":
        text += _matches(payload)
    context = dict(payload)
    context.update(summary=message, default_text=text)
    # No dedupe key: legacy payloads carry no group key or fingerprint; the text's own
    # key (the bridge's default) keeps a repeated notification from texting twice.
    return HookMessage(text=text, context=context, topic=rule)


def parse(request: HookRequest) -> list[HookMessage]:
    if _is_legacy(request.payload):
        return [legacy(request)]
    return [
        summarize(request.payload, source="grafana", with_values=True, match=request.route.match)
    ]
