"""Prometheus Alertmanager webhook (payload version 4): one SMS per notification.

The dedupe key is the group key, the status, each alert's fingerprint, start time and
status, and how many alerts `max_alerts` cut, so Alertmanager's repeat notifications
within the dedupe window send nothing new, while a change (another alert joins or
resolves, the group resolves, or fires again) does.
"""

from __future__ import annotations

from bridge.ingress.formats.alerts import summarize
from bridge.ingress.formats.base import HookMessage, HookRequest

SAMPLE = {
    "version": "4",
    "groupKey": '{}:{alertname="HighLatency"}',
    "truncatedAlerts": 0,
    "status": "firing",
    "receiver": "sms",
    "groupLabels": {"alertname": "HighLatency"},
    "commonLabels": {"alertname": "HighLatency", "severity": "page"},
    "commonAnnotations": {"summary": "p99 above 2s"},
    "externalURL": "http://am:9093",
    "alerts": [
        {
            "status": "firing",
            "labels": {"alertname": "HighLatency", "instance": "api-1"},
            "annotations": {"summary": "p99 above 2s"},
            "startsAt": "2026-11-25T10:00:00Z",
            "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://prom/graph",
            "fingerprint": "a1b2c3d4e5f60718",
        }
    ],
}


def parse(request: HookRequest) -> list[HookMessage]:
    return [summarize(request.payload, source="alertmanager", match=request.route.match)]
