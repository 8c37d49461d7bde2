"""Every Prometheus metric splitter exports, defined once on an injectable registry.

Label values are bounded by construction: paths come from the fixed route table, event types
outside the six known ones are "other", sources/rules/destinations are names from the rules file.
Never a user id, an event name or a raw path. Labelled children are cached (`child()`), so the hot
path does one dictionary look-up instead of prometheus_client's label resolution per increment.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, Metric, disable_created_metrics
from prometheus_client.multiprocess import MultiProcessCollector

from proxy.engine import EVENT_TYPES, VIOLATION_KINDS, RuleSet

disable_created_metrics()  # *_created series double the exposition and no dashboard reads them
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
KNOWN_TYPES = frozenset(EVENT_TYPES)
RELOAD_RESULTS = ("success", "error", "refused", "unchanged")  # proxy.reload.Status, in the order a dashboard lists them
ROLLBACK_KINDS = ("split", "primary", "copy_lost")  # what an accepted reload moved back (proxy.engine.RolloutReport)
DROP_REASONS = ("spool_full", "spool_error")
# Why a request de-duplicated without the shared store; `tier`: the tier view's publish or read failed (proxy/observe/tier.py).
DEDUP_STORE_ERRORS = ("timeout", "connection", "error", "unavailable", "tier")
GEOIP_RELOAD_RESULTS = ("success", "error")  # proxy/control/geoip_watch.py


def bounded_type(value: object) -> str:
    return value if isinstance(value, str) and value in KNOWN_TYPES else "other"


def is_multiprocess() -> bool:
    """True in a `serve --workers N` worker: prometheus_client then keeps values in shared files."""
    return "PROMETHEUS_MULTIPROC_DIR" in os.environ


class Gauge(prometheus_client.Gauge):
    """A Gauge whose `set_function` also works in multiprocess mode.

    A multiprocess scrape reads each worker's value files and never calls a worker's function, so a
    worker calls `refresh()` periodically to copy each function's current value into its file.
    """

    _function: Callable[[], float] | None = None

    def set_function(self, f: Callable[[], float]) -> None:
        super().set_function(f)
        self._function = f

    def refresh(self) -> None:
        is_parent = bool(self._labelnames) and not self._labelvalues
        children = [child for child in self._metrics.values() if isinstance(child, Gauge)] if is_parent else [self]
        for child in children:
            if child._function is not None:
                child.set(child._function())


class Tally:
    """The request path's counts and latencies, added to their prometheus_client children whenever
    the registry is collected (a scrape, a test's `get_sample_value`): a dictionary update per count
    instead of a lock and three calls per increment, and a C bisection instead of a bucket search and
    two locked increments per latency. Registered on the registry before any metric, so a collection
    adds what is pending before reading anything; a scrape filtered by name (prometheus_client's
    `restricted_registry`, which splitter does not use) would skip it. Collected on the event loop's
    thread, as the admin port serves it. Not used in a `serve --workers N` worker (`Metrics` counts directly there): a
    multiprocess scrape reads the workers' files and never collects a worker's registry."""

    def __init__(self) -> None:
        self._counts: dict[Any, float] = {}  # a Counter's child -> pending amount
        self._latencies: dict[Any, tuple[list[float], list[int], list[float]]] = {}  # a Histogram's child -> (bounds, per bucket, [sum])

    def count(self, child: Any, amount: float) -> None:
        if amount < 0:  # refused here, as Counter.inc refuses it, rather than failing a flush
            raise ValueError("counters only go up")
        counts = self._counts
        counts[child] = counts.get(child, 0.0) + amount

    def observe(self, child: Any, value: float) -> None:
        pending = self._latencies.get(child)
        if pending is None:
            bounds = list(child._upper_bounds)
            pending = self._latencies[child] = (bounds, [0] * len(bounds), [0.0])
        pending[1][bisect_left(pending[0], value)] += 1  # the first bucket whose `le` is at least `value`, as observe() picks
        pending[2][0] += value

    def flush(self) -> None:
        counts, self._counts = self._counts, {}
        for child, amount in counts.items():
            child.inc(amount)
        latencies, self._latencies = self._latencies, {}
        for child, (_, buckets, total) in latencies.items():
            child._sum.inc(total[0])
            for index, observed in enumerate(buckets):
                if observed:
                    child._buckets[index].inc(observed)

    def collect(self) -> list[Metric]:
        self.flush()
        return []


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, *, counts_reloads: bool = True) -> None:
        """`counts_reloads=False` in a worker of `serve --workers N`: its supervisor reloads the same
        file and counts reloads and rollbacks once for all (SupervisorMetrics exports its counters),
        so a worker leaves those series out of its multiprocess files entirely."""
        self.registry = registry or CollectorRegistry()
        self.counts_reloads = counts_reloads
        r = self.registry
        self._tally: Tally | None = None
        if not is_multiprocess():
            self._tally = Tally()
            r.register(self._tally)  # first: its collect() runs before the metrics'
        self.requests = Counter("splitter_requests", "Client requests answered, by route and status code.", ["path", "code"], registry=r)
        self.request_duration = Histogram(
            "splitter_request_duration_seconds", "Time to answer a client request.", ["path"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.requests_in_flight = Gauge("splitter_requests_in_flight", "Client requests being handled now.", registry=r, multiprocess_mode="livesum")
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
        self.spool_read_back_bytes = Counter(
            "splitter_spool_read_back_bytes",
            "Bytes of records the sender read back from its spool files: behind the records kept in memory (an outage, an overload) or after a restart.",
            per_destination, registry=r,
        )
        self.requests_paced = Counter(
            "splitter_requests_paced",
            "Client requests that waited for their turn while a sender with an answering upstream was behind (--durability interval).", registry=r,
        )
        self.spool_syncs = Counter(
            "splitter_spool_syncs", "Group-commit fsync rounds over the spools (per request group with --durability fsync, per interval with interval).",
            registry=r,
        )
        # multiprocess_mode: how `serve --workers N` merges the workers' values (sums; the worst age and breaker)
        self.spool_bytes = Gauge("splitter_spool_bytes", "Bytes of spool segment files on disk.", per_destination, registry=r, multiprocess_mode="livesum")
        self.spool_records = Gauge(
            "splitter_spool_records", "Events in the spool not yet accepted upstream.", per_destination, registry=r, multiprocess_mode="livesum"
        )
        self.spool_oldest_age = Gauge(
            "splitter_spool_oldest_event_age_seconds", "Age of the oldest event waiting in the spool.", per_destination, registry=r,
            multiprocess_mode="livemax",
        )
        self.delivery_queue_depth = Gauge(
            "splitter_delivery_queue_depth", "Events read from the spool and in flight to the upstream.", per_destination, registry=r,
            multiprocess_mode="livesum",
        )
        self.breaker_state = Gauge(
            "splitter_breaker_state", "Circuit breaker: 0 closed, 1 half-open, 2 open.", per_destination, registry=r, multiprocess_mode="livemax"
        )
        self.dedup_hits = Counter(
            "splitter_dedup_hits", "Events not sent to a destination that already had their messageId (de-duplication).", per_destination, registry=r
        )
        self.dedup_tracked_ids = Gauge(
            "splitter_dedup_tracked_ids", "messageIds remembered for de-duplication.", per_destination, registry=r, multiprocess_mode="livesum"
        )
        self.dedup_store_errors = Counter(
            "splitter_dedup_store_errors",
            "Requests de-duplicated in this process alone because the shared store (dedup.store) did not answer in time (timeout), "
            "could not be reached (connection), answered an error (error), or was backing off after one of those (unavailable); "
            "tier: a publish or read of the tier view's catalog and ledger snapshots on that store failed.",
            ["reason"], registry=r,
        )
        self.tracking_plan_violations = Counter(
            "splitter_tracking_plan_violations", "Tracking-plan violations found, by source and kind (unplanned_event, missing_property, ...).",
            ["source", "kind"], registry=r,
        )
        self.tracking_plan_unchecked = Counter(
            "splitter_tracking_plan_unchecked", "Events not checked against their source's tracking plan because the check queue was full.",
            ["source"], registry=r,
        )
        self.config_reloads = Counter("splitter_config_reloads", "Rules reloads by result (success, error, refused, unchanged).", ["result"], registry=r)
        self.config_rollbacks = Counter(
            "splitter_config_rollbacks",
            "Rollbacks in accepted reloads: splits lowered, events whose primary moved back toward Segment, copies RudderStack stopped receiving.",
            ["kind"], registry=r,
        )
        self.config_info = Gauge("splitter_config_info", "The active rules file: always 1, labelled with its sha256.", ["sha256"], registry=r)
        self.rollout_percent = Gauge(
            "splitter_rollout_percent", "The live split: percent of cohort buckets each rule sends to each primary destination.",
            ["rule", "destination"], registry=r,
        )
        self.config_file_refused = Gauge(  # `--workers N`: each worker's own, the worst one shown (livemax)
            "splitter_config_file_refused",
            "1 while the last good rules serve because a reload from them would refuse the rules file (since start-up), else 0.",
            registry=r, multiprocess_mode="livemax",
        )
        self.geoip_reloads = Counter(  # preset by the watcher, so without --geoip-db there is no series
            "splitter_geoip_reloads", "GeoIP database reloads after its file changed, by result (success, error: the old database keeps serving).",
            ["result"], registry=r,
        )
        self.geoip_build_timestamp = Gauge(  # `--workers N`: the newest any worker serves (a drainer's 0 must not hide it)
            "splitter_geoip_database_build_timestamp_seconds", "When the GeoIP database in use was built (its build_epoch); 0 without --geoip-db.",
            registry=r, multiprocess_mode="livemax",
        )
        # Recorded traffic (`record:`, proxy/observe/recording.py). `--workers N`: events are summed; every worker
        # sees the same directory, so its bytes and files are the largest any worker last saw.
        self.recorded_events = Counter("splitter_recording_events", "Events written to recording files (the rules' `record:`).", registry=r)
        self.recording_dropped = Counter(
            "splitter_recording_dropped_events",
            "Events chosen for recording but not recorded: queue_full (the request never waits for the writer), write_error.",
            ["reason"], registry=r,
        )
        self.recording_queued = Gauge(
            "splitter_recording_queued_events", "Events waiting for the recording writer.", registry=r, multiprocess_mode="livesum"
        )
        self.recording_bytes = Gauge(
            "splitter_recording_bytes", "Bytes of recording files in the recording directory (capped by record.max_mb).", registry=r,
            multiprocess_mode="livemax",
        )
        self.recording_files = Gauge("splitter_recording_files", "Recording files in the recording directory.", registry=r, multiprocess_mode="livemax")
        self._children: dict[tuple[Any, ...], Any] = {}
        if counts_reloads:
            for result in RELOAD_RESULTS:
                self.config_reloads.labels(result)
            for kind in ROLLBACK_KINDS:
                self.config_rollbacks.labels(kind)

    def preset(self, rules: RuleSet) -> None:
        """Create every labelled counter whose label values the rules make known, at 0.

        A series that appears only at its first increment makes `rate()` and `increase()` blind to
        that first occurrence, and alerts on it never fire (Prometheus's advice on missing series);
        so each configured destination and source gets its series from the start.
        """
        for destination in rules.destinations:
            for counter in (self.events_delivered, self.events_dead_lettered, self.upstream_retries, self.spool_replayed,
                            self.spool_truncated_bytes, self.dedup_hits):
                self.child(counter, destination)
            for reason in DROP_REASONS:
                self.child(self.events_dropped, destination, reason)
                self.child(self.mirror_dropped, destination, reason)
        if rules.dedup is not None and rules.dedup.store is not None:
            for reason in DEDUP_STORE_ERRORS:
                self.child(self.dedup_store_errors, reason)
        for source in rules.tracking_plans:
            self.child(self.tracking_plan_unchecked, source)
            for kind in VIOLATION_KINDS:
                self.child(self.tracking_plan_violations, source, kind)

    def count(self, child: Any, amount: float = 1.0) -> None:
        """Add `amount` to a Counter's `child` (from `child()`): for the request path, where it is tallied."""
        if self._tally is not None:
            self._tally.count(child, amount)
        else:
            child.inc(amount)

    def observe(self, child: Any, value: float) -> None:
        """Observe `value` in a Histogram's `child`: for the request path, where it is tallied."""
        if self._tally is not None:
            self._tally.observe(child, value)
        else:
            child.observe(value)

    def child(self, metric: Any, *labels: str) -> Any:
        """A cached labelled child: label resolution once per label set, not once per event."""
        key = (id(metric), *labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def refresh(self) -> None:
        """Copy every `set_function` gauge's current value into its multiprocess file."""
        for value in vars(self).values():
            if isinstance(value, Gauge):
                value.refresh()

    def show_rules(self, rules: RuleSet) -> None:
        """Publish the active file's identity and split; called at start-up and on every reload.

        New values are set before stale label sets are removed, so a scrape never sees neither.
        A multiprocess worker publishes nothing: stale label sets cannot be removed from the shared
        files, so the supervisor, which reloads the same file, publishes these (`SupervisorMetrics`).
        """
        self.preset(rules)
        if is_multiprocess():
            return
        self.config_info.labels(rules.sha256).set(1)
        _remove_except(self.config_info, {(rules.sha256,)})
        live: set[tuple[str, ...]] = set()
        for rule in rules.rules:
            for destination, percent in rollout_of(rule):
                self.rollout_percent.labels(rule.name, destination).set(percent)
                live.add((rule.name, destination))
        _remove_except(self.rollout_percent, live)


class SupervisorMetrics:
    """`serve --workers N`'s `/metrics`: the workers' files merged, the rules gauges, the supervisor's own.

    `rules` is the supervisor's `Metrics`, which `show_rules` keeps current on each reload; of its
    other metrics only the reload and rollback counters are exported (the workers count the traffic,
    and leave reloads to the supervisor).
    """

    def __init__(self, path: str, rules: Metrics) -> None:
        self.registry = CollectorRegistry()
        MultiProcessCollector(self.registry, path=path)
        self.registry.register(rules.config_info)  # a metric is a collector, and may be in two registries
        self.registry.register(rules.rollout_percent)
        self.registry.register(rules.config_reloads)  # counted here once, not by each worker
        self.registry.register(rules.config_rollbacks)
        self.worker_restarts = Counter(
            "splitter_worker_restarts", "Worker processes restarted after exiting unexpectedly, by role.", ["role"], registry=self.registry
        )
        self.workers_ready = Gauge("splitter_workers_ready", "Worker processes ready to serve.", registry=self.registry)


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
