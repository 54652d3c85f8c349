"""Prometheus metrics at `/metrics`, in a registry of this bridge's own (no globals).

Counters and histograms are kept in process (provider requests by endpoint and outcome,
their latency); everything about messages is read from the store at scrape time, so the
figures are exact and survive restarts: messages by source and state, queue depth and
oldest queued age, held and suppressed by reason, parts and cost sent. While the store
cannot be reached (or written: see bridge.ops.probe, a scrape writes at most once a
minute) the scrape still answers: `sms_bridge_store_up 0`, the process's own figures,
and none of the store's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from bridge.errors import StoreUnavailable
from bridge.ops.probe import StoreProbe
from bridge.store import Store

PREFIX = "sms_bridge"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


@dataclass
class Snapshot:
    """What the store says, read asynchronously just before each scrape."""

    by_source_state: list[tuple[str, str, int]] = field(default_factory=list)
    by_reason: list[tuple[str, str, int]] = field(default_factory=list)
    oldest_queued_age: float = 0.0
    parts_sent: int = 0
    cost: float = 0.0
    store_up: bool = True  # False: the store failed this scrape, the figures above are none


class _StoreCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        snap = self.metrics.snapshot
        yield GaugeMetricFamily(
            f"{PREFIX}_store_up",
            "1 when the store answered this scrape's reads and took a write in the last"
            " minute (/readyz's or the scrape's own)",
            value=1.0 if snap.store_up else 0.0,
        )
        if snap.store_up:
            yield from self._store_figures(snap)
        for name, help_text, read in self.metrics.live_gauges:
            value = read()
            if value is not None:
                yield GaugeMetricFamily(f"{PREFIX}_{name}", help_text, value=value)
        for name, help_text, count_since_start in self.metrics.live_counters:
            yield CounterMetricFamily(f"{PREFIX}_{name}", help_text, value=count_since_start())
        for name, help_text, label, counts in self.metrics.labelled_counters:
            family = CounterMetricFamily(f"{PREFIX}_{name}", help_text, labels=[label])
            for label_value, failures in counts().items():
                family.add_metric([label_value], failures)
            yield family

    def _store_figures(self, snap: Snapshot) -> Iterator[GaugeMetricFamily]:
        messages = GaugeMetricFamily(
            f"{PREFIX}_messages", "Stored messages by source and state", labels=["source", "state"]
        )
        queued = 0
        for source, state, count in snap.by_source_state:
            messages.add_metric([source, state], count)
            queued += count if state == "queued" else 0
        yield messages
        yield GaugeMetricFamily(
            f"{PREFIX}_queue_depth", "Messages queued for sending", value=queued
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_oldest_queued_age_seconds",
            "Age of the oldest queued message",
            value=snap.oldest_queued_age,
        )
        reasons = GaugeMetricFamily(
            f"{PREFIX}_messages_by_reason",
            "Held, suppressed and failed messages by reason",
            labels=["state", "reason"],
        )
        for state, reason, count in snap.by_reason:
            reasons.add_metric([state, reason], count)
        yield reasons
        yield GaugeMetricFamily(f"{PREFIX}_sms_parts_sent", "SMS parts sent", value=snap.parts_sent)
        yield GaugeMetricFamily(
            f"{PREFIX}_cost_sent", "Cost reported by the provider", value=snap.cost
        )


class Metrics:
    def __init__(self, store: Store, now: Callable[[], float]) -> None:
        self.store = store
        self.now = now
        self.probe = StoreProbe(store, now)  # shared with /readyz: its writes count here
        self.registry = CollectorRegistry()
        self.snapshot = Snapshot()
        self.live_gauges: list[tuple[str, str, Callable[[], float | None]]] = []
        self.live_counters: list[tuple[str, str, Callable[[], float]]] = []
        self.labelled_counters: list[tuple[str, str, str, Callable[[], dict[str, float]]]] = []
        self.provider_requests = Counter(
            f"{PREFIX}_provider_requests",
            "Provider requests by endpoint and outcome",
            ["endpoint", "outcome"],
            registry=self.registry,
        )
        self.provider_latency = Histogram(
            f"{PREFIX}_provider_request_seconds",
            "Provider request latency",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_StoreCollector(self))

    def observe_request(self, endpoint: str, outcome: str, seconds: float) -> None:
        self.provider_requests.labels(endpoint, outcome).inc()
        self.provider_latency.labels(endpoint).observe(seconds)

    def gauge(self, name: str, help_text: str, read: Callable[[], float | None]) -> None:
        """A value read from a live component at scrape time (rate budget, balance...)."""
        self.live_gauges.append((name, help_text, read))

    def counter(self, name: str, help_text: str, count: Callable[[], float]) -> None:
        """A count a live component keeps since start, read at scrape time: exposed as
        `NAME_total`, so that `increase()` reads it across restarts."""
        self.live_counters.append((name, help_text, count))

    def counters(
        self, name: str, help_text: str, label: str, counts: Callable[[], dict[str, float]]
    ) -> None:
        """Counts since start by one label (`counts`: label value -> count), read at
        scrape time, exposed as `NAME_total{label=...}`."""
        self.labelled_counters.append((name, help_text, label, counts))

    async def refresh(self) -> None:
        now = self.now()
        try:
            # A full disk still answers reads: a write proves it, but not one per
            # scrape (several Prometheus servers, every 15 s): one a minute at most.
            await self.probe.recent_write()
            counts = await self.store.counts_for_metrics()
        except StoreUnavailable:
            # Not a failed scrape: that reads as the bridge down, and hides the
            # figures (provider_ready, the leader...) that still hold.
            self.snapshot = Snapshot(store_up=False)
            return
        oldest = counts.oldest_due
        self.snapshot = Snapshot(
            by_source_state=counts.by_source_state,
            by_reason=counts.by_reason,
            oldest_queued_age=max(0.0, now - oldest) if oldest is not None else 0.0,
            parts_sent=counts.parts_sent,
            cost=counts.cost,
        )

    async def exposition(self) -> bytes:
        await self.refresh()
        return generate_latest(self.registry)
