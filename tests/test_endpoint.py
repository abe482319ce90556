"""EndpointBatchDispatcher: batching per endpoint, priorities, limits, retries, stats, events, shutdown."""

from __future__ import annotations

import functools
import gc
import itertools
import logging
import math
import os
import random
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

import pytest

from threaddispatch import (
    ConfigurationError,
    Constant,
    DispatcherClosedError,
    Exponential,
    InvalidStateError,
    RetryPolicy,
)
from threaddispatch.endpoint import EVENTS, BatchStats, DispatchJob, EndpointBatchDispatcher, WebhookBatch
from threaddispatch.testing import live_dispatch_threads, wait_for

pytestmark = pytest.mark.timeout(60)

Outcome = Callable[[Hashable, list[DispatchJob]], "Sequence[object] | None"]


class Sink:
    """A thread-safe send_batch: records every call, counts concurrent sends, answers with ``outcome``."""

    def __init__(self, outcome: Outcome | None = None, latency: float = 0.0) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[Hashable, list[DispatchJob], float, str]] = []
        self.delivered: list[DispatchJob] = []
        self.outcome = outcome
        self.latency = latency  # simulated network time, so sends overlap
        self.active = 0
        self.max_active = 0

    def __call__(self, endpoint_id: Hashable, jobs: list[DispatchJob]) -> Sequence[object] | None:
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.calls.append((endpoint_id, list(jobs), time.monotonic(), threading.current_thread().name))
        try:
            if self.latency:
                threading.Event().wait(self.latency)
            result = self.outcome(endpoint_id, jobs) if self.outcome is not None else None
            with self.lock:
                if result is None:
                    self.delivered.extend(jobs)
                elif isinstance(result, list) and len(result) == len(jobs):
                    # A malformed list fails the whole batch: count nothing then.
                    if all(ok in (None, True, False) or isinstance(ok, BaseException) for ok in result):
                        self.delivered.extend(job for job, ok in zip(jobs, result) if ok is None or ok is True)
            return result
        finally:
            with self.lock:
                self.active -= 1

    def payloads(self, endpoint_id: Hashable | None = None) -> list[Any]:
        with self.lock:
            return [j.payload for ep, jobs, _t, _n in self.calls if endpoint_id in (None, ep) for j in jobs]

    def call_count(self) -> int:
        with self.lock:
            return len(self.calls)

    def delivered_count(self) -> int:
        with self.lock:
            return len(self.delivered)


class Blocker:
    """A send_batch whose calls wait until the test releases them; counts how many are inside."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.inside = 0
        self.release = threading.Event()
        self.sink = Sink()

    def __call__(self, endpoint_id: Hashable, jobs: list[DispatchJob]) -> None:
        with self.lock:
            self.inside += 1
        try:
            assert self.release.wait(30), "the test never released the sender"
            self.sink(endpoint_id, jobs)
        finally:
            with self.lock:
                self.inside -= 1

    def count_inside(self) -> int:
        with self.lock:
            return self.inside


class EventLog:
    """Listens to every event; records (event, payload, thread name) in emission order."""

    def __init__(self, dispatcher: EndpointBatchDispatcher) -> None:
        self.lock = threading.Lock()
        self.entries: list[tuple[str, dict[str, Any], str]] = []
        for event in EVENTS:
            dispatcher.on(event, self._listener(event))

    def _listener(self, event: str) -> Callable[[dict[str, Any]], None]:
        def record(payload: dict[str, Any]) -> None:
            with self.lock:
                self.entries.append((event, payload, threading.current_thread().name))

        return record

    def of(self, event: str) -> list[dict[str, Any]]:
        with self.lock:
            return [payload for name, payload, _t in self.entries if name == event]

    def names(self) -> list[str]:
        with self.lock:
            return [name for name, _p, _t in self.entries]


def status(job: DispatchJob) -> str:
    """The job's status, read afresh (keeps type checkers from narrowing it across calls)."""
    return job.status


def make(send: Any = None, **kwargs: Any) -> EndpointBatchDispatcher:
    kwargs.setdefault("batch_timeout", 60.0)
    return EndpointBatchDispatcher(send if send is not None else Sink(), **kwargs)


def stats_add_up(stats: BatchStats, d: EndpointBatchDispatcher, endpoints: Sequence[Hashable] = ()) -> None:
    """The internal consistency every BatchStats must have."""
    assert stats.active_batches_count <= d.max_concurrent_batches
    assert stats.endpoints_with_pending_jobs <= stats.pending_jobs_count
    if stats.endpoints_with_pending_jobs:
        assert stats.average_queue_size == pytest.approx(stats.pending_jobs_count / stats.endpoints_with_pending_jobs)
    else:
        assert stats.pending_jobs_count == 0
        assert stats.average_queue_size == 0.0
    if endpoints:
        assert sum(d.get_pending_job_count(ep) for ep in endpoints) == stats.pending_jobs_count


# -- configuration and bad input --------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"max_batch_size": 0}, "max_batch_size.*0"),
        ({"max_batch_size": -3}, "max_batch_size.*-3"),
        ({"max_batch_size": 2.5}, "max_batch_size.*2.5"),
        ({"max_batch_size": True}, "max_batch_size.*True"),
        ({"batch_timeout": 0}, "batch_timeout.*0"),
        ({"batch_timeout": -1.0}, r"batch_timeout.*-1\.0"),
        ({"batch_timeout": math.inf}, "batch_timeout.*inf"),
        ({"batch_timeout": math.nan}, "batch_timeout.*nan"),
        ({"batch_timeout": "5"}, "batch_timeout.*'5'"),
        ({"max_concurrent_batches": 0}, "max_concurrent_batches.*0"),
        ({"max_concurrent_batches": None}, "max_concurrent_batches.*None"),
        ({"enable_prioritization": "yes"}, "enable_prioritization.*'yes'"),
        ({"retry": 3}, "retry.*3"),
        ({"name": ""}, "name"),
    ],
)
def test_bad_options_are_refused_naming_the_value(kwargs: dict[str, Any], needle: str) -> None:
    """A non-positive size or timeout (or another bad option) raises ConfigurationError with the value."""
    with pytest.raises(ConfigurationError, match=needle):
        EndpointBatchDispatcher(Sink(), **kwargs)


def test_send_batch_must_be_callable() -> None:
    """A non-callable send_batch is refused at construction."""
    with pytest.raises(ConfigurationError, match=r"send_batch.*42"):
        EndpointBatchDispatcher(42)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [None, "", "   ", True, ["a"]])
def test_a_job_needs_an_endpoint_id(bad: Any) -> None:
    """A job without a usable endpoint id is refused when it is made, naming the value."""
    with pytest.raises(ConfigurationError, match="endpoint_id") as info:
        DispatchJob(bad, {"x": 1})
    assert repr(bad) in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"priority": "high"}, "priority.*'high'"),
        ({"priority": 1.5}, r"priority.*1\.5"),
        ({"max_attempts": 0}, "max_attempts.*0"),
        ({"max_attempts": -1}, "max_attempts.*-1"),
        ({"id": ""}, "id"),
        ({"id": 7}, "id.*7"),
    ],
)
def test_bad_job_fields_are_refused(kwargs: dict[str, Any], needle: str) -> None:
    """Bad priority, max_attempts or id raise ConfigurationError naming the value."""
    with pytest.raises(ConfigurationError, match=needle):
        DispatchJob("ep", None, **kwargs)


