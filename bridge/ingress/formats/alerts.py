"""Alert groups (Alertmanager, Grafana) to one readable line per notification.

[FIRING:3] HighLatency api-1, api-2 +1: p99 above 2s
[RESOLVED] HighLatency api-1, api-2 +1: p99 above 2s
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

from bridge.errors import InputError
from bridge.ingress.formats.base import HookMessage, Ignored, obj, text_field

# Labels that say where an alert is, most telling first.
INSTANCE_LABELS = (
    "instance",
    "host",
    "hostname",
    "nodename",
    "pod",
    "node",
    "container",
    "device",
    "service",
    "job",
    "namespace",
    "service_name",  # OpenTelemetry's service.name, host.name, k8s.pod.name as labels
    "host_name",
    "k8s_pod_name",
)
# Instance-like labels that name a part of a machine, not the machine.
PART_LABELS = frozenset(("container", "device"))
# Places that are no machine: what holds a container, never a disk.
NOT_MACHINE_LABELS = frozenset(("pod",))
# Labels that never say where: how bad, how it is filed, Grafana's internals.
NOT_INSTANCE_LABELS = frozenset(("alertname", "severity", "priority", "grafana_folder", "team"))
# Flag-like values ("debug=true") say nothing about where either.
FLAG_VALUES = frozenset(("true", "false", "yes", "no", "on", "off", "0", "1", ""))
# Nor does a number where the alerts share a host (a core, a bucket's bound): three
# cores of db-1 read "CoreTemp 2 +2", the host not named at all. Elsewhere it may be all
# that tells the alerts apart (a shard, an HTTP code), named with its label.
_NUMBER = re.compile(r"[-+]?[0-9]+(\.[0-9]+)?")
# Grafana's `valueString`: [ var='A' labels={instance=node:9100, job=node} value=2.4e+09 ]
# No `{` inside: with `[^}]*`, each "labels={" of a value without a "}" was read to its
# end, and 64 KB of "labels={" held the event loop 8 s (quadratic).
_VALUE_LABELS = re.compile(r"labels=\{([^{}]*)\}")
NO_VALUE = "<no value>"  # what a Go template prints for a missing label or annotation
SHOWN_INSTANCES = 2
SHOWN_NAMES = 2


def _alerts(payload: dict[str, Any]) -> list[dict[str, Any]]:
    alerts = payload.get("alerts")
    if not isinstance(alerts, list):
        raise InputError("alerts", "must be a list of alerts")
    out = []
    for index, alert in enumerate(alerts):
        alert = obj(alert, f"alerts[{index}]")
        for key in ("labels", "annotations"):
            if key in alert and alert[key] is not None:
                obj(alert[key], f"alerts[{index}].{key}")
        out.append(alert)
    return out


def _host(value: Any) -> str:
    text = str(value)
    # host:port -> host (IPv6 in brackets keeps its colons)
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


def _value_labels(alert: dict[str, Any]) -> dict[str, str]:
    """The series labels Grafana lists in `valueString` (the query's, not the rule's)."""
    found: dict[str, str] = {}
    for group in _VALUE_LABELS.findall(str(alert.get("valueString") or "")):
        for pair in group.split(","):
            key, sep, value = pair.partition("=")
            if sep and key.strip() not in found:
                found[key.strip()] = value.strip()
    return found


def _instance(
    labels: dict[str, Any], common: dict[str, Any], *, distinct: bool, numbers: bool = True
) -> str | None:
    """Where this alert is: a known instance-like label; with `distinct`, else any
    label that tells it apart from the rest of its group (not a flag, a severity or the
    folder; a number as `key=value`, and with `numbers` only). Never an arbitrary label
    of a lone alert (that named `debug=true`)."""
    found = _place(labels, common, distinct=distinct, numbers=numbers)
    return found[1] if found else None


def _place(
    labels: dict[str, Any], common: dict[str, Any], *, distinct: bool, numbers: bool
) -> tuple[str, str] | None:
    """`_instance`, with the label it was read from."""
    for key in INSTANCE_LABELS:
        value = labels.get(key)
        if value and value != common.get(key):
            return key, _host(value)
    if distinct:
        for key in sorted(labels):
            value = labels[key]
            if (
                key not in NOT_INSTANCE_LABELS
                and not key.startswith("__")
                and str(value).lower() not in FLAG_VALUES
                and value != common.get(key)
            ):
                if not _NUMBER.fullmatch(str(value)):
                    return key, _host(value)
                if numbers:  # a bare "3, 7" says nothing; "shard=3, shard=7" does
                    return key, f"{key}={value}"
    return None


def _container_of(keys: set[str], common: dict[str, Any]) -> str | None:
    """The place that holds what tells the alerts apart, when that is part of a
    machine (a disk, a container) and the group shares it: two full disks of db-1
    read "/dev/sda1, /dev/sdb1", which names no machine. The nearest place above in
    `INSTANCE_LABELS` (a container's pod before the scraped instance). Not for other
    labels: kube-state-metrics' alerts share its own instance, which is no place of
    the deployments they name."""
    if not keys or not keys <= PART_LABELS:
        return None
    top = min(INSTANCE_LABELS.index(key) for key in keys)
    # A disk's place is its machine: the `container` and `pod` it shares are the
    # scrape's own (kube-prometheus' node_exporter: kube-rbac-proxy), not where it is.
    above = [k for k in INSTANCE_LABELS[:top] if k not in PART_LABELS]
    if "device" in keys:
        above = [k for k in above if k not in NOT_MACHINE_LABELS]
    for key in reversed(above):
        if common.get(key):
            return _host(common[key])
    return None


def _listing(items: list[str], shown: int, total: int, where: str | None = None) -> str:
    """The first `shown` items (`on where`, the place they share), then "+N" for the
    rest of `total`, however few were named."""
    named = ", ".join(items[:shown]) + (f" on {where}" if where else "")
    rest = total - min(len(items), shown)
    return f"{named} +{rest}" if rest > 0 else named


def _values(alert: dict[str, Any]) -> str:
    values = alert.get("values")
    if not isinstance(values, dict) or not values:
        return ""
    parts = [
        f"{k}={v:.4g}" if isinstance(v, int | float) else f"{k}={v}"
        for k, v in sorted(values.items())
    ]
    return " (" + ", ".join(parts) + ")"


def summarize(
    payload: Any,
    *,
    source: str,
    with_values: bool = False,
    match: Mapping[str, str] | None = None,
) -> HookMessage:
    payload = obj(payload, "body")
    status = payload.get("status")
    if status not in ("firing", "resolved"):
        raise InputError("status", 'must be "firing" or "resolved"')
    alerts = _alerts(payload)
    truncated = payload.get("truncatedAlerts") or 0
    if not isinstance(truncated, int) or isinstance(truncated, bool) or truncated < 0:
        raise InputError("truncatedAlerts", "must be a non-negative integer")
    common = payload.get("commonLabels") or {}
    common_annotations = payload.get("commonAnnotations") or {}
    obj(common, "commonLabels")
    obj(common_annotations, "commonAnnotations")
    if match:  # the route texts only alerts whose labels match, e.g. severity = "page"
        alerts = [
            a
            for a in alerts
            if all(str((a.get("labels") or {}).get(k)) == v for k, v in match.items())
        ]
        if not alerts:
            raise Ignored("no alert matches this route's labels")
        # The group's status is of every alert in it; the route's, of those it texts. A
        # group firing on with only alerts the route leaves out is, for it, resolved: read
        # as the group's, the resolved alert was texted as [FIRING] (and keyed as its own
        # firing text, so first suppressed as a repeat of it).
        firing = any(a.get("status", status) == "firing" for a in alerts)
        status = "firing" if firing else "resolved"
    listed = [a for a in alerts if a.get("status", status) == status] or alerts
    total = len(listed) + truncated

    # Ordered sets: `in` on a list made a group of 16,000 alerts named apart hold the
    # event loop for seconds (every webhook, API call and mail waiting behind it).
    seen_names: dict[str, None] = {}
    seen_instances: dict[str, None] = {}
    unnamed = 0  # alerts with no instance of their own: counted in "+N", not named
    shared_place = _instance(common, {}, distinct=False)
    apart_by: set[str] = set()  # the labels the alerts' own places were read from
    for alert in listed:
        labels = alert.get("labels") or {}
        name = text_field(labels.get("alertname"), "alerts[].labels.alertname")
        if name:
            seen_names[name] = None  # a name seen before keeps its place
        place = _place(labels, common, distinct=len(listed) > 1, numbers=shared_place is None)
        if place:
            apart_by.add(place[0])
        instance = place[1] if place else _instance(_value_labels(alert), {}, distinct=False)
        if not instance:
            unnamed += 1
        else:
            seen_instances[instance] = None
    names, instances = list(seen_names), list(seen_instances)
    if not instances:
        # One alert: its instance even if common, else what the group is grouped by
        # (group_by: [alertname, service_name]). Several alerts that nothing tells apart
        # (two cores too hot on one host): the instance they share, once.
        group_labels = obj(payload.get("groupLabels") or {}, "groupLabels")
        if len(listed) == 1:
            instance = _instance(listed[0].get("labels") or {}, {}, distinct=False) or _instance(
                group_labels, {}, distinct=True
            )
        else:
            instance = shared_place
        if instance:
            instances, unnamed = [instance], 0
    summaries = {
        str(
            (a.get("annotations") or {}).get("summary")
            or (a.get("annotations") or {}).get("description")
            or ""
        )
        for a in listed
    }
    # One summary for the group, or none: the first alert's would mislabel the others.
    summary = str(
        common_annotations.get("summary")
        or common_annotations.get("description")
        or (summaries.pop() if len(summaries) == 1 else "")
    )
    tag = f"[FIRING:{total}]" if status == "firing" else "[RESOLVED]"
    container = _container_of(apart_by, common)
    head = " ".join(
        part
        for part in (
            tag,
            _listing(names, SHOWN_NAMES, len(names)),
            # "+N": the places not shown and the alerts with no place of their own; never
            # a repeat of a place shown (two alerts on one host are "host", not "host +1").
            # The place the named ones share before "+N": Alertmanager reads commonLabels
            # over the alerts it sends, not those `max_alerts` cut, which may be elsewhere.
            _listing(instances, SHOWN_INSTANCES, len(instances) + unnamed + truncated, container)
            if instances
            else "",
        )
        if part
    )
    summary = summary.replace(NO_VALUE, "?")  # Grafana's text for a missing value
    text = f"{head}: {summary}" if summary else head
    if with_values and len(listed) == 1:
        text += _values(listed[0])

    # Each alert by its fingerprint, when it started and its own status: a repeat of an
    # unchanged group keeps all three, while an alert that resolved and fires again is a
    # new episode with a new startsAt (else the flap's second "firing" was a duplicate of
    # the first, and the phone's last word was [RESOLVED] while it fired). Every alert,
    # not only those listed: one resolving while the rest fire on lists what an earlier
    # notification listed (db-2, before db-1 joined), and had its key.
    fingerprints = sorted(
        [
            str(a.get("fingerprint") or json.dumps(a.get("labels"), sort_keys=True)),
            str(a.get("startsAt") or ""),
            str(a.get("status", status)),
        ]
        for a in alerts
    )
    # And how many alerts `max_alerts` cut: a group grown from 3 to 40 still sends the
    # same first alerts, and without the count had the same key (the 37 more suppressed).
    digest = hashlib.sha256(
        json.dumps([payload.get("groupKey"), status, fingerprints, truncated]).encode()
    ).hexdigest()[:32]
    context = dict(payload)
    context.update(
        # On a route with `match`, the alerts it keeps and their status, as the default
        # text has them: the group's said "firing" (and listed the alerts the route leaves
        # out) while the text said [RESOLVED] for the page that was over.
        status=status,
        alerts=alerts,
        firing=[a for a in alerts if a.get("status") == "firing"],
        resolved=[a for a in alerts if a.get("status") == "resolved"],
        summary=summary,
        default_text=text,
    )
    return HookMessage(
        text=text,
        context=context,
        dedupe_key=f"{source}:{digest}",
        topic=", ".join(names) or "alerts",
        instance=", ".join(instances[:SHOWN_INSTANCES]) or None,
    )
