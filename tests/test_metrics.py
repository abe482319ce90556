"""Metrics through OpenTelemetry: every name moves as the faces work, with the face's attributes.

The SDK's InMemoryMetricReader collects on demand; a reading is compared with what the
face's own stats() says at that moment.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from threaddispatch import AsyncDispatcher, BackgroundDispatcher, BatchedDispatcher, JobEngine, testing
from threaddispatch.backoff import Constant, RetryPolicy
from threaddispatch.endpoint import EndpointBatchDispatcher
from threaddispatch.errors import ConfigurationError
from threaddispatch.logging import BatchingHandler
from threaddispatch.metrics import NO_METRICS, Metrics, NoMetrics, readings
from threaddispatch.otel import OTelMetrics
from threaddispatch.stores import MemoryStore

pytestmark = pytest.mark.timeout(30)


class Reader:
    """An OTelMetrics on its own MeterProvider, and the points of one collection."""

    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.provider = MeterProvider(metric_readers=[self.reader])
        self.metrics = OTelMetrics(self.provider)

    def points(self, name: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        found: list[Any] = []
        if data is None:
            return found
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        found += metric.data.data_points
        return found

    def value(self, name: str, **attributes: str) -> float:
        """The sum of ``name``'s points whose attributes include ``attributes`` (dots spelled ``__``)."""
        wanted = {key.replace("__", "."): value for key, value in attributes.items()}
        return float(
            sum(
                point.value
                for point in self.points(name)
                if all(point.attributes.get(key) == value for key, value in wanted.items())
            )
        )

    def histogram(self, name: str, **attributes: str) -> tuple[int, float]:
        """(count, sum) of histogram ``name`` over the points whose attributes include ``attributes``."""
        wanted = {key.replace("__", "."): value for key, value in attributes.items()}
        count, total = 0, 0.0
        for point in self.points(name):
            if all(point.attributes.get(key) == value for key, value in wanted.items()):
                count += point.count
                total += point.sum
        return count, total


@pytest.fixture
def otel() -> Iterator[Reader]:
    reader = Reader()
    yield reader
    reader.provider.shutdown()


def face(kind: str, name: str) -> dict[str, str]:
    return {"threaddispatch__face": kind, "threaddispatch__dispatcher": name}


def test_background_delivered_batches_and_depth(otel: Reader) -> None:
    sent: list[list[int]] = []
    # A window no collection outlasts: the entries stay queued until flush().
    with BackgroundDispatcher(sent.append, 60_000, name="bg", metrics=otel.metrics) as dispatcher:
        for number in range(5):
            dispatcher.enqueue(number)
        attrs = face("BackgroundDispatcher", "bg")
        assert otel.value("threaddispatch.enqueued", **attrs) == 5
        assert otel.value("threaddispatch.queue.depth", **attrs) == 5
        assert dispatcher.flush(10)
        assert otel.value("messaging.client.sent.messages", **attrs) == 5
        assert otel.value("threaddispatch.queue.depth", **attrs) == 0
        assert otel.value("threaddispatch.batches", **attrs) == dispatcher.stats()["batches"] == len(sent)
        assert otel.histogram("threaddispatch.batch.size", **attrs) == (len(sent), 5)
        count, seconds = otel.histogram(
            "messaging.client.operation.duration", **attrs, messaging__operation__name="send"
        )
        assert count == len(sent) and seconds >= 0
        assert all("messaging.system" not in p.attributes for p in otel.points("threaddispatch.batch.size"))
        assert otel.value("messaging.client.sent.messages", **attrs, error__type="_OTHER") == 0


def test_background_failed_and_retried(otel: Reader) -> None:
    def send(batch: list[int]) -> None:
        raise RuntimeError("down")

    retry = RetryPolicy(max_attempts=2, backoff=Constant(0.0))
    with BackgroundDispatcher(
        send, 1, name="bad", retry=retry, on_error=lambda failed: None, metrics=otel.metrics
    ) as d:
        d.enqueue(1)
        assert d.flush(10)
        testing.wait_for(lambda: d.stats()["failed"] == 1, 10)
        attrs = face("BackgroundDispatcher", "bad")
        assert otel.value("messaging.client.sent.messages", **attrs, error__type="_OTHER") == 1
        assert otel.value("threaddispatch.retried", **attrs) == 1
        assert otel.histogram("messaging.client.operation.duration", **attrs, error__type="RuntimeError")[0] == 2