def test_bad_calls_are_refused() -> None:
    """add_job takes only new DispatchJobs; endpoint ids given to queries are checked too."""
    d = make()
    with pytest.raises(TypeError, match=r"DispatchJob.*'not a job'"):
        d.add_job("not a job")  # type: ignore[arg-type]
    job = DispatchJob("ep", 1)
    d.add_job(job)
    with pytest.raises(InvalidStateError, match=job.id):
        d.add_job(job)
    with pytest.raises(ConfigurationError, match=r"endpoint_id.*None"):
        d.process_batch_for_endpoint(None)
    with pytest.raises(ConfigurationError, match=r"endpoint_id.*''"):
        d.get_pending_job_count("")
    with pytest.raises(ValueError, match="unknown event 'job_addded'"):
        d.on("job_addded", print)
    with pytest.raises(ConfigurationError, match=r"timeout.*-1"):
        d.shutdown(-1)
    assert d.get_pending_job_count("ep") == 1  # the refused re-add changed nothing
    assert d.shutdown(5)


# -- jobs ------------------------------------------------------------------------------------


def test_jobs_get_an_id_and_timestamps() -> None:
    """A job gets a unique id unless it has one, a creation time, and attempt times as it is sent."""
    before = time.time()
    jobs = [DispatchJob("ep", i) for i in range(100)]
    after = time.time()
    assert len({job.id for job in jobs}) == 100
    assert all(isinstance(job.id, str) and job.id for job in jobs)
    assert all(before <= job.created_at <= after for job in jobs)
    named = DispatchJob("ep", "x", id="evt-42")
    assert named.id == "evt-42"
    assert (named.priority, named.max_attempts, named.attempts, named.status) == (0, None, 0, "new")
    assert "evt-42" in repr(named) and "'x'" not in repr(named)  # the payload stays out of logs

    sink = Sink()
    d = make(sink)
    assert d.add_job(named) == "evt-42"
    assert named.status == "pending"
    batch = d.process_batch_for_endpoint("ep")
    assert batch is not None
    assert status(named) == "delivered"
    assert named.attempts == 1
    assert named.last_attempt_at == batch.started_at
    assert named.finished_at == batch.completed_at
    assert named.last_attempt_at is not None and named.finished_at is not None
    assert named.created_at <= named.last_attempt_at <= named.finished_at
    assert d.shutdown(5)


def test_higher_priority_first_fifo_within_a_priority() -> None:
    """A batch takes the highest priority first and keeps arrival order within a priority."""
    sink = Sink()
    d = make(sink, max_batch_size=100)
    order = [(0, "a"), (5, "b"), (0, "c"), (1, "d"), (5, "e"), (1, "f"), (0, "g"), (-2, "h")]
    for priority, name in order:
        d.add_job(DispatchJob("ep", name, priority=priority))
    d.process_batch_for_endpoint("ep")
    assert sink.payloads() == ["b", "e", "d", "f", "a", "c", "g", "h"]
    assert d.shutdown(5)


def test_without_prioritization_jobs_go_in_arrival_order() -> None:
    """enable_prioritization=False sends first in, first out whatever the priority."""
    sink = Sink()
    d = make(sink, enable_prioritization=False)
    for i, priority in enumerate([0, 5, 1, 9]):
        d.add_job(DispatchJob("ep", i, priority=priority))
    d.process_batch_for_endpoint("ep")
    assert sink.payloads() == [0, 1, 2, 3]
    assert d.shutdown(5)


def test_priority_decides_which_jobs_make_the_size_triggered_batch() -> None:
    """With more jobs than fit, the high-priority ones go in the first batch, in priority order."""
    sink = Sink()
    d = make(sink, max_batch_size=4, max_concurrent_batches=1)
    gate = threading.Event()
    d.on("batch_started", lambda p: gate.wait(10))  # hold the first batch until all jobs are in
    for i in range(4):
        d.add_job(DispatchJob("ep", f"low{i}", priority=0))
    wait_for(lambda: d.get_batch_stats().active_batches_count == 1, message="the first batch taken")
    for i in range(3):
        d.add_job(DispatchJob("ep", f"mid{i}", priority=1))
    d.add_job(DispatchJob("ep", "top", priority=9))
    d.add_job(DispatchJob("ep", "low4", priority=0))
    gate.set()
    assert d.shutdown(10)
    batches = [[j.payload for j in jobs] for _ep, jobs, _t, _n in sink.calls]
    assert batches == [["low0", "low1", "low2", "low3"], ["top", "mid0", "mid1", "mid2"], ["low4"]]


# -- batching --------------------------------------------------------------------------------


def test_batches_never_mix_endpoints_nor_exceed_the_size() -> None:
    """Every batch holds jobs of one endpoint, at most max_batch_size, in arrival order within the batch."""
    sink = Sink()
    d = make(sink, max_batch_size=7, batch_timeout=0.02)
    expected: dict[str, list[int]] = {}
    for i in range(500):
        ep = f"ep{i % 13}"
        expected.setdefault(ep, []).append(i)
        d.add_job(DispatchJob(ep, i))
    assert d.shutdown(20)
    for endpoint_id, jobs, _t, _n in sink.calls:
        assert 1 <= len(jobs) <= 7
        assert {job.endpoint_id for job in jobs} == {endpoint_id}
        assert [job.payload for job in jobs] == sorted(job.payload for job in jobs)
    # Batches of one endpoint may be sent at the same time, so only each batch keeps the order.
    for ep, payloads in expected.items():
        assert sorted(sink.payloads(ep)) == payloads


def test_a_full_queue_is_sent_at_once() -> None:
    """An endpoint reaching max_batch_size goes at once, without waiting for batch_timeout."""
    sink = Sink()
    d = make(sink, max_batch_size=5, batch_timeout=60)
    for i in range(5):
        d.add_job(DispatchJob("ep", i))
    # The window is a minute long: a batch within wait_for's 10 s went by the size trigger.
    wait_for(lambda: sink.call_count() == 1, timeout=10, message="the size-triggered batch")
    assert sink.payloads() == [0, 1, 2, 3, 4]
    d.add_job(DispatchJob("ep", 5))  # below the size: waits for its window
    assert d.get_pending_job_count("ep") == 1
    assert d.shutdown(5)


def test_pending_jobs_go_when_batch_timeout_passes() -> None:
    """Below the size, an endpoint's jobs go together batch_timeout after the first one arrived."""
    sink = Sink()
    d = make(sink, max_batch_size=100, batch_timeout=0.3)
    t0 = time.monotonic()
    d.add_job(DispatchJob("a", 1))
    d.add_job(DispatchJob("a", 2))
    d.add_job(DispatchJob("b", 3))
    wait_for(lambda: sink.call_count() == 2, timeout=10, message="both endpoints' batches")
    for _ep, _jobs, sent_at, _n in sink.calls:
        assert sent_at - t0 >= 0.29  # not before the window closed
    assert sorted((ep, [j.payload for j in jobs]) for ep, jobs, _t, _n in sink.calls) == [("a", [1, 2]), ("b", [3])]
    assert d.shutdown(5)


# -- the concurrency limit -------------------------------------------------------------------


