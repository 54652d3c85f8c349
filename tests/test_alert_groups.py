"""What one alert group's successive notifications (Alertmanager, Grafana unified) become
on the phone, through a running bridge on loopback: which are texted, which are repeats.

Alertmanager (and Grafana, which sends the same payload) notifies a group again whenever
any alert in it changes, and again unchanged every `repeat_interval`: the dedupe key must
tell the first from the second, whatever part of the group changed.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from bridge.clock import ManualClock
from bridge.models import Message
from tests.helpers import bridge_config, running_bridge

PHONE = "+12025550143"
PAGES = 'match = { severity = "page" }\n'
# A route of each format, and one of each that texts pages only (`_pages`); `public`:
# what is tested is the payload's reading, not a route's credential.
ROUTES = "".join(
    f'[routes.{fmt}{suffix}]\nformat = "{fmt}"\nto = ["{PHONE}"]\npublic = true\n{match}'
    for fmt in ("alertmanager", "grafana")
    for suffix, match in (("", ""), ("_pages", PAGES))
)
STARTED = "2026-11-30T08:00:00Z"


def alert(instance: str, status: str = "firing", severity: str = "page") -> dict[str, Any]:
    """One DiskFull alert on `instance`, its fingerprint the instance's own."""
    return {
        "status": status,
        "labels": {"alertname": "DiskFull", "instance": instance, "severity": severity},
        "annotations": {"summary": "disk almost full"},
        "startsAt": STARTED,
        "endsAt": "0001-01-01T00:00:00Z" if status == "firing" else "2026-11-30T08:30:00Z",
        "fingerprint": f"d15cf011{instance.encode().hex():0>8}",
    }


def group(*alerts: dict[str, Any], truncated: int = 0) -> dict:
    """A notification of the group `alerts` are in, its status Alertmanager's own: firing
    while any of them fires; `truncated` more alerts that `max_alerts` left out."""
    firing = any(a["status"] == "firing" for a in alerts)
    return {
        "version": "4",
        "groupKey": '{}:{alertname="DiskFull"}',
        "truncatedAlerts": truncated,
        "status": "firing" if firing else "resolved",
        "receiver": "sms",
        "groupLabels": {"alertname": "DiskFull"},
        "commonLabels": {"alertname": "DiskFull"},
        "commonAnnotations": {"summary": "disk almost full"},
        "externalURL": "http://alertmanager:9093",
        "alerts": list(alerts),
    }


async def notify(
    route: str, payloads: list[dict], tmp_path, clock: ManualClock, sandbox_url: str, step: float
) -> list[Message]:
    """Post `payloads` to `route` `step` seconds apart; the message each is stored as."""
    config = bridge_config(tmp_path, sandbox_url, ROUTES)
    stored = []
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        for payload in payloads:
            response = await http.post(f"{url}/hooks/{route}", json=payload)
            assert response.status_code == 202, response.text
            [message_id] = response.json()["ids"]
            message = await bridge.store.get(message_id)
            assert message is not None
            stored.append(message)
            clock.advance(step)
    return stored


def told(messages: list[Message]) -> list[tuple[str, str]]:
    return [(m.state.value, m.text) for m in messages]


@pytest.mark.parametrize("route", ["alertmanager_pages", "grafana_pages"])
async def test_a_matching_alert_that_resolves_while_the_group_fires_on_is_texted_resolved(
    route: str, tmp_path, clock, sandbox_url
) -> None:
    """The route texts `severity = "page"` only. db-1 (page) resolves while db-2
    (warning) fires on: the group's status is still "firing", but all the route keeps is
    db-1, resolved. It was read as [FIRING:1] db-1 with the key of the first text, so
    suppressed as its repeat, and texted as FIRING once past the window: the phone never
    heard that db-1 is over. Its own repeat (a retry, `repeat_interval`) is a repeat."""
    both = group(alert("db-1"), alert("db-2", severity="warning"))
    page_over = group(alert("db-1", "resolved"), alert("db-2", severity="warning"))
    messages = await notify(
        route, [both, page_over, page_over], tmp_path, clock, sandbox_url, step=240
    )
    assert told(messages) == [
        ("queued", "[FIRING:1] DiskFull db-1: disk almost full"),
        ("queued", "[RESOLVED] DiskFull db-1: disk almost full"),
        ("suppressed", "[RESOLVED] DiskFull db-1: disk almost full"),
    ]