@pytest.mark.timeout(30)
def test_background_dropped_and_depth_while_a_send_is_stuck(otel: Reader) -> None:
    release = threading.Event()
    entered = threading.Event()

    def send(batch: list[int]) -> None:
        entered.set()
        assert release.wait(10)

    dispatcher = BackgroundDispatcher(send, 1, max_queue_size=2, name="full", metrics=otel.metrics)
    try:
        dispatcher.enqueue(0)
        assert entered.wait(10)
        for number in range(1, 5):
            dispatcher.enqueue(number)
        attrs = face("BackgroundDispatcher", "full")
        stats = dispatcher.stats()
        assert stats["dropped"] == 2
        assert otel.value("threaddispatch.dropped", **attrs) == 2
        assert otel.value("threaddispatch.queue.depth", **attrs) == stats["pending"] == 2
        assert otel.value("threaddispatch.in_flight", **attrs) == 1
    finally:
        release.set()
        dispatcher.close(10)


def test_batched_per_target_and_partial_failure(otel: Reader) -> None:
    def send(target: str, messages: list[str]) -> list[str | BaseException]:
        return [ValueError(m) if m == "bad" else f"id-{m}" for m in messages]

    with BatchedDispatcher(send, max_batch_size=10, flush_interval=10, name="sqs", metrics=otel.metrics) as d:
        futures = [d.submit("a", "q1"), d.submit("bad", "q1"), d.submit("b", "q2")]
        assert d.flush(10)
        for future in futures:
            future.exception(10)
        attrs = face("BatchedDispatcher", "sqs")
        assert otel.value("threaddispatch.enqueued", **attrs) == 3
        assert otel.value("messaging.client.sent.messages", **attrs) == 3  # 2 delivered + 1 failed
        assert otel.value("messaging.client.sent.messages", **attrs, error__type="_OTHER") == 1
        assert otel.histogram("threaddispatch.batch.size", **attrs, messaging__destination__name="q1") == (1, 2)
        assert otel.histogram("threaddispatch.batch.size", **attrs, messaging__destination__name="q2") == (1, 1)
        assert otel.histogram("messaging.client.operation.duration", **attrs)[0] == 2
        assert otel.value("threaddispatch.queue.depth", **attrs) == 0


def test_batched_immediate_send_is_recorded(otel: Reader) -> None:
    with testing.immediate():
        d = BatchedDispatcher(lambda target, messages: ["id"] * len(messages), name="now", metrics=otel.metrics)
        assert d.submit("m", "q").result(0) == "id"
        d.close(10)
    assert otel.histogram("threaddispatch.batch.size", **face("BatchedDispatcher", "now")) == (1, 1)


def test_async_dispatcher_sent_failed_retried_rejected(otel: Reader) -> None:
    target = testing.RecordingDispatcher[str]()
    target.set_failing(lambda message: message == "bad")
    retry = RetryPolicy(max_attempts=2, backoff=Constant(0.0))
    failed: list[Any] = []
    d = AsyncDispatcher(target, "jobs", failed.append, retry=retry, metrics=otel.metrics)
    sender = d.setup(2)
    sender.put("ok")
    sender.put("bad")
    assert not sender.try_put("refused")  # full: not started yet
    attrs = face("AsyncDispatcher", "jobs")
    assert otel.value("threaddispatch.queue.depth", **attrs) == 2
    assert otel.value("threaddispatch.rejected", **attrs) == 1
    with d:
        testing.wait_for(lambda: len(failed) == 1, 10)
    stats = d.stats()
    assert otel.value("threaddispatch.enqueued", **attrs) == stats["buffered"] == 2
    assert otel.value("messaging.client.sent.messages", **attrs, error__type="_OTHER") == stats["failed"] == 1
    assert otel.value("messaging.client.sent.messages", **attrs) == 2
    assert otel.value("threaddispatch.retried", **attrs) == stats["retried"] == 1
    assert otel.histogram("messaging.client.operation.duration", **attrs)[0] == 3  # ok, bad, bad again
    assert otel.histogram("messaging.client.operation.duration", **attrs, error__type="RuntimeError")[0] == 2


def test_batching_handler_passes_metrics_to_its_dispatcher(otel: Reader) -> None:
    records: list[logging.LogRecord] = []
    handler = BatchingHandler(records.extend, 1, name="logs", metrics=otel.metrics)
    try:
        handler.handle(logging.LogRecord("x", logging.INFO, __file__, 1, "hello", None, None))
        handler.flush(10)
    finally:
        handler.close(10)
    attrs = face("BackgroundDispatcher", "logs")
    assert otel.value("messaging.client.sent.messages", **attrs) == 1
    assert otel.histogram("threaddispatch.batch.size", **attrs) == (1, 1)