def test_over_the_limit_a_batch_is_skipped_and_its_jobs_stay_queued() -> None:
    """With max_concurrent_batches in flight, another batch is skipped (batch_skipped); it goes once one finishes."""
    blocker = Blocker()
    d = make(blocker, max_batch_size=2, max_concurrent_batches=2, batch_timeout=60)
    log = EventLog(d)
    for ep in ("a", "b", "c"):
        d.add_job(DispatchJob(ep, 1))
        d.add_job(DispatchJob(ep, 2))
    wait_for(lambda: blocker.count_inside() == 2, message="two batches in flight")
    wait_for(lambda: log.of("batch_skipped"), message="the third batch skipped")
    skipped = log.of("batch_skipped")[0]
    assert skipped["endpoint_id"] == "c"
    assert skipped["pending_jobs"] == 2
    assert skipped["reason"] == "max_concurrent_batches"
    assert skipped["max_concurrent_batches"] == 2
    stats = d.get_batch_stats()
    assert (stats.active_batches_count, stats.pending_jobs_count, d.get_pending_job_count("c")) == (2, 2, 2)

    # The synchronous path obeys the same limit, and reports the skip on the caller's thread.
    assert d.process_batch_for_endpoint("c") is None
    assert log.entries[-1][0] == "batch_skipped"
    assert log.entries[-1][2] == threading.current_thread().name
    assert d.process_all_batches() == []
    assert d.get_pending_job_count("c") == 2

    blocker.release.set()
    # Within wait_for's 10 s, not a 60 s window later: it went because capacity freed.
    wait_for(lambda: blocker.sink.call_count() == 3, timeout=10, message="the skipped batch after capacity freed")
    assert d.shutdown(5)
    assert sorted(blocker.sink.payloads()) == [1, 1, 1, 2, 2, 2]


def test_the_concurrency_limit_holds_under_load() -> None:
    """Many producers, sync callers and the background sender together never exceed max_concurrent_batches."""
    sink = Sink(latency=0.002)
    limit = 3
    d = make(sink, max_batch_size=5, batch_timeout=0.005, max_concurrent_batches=limit)
    stop = threading.Event()
    violations: list[BatchStats] = []

    def producer(seed: int) -> None:
        for i in range(600):
            d.add_job(DispatchJob(f"ep{(seed * 7 + i) % 40}", (seed, i)))

    def sync_caller() -> None:
        while not stop.is_set():
            d.process_all_batches()

    def watcher() -> None:
        while not stop.is_set():
            stats = d.get_batch_stats()
            if stats.active_batches_count > limit:
                violations.append(stats)

    producers = [threading.Thread(target=producer, args=(n,)) for n in range(6)]
    helpers = [threading.Thread(target=sync_caller) for _ in range(2)] + [threading.Thread(target=watcher)]
    for t in producers + helpers:
        t.start()
    for t in producers:
        t.join(30)
    wait_for(lambda: sink.delivered_count() == 3600, timeout=30, message="every job delivered")
    stop.set()
    for t in helpers:
        t.join(30)
    assert d.shutdown(10)
    assert violations == []
    assert sink.max_active == limit  # reached, never exceeded
    assert Counter(job.id for job in sink.delivered).most_common(1)[0][1] == 1


def test_the_limit_holds_during_the_shutdown_drain() -> None:
    """The drain at shutdown sends every endpoint's jobs, still at most max_concurrent_batches at once."""
    sink = Sink(latency=0.002)
    d = make(sink, max_batch_size=10, max_concurrent_batches=4, batch_timeout=60)
    for i in range(2000):
        d.add_job(DispatchJob(f"ep{i % 100}", i))
    assert d.shutdown(30)
    assert sink.max_active <= 4
    assert sorted(sink.payloads()) == list(range(2000))


# -- outcomes, retries, exhaustion -----------------------------------------------------------


def fast_retry(max_attempts: int = 1000) -> RetryPolicy:
    return RetryPolicy(max_attempts=max_attempts, backoff=Constant(0.0))


def test_only_failed_jobs_are_retried() -> None:
    """Per-job outcomes: None/True delivered, False/an exception failed; only the failed ones go again."""

    def outcome(ep: Hashable, jobs: list[DispatchJob]) -> list[object]:
        results: list[object] = []
        for job in jobs:
            if job.attempts > 1 or job.payload in (0, 1):
                results.append(None if job.payload == 0 else True)
            else:
                results.append(False if job.payload == 2 else ConnectionError(f"refused {job.payload}"))
        return results

    sink = Sink(outcome)
    d = make(sink, retry=fast_retry(), batch_timeout=60)  # only process_batch_for_endpoint takes batches
    log = EventLog(d)
    jobs = [DispatchJob("ep", i) for i in range(4)]
    for job in jobs:
        d.add_job(job)
    first = d.process_batch_for_endpoint("ep")
    assert first is not None
    assert (first.status, first.successful, first.failed, first.error) == ("failed", 2, 2, None)
    failed = log.of("batch_failed")[0]
    assert failed["failed"] == 2 and failed["retrying"] == 2 and failed["exhausted"] == 0
    assert failed["failed_job_ids"] == [jobs[2].id, jobs[3].id]
    assert [job.status for job in jobs[:2]] == ["delivered", "delivered"]
    assert isinstance(jobs[3].last_error, ConnectionError)
    assert "not delivered" in str(jobs[2].last_error)
    wait_for(lambda: d.get_pending_job_count("ep") == 2, message="the failed jobs queued again")
    d.process_batch_for_endpoint("ep")
    assert [j.payload for j in sink.calls[1][1]] == [2, 3]
    assert d.shutdown(5)
    assert [job.status for job in jobs] == ["delivered"] * 4
    assert [job.attempts for job in jobs] == [1, 1, 2, 2]
    assert Counter(job.id for job in sink.delivered) == Counter(job.id for job in jobs)


def test_a_raising_send_fails_and_retries_the_whole_batch() -> None:
    """send_batch raising fails every job of the batch; all of them are retried."""
    calls = []

    def outcome(ep: Hashable, jobs: list[DispatchJob]) -> None:
        calls.append(len(jobs))
        if len(calls) == 1:
            raise TimeoutError("endpoint timed out")

    sink = Sink(outcome)
    d = make(sink, retry=fast_retry(), batch_timeout=60)  # only process_batch_for_endpoint takes batches
    log = EventLog(d)
    for i in range(3):
        d.add_job(DispatchJob("ep", i))
    batch = d.process_batch_for_endpoint("ep")
    assert batch is not None and batch.status == "failed"
    assert isinstance(batch.error, TimeoutError) and (batch.successful, batch.failed) == (0, 3)
    assert isinstance(log.of("batch_failed")[0]["error"], TimeoutError)
    wait_for(lambda: d.get_pending_job_count("ep") == 3, message="the whole batch queued again")
    d.process_batch_for_endpoint("ep")
    assert calls == [3, 3]
    assert d.shutdown(5)
    assert calls == [3, 3]
    assert sorted(job.payload for job in sink.delivered) == [0, 1, 2]


