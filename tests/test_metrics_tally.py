"""The request path's tallied counts and latencies read exactly as prometheus_client's own would."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from proxy.metrics import LATENCY_BUCKETS, Metrics


def _direct_and_tallied() -> tuple[Metrics, Metrics]:
    direct = Metrics(CollectorRegistry())
    direct._tally = None  # what a `--workers` worker does: every count goes straight to prometheus_client
    return direct, Metrics(CollectorRegistry())


def test_counts_and_latencies_read_as_if_counted_directly() -> None:
    direct, tallied = _direct_and_tallied()
    values = [0.0, 0.0001, 0.0005, 0.00050001, 0.003, 0.0099, 0.01, 0.7, 9.9, 10.0, 10.5, 3600.0, math.inf]
    for metrics in (direct, tallied):
        for value in values:
            metrics.observe(metrics.child(metrics.request_duration, "/v1/track"), value)
            metrics.count(metrics.child(metrics.requests, "/v1/track", "200"))
        metrics.count(metrics.child(metrics.events, "web", "track", "r", "segment", "primary"), 50)
        metrics.observe(metrics.child(metrics.request_duration, "/v1/batch"), 0.002)
    assert generate_latest(tallied.registry) == generate_latest(direct.registry)
    assert tallied.registry.get_sample_value("splitter_request_duration_seconds_bucket", {"path": "/v1/track", "le": "0.0005"}) == 3
    assert tallied.registry.get_sample_value("splitter_requests_total", {"path": "/v1/track", "code": "200"}) == len(values)


def test_each_collection_adds_only_what_came_since_the_last() -> None:
    metrics = Metrics(CollectorRegistry())
    child = metrics.child(metrics.requests, "/v1/t", "200")
    metrics.count(child)
    assert metrics.registry.get_sample_value("splitter_requests_total", {"path": "/v1/t", "code": "200"}) == 1
    assert metrics.registry.get_sample_value("splitter_requests_total", {"path": "/v1/t", "code": "200"}) == 1
    metrics.count(child, 2)
    metrics.observe(metrics.child(metrics.request_duration, "/v1/t"), 0.2)
    assert metrics.registry.get_sample_value("splitter_requests_total", {"path": "/v1/t", "code": "200"}) == 3
    assert metrics.registry.get_sample_value("splitter_request_duration_seconds_count", {"path": "/v1/t"}) == 1
    assert metrics.registry.get_sample_value("splitter_request_duration_seconds_sum", {"path": "/v1/t"}) == 0.2
    assert len(LATENCY_BUCKETS) + 1 == sum(
        1 for sample in metrics.request_duration.collect()[0].samples if sample.name.endswith("_bucket") and sample.labels["path"] == "/v1/t")


def test_a_negative_count_is_refused_when_counted() -> None:
    metrics = Metrics(CollectorRegistry())
    child = metrics.child(metrics.requests, "/v1/t", "200")
    metrics.count(child, 2)
    with pytest.raises(ValueError):
        metrics.count(child, -1)
    assert metrics.registry.get_sample_value("splitter_requests_total", {"path": "/v1/t", "code": "200"}) == 2