def test_watched_job_engine_counts_outcomes_and_states(otel: Reader) -> None:
    engine = JobEngine(MemoryStore(), immediate=True, backoff=Constant(3600.0))
    otel.metrics.watch(engine)

    def work(ctx: Any, payload: int) -> int:
        if payload < 0:
            raise ValueError("negative")
        return payload

    engine.register("work", work, max_retries=1)
    engine.enqueue("work", 1)
    engine.enqueue("work", -1)
    attrs = {"threaddispatch__face": "JobEngine"}
    stats = engine.stats()
    assert otel.value("threaddispatch.jobs", **attrs, threaddispatch__job__outcome="completed") == stats["completed"]
    assert otel.value("threaddispatch.jobs", **attrs, threaddispatch__job__outcome="failed") == stats["failed"]
    assert otel.value("threaddispatch.jobs", **attrs, threaddispatch__job__outcome="retried") == stats["retried"]
    assert (stats["completed"], stats["failed"], stats["retried"]) == (1, 1, 1)
    counts = engine.counts()
    for state, count in counts.items():
        assert otel.value("threaddispatch.jobs.state", **attrs, threaddispatch__job__state=state) == count
    assert otel.value("threaddispatch.jobs.running", **attrs) == 0


@pytest.mark.parametrize("how", ["watch", "metrics="])
def test_watched_endpoint_dispatcher_reads_its_stats(otel: Reader, how: str) -> None:
    options: dict[str, Any] = {"metrics": otel.metrics} if how == "metrics=" else {}
    endpoint = EndpointBatchDispatcher(lambda endpoint, jobs: None, name="hooks", **options)
    try:
        if how == "watch":
            otel.metrics.watch(endpoint)
        attrs = face("EndpointBatchDispatcher", "hooks")
        assert otel.value("threaddispatch.dropped", **attrs) == 0
        assert [p for p in otel.points("threaddispatch.queue.depth") if p.attributes == {**_dots(attrs)}]
    finally:
        endpoint.close(10)


def _dots(attributes: dict[str, str]) -> dict[str, str]:
    return {key.replace("__", "."): value for key, value in attributes.items()}


def test_a_collected_face_leaves_the_readings(otel: Reader) -> None:
    dispatcher = BackgroundDispatcher[object](lambda batch: None, name="gone", metrics=otel.metrics)
    dispatcher.close(10)
    del dispatcher
    gc.collect()
    assert not [
        p for p in otel.points("threaddispatch.enqueued") if p.attributes.get("threaddispatch.dispatcher") == "gone"
    ]


def test_no_metrics_is_the_default_and_binds_nothing() -> None:
    with BackgroundDispatcher[object](lambda batch: None, name="plain") as dispatcher:
        assert dispatcher._sender.recorder is None
    with BatchedDispatcher(lambda t, m: [None] * len(m), metrics=NO_METRICS) as batched:
        assert batched._state.recorder is None
    assert isinstance(NO_METRICS, NoMetrics) and NO_METRICS.bind(object()) is None
    NO_METRICS.counter("c").add(1)
    NO_METRICS.up_down_counter("u").add(-1)
    NO_METRICS.histogram("h").record(1.0)


@pytest.mark.parametrize("make", [BackgroundDispatcher, BatchedDispatcher, EndpointBatchDispatcher])
def test_metrics_must_be_a_metrics(make: Any) -> None:
    with pytest.raises(ConfigurationError, match="metrics must be"):
        make(lambda *args: None, metrics="otel")


def test_async_dispatcher_refuses_bad_metrics() -> None:
    with pytest.raises(ConfigurationError, match="metrics must be"):
        AsyncDispatcher(testing.RecordingDispatcher[str](), "q", metrics=object())  # type: ignore[arg-type]


def test_a_metrics_of_ones_own_gets_the_histograms() -> None:
    recorded: list[tuple[str, float, dict[str, Any]]] = []

    class Recorded:
        def __init__(self, name: str) -> None:
            self.name = name

        def add(self, amount: float, attributes: Any = None) -> None:
            recorded.append((self.name, amount, dict(attributes or {})))

        record = add

    class Mine(Metrics):
        def counter(self, name: str, *, unit: str = "", description: str = "") -> Any:
            return Recorded(name)

        up_down_counter = counter
        histogram = counter

    with BackgroundDispatcher[int](lambda batch: None, 1, name="mine", metrics=Mine()) as dispatcher:
        dispatcher.enqueue(1)
        assert dispatcher.flush(10)
    sizes = [(amount, attrs) for name, amount, attrs in recorded if name == "threaddispatch.batch.size"]
    assert sizes == [(1, {**sizes[0][1]})] and sizes[0][1]["threaddispatch.dispatcher"] == "mine"


def test_readings_of_an_unknown_face_are_empty() -> None:
    assert readings(object()) == []
