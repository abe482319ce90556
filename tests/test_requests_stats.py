"""RequestDispatcher.stats(): counters kept as the core works, read under its lock; and read by the metrics.

The OTel and Prometheus tests read ``stats()`` through ``threaddispatch.metrics.readings``:
they use metrics.py's own entry for RequestDispatcher when it has one, else the mapping
below (the one proposed for metrics.py), so they show that what stats() says is what a
scrape says.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from threaddispatch import metrics
from threaddispatch.errors import ConfigurationError
from threaddispatch.requests import CancellationToken, RequestDispatcher
from threaddispatch.testing import wait_for

pytestmark = pytest.mark.timeout(60)

#: stats() key -> vocabulary metric: what metrics._STATS maps for a RequestDispatcher.
EXPECTED = {
    "added": (metrics.ENQUEUED, {}),
    "delivered": (metrics.SENT, {}),
    "failed": (metrics.SENT, {"error.type": "_OTHER"}),
    "cancelled": (metrics.CANCELLED, {}),
    "retried": (metrics.RETRIED, {}),
    "pending": (metrics.QUEUE_DEPTH, {}),
    "running": (metrics.IN_FLIGHT, {}),
}


class Send:
    """Answers "ok", raises for "fail" (each attempt), and holds "hold" until ``gate`` is set."""

    def __init__(self) -> None:
        self.gate = threading.Event()

    def __call__(self, request: Any, token: CancellationToken) -> Any:
        if request == "fail":
            raise ValueError("no")
        if request == "hold":
            self.gate.wait(20)
        return request


@pytest.fixture
def send() -> Send:
    return Send()


@pytest.fixture
def rd(send: Send) -> Iterator[RequestDispatcher[Any, Any]]:
    dispatcher: RequestDispatcher[Any, Any] = RequestDispatcher(send, max_workers=2, name="stats")
    yield dispatcher
    send.gate.set()
    dispatcher.close(20)


def test_a_new_dispatcher_counts_nothing(rd: RequestDispatcher[Any, Any]) -> None:
    assert rd.stats() == {
        "added": 0,
        "delivered": 0,
        "failed": 0,
        "retried": 0,
        "cancelled": 0,
        "deduplicated": 0,
        "cache_hits": 0,
        "pending": 0,
        "waiting": 0,
        "running": 0,
        "retrying": 0,
        "queues": 0,
    }


def test_stats_count_outcomes(rd: RequestDispatcher[Any, Any]) -> None:
    ok = rd.add("ok", queue_key="a")
    failed = rd.add("fail", queue_key="a", retry=2, retry_time=0.0)
    assert ok.future.result(10) == "ok"
    with pytest.raises(ValueError):
        failed.future.result(10)
    wait_for(lambda: rd.stats()["pending"] == 0, timeout=10)
    stats = rd.stats()
    assert (stats["added"], stats["delivered"], stats["failed"], stats["retried"]) == (2, 1, 1, 2)
    assert stats["running"] == stats["waiting"] == stats["retrying"] == 0


def test_stats_gauges_and_depth_per_key(rd: RequestDispatcher[Any, Any], send: Send) -> None:
    rd.pause("b")
    held = [rd.add("hold", queue_key="a", deduplicate=True), rd.add("hold", queue_key="a")]
    waiting = [rd.add(i, queue_key="b") for i in range(3)]
    wait_for(lambda: rd.stats()["running"] == 2, timeout=10)
    stats = rd.stats(per_key=True)
    assert stats["pending"] == 5 and stats["waiting"] == 3 and stats["queues"] == 2
    assert stats["queue_depths"] == {"a": 2, "b": 3}
    joined = rd.add("hold", queue_key="a", deduplicate=True)
    assert joined.deduplicated
    assert waiting[0].cancel()
    stats = rd.stats()
    assert (stats["deduplicated"], stats["cancelled"], stats["pending"]) == (1, 1, 4)
    send.gate.set()
    rd.start("b")
    assert [h.future.result(10) for h in held + waiting[1:]] == ["hold", "hold", 1, 2]
    wait_for(lambda: rd.stats()["pending"] == 0, timeout=10)
    assert rd.stats(per_key=True)["queue_depths"] == {}


def test_stats_count_cache_hits(send: Send) -> None:
    rd: RequestDispatcher[Any, Any] = RequestDispatcher(send, max_workers=1, cache_time=60.0)
    try:
        assert rd.add("ok", queue_key="a").future.result(10) == "ok"
        hit = rd.add("ok", queue_key="a")
        assert hit.cached
        stats = rd.stats()
        assert (stats["added"], stats["delivered"], stats["cache_hits"]) == (1, 1, 1)
    finally:
        rd.close(10)


def test_stats_per_key_must_be_a_bool(rd: RequestDispatcher[Any, Any]) -> None:
    with pytest.raises(ConfigurationError, match="per_key"):
        rd.stats(per_key="yes")  # type: ignore[arg-type]


def test_bad_metrics_is_refused(send: Send) -> None:
    with pytest.raises(ConfigurationError, match="metrics"):
        RequestDispatcher(send, metrics="prometheus")  # type: ignore[arg-type]


@pytest.fixture
def mapped() -> None:
    assert metrics._STATS["RequestDispatcher"] == EXPECTED


def _settled(rd: RequestDispatcher[Any, Any]) -> None:
    rd.add("ok", queue_key="a").future.result(10)
    with pytest.raises(ValueError):
        rd.add("fail", queue_key="a", retry=1, retry_time=0.0).future.result(10)
    wait_for(lambda: rd.stats()["pending"] == 0, timeout=10)


@pytest.mark.usefixtures("mapped")
def test_otel_reader_shows_the_numbers_of_stats(send: Send) -> None:
    sdk = pytest.importorskip("opentelemetry.sdk.metrics")
    export = pytest.importorskip("opentelemetry.sdk.metrics.export")
    from threaddispatch.otel import OTelMetrics

    reader = export.InMemoryMetricReader()
    provider = sdk.MeterProvider(metric_readers=[reader])
    rd: RequestDispatcher[Any, Any] = RequestDispatcher(send, max_workers=1, name="otel", metrics=OTelMetrics(provider))
    try:
        _settled(rd)
        stats = rd.stats()
        data = reader.get_metrics_data()
        seen: dict[tuple[str, tuple[tuple[str, Any], ...]], Any] = {}
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    for point in metric.data.data_points:
                        attributes = dict(point.attributes)
                        if not hasattr(point, "value"):
                            continue  # a histogram
                        if attributes.get("threaddispatch.dispatcher") != "otel":
                            continue
                        extra = tuple(
                            sorted((k, v) for k, v in attributes.items() if not k.startswith("threaddispatch."))
                        )
                        seen[(metric.name, extra)] = point.value
        assert seen[("threaddispatch.enqueued", ())] == stats["added"] == 2
        assert seen[("messaging.client.sent.messages", ())] == stats["delivered"] == 1
        assert seen[("messaging.client.sent.messages", (("error.type", "_OTHER"),))] == stats["failed"] == 1
        assert seen[("threaddispatch.retried", ())] == stats["retried"] == 1
        assert seen[("threaddispatch.queue.depth", ())] == stats["pending"] == 0
        # Each attempt's send is timed (3 attempts: ok, fail, its retry).
        durations = [
            point
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
            if metric.name == "messaging.client.operation.duration"
            for point in metric.data.data_points
            if dict(point.attributes).get("threaddispatch.dispatcher") == "otel"
        ]
        assert sum(point.count for point in durations) == 3
    finally:
        rd.close(10)
        provider.shutdown()


@pytest.mark.usefixtures("mapped")
def test_prometheus_scrape_shows_the_numbers_of_stats(send: Send) -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    from threaddispatch.prometheus import ThreadDispatchCollector

    rd: RequestDispatcher[Any, Any] = RequestDispatcher(send, max_workers=1, name="prom")
    registry = prometheus_client.CollectorRegistry()
    registry.register(ThreadDispatchCollector(rd))
    try:
        _settled(rd)
        stats = rd.stats()
        labels = {"threaddispatch_face": "RequestDispatcher", "threaddispatch_dispatcher": "prom"}
        sample = registry.get_sample_value
        assert sample("threaddispatch_enqueued_total", labels) == stats["added"] == 2
        assert sample("messaging_client_sent_messages_total", {**labels, "error_type": ""}) == stats["delivered"] == 1
        assert (
            sample("messaging_client_sent_messages_total", {**labels, "error_type": "_OTHER"}) == stats["failed"] == 1
        )
        assert sample("threaddispatch_retried_total", labels) == stats["retried"] == 1
        assert sample("threaddispatch_queue_depth", labels) == stats["pending"] == 0
        assert sample("threaddispatch_in_flight", labels) == stats["running"] == 0
    finally:
        rd.close(10)
