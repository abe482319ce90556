"""JobEngine metrics: every job metric moves as jobs run (OTel in-memory reader), Prometheus shows stats().

Per queue (``messaging.destination.name``) and job name (``threaddispatch.job.name``):
enqueued, started, completed, failed, retried, dead-lettered, run time and queue wait; the
running and pending gauges; ``dead_lettered`` in ``stats()``. With ``metrics`` None (the
default) the engine holds no recorder and listens to nothing.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk")
pytest.importorskip("prometheus_client")

from prometheus_client import CollectorRegistry
from test_metrics import Reader

from threaddispatch import BackgroundDispatcher, JobEngine
from threaddispatch.backoff import Constant
from threaddispatch.metrics import NO_METRICS, VOCABULARY, job_recorder
from threaddispatch.prometheus import PrometheusMetrics, _Distribution, prometheus_name
from threaddispatch.stores import MemoryStore, SQLiteStore, Store
from threaddispatch.stores.base import JobState
from threaddispatch.testing import wait_for

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def otel() -> Iterator[Reader]:
    reader = Reader()
    yield reader
    reader.provider.shutdown()


@pytest.fixture(params=["memory", "sqlite"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Store]:
    if request.param == "memory":
        return MemoryStore
    return lambda: SQLiteStore(str(tmp_path / "jobs.db"))


def job(queue: str, name: str) -> dict[str, str]:
    return {"messaging__destination__name": queue, "threaddispatch__job__name": name}


def flaky(ctx: Any, payload: None) -> str:
    if ctx.attempt == 1:
        raise ConnectionError("first attempt")
    return "ok"


def bad(ctx: Any, payload: None) -> None:
    raise ValueError("always")


def threaded(store: Store, metrics: Any) -> JobEngine:
    engine = JobEngine(
        store, metrics=metrics, backoff=Constant(0.0), poll_interval=0.01, max_poll_interval=0.05, queues=["a", "b"]
    )
    engine.register("ok", lambda ctx, payload: payload, queue="a")
    engine.register("flaky", flaky, queue="b")
    engine.register("bad", bad, queue="b", max_retries=1)
    return engine


def run_all(engine: JobEngine) -> list[str]:
    """Start, enqueue 3 ok, 1 flaky, 1 bad, wait until every job ended, stop."""
    engine.start()
    try:
        ids = [engine.enqueue("ok", n) for n in range(3)] + [engine.enqueue("flaky"), engine.enqueue("bad")]
        ended = (JobState.COMPLETED, JobState.FAILED)
        wait_for(lambda: all(engine.get_job(i).state in ended for i in ids), 30, message="every job ended")
    finally:
        assert engine.stop(10)
    return ids


@pytest.mark.timeout(60)
def test_every_job_metric_moves_as_jobs_run(otel: Reader, make_store: Callable[[], Store]) -> None:
    engine = threaded(make_store(), otel.metrics)
    run_all(engine)
    stats = engine.stats()
    assert (stats["completed"], stats["retried"], stats["failed"], stats["dead_lettered"]) == (4, 2, 1, 1)

    assert otel.value("threaddispatch.job.enqueued", **job("a", "ok")) == 3
    assert otel.value("threaddispatch.job.enqueued", **job("b", "flaky")) == 1
    assert otel.value("threaddispatch.job.enqueued", **job("b", "bad")) == 1
    # started: one per attempt (ok x3, flaky x2, bad x2)
    assert otel.value("messaging.client.consumed.messages", **job("a", "ok")) == 3
    assert otel.value("messaging.client.consumed.messages", **job("b", "flaky")) == 2
    assert otel.value("messaging.client.consumed.messages", **job("b", "bad")) == 2
    assert otel.value("messaging.client.consumed.messages") == stats["claimed"] == 7
    assert otel.value("threaddispatch.job.completed", **job("a", "ok")) == 3
    assert otel.value("threaddispatch.job.completed", **job("b", "flaky")) == 1
    assert otel.value("threaddispatch.job.completed") == stats["completed"]
    assert otel.value("threaddispatch.job.failed", **job("b", "flaky"), error__type="ConnectionError") == 1
    assert otel.value("threaddispatch.job.failed", **job("b", "bad"), error__type="ValueError") == 2
    assert otel.value("threaddispatch.job.retried", **job("b", "flaky")) == 1
    assert otel.value("threaddispatch.job.retried", **job("b", "bad")) == 1
    assert otel.value("threaddispatch.job.retried") == stats["retried"]
    assert otel.value("threaddispatch.job.dead_lettered", **job("b", "bad")) == 1
    assert otel.value("threaddispatch.job.dead_lettered") == stats["dead_lettered"]

    count, seconds = otel.histogram("messaging.process.duration", **job("a", "ok"), messaging__system="threaddispatch")
    assert count == 3 and seconds >= 0
    assert otel.histogram("messaging.process.duration", **job("b", "bad"), error__type="ValueError")[0] == 2
    assert otel.histogram("messaging.process.duration")[0] == 7
    count, seconds = otel.histogram("threaddispatch.job.queue_wait")
    assert count == 7 and seconds >= 0
    # read from stats() at collection: the outcomes (dead_lettered included) and the gauges
    attrs = {"threaddispatch__face": "JobEngine"}
    for outcome in ("completed", "retried", "failed", "dead_lettered"):
        found = otel.value("threaddispatch.jobs", **attrs, threaddispatch__job__outcome=outcome)
        assert found == stats[outcome], outcome
    assert otel.value("threaddispatch.jobs.running", **attrs) == 0
    assert otel.value("threaddispatch.jobs.pending", **attrs) == 0


@pytest.mark.timeout(30)
def test_running_and_pending_gauges(otel: Reader, make_store: Callable[[], Store]) -> None:
    engine = JobEngine(make_store(), metrics=otel.metrics, poll_interval=0.01, max_poll_interval=0.05)
    started, release = threading.Event(), threading.Event()

    def hold(ctx: Any, payload: None) -> None:
        started.set()
        release.wait(20)

    engine.register("hold", hold)
    engine.register("later", lambda ctx, payload: None, queue="other")
    job_recorder(engine)  # what JobEngine's constructor does once it binds metrics= (see the module docstring)
    engine.enqueue("later")
    engine.enqueue("later")
    assert otel.value("threaddispatch.jobs.pending", messaging__destination__name="other") == 2
    engine.start()
    try:
        engine.enqueue("hold")
        assert started.wait(20)
        assert otel.value("threaddispatch.jobs.running", threaddispatch__face="JobEngine") == 1
        assert otel.value("threaddispatch.jobs.pending", messaging__destination__name="default") == 0
    finally:
        release.set()
        assert engine.stop(10)
    assert otel.value("threaddispatch.jobs.running", threaddispatch__face="JobEngine") == 0
    assert otel.value("threaddispatch.job.enqueued", **job("other", "later")) == 2


def test_immediate_mode_records_too(otel: Reader) -> None:
    engine = JobEngine(MemoryStore(), metrics=otel.metrics, immediate=True, backoff=Constant(0.0))
    engine.register("bad", bad, max_retries=2)
    engine.enqueue("bad")
    engine.enqueue("bad")
    assert otel.value("threaddispatch.job.failed", **job("default", "bad")) == 6
    assert otel.value("threaddispatch.job.retried", **job("default", "bad")) == 4
    assert otel.value("threaddispatch.job.dead_lettered", **job("default", "bad")) == 2
    assert engine.stats()["dead_lettered"] == 2


def test_enqueues_before_any_run_are_counted(otel: Reader) -> None:
    """A producer-only engine (a web process) counts its enqueues: the binding happens at construction."""
    engine = JobEngine(MemoryStore(), metrics=otel.metrics)
    engine.register("ok", lambda ctx, payload: None)
    engine.enqueue("ok")
    assert otel.value("threaddispatch.job.enqueued", **job("default", "ok")) == 1


@pytest.mark.parametrize("metrics", [None, NO_METRICS])
def test_metrics_off_binds_nothing(metrics: Any) -> None:
    engine = JobEngine(MemoryStore(), metrics=metrics, immediate=True)
    engine.register("ok", lambda ctx, payload: None)
    engine.enqueue("ok")
    assert job_recorder(engine) is None
    assert not engine.events.has_listeners("job_enqueued")
    inline = engine._inline
    assert inline is not None and inline._meter is None and inline._recorder._meter is None
    assert engine.stats()["dead_lettered"] == 0


def test_binding_is_once_per_engine(otel: Reader) -> None:
    engine = JobEngine(MemoryStore(), metrics=otel.metrics, immediate=True)
    engine.register("ok", lambda ctx, payload: None)
    first = job_recorder(engine)
    assert first is not None and job_recorder(engine) is first
    engine.enqueue("ok")
    assert engine.events.listener_count("job_enqueued") == 1
    assert otel.value("threaddispatch.job.enqueued", **job("default", "ok")) == 1


@pytest.mark.timeout(30)
def test_threads_binding_at_once_get_one_recorder(otel: Reader) -> None:
    engine = JobEngine(MemoryStore(), metrics=otel.metrics)
    barrier = threading.Barrier(8)
    found: list[object] = []

    def bind() -> None:
        barrier.wait(10)
        found.append(job_recorder(engine))

    threads = [threading.Thread(target=bind) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(found) == 8 and len({id(recorder) for recorder in found}) == 1 and found[0] is not None
    assert engine.events.listener_count("job_enqueued") == 1


# -- Prometheus -------------------------------------------------------------------------------------------


def sample(registry: CollectorRegistry, name: str, labels: dict[str, str] | None = None) -> float:
    """The sum of the samples ``name`` whose labels include ``labels`` (0.0 when none)."""
    total = 0.0
    for family in registry.collect():
        for found in family.samples:
            if found.name == name and all(found.labels.get(k) == v for k, v in (labels or {}).items()):
                total += found.value
    return total


def labels(queue: str, name: str) -> dict[str, str]:
    return {"messaging_destination_name": queue, "threaddispatch_job_name": name}


@pytest.mark.timeout(60)
def test_the_prometheus_scrape_shows_what_stats_says(make_store: Callable[[], Store]) -> None:
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry)
    engine = threaded(make_store(), metrics)
    run_all(engine)
    stats = engine.stats()
    engine_labels = {"threaddispatch_face": "JobEngine"}
    for outcome in ("claimed", "completed", "failed", "retried", "dead_lettered", "cancelled", "lost"):
        found = sample(registry, "threaddispatch_jobs_total", {**engine_labels, "threaddispatch_job_outcome": outcome})
        assert found == stats[outcome], outcome
    assert sample(registry, "threaddispatch_jobs_running", engine_labels) == stats["in_flight"] == 0
    # recorded per queue and job name; their sums are stats() again
    assert sample(registry, "threaddispatch_job_enqueued_total") == 5
    assert sample(registry, "threaddispatch_job_enqueued_total", labels("a", "ok")) == 3
    assert sample(registry, "messaging_client_consumed_messages_total") == stats["claimed"]
    assert sample(registry, "threaddispatch_job_completed_total") == stats["completed"]
    assert sample(registry, "threaddispatch_job_completed_total", labels("b", "flaky")) == 1
    assert sample(registry, "threaddispatch_job_retried_total") == stats["retried"]
    assert sample(registry, "threaddispatch_job_dead_lettered_total") == stats["dead_lettered"]
    assert sample(registry, "threaddispatch_job_failed_total", {"error_type": "ValueError"}) == 2
    assert sample(registry, "messaging_process_duration_count") == stats["claimed"]
    assert sample(registry, "messaging_process_duration_bucket", {"le": "+Inf"}) == stats["claimed"]
    assert sample(registry, "messaging_process_duration_sum") >= 0
    assert sample(registry, "threaddispatch_job_queue_wait_count", labels("a", "ok")) == 3
    for state, count in engine.counts().items():
        assert sample(registry, "threaddispatch_jobs_state", {"threaddispatch_job_state": state}) == count


def test_prometheus_histograms_of_a_face() -> None:
    registry = CollectorRegistry()
    sent: list[list[int]] = []
    with BackgroundDispatcher(sent.append, name="bg", metrics=PrometheusMetrics(registry)) as dispatcher:
        for number in range(5):
            dispatcher.enqueue(number)
        assert dispatcher.flush(10)
        stats = dispatcher.stats()
    face = {"threaddispatch_face": "BackgroundDispatcher", "threaddispatch_dispatcher": "bg"}
    assert sample(registry, "threaddispatch_enqueued_total", face) == stats["enqueued"] == 5
    assert sample(registry, "threaddispatch_batch_size_count", face) == stats["batches"] == len(sent)
    assert sample(registry, "threaddispatch_batch_size_sum", face) == 5
    assert sample(registry, "messaging_client_operation_duration_count", face) == stats["batches"]


def test_prometheus_buckets_are_cumulative() -> None:
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry, buckets=(1.0, 10.0))
    histogram = metrics.histogram("my.latency", unit="s")
    for value in (0.5, 1.0, 5.0, 50.0):
        histogram.record(value, {"route": "x"})
    assert metrics.histogram("my.latency") is histogram
    buckets = {le: sample(registry, "my_latency_bucket", {"le": le}) for le in ("1.0", "10.0", "+Inf")}
    assert buckets == {"1.0": 2, "10.0": 3, "+Inf": 4}
    assert sample(registry, "my_latency_sum") == 56.5
    counter = metrics.counter("my.calls")
    counter.add(2, {"route": "x"})
    counter.add(1, {"route": "y"})
    assert sample(registry, "my_calls_total", {"route": "x"}) == 2 and sample(registry, "my_calls_total") == 3


def test_every_job_name_has_a_prometheus_spelling() -> None:
    assert {prometheus_name(metric.name) for metric in VOCABULARY} >= {
        "threaddispatch_job_enqueued",
        "messaging_client_consumed_messages",
        "threaddispatch_job_dead_lettered",
        "messaging_process_duration",
        "threaddispatch_job_queue_wait",
    }


# -- fork -------------------------------------------------------------------------------------------------


def _child_exit_code(pid: int, timeout: float) -> int:
    """The exit code of the forked child ``pid``; killed (and -9) if it has not ended by ``timeout``."""

    def ended() -> tuple[int, int] | None:
        found = os.waitpid(pid, os.WNOHANG)
        return found if found[0] else None

    try:
        found = wait_for(ended, timeout, interval=0.01, message="the forked child")
    except TimeoutError:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return -9
    assert found is not None
    return os.waitstatus_to_exitcode(found[1])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.timeout(30)
def test_a_forked_child_counts_from_zero_with_fresh_locks(otel: Reader) -> None:
    engine = JobEngine(MemoryStore(), metrics=otel.metrics, immediate=True)
    engine.register("ok", lambda ctx, payload: None)
    recorder = job_recorder(engine)
    assert recorder is not None
    engine.enqueue("ok")
    watched = otel.metrics._faces
    latency = PrometheusMetrics(CollectorRegistry()).histogram("latency")
    assert isinstance(latency, _Distribution)
    latency.record(1.0)
    # Locks another thread of the parent holds at fork time: the child must not wait for them.
    held = [recorder._lock, watched._lock, latency._lock, otel.metrics._lock]
    for lock in held:
        lock.acquire()
    try:
        pid = os.fork()
        if pid == 0:  # the child: count, read, and report by exit code only
            code = 1
            try:
                recorder.enqueued(engine.get_job(engine.enqueue("ok")))
                values = {r.metric.name: r.value for r in recorder.readings({})}
                watched.add(engine)
                latency.record(2.0)
                otel.metrics.histogram("another")
                counted = values.get("threaddispatch.job.enqueued") == 2 and len(watched) == 1
                code = 0 if counted and latency._values[()][1] == [2.0] else 2
            finally:
                os._exit(code)
    finally:
        for lock in held:
            lock.release()
    assert _child_exit_code(pid, 20) == 0
    assert otel.value("threaddispatch.job.enqueued", **job("default", "ok")) == 1  # the parent's own count
