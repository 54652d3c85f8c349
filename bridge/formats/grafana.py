"""Grafana unified alerting webhook: alert groups as for Alertmanager, plus values.

Optional HMAC-SHA256 signature (Grafana 12+): lowercase hex over the raw body, or over
`timestamp:body` when the contact point sets a timestamp header; the header names are
configurable per route because Grafana lets each contact point choose them.
"""

from __future__ import annotations

import hashlib
import hmac

from bridge.formats import HookMessage, HookRequest, Unauthorized
from bridge.formats.alerts import summarize

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
        if not (stamp.isascii() and stamp.isdigit()):  # "²".isdigit() is True
            raise Unauthorized(f"missing or malformed {route.timestamp_header}")
        if abs(now - int(stamp)) > route.max_timestamp_skew:
            raise Unauthorized(f"{route.timestamp_header} too far from now (replay?)")
        signed = stamp.encode() + b":" + request.body
    expected = hmac.new(route.secret.encode(), signed, hashlib.sha256).hexdigest()
    # bytes: compare_digest raises TypeError on a str with non-ASCII (headers are latin-1)
    if not hmac.compare_digest(expected.encode(), signature.strip().lower().encode("latin-1")):
        raise Unauthorized(f"{route.signature_header} does not match the body")


def parse(request: HookRequest) -> list[HookMessage]:
    return [
        summarize(request.payload, source="grafana", with_values=True, match=request.route.match)
    ]