@pytest.mark.parametrize("route", ["alertmanager_pages", "grafana_pages"])
async def test_a_matching_alerts_resolve_read_after_the_window_is_still_resolved(
    route: str, tmp_path, clock, sandbox_url
) -> None:
    """The same notification past the dedupe window (10 minutes): texted again, and as
    what it says, RESOLVED (it went out as [FIRING:1] db-1)."""
    both = group(alert("db-1"), alert("db-2", severity="warning"))
    page_over = group(alert("db-1", "resolved"), alert("db-2", severity="warning"))
    messages = await notify(route, [both, page_over], tmp_path, clock, sandbox_url, step=700)
    assert told(messages)[1] == ("queued", "[RESOLVED] DiskFull db-1: disk almost full")


@pytest.mark.parametrize("route", ["alertmanager", "grafana"])
async def test_an_alert_that_resolves_while_the_rest_of_its_group_fires_is_texted(
    route: str, tmp_path, clock, sandbox_url
) -> None:
    """db-2 fires, db-1 joins, db-1 resolves while db-2 fires on. The third notification
    lists the firing db-2 alone, as the first did, and had its key: suppressed, and the
    phone's last word was [FIRING:2] db-1, db-2 with db-1 over. Repeats are still
    repeats: a `repeat_interval` resend, a retry."""
    db2 = group(alert("db-2"))
    both = group(alert("db-1"), alert("db-2"))
    db1_over = group(alert("db-1", "resolved"), alert("db-2"))
    messages = await notify(
        route, [db2, db2, both, db1_over, db1_over], tmp_path, clock, sandbox_url, step=60
    )
    db2_text = "[FIRING:1] DiskFull db-2: disk almost full"
    assert told(messages) == [
        ("queued", db2_text),
        ("suppressed", db2_text),
        ("queued", "[FIRING:2] DiskFull db-1, db-2: disk almost full"),
        ("queued", db2_text),
        ("suppressed", db2_text),
    ]


@pytest.mark.parametrize("route", ["alertmanager", "grafana"])
async def test_a_group_that_grows_past_max_alerts_is_texted(
    route: str, tmp_path, clock, sandbox_url
) -> None:
    """`max_alerts = 2` in the receiver: the payload carries the first two alerts and
    counts the rest in `truncatedAlerts`. 3 disks full, then 40: the same two alerts
    sent, so the same key, and the 37 more were suppressed. The same count again is a
    repeat."""
    first_two = (alert("db-1"), alert("db-2"))
    three, forty = group(*first_two, truncated=1), group(*first_two, truncated=38)
    messages = await notify(route, [three, forty, forty], tmp_path, clock, sandbox_url, step=60)
    assert told(messages) == [
        ("queued", "[FIRING:3] DiskFull db-1, db-2 +1: disk almost full"),
        ("queued", "[FIRING:40] DiskFull db-1, db-2 +38: disk almost full"),
        ("suppressed", "[FIRING:40] DiskFull db-1, db-2 +38: disk almost full"),
    ]


@pytest.mark.parametrize("fmt", ["alertmanager", "grafana"])
async def test_a_templates_status_and_alerts_on_a_match_route_are_the_kept_alerts(
    fmt: str, tmp_path, clock, sandbox_url
) -> None:
    """db-1 (page) resolves while db-2 (warning) fires on, on a route that texts pages:
    the default text said [RESOLVED] db-1, but a template's `{{ status }}` was the
    group's, "firing", and its `alerts` held db-2, which the route leaves out: the
    template texted "FIRING" for the page that was over. Both are the kept alerts', as
    `firing`, `resolved` and the default text are."""
    template = (
        "{{ status | upper }} {{ alerts | map(attribute='labels.instance') | join(',') }}"
        " {{ firing | length }}/{{ resolved | length }}"
    )
    routes = (
        f'[routes.t]\nformat = "{fmt}"\nto = ["{PHONE}"]\npublic = true\n{PAGES}'
        f"template = {template!r}\n"
    )
    config = bridge_config(tmp_path, sandbox_url, routes)
    both = group(alert("db-1"), alert("db-2", severity="warning"))
    page_over = group(alert("db-1", "resolved"), alert("db-2", severity="warning"))
    texts = []
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        for payload in (both, page_over):
            response = await http.post(f"{url}/hooks/t", json=payload)
            assert response.status_code == 202, response.text
            message = await bridge.store.get(response.json()["ids"][0])
            assert message is not None
            texts.append(message.text)
    assert texts == ["FIRING db-1 1/0", "RESOLVED db-1 0/1"]
