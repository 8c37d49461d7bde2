"""Every Prometheus metric splitter exports, defined once on an injectable registry.

Label values are bounded by construction: paths come from the fixed route table, event types
outside the six known ones are "other", sources/rules/destinations are names from the rules file.
Never a user id, an event name or a raw path. Labelled children are cached (`child()`), so the hot
path does one dictionary look-up instead of prometheus_client's label resolution per increment.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from proxy.engine import EVENT_TYPES, RuleSet

disable_created_metrics()  # *_created series double the exposition and no dashboard reads them
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
KNOWN_TYPES = frozenset(EVENT_TYPES)


def bounded_type(value: object) -> str:
    return value if isinstance(value, str) and value in KNOWN_TYPES else "other"


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("splitter_requests", "Client requests answered, by route and status code.", ["path", "code"], registry=r)
        self.request_duration = Histogram(
            "splitter_request_duration_seconds", "Time to answer a client request.", ["path"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.requests_in_flight = Gauge("splitter_requests_in_flight", "Client requests being handled now.", registry=r)
        self.events = Counter(
            "splitter_events", "Events routed, by source, type, rule, destination and role (primary|mirror).",
            ["source", "type", "rule", "destination", "role"], registry=r,
        )
        self.events_rejected = Counter("splitter_events_rejected", "Events refused at ingress, by source and reason code.", ["source", "code"], registry=r)
        self.upstream_requests = Counter(
            "splitter_upstream_requests", "Requests sent upstream, by destination and status (code, or timeout/error).", ["destination", "code"], registry=r
        )
        self.upstream_duration = Histogram(
            "splitter_upstream_duration_seconds", "Upstream request latency.", ["destination"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.mirror_dropped = Counter(
            "splitter_mirror_dropped", "Mirror events not kept, by destination and reason (spool_full, spool_error).",
            ["destination", "reason"], registry=r,
        )
        per_destination = ["destination"]
        self.events_delivered = Counter("splitter_events_delivered", "Events accepted by the upstream.", per_destination, registry=r)
        self.events_dead_lettered = Counter(
            "splitter_events_dead_lettered", "Events an upstream refused for good, written to the dead-letter file.", per_destination, registry=r
        )
        self.events_dropped = Counter(
            "splitter_events_dropped", "Events not kept, by destination and reason (spool_full for mirrors at quota).", ["destination", "reason"], registry=r
        )
        self.upstream_retries = Counter("splitter_upstream_retries", "Upstream requests retried after a retryable failure.", per_destination, registry=r)
        self.spool_replayed = Counter(
            "splitter_spool_replayed", "Spooled events found at start-up and sent again (some may be duplicates).", per_destination, registry=r
        )
        self.spool_truncated_bytes = Counter(
            "splitter_spool_truncated_bytes", "Bytes of torn or corrupt spool tails cut off at start-up.", per_destination, registry=r
        )
        self.spool_bytes = Gauge("splitter_spool_bytes", "Bytes of spool segment files on disk.", per_destination, registry=r)
        self.spool_records = Gauge("splitter_spool_records", "Events in the spool not yet accepted upstream.", per_destination, registry=r)
        self.spool_oldest_age = Gauge(
            "splitter_spool_oldest_event_age_seconds", "Age of the oldest event waiting in the spool.", per_destination, registry=r
        )
        self.delivery_queue_depth = Gauge(
            "splitter_delivery_queue_depth", "Events read from the spool and in flight to the upstream.", per_destination, registry=r
        )
        self.breaker_state = Gauge("splitter_breaker_state", "Circuit breaker: 0 closed, 1 half-open, 2 open.", per_destination, registry=r)
        self.config_reloads = Counter("splitter_config_reloads", "Rules reloads by result (success, error, refused, unchanged).", ["result"], registry=r)
        self.config_info = Gauge("splitter_config_info", "The active rules file: always 1, labelled with its sha256.", ["sha256"], registry=r)
        self.rollout_percent = Gauge(
            "splitter_rollout_percent", "The live split: percent of cohort buckets each rule sends to each primary destination.",
            ["rule", "destination"], registry=r,
        )
        self._children: dict[tuple[Any, ...], Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """A cached labelled child: label resolution once per label set, not once per event."""
        key = (id(metric), *labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def show_rules(self, rules: RuleSet) -> None:
        """Publish the active file's identity and split; called at start-up and on every reload.

        New values are set before stale label sets are removed, so a scrape never sees neither.
        """
        self.config_info.labels(rules.sha256).set(1)
        _remove_except(self.config_info, {(rules.sha256,)})
        live = set()
        for rule in rules.rules:
            for destination, percent in rollout_of(rule):
                self.rollout_percent.labels(rule.name, destination).set(percent)
                live.add((rule.name, destination))
        _remove_except(self.rollout_percent, live)


def _remove_except(gauge: Gauge, keep: set[tuple[str, ...]]) -> None:
    for labels in list(gauge._metrics):  # prometheus_client keeps children by label tuple
        if labels not in keep:
            gauge.remove(*labels)


def rollout_of(rule: Any) -> Iterable[tuple[str, float]]:
    """(destination, percent of buckets) for each primary destination a rule can choose."""
    split = rule.route.split
    shares: dict[str, float] = {}
    if split is not None:
        for destination, percent in split.percents:
            shares[destination] = shares.get(destination, 0.0) + percent
    for destination in rule.route.to:
        shares[destination] = 100.0
    return shares.items()