@pytest.mark.parametrize(
    ("result", "needle"),
    [
        ([None], "returned 1 outcomes for a batch of 3 jobs; expected None or exactly 3"),
        ([None, None, None, None], "returned 4 outcomes for a batch of 3 jobs"),
        ([], "returned 0 outcomes for a batch of 3 jobs"),
        ("ok!", "returned 'ok!'"),
        (3, "returned 3"),
        ([None, "ok", None], "outcome 'ok' at index 1"),
        ([None, None, 200], "outcome 200 at index 2"),
    ],
)
def test_a_bad_result_fails_the_batch_with_a_clear_error(
    result: object, needle: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A result that is not one outcome per job fails the whole batch with an error naming the counts or value."""
    sink = Sink(lambda ep, jobs: result if jobs[0].attempts == 1 else None)  # type: ignore[arg-type,return-value]
    d = make(sink, retry=fast_retry(), batch_timeout=60)  # only process_batch_for_endpoint takes batches
    log = EventLog(d)
    for i in range(3):
        d.add_job(DispatchJob("ep", i))
    with caplog.at_level(logging.ERROR, logger="threaddispatch"):
        batch = d.process_batch_for_endpoint("ep")
    assert batch is not None and batch.status == "failed" and batch.failed == 3
    assert isinstance(batch.error, (TypeError, ValueError))
    assert needle in str(batch.error)
    assert needle in caplog.text
    assert log.of("batch_failed")[0]["error"] is batch.error
    assert log.of("batch_executed")[0]["failed"] == 3
    wait_for(lambda: d.get_pending_job_count("ep") == 3, message="the failed jobs queued again")
    d.process_batch_for_endpoint("ep")
    assert d.shutdown(10)
    assert sorted(j.payload for j in sink.delivered) == [0, 1, 2]


def test_a_result_that_breaks_when_read_fails_the_batch_not_the_dispatcher() -> None:
    """A result sequence that raises while being read fails the batch; its jobs are retried, none is lost."""

    class Broken(Sequence[object]):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, index: Any) -> Any:
            raise RuntimeError("cannot read outcome")

    sink = Sink(lambda ep, jobs: Broken() if jobs[0].attempts == 1 else None)
    d = make(sink, retry=fast_retry())
    for i in range(2):
        d.add_job(DispatchJob("ep", i))
    batch = d.process_batch_for_endpoint("ep")
    assert batch is not None and batch.status == "failed"
    assert isinstance(batch.error, RuntimeError)
    wait_for(lambda: d.get_pending_job_count("ep") == 2, message="both jobs queued again")
    d.process_batch_for_endpoint("ep")
    assert sorted(j.payload for j in sink.delivered) == [0, 1]
    assert d.shutdown(5)


def test_jobs_are_retried_until_max_attempts_then_exhausted() -> None:
    """A job that keeps failing is sent max_attempts times, then job_exhausted fires after batch_failed."""
    sink = Sink(lambda ep, jobs: [False] * len(jobs))
    d = make(sink, retry=fast_retry(), batch_timeout=0.01)
    log = EventLog(d)
    exhausted = threading.Event()
    d.on("job_exhausted", lambda p: exhausted.set())
    job = DispatchJob("ep", "x", max_attempts=4)
    d.add_job(job)
    assert exhausted.wait(10)
    assert [len(jobs) for _ep, jobs, _t, _n in sink.calls] == [1, 1, 1, 1]
    assert job.status == "exhausted" and job.attempts == 4
    payload = log.of("job_exhausted")[0]
    assert (payload["job_id"], payload["endpoint_id"], payload["attempts"], payload["job"]) == (job.id, "ep", 4, job)
    assert payload["error"] is job.last_error
    names = log.names()
    assert names.index("job_exhausted") > max(i for i, name in enumerate(names) if name == "batch_failed")
    last_failed = log.of("batch_failed")[-1]
    assert (last_failed["retrying"], last_failed["exhausted"]) == (0, 1)
    assert d.shutdown(5)  # exhausted before shutdown began: nothing pending was lost by it
    assert log.of("shutdown")[0]["exhausted_jobs"] == 0


def test_retry_policy_caps_attempts_and_retry_on_stops_at_once() -> None:
    """retry.max_attempts bounds a job that has none of its own; retry_on returning False exhausts at once,
    even a job whose own max_attempts would allow more."""
    sink = Sink(lambda ep, jobs: [ValueError("bad payload") if j.payload == "bad" else False for j in jobs])
    policy = RetryPolicy(max_attempts=2, backoff=Constant(0.0), retry_on=lambda e: not isinstance(e, ValueError))
    d = make(sink, retry=policy, batch_timeout=0.01)
    exhausted: list[DispatchJob] = []
    d.on("job_exhausted", lambda p: exhausted.append(p["job"]))
    flaky = DispatchJob("ep", "flaky")
    bad = DispatchJob("ep", "bad", max_attempts=10)
    d.add_job(flaky)
    d.add_job(bad)
    wait_for(lambda: len(exhausted) == 2, message="both jobs exhausted")
    assert (bad.attempts, flaky.attempts) == (1, 2)
    assert d.shutdown(5)


def test_default_retry_is_exponential_from_one_second() -> None:
    """Without retry=, a failed job waits 1 s before its first retry, 2 s before its second."""
    d = make(Sink(lambda ep, jobs: [False] * len(jobs)))
    assert d.retry.backoff == Exponential(initial=1.0)  # the shared backoff, not a second one
    assert d.retry.delay(1) == 1.0 and d.retry.delay(2) == 2.0 and d.retry.delay(3) == 4.0
    job = DispatchJob("ep", 1, max_attempts=5)
    d.add_job(job)
    d.process_batch_for_endpoint("ep")
    assert job.status == "retrying"
    assert job.next_retry_at is not None and job.last_attempt_at is not None
    assert job.next_retry_at - job.last_attempt_at == pytest.approx(1.0, abs=0.05)
    assert d.get_batch_stats().retrying_jobs_count == 1
    assert not d.shutdown(5)  # the retry was cancelled
    assert status(job) == "cancelled"


def test_retries_follow_the_backoff() -> None:
    """The gap between a job's attempts is the backoff's delay for that attempt (plus at most a window)."""
    delays = {1: 0.1, 2: 0.3, 3: 0.2}
    asked: list[int] = []

    def backoff(attempt: int) -> float:
        asked.append(attempt)
        return delays[attempt]

    window = 0.01
    sink = Sink(lambda ep, jobs: [False] * len(jobs))
    d = make(sink, retry=RetryPolicy(max_attempts=100, backoff=backoff), batch_timeout=window)
    done = threading.Event()
    d.on("job_exhausted", lambda p: done.set())
    d.add_job(DispatchJob("ep", "x", max_attempts=4))
    assert done.wait(20)
    assert asked == [1, 2, 3]
    times = [sent_at for _ep, _jobs, sent_at, _n in sink.calls]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    for attempt, gap in enumerate(gaps, start=1):
        assert gap >= delays[attempt] - 0.005, (attempt, gap)  # never before the backoff's delay
    assert d.shutdown(5)


def test_a_retried_job_goes_with_its_endpoints_next_batch() -> None:
    """A retried job rejoins its endpoint's queue by priority and goes with the jobs already waiting."""
    sink = Sink(lambda ep, jobs: [False if j.payload == "retry" and j.attempts == 1 else None for j in jobs])
    d = make(sink, retry=RetryPolicy(backoff=Constant(0.0)), batch_timeout=60)
    d.add_job(DispatchJob("ep", "retry", priority=1))
    d.process_batch_for_endpoint("ep")
    d.add_job(DispatchJob("ep", "new", priority=0))
    wait_for(lambda: d.get_pending_job_count("ep") == 2, message="the retry back in the queue")
    d.process_batch_for_endpoint("ep")
    assert [[j.payload for j in jobs] for _e, jobs, _t, _n in sink.calls] == [["retry"], ["retry", "new"]]
    assert d.shutdown(5)


# -- synchronous processing ------------------------------------------------------------------


def test_process_batch_for_endpoint_returns_the_batch_record() -> None:
    """The synchronous call sends on the caller's thread and returns id, endpoint, jobs, status and times."""
    sink = Sink()
    d = make(sink, max_batch_size=10)
    jobs = [DispatchJob("ep", i) for i in range(5)]
    for job in jobs:
        d.add_job(job)
    before = time.time()
    batch = d.process_batch_for_endpoint("ep")
    after = time.time()
    assert isinstance(batch, WebhookBatch)
    assert batch.endpoint_id == "ep"
    assert batch.jobs == tuple(jobs)
    assert batch.status == "completed" and (batch.successful, batch.failed, batch.error) == (5, 0, None)
    assert batch.started_at is not None and batch.completed_at is not None
    assert before <= batch.created_at <= batch.started_at <= batch.completed_at <= after
    assert sink.calls[0][3] == threading.current_thread().name
    assert d.get_pending_job_count("ep") == 0
    d.add_job(DispatchJob("ep", 5))
    second = d.process_batch_for_endpoint("ep")
    assert second is not None and second.id != batch.id and len(second.jobs) == 1
    assert d.process_batch_for_endpoint("ep") is None
    assert d.process_batch_for_endpoint("nobody") is None
    assert d.shutdown(5)


def test_process_all_batches_sends_one_batch_per_endpoint() -> None:
    """process_all_batches sends one batch for each endpoint with jobs and returns their records."""
    sink = Sink()
    d = make(sink, max_batch_size=4)
    for i in range(3):
        d.add_job(DispatchJob("big", i))
    d.add_job(DispatchJob("small", "s"))
    batches = d.process_all_batches()
    assert sorted((b.endpoint_id, len(b.jobs), b.status) for b in batches) == [
        ("big", 3, "completed"),
        ("small", 1, "completed"),
    ]
    assert d.get_batch_stats().pending_jobs_count == 0
    d.add_job(DispatchJob("big", 3))
    assert [b.endpoint_id for b in d.process_all_batches()] == ["big"]
    assert d.process_all_batches() == []
    assert d.shutdown(5)


def test_an_interrupt_in_a_synchronous_send_loses_no_job() -> None:
    """KeyboardInterrupt from send_batch reaches the caller; the batch's jobs are retried, not lost."""
    state = {"interrupt": True}

    def outcome(ep: Hashable, jobs: list[DispatchJob]) -> None:
        if state.pop("interrupt", False):
            raise KeyboardInterrupt

    sink = Sink(outcome)
    d = make(sink, retry=fast_retry(), batch_timeout=60)  # only process_batch_for_endpoint takes batches
    d.add_job(DispatchJob("ep", 1))
    with pytest.raises(KeyboardInterrupt):
        d.process_batch_for_endpoint("ep")
    wait_for(lambda: d.get_pending_job_count("ep") == 1, message="the interrupted job queued again")
    d.process_batch_for_endpoint("ep")
    assert d.shutdown(5)
    assert [j.payload for j in sink.delivered] == [1]


# -- stats -----------------------------------------------------------------------------------


def test_stats_add_up_at_every_step() -> None:
    """Pending, active, endpoints, average and retrying counts match the queues after each step."""
    blocker = Blocker()
    fail_once = {"ep-b"}

    def send(ep: Hashable, jobs: list[DispatchJob]) -> list[object] | None:
        blocker(ep, jobs)
        if ep in fail_once:
            fail_once.discard(ep)
            return [False] + [None] * (len(jobs) - 1)
        return None

    d = make(send, max_batch_size=10, retry=RetryPolicy(backoff=Constant(60)))
    eps = ("ep-a", "ep-b", "ep-c")
    empty = BatchStats(0, 0, 0, 0.0, 0)
    assert d.get_batch_stats() == empty

    for i, ep in enumerate(["ep-a", "ep-a", "ep-b", "ep-a", "ep-b", "ep-c"]):
        d.add_job(DispatchJob(ep, i))
        stats_add_up(d.get_batch_stats(), d, eps)
    assert d.get_batch_stats() == BatchStats(6, 0, 3, 2.0, 0)
    assert [d.get_pending_job_count(ep) for ep in eps] == [3, 2, 1]

    worker = threading.Thread(target=d.process_batch_for_endpoint, args=("ep-b",))
    worker.start()
    wait_for(lambda: blocker.count_inside() == 1, message="ep-b's batch in flight")
    assert d.get_batch_stats() == BatchStats(4, 1, 2, 2.0, 0)
    stats_add_up(d.get_batch_stats(), d, eps)

    blocker.release.set()
    worker.join(10)
    # One of ep-b's two jobs failed and waits 60 s for its retry.
    assert d.get_batch_stats() == BatchStats(4, 0, 2, 2.0, 1)
    assert d.get_pending_job_count("ep-b") == 0

    assert len(d.process_all_batches()) == 2
    assert d.get_batch_stats() == BatchStats(0, 0, 0, 0.0, 1)
    stats_add_up(d.get_batch_stats(), d, eps)
    assert not d.shutdown(5)  # the retry is cancelled
    assert d.get_batch_stats() == empty


def test_stats_stay_consistent_while_jobs_flow() -> None:
    """Every snapshot taken under load is internally consistent and within the concurrency limit."""
    sink = Sink(latency=0.001)
    d = make(sink, max_batch_size=8, batch_timeout=0.005, max_concurrent_batches=4)
    stop = threading.Event()
    problems: list[str] = []

    def watcher() -> None:
        while not stop.is_set():
            stats = d.get_batch_stats()
            try:
                stats_add_up(stats, d)
                assert stats.active_batches_count <= 4
            except AssertionError as error:
                problems.append(f"{stats}: {error}")

    watchers = [threading.Thread(target=watcher) for _ in range(2)]
    for t in watchers:
        t.start()
    for i in range(3000):
        d.add_job(DispatchJob(f"ep{i % 50}", i))
    wait_for(lambda: sink.delivered_count() == 3000, timeout=30, message="all delivered")
    stop.set()
    for t in watchers:
        t.join(10)
    assert problems == []
    # The sink counts a job delivered inside send_batch, before its batch settles: wait for that.
    wait_for(lambda: d.get_batch_stats() == BatchStats(0, 0, 0, 0.0, 0), message="the last batch settled")
    assert d.shutdown(5)


# -- events ----------------------------------------------------------------------------------


def test_events_fire_in_order_on_the_thread_doing_the_work() -> None:
    """job_added (caller) precedes its batch; each batch fires started, executed, completed/failed on one thread."""
    sink = Sink(lambda ep, jobs: [False if j.attempts == 1 and j.payload % 4 == 0 else None for j in jobs])
    d = make(sink, max_batch_size=5, batch_timeout=0.01, retry=fast_retry(), max_concurrent_batches=3)
    log = EventLog(d)
    jobs = [DispatchJob(f"ep{i % 7}", i) for i in range(200)]
    for job in jobs:
        d.add_job(job)
    wait_for(lambda: sink.delivered_count() == 200, timeout=20, message="every job, retries included")
    assert d.shutdown(20)

    me = threading.current_thread().name
    entries = list(log.entries)
    added_at = {p["job_id"]: i for i, (name, p, t) in enumerate(entries) if name == "job_added"}
    assert set(added_at) == {job.id for job in jobs}
    assert all(t == me for name, _p, t in entries if name in ("job_added", "shutdown"))
    per_batch: dict[str, list[tuple[int, str, str]]] = {}
    for i, (name, p, t) in enumerate(entries):
        if name.startswith("batch_") and name != "batch_skipped":
            per_batch.setdefault(p["batch_id"], []).append((i, name, t))
    for batch_id, seq in per_batch.items():
        names = [name for _i, name, _t in seq]
        assert names in (
            ["batch_started", "batch_executed", "batch_completed"],
            ["batch_started", "batch_executed", "batch_failed"],
        ), batch_id
        assert len({t for _i, _n, t in seq}) == 1  # all on one thread
        assert seq[0][2].startswith(f"threaddispatch-{d.name}-send-")
    for i, (name, p, _t) in enumerate(entries):
        if name == "batch_started":
            assert all(added_at[job_id] < i for job_id in p["job_ids"])
    # A retried job's second batch starts after the report of its first.
    reported_at: dict[str, int] = {}
    for i, (name, p, _t) in enumerate(entries):
        if name == "batch_failed":
            for job_id in p["failed_job_ids"]:
                reported_at[job_id] = i
        if name == "batch_started":
            for job_id in p["job_ids"]:
                if job_id in reported_at:
                    assert reported_at.pop(job_id) < i
    assert log.names()[-1] == "shutdown"


def test_sync_calls_fire_batch_events_on_the_caller() -> None:
    """process_batch_for_endpoint fires its batch's events on the calling thread, before it returns."""
    d = make(Sink())
    log = EventLog(d)
    d.add_job(DispatchJob("ep", 1))
    batch = d.process_batch_for_endpoint("ep")
    assert batch is not None
    me = threading.current_thread().name
    assert [(name, t) for name, _p, t in log.entries] == [
        ("job_added", me),
        ("batch_started", me),
        ("batch_executed", me),
        ("batch_completed", me),
    ]
    started, executed, completed = (p for name, p, _t in log.entries[1:])
    assert started["batch_id"] == executed["batch_id"] == completed["batch_id"] == batch.id
    assert started["job_count"] == 1 and started["batch"] is batch
    assert (executed["total"], executed["successful"], executed["failed"]) == (1, 1, 0)
    added = log.entries[0][1]
    assert (added["endpoint_id"], added["priority"], added["queue_size"]) == ("ep", 0, 1)
    assert d.shutdown(5)


def test_failing_listeners_never_break_delivery(caplog: pytest.LogCaptureFixture) -> None:
    """Listeners that raise on every event are logged; jobs are still delivered and retried."""
    sink = Sink(lambda ep, jobs: [False if j.attempts == 1 and j.payload == 0 else None for j in jobs])
    d = make(sink, max_batch_size=2, batch_timeout=0.01, retry=fast_retry(), max_concurrent_batches=1)

    def broken(payload: dict[str, Any]) -> None:
        raise RuntimeError("listener bug")

    for event in EVENTS:
        d.on(event, broken)
    log = EventLog(d)  # added after the broken ones: still called
    with caplog.at_level(logging.ERROR, logger="threaddispatch.events"):
        for i in range(10):
            d.add_job(DispatchJob(f"ep{i % 3}", i))
        d.process_all_batches()
        wait_for(lambda: sink.delivered_count() == 10, message="every job, the retry included")
        assert d.shutdown(10)
    assert sorted(j.payload for j in sink.delivered) == list(range(10))
    assert "listener bug" in caplog.text
    assert len(log.of("job_added")) == 10 and log.of("batch_failed") and log.of("shutdown")


def test_on_once_off_emit_remove_all_listeners() -> None:
    """The emitter API: once fires once, off and remove_all_listeners stop listeners, emit calls them here."""
    d = make(Sink())
    seen: list[tuple[str, Any]] = []

    def on_added(p: dict[str, Any]) -> None:
        seen.append(("on", p["job_id"]))

    def once_added(p: dict[str, Any]) -> None:
        seen.append(("once", p["job_id"]))

    remove = d.on("job_added", on_added)
    d.once("job_added", once_added)
    a = d.add_job(DispatchJob("ep", 1))
    b = d.add_job(DispatchJob("ep", 2))
    assert seen == [("on", a), ("once", a), ("on", b)]
    assert remove() is True
    assert d.off("job_added", on_added) is False
    d.add_job(DispatchJob("ep", 3))
    assert len(seen) == 3
    assert d.emit("batch_skipped", {"endpoint_id": "x"}) is False
    d.on("batch_skipped", lambda p: seen.append(("emit", p["endpoint_id"])))
    assert d.emit("batch_skipped", {"endpoint_id": "x"}) is True
    assert seen[-1] == ("emit", "x")
    d.on("batch_completed", print)
    d.remove_all_listeners("batch_skipped")
    assert d.emit("batch_skipped", {}) is False
    d.remove_all_listeners()
    assert d.emit("batch_completed", {}) is False
    assert d.shutdown(5)


# -- shutdown --------------------------------------------------------------------------------


def test_shutdown_sends_every_pending_job_and_reports() -> None:
    """shutdown sends every queued job (beyond the size and the limit), emits shutdown, returns True."""
    sink = Sink()
    d = make(sink, max_batch_size=50, max_concurrent_batches=2, batch_timeout=60)
    log = EventLog(d)
    for i in range(250):
        d.add_job(DispatchJob(f"ep{i % 9}", i))
    assert d.get_batch_stats().pending_jobs_count == 250  # below the size: nothing went yet
    assert d.shutdown(20) is True
    assert sorted(sink.payloads()) == list(range(250))
    assert sink.call_count() == 9
    assert log.of("shutdown") == [
        {
            "delivered": True,
            "pending_jobs": 0,
            "active_batches": 0,
            "cancelled_retries": 0,
            "cancelled_jobs": [],
            "exhausted_jobs": 0,
        }
    ]
    assert d.get_batch_stats() == BatchStats(0, 0, 0, 0.0, 0)


def test_shutdown_waits_for_active_batches() -> None:
    """A batch in flight when shutdown starts is waited for; shutdown returns after it finished."""
    blocker = Blocker()
    d = make(blocker, max_batch_size=1)
    d.add_job(DispatchJob("ep", 1))
    wait_for(lambda: blocker.count_inside() == 1, message="the batch in flight")
    result: list[bool] = []
    closer = threading.Thread(target=lambda: result.append(d.shutdown(20)))
    closer.start()
    closer.join(0.1)
    assert closer.is_alive() and result == []
    blocker.release.set()
    closer.join(20)
    assert result == [True]
    assert blocker.sink.payloads() == [1]


def test_shutdown_cancels_pending_retries_and_reports_them(caplog: pytest.LogCaptureFixture) -> None:
    """Retries not yet due at shutdown are cancelled: the jobs are reported undelivered, shutdown returns False."""
    sink = Sink(lambda ep, jobs: [False if j.payload == "fails" else None for j in jobs])
    d = make(sink, retry=RetryPolicy(backoff=Constant(60)))
    log = EventLog(d)
    failing = DispatchJob("ep", "fails")
    d.add_job(failing)
    d.add_job(DispatchJob("ep", "fine"))
    d.process_batch_for_endpoint("ep")
    d.add_job(DispatchJob("ep2", "pending"))
    assert d.get_batch_stats().retrying_jobs_count == 1
    with caplog.at_level(logging.WARNING, logger="threaddispatch"):
        assert d.shutdown(5) is False
    assert failing.status == "cancelled"
    assert failing.id in caplog.text and "not delivered" in caplog.text
    (report,) = log.of("shutdown")
    assert report["delivered"] is False
    assert report["cancelled_retries"] == 1 and report["cancelled_jobs"] == [failing]
    assert report["pending_jobs"] == 0 and report["active_batches"] == 0
    assert sorted(sink.payloads()) == ["fails", "fine", "pending"]  # the pending job was still sent


def test_a_failure_during_the_drain_is_reported() -> None:
    """A job that fails during the shutdown drain cannot be retried: it is cancelled, shutdown returns False."""
    sink = Sink(lambda ep, jobs: [False] * len(jobs))
    d = make(sink, retry=fast_retry())
    log = EventLog(d)
    job = DispatchJob("ep", 1, max_attempts=1)
    retried = DispatchJob("ep", 2, max_attempts=5)
    d.add_job(job)
    d.add_job(retried)
    assert d.shutdown(5) is False
    report = log.of("shutdown")[0]
    assert report["exhausted_jobs"] == 1 and report["cancelled_jobs"] == [retried]
    assert (job.status, retried.status) == ("exhausted", "cancelled")


def test_shutdown_returns_within_its_timeout_with_a_hung_sender() -> None:
    """A send that never returns does not stretch shutdown past its timeout; it reports the batch in flight."""
    blocker = Blocker()
    d = make(blocker, max_batch_size=1, max_concurrent_batches=1)
    log = EventLog(d)
    d.add_job(DispatchJob("ep", 1))
    d.add_job(DispatchJob("ep", 2))
    wait_for(lambda: blocker.count_inside() == 1, message="the hung send")
    assert d.shutdown(0.3) is False
    assert blocker.count_inside() == 1  # it returned while the send still hangs
    report = log.of("shutdown")[0]
    assert report["delivered"] is False and report["active_batches"] >= 1
    with pytest.raises(DispatcherClosedError):
        d.add_job(DispatchJob("ep", 3))
    blocker.release.set()  # the sender returns later: its jobs are still delivered, once
    assert d.shutdown(10) is True  # a later call waits again and sees everything delivered
    assert sorted(blocker.sink.payloads()) == [1, 2]
    assert len(log.of("shutdown")) == 1


def test_shutdown_is_idempotent_and_work_after_it_raises() -> None:
    """A second shutdown returns the same and emits nothing; add and process calls raise DispatcherClosedError."""
    d = make(Sink())
    log = EventLog(d)
    d.add_job(DispatchJob("ep", 1))
    assert d.shutdown(5) is True
    assert d.shutdown(5) is True
    assert d.closed
    assert len(log.of("shutdown")) == 1
    job = DispatchJob("ep", 2)
    with pytest.raises(DispatcherClosedError, match="shut down"):
        d.add_job(job)
    assert job.status == "new"  # not accepted: it may go to another dispatcher
    with pytest.raises(DispatcherClosedError):
        d.process_batch_for_endpoint("ep")
    with pytest.raises(DispatcherClosedError):
        d.process_all_batches()
    assert d.get_batch_stats() == BatchStats(0, 0, 0, 0.0, 0)
    assert "shut down" in repr(d)


def test_concurrent_shutdown_calls_agree() -> None:
    """Several threads shutting down at once all wait for the drain and one shutdown event fires."""
    sink = Sink(latency=0.001)
    d = make(sink, max_batch_size=5)
    log = EventLog(d)
    for i in range(200):
        d.add_job(DispatchJob(f"ep{i % 20}", i))
    results: list[bool] = []
    closers = [threading.Thread(target=lambda: results.append(d.shutdown(20))) for _ in range(4)]
    for t in closers:
        t.start()
    for t in closers:
        t.join(30)
    assert results == [True] * 4
    assert len(log.of("shutdown")) == 1
    assert sorted(sink.payloads()) == list(range(200))


def test_shutdown_from_inside_a_send_does_not_deadlock() -> None:
    """shutdown called by send_batch itself starts the drain and returns False instead of waiting for itself."""
    results: list[bool] = []
    holder: list[EndpointBatchDispatcher] = []

    def send(ep: Hashable, jobs: list[DispatchJob]) -> None:
        if not results:
            results.append(holder[0].shutdown(None))  # waiting for its own batch would never end

    d = make(send)
    holder.append(d)
    d.add_job(DispatchJob("ep", 1))
    d.add_job(DispatchJob("ep2", 2))
    d.process_batch_for_endpoint("ep")
    assert results == [False]
    assert d.shutdown(5) is True  # the drain finished: ep2's job went


def test_adds_racing_shutdown_are_either_refused_or_delivered() -> None:
    """A job add_job accepted is delivered even when shutdown runs at the same moment; job_added means accepted."""
    for round_ in range(5):
        sink = Sink()
        d = make(sink, max_batch_size=7, batch_timeout=0.005)
        announced: set[str] = set()
        lock = threading.Lock()

        def on_added(p: dict[str, Any], announced: set[str] = announced) -> None:
            with lock:
                announced.add(p["job_id"])

        if round_ % 2:
            d.on("job_added", on_added)  # the announced path on odd rounds
        accepted: list[str] = []
        refused: list[DispatchJob] = []

        def producer(n: int, d: EndpointBatchDispatcher = d, accepted: list[str] = accepted) -> None:
            for i in range(400):
                job = DispatchJob(f"ep{i % 11}", (n, i))
                try:
                    accepted.append(d.add_job(job))
                except DispatcherClosedError:
                    assert job.status == "new"
                    refused.append(job)

        producers = [threading.Thread(target=producer, args=(n,)) for n in range(4)]
        for t in producers:
            t.start()
        wait_for(functools.partial(lambda sink: sink.call_count() > 3, sink), message="some sends before shutdown")
        assert d.shutdown(20)
        for t in producers:
            t.join(20)
        delivered = Counter(job.id for job in sink.delivered)
        assert set(delivered) == set(accepted)
        assert max(delivered.values()) == 1
        if round_ % 2:
            assert announced == set(accepted)
        assert len(accepted) + len(refused) == 1600


def test_context_manager_shuts_down() -> None:
    """Leaving a with block shuts the dispatcher down, sending what is pending."""
    sink = Sink()
    with EndpointBatchDispatcher(sink, batch_timeout=60) as d:
        d.add_job(DispatchJob("ep", 1))
    assert d.closed
    assert sink.payloads() == [1]


# -- many threads, many endpoints ------------------------------------------------------------


def test_many_producers_and_endpoints_lose_nothing() -> None:
    """16 producers x 500 endpoints with failures and retries: every job is delivered exactly once."""
    rng_lock = threading.Lock()
    rng = random.Random(1234)

    def outcome(ep: Hashable, jobs: list[DispatchJob]) -> list[object]:
        # A job fails (an exception or False) one time in four on its first two attempts.
        results: list[object] = []
        for job in jobs:
            with rng_lock:
                draw = rng.random()
            if job.attempts >= 3 or draw >= 0.25:
                results.append(True)
            else:
                results.append(ConnectionError("flaky") if draw < 0.2 else False)
        return results

    sink = Sink(outcome)
    retry = RetryPolicy(backoff=Constant(0.005))
    d = make(sink, max_batch_size=20, batch_timeout=0.01, max_concurrent_batches=6, retry=retry)
    exhausted: list[str] = []
    d.on("job_exhausted", lambda p: exhausted.append(p["job_id"]))
    all_jobs: list[DispatchJob] = []
    lock = threading.Lock()

    def producer(n: int) -> None:
        mine = []
        for i in range(1000):
            job = DispatchJob(f"ep{(n * 131 + i * 7) % 500}", (n, i), priority=i % 3)
            d.add_job(job)
            mine.append(job)
        with lock:
            all_jobs.extend(mine)

    producers = [threading.Thread(target=producer, args=(n,)) for n in range(16)]
    for t in producers:
        t.start()
    for t in producers:
        t.join(60)
    wait_for(lambda: sink.delivered_count() == 16_000, timeout=60, message="every job delivered")
    assert d.shutdown(20)
    assert exhausted == []
    delivered = Counter(job.id for job in sink.delivered)
    assert len(delivered) == 16_000 and max(delivered.values()) == 1
    assert all(job.status == "delivered" for job in all_jobs)
    for ep, jobs, _t, _n in sink.calls:
        assert len(jobs) <= 20 and all(job.endpoint_id == ep for job in jobs)
    assert sink.max_active <= 6


# -- threads, collection, fork ---------------------------------------------------------------


def test_an_unreferenced_dispatcher_is_collected_and_drains() -> None:
    """A dispatcher nobody references is garbage-collected; its pending jobs are still sent and its threads leave."""
    sink = Sink()
    d = EndpointBatchDispatcher(sink, max_batch_size=3, batch_timeout=60, name="orphan")
    for i in range(7):
        d.add_job(DispatchJob(f"ep{i % 2}", i))
    wait_for(lambda: sink.call_count() >= 1, message="the full batch")  # threads are running
    d.on("batch_completed", lambda p: None)
    ref = weakref.ref(d)
    del d
    gc.collect()
    assert ref() is None
    wait_for(lambda: sorted(sink.payloads()) == list(range(7)), message="the drain after collection")
    wait_for(lambda: not [t for t in live_dispatch_threads() if t.name.startswith("threaddispatch-orphan")])


def test_collecting_on_a_thread_that_holds_the_engine_lock_does_not_deadlock() -> None:
    """A dispatcher in a reference cycle may be collected on any thread, even one holding the engine's lock."""
    sink = Sink()
    d = EndpointBatchDispatcher(sink, batch_timeout=60, name="cyclic")
    d.add_job(DispatchJob("ep", 1))
    vars(d)["myself"] = d  # a reference cycle: only the cyclic collector can free it
    engine = d._core.engine
    ref = weakref.ref(d)
    del d
    with engine._lock:  # as the engine's worker is while it allocates, when a collection may start
        gc.collect()
        assert ref() is None
    wait_for(lambda: sink.payloads() == [1], message="the drain after collection")
    wait_for(lambda: not [t for t in live_dispatch_threads() if t.name.startswith("threaddispatch-cyclic")])


def run_script(body: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(body)], capture_output=True, text=True, timeout=60, check=False, env=env
    )


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_starts_clean() -> None:
    """The child of a fork has no pending job and works on its own; the parent's jobs go once, from the parent."""
    result = run_script(
        """
        import os
        from threaddispatch.endpoint import BatchStats, DispatchJob, EndpointBatchDispatcher
        sent = []
        d = EndpointBatchDispatcher(lambda ep, jobs: sent.extend(j.payload for j in jobs), batch_timeout=60)
        for i in range(5):
            d.add_job(DispatchJob("ep", i))
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            ok = d.get_batch_stats() == BatchStats(0, 0, 0, 0.0, 0)
            d.add_job(DispatchJob("ep", "child"))
            ok = ok and [b.endpoint_id for b in d.process_all_batches()] == ["ep"]
            ok = ok and d.shutdown(5) and sent == ["child"]
            os.write(write_end, DispatchJob("ep", 0).id.encode())  # ids must not repeat the parent's
            os._exit(0 if ok else 3)
        os.close(write_end)
        child_id = os.read(read_end, 100).decode()
        _pid, status = os.waitpid(pid, 0)
        parent_ids = {DispatchJob("ep", 0).id for _ in range(3)}
        print("child exit", os.waitstatus_to_exitcode(status))
        print("ids distinct", child_id not in parent_ids and child_id[:14] != DispatchJob("ep", 0).id[:14])
        print("parent", d.shutdown(5), sent)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "child exit 0" in result.stdout
    assert "ids distinct True" in result.stdout
    assert "parent True [0, 1, 2, 3, 4]" in result.stdout


def test_a_script_that_just_ends_still_sends_its_jobs() -> None:
    """At interpreter exit pending jobs are sent; a retry still waiting is reported as not delivered."""
    result = run_script(
        """
        import atexit, logging, sys
        from threaddispatch import Constant, RetryPolicy
        from threaddispatch.endpoint import DispatchJob, EndpointBatchDispatcher
        logging.basicConfig(level=logging.WARNING)
        sent = []

        def send(ep, jobs):
            sent.extend(j.payload for j in jobs)
            return [j.payload != "flaky" for j in jobs]

        atexit.register(lambda: sys.stdout.write(f"sent={sorted(map(str, sent))}\\n"))  # runs after the drain
        d = EndpointBatchDispatcher(send, batch_timeout=60, retry=RetryPolicy(backoff=Constant(60)))
        d.add_job(DispatchJob("ep", "flaky", id="flaky-job"))
        d.process_all_batches()
        for i in range(30):
            d.add_job(DispatchJob(f"ep{i % 4}", i))
        """
    )
    assert result.returncode == 0, result.stderr
    expected = sorted(["flaky", *map(str, range(30))])
    assert f"sent={expected}" in result.stdout
    assert "flaky-job" in result.stderr and "not delivered" in result.stderr


def test_close_is_the_shared_closing_shutdown_without_a_default_limit() -> None:
    """The face closes through the shared Closing mixin: close() drains like shutdown(), idempotent."""
    from threaddispatch._lifecycle import Closing

    sent: list[str] = []
    d = EndpointBatchDispatcher(lambda endpoint_id, jobs: sent.extend(job.id for job in jobs), batch_timeout=60)
    assert isinstance(d, Closing)
    job = DispatchJob("ep", "x")
    d.add_job(job)
    assert d.close(5) is True
    assert d.closed and sent == [job.id]
    assert d.close(5) is True and d.shutdown(5) is True
    with pytest.raises(ConfigurationError, match="timeout"):
        d.close(-1)
