"""EndpointBatchDispatcher against k-msg's BatchDispatcher: the error events, scheduled_at, max_attempts."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Hashable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from threaddispatch import ConfigurationError, Constant, RetryPolicy
from threaddispatch.endpoint import EVENTS, DispatchJob, EndpointBatchDispatcher
from threaddispatch.errors import QueueFullError
from threaddispatch.testing import wait_for

pytestmark = pytest.mark.timeout(60)


class Recorder:
    """A send_batch answering with ``outcome(jobs)``; records (payloads, time.time()) per call."""

    def __init__(self, outcome: Any = None) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[list[Any], float]] = []
        self.outcome = outcome

    def __call__(self, _endpoint_id: Hashable, jobs: list[DispatchJob]) -> Any:
        with self.lock:
            self.calls.append(([job.payload for job in jobs], time.time()))
        return None if self.outcome is None else self.outcome(jobs)

    def count(self) -> int:
        with self.lock:
            return len(self.calls)


class Events:
    """Records every event as (name, payload), in emission order."""

    def __init__(self, dispatcher: EndpointBatchDispatcher) -> None:
        self.lock = threading.Lock()
        self.entries: list[tuple[str, dict[str, Any]]] = []
        for event in EVENTS:
            dispatcher.on(event, self._listener(event))

    def _listener(self, event: str) -> Any:
        def record(payload: dict[str, Any]) -> None:
            with self.lock:
                self.entries.append((event, payload))

        return record

    def of(self, event: str) -> list[dict[str, Any]]:
        with self.lock:
            return [payload for name, payload in self.entries if name == event]

    def names(self) -> list[str]:
        with self.lock:
            return [name for name, _ in self.entries]


def make(send: Any, **kwargs: Any) -> EndpointBatchDispatcher:
    kwargs.setdefault("batch_timeout", 60.0)  # only process_* sends, unless a test says otherwise
    return EndpointBatchDispatcher(send, **kwargs)


def status(job: DispatchJob) -> str:
    return job.status


# -- batch_execution_error -------------------------------------------------------------------


def test_a_raising_send_fires_batch_execution_error() -> None:
    """send_batch raising: batch_execution_error (batch id, endpoint, the exception) after batch_executed."""
    error = ConnectionError("endpoint down")

    def send(_endpoint_id: Hashable, _jobs: list[DispatchJob]) -> None:
        raise error

    d = make(send, retry=RetryPolicy(max_attempts=1))
    events = Events(d)
    jobs = [DispatchJob("ep", i) for i in range(2)]
    for job in jobs:
        d.add_job(job)
    batch = d.process_batch_for_endpoint("ep")
    assert batch is not None
    (payload,) = events.of("batch_execution_error")
    assert payload == {"batch_id": batch.id, "endpoint_id": "ep", "error": error, "job_count": 2, "batch": batch}
    names = [name for name in events.names() if name.startswith("batch_")]
    assert names == ["batch_started", "batch_executed", "batch_execution_error", "batch_failed"]
    assert [status(job) for job in jobs] == ["exhausted", "exhausted"]
    assert d.shutdown(5)  # exhausted before shutdown began


def test_a_bad_result_fires_batch_execution_error_and_a_partial_failure_does_not() -> None:
    """A result of the wrong length fails the batch with an error (the event fires); per-job failures do not."""
    d = make(Recorder(lambda jobs: [None] * (len(jobs) + 1)), retry=RetryPolicy(max_attempts=1))
    events = Events(d)
    d.add_job(DispatchJob("ep", 1))
    d.process_batch_for_endpoint("ep")
    (payload,) = events.of("batch_execution_error")
    assert isinstance(payload["error"], ValueError) and "2 outcomes" in str(payload["error"])
    d.shutdown(5)

    partial = make(Recorder(lambda jobs: [False] * len(jobs)), retry=RetryPolicy(max_attempts=1))
    events = Events(partial)
    partial.add_job(DispatchJob("ep", 1))
    partial.process_batch_for_endpoint("ep")
    assert len(events.of("batch_failed")) == 1
    assert events.of("batch_execution_error") == []
    partial.shutdown(5)


# -- requeue_error ---------------------------------------------------------------------------


def test_a_requeue_failure_fires_requeue_error_and_exhausts_the_job(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed job whose retry cannot be scheduled: requeue_error, then job_exhausted; never lost or stuck."""
    d = make(Recorder(lambda jobs: [False] * len(jobs)), retry=RetryPolicy(max_attempts=5, backoff=Constant(0.0)))
    events = Events(d)
    broken = RuntimeError("the retry schedule is broken")

    def put_later(_item: object, _key: Hashable, _delay: float) -> None:
        raise broken

    monkeypatch.setattr(d._core.engine, "put_later", put_later)
    job = DispatchJob("ep", "x")
    d.add_job(job)
    d.process_batch_for_endpoint("ep")  # the requeue failure is reported, not raised here
    (payload,) = events.of("requeue_error")
    assert payload == {"job_id": job.id, "endpoint_id": "ep", "error": broken, "attempts": 1, "job": job}
    assert status(job) == "exhausted" and job.attempts == 1
    assert isinstance(job.last_error, Exception) and job.last_error is not broken  # the delivery's error stays
    names = events.names()
    assert names.index("batch_failed") < names.index("requeue_error") < names.index("job_exhausted")
    stats = d.stats()
    assert (stats["held"], stats["exhausted"], stats["retrying"]) == (0, 1, 0)
    monkeypatch.undo()
    assert d.shutdown(5)  # exhausted before shutdown began


# -- processor_error -------------------------------------------------------------------------


def test_a_processor_failure_fires_processor_error_and_the_batch_still_goes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The batching thread cannot hand a batch to a sending thread: processor_error, and it sends it itself."""
    sink = Recorder()
    d = make(sink, batch_timeout=0.01)
    events = Events(d)
    broken = RuntimeError("can't start new thread")

    def run(*_args: object) -> None:
        raise broken

    monkeypatch.setattr(d._core.pool, "run", run)
    job = DispatchJob("ep", "x")
    d.add_job(job)
    wait_for(lambda: status(job) == "delivered", timeout=10, message="the batch sent despite the failure")
    (payload,) = events.of("processor_error")
    assert payload["error"] is broken
    assert (payload["endpoint_id"], payload["job_count"]) == ("ep", 1)
    assert payload["batch"].jobs == (job,) and payload["batch_id"] == payload["batch"].id
    monkeypatch.undo()
    assert d.shutdown(5)


def test_a_sending_thread_failure_fires_processor_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """An error escaping the batch machinery on a sending thread is reported, not lost in a Future."""
    d = make(Recorder(), batch_timeout=0.01)
    reported = threading.Event()
    payloads: list[dict[str, Any]] = []

    def on_error(payload: dict[str, Any]) -> None:
        payloads.append(payload)
        reported.set()

    d.on("processor_error", on_error)
    broken = RuntimeError("bug")

    def send(_batch: object, _inline_retries: object = None) -> None:
        raise broken

    def end(*_args: object) -> None:
        raise broken

    monkeypatch.setattr(d._core, "_send", send)
    monkeypatch.setattr(d._core, "_sent", end)  # the end of a batch with no record (a listener is registered)
    d.add_job(DispatchJob("ep", "x"))
    assert reported.wait(10)
    assert payloads[0]["error"] is broken and payloads[0]["endpoint_id"] == "ep"
    monkeypatch.undo()
    d.shutdown(5)


# -- scheduled_at ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["soon", True, math.nan, math.inf, -math.inf, datetime(2030, 1, 1)],  # the datetime: naive
)
def test_bad_scheduled_at_raises_naming_it(value: object) -> None:
    """scheduled_at is epoch seconds (time.time()) or an aware datetime; anything else is refused."""
    with pytest.raises(ConfigurationError, match="scheduled_at"):
        DispatchJob("ep", 1, scheduled_at=value)  # type: ignore[arg-type]


def test_scheduled_at_set_after_construction_is_checked_at_add_job() -> None:
    job = DispatchJob("ep", 1)
    job.scheduled_at = "tomorrow"  # type: ignore[assignment]
    d = make(Recorder())
    with pytest.raises(ConfigurationError, match=r"scheduled_at.*tomorrow"):
        d.add_job(job)
    assert job.status == "new"
    assert d.stats()["held"] == 0
    assert d.shutdown(5)


def test_scheduled_at_more_than_a_year_ahead_is_refused_at_add_job() -> None:
    """No thread can wait that long (its timeout overflows), and no process holds a job that long."""
    d = make(Recorder())
    job = DispatchJob("ep", 1, scheduled_at=time.time() + 1e10)
    with pytest.raises(ConfigurationError, match="scheduled_at must be at most 365 days ahead"):
        d.add_job(job)
    assert job.status == "new" and d.stats()["held"] == 0
    d.add_job(DispatchJob("ep", 2, scheduled_at=time.time() + 300 * 86400))  # within the year: accepted
    assert d.shutdown(5) is False  # and cancelled, not yet due


def test_scheduled_at_takes_epoch_seconds_or_an_aware_datetime() -> None:
    when = datetime(2030, 1, 1, tzinfo=timezone.utc)
    assert DispatchJob("ep", 1, scheduled_at=when).scheduled_at == when.timestamp()
    assert DispatchJob("ep", 1, scheduled_at=1_900_000_000).scheduled_at == 1_900_000_000.0
    assert DispatchJob("ep", 1).scheduled_at is None


def test_a_job_not_yet_due_is_not_sent_and_shutdown_reports_it() -> None:
    """A job scheduled an hour ahead waits: not queued, not sent by process_*, held; cancelled at shutdown."""
    sink = Recorder()
    d = make(sink)
    events = Events(d)
    later = DispatchJob("ep", "later", scheduled_at=time.time() + 3600)
    now = DispatchJob("ep", "now", scheduled_at=datetime.now(timezone.utc) - timedelta(seconds=10))
    d.add_job(later)
    d.add_job(now)
    assert status(later) == "scheduled" and status(now) == "pending"
    assert events.of("job_added")[0]["scheduled_at"] == later.scheduled_at
    assert d.get_pending_job_count("ep") == 1
    assert [batch.jobs for batch in d.process_all_batches()] == [(now,)]
    assert d.process_all_batches() == []
    stats = d.stats()
    assert (stats["held"], stats["pending"], stats["retrying"]) == (1, 0, 1)
    assert d.get_batch_stats().retrying_jobs_count == 1
    assert d.shutdown(5) is False
    assert sink.calls == [(["now"], sink.calls[0][1])]
    assert status(later) == "cancelled" and later.attempts == 0
    (payload,) = events.of("shutdown")
    assert payload["cancelled_jobs"] == [later] and payload["delivered"] is False


def test_a_scheduled_job_goes_once_due_and_not_before() -> None:
    """The job is sent by the dispatcher's own batching once scheduled_at has passed, never before."""
    sink = Recorder()
    d = make(sink, batch_timeout=0.01)
    job = DispatchJob("ep", "x", scheduled_at=time.time() + 0.2)
    d.add_job(job)
    wait_for(lambda: status(job) == "delivered", timeout=20, message="the scheduled job delivered")
    assert job.scheduled_at is not None
    (_payloads, sent_at), *_ = sink.calls
    assert sent_at >= job.scheduled_at - 0.005  # never before its time (the clocks may differ by a hair)
    assert d.shutdown(5)


def test_a_scheduled_job_counts_toward_max_pending_jobs_and_is_never_dropped() -> None:
    """Held while it waits: it fills the bound, and drop_oldest drops the new job rather than it."""
    d = make(Recorder(), max_pending_jobs=1)
    d.add_job(DispatchJob("ep", "later", scheduled_at=time.time() + 3600))
    with pytest.raises(QueueFullError):
        d.add_job(DispatchJob("ep", "now"))
    d.shutdown(5)

    dropping = make(Recorder(), max_pending_jobs=1, overflow="drop_oldest")
    later = DispatchJob("ep", "later", scheduled_at=time.time() + 3600)
    dropping.add_job(later)
    new = DispatchJob("ep", "now")
    dropping.add_job(new)
    assert (status(later), status(new)) == ("scheduled", "dropped")
    dropping.shutdown(5)


# -- max_attempts ----------------------------------------------------------------------------


def test_the_readme_retry_policy_gives_five_attempts() -> None:
    """RetryPolicy(max_attempts=5) with a job that does not say otherwise: exactly 5 attempts."""
    sink = Recorder(lambda jobs: [False] * len(jobs))
    d = make(sink, batch_timeout=0.01, retry=RetryPolicy(max_attempts=5, backoff=Constant(0.0)))
    done = threading.Event()
    d.on("job_exhausted", lambda _p: done.set())
    job = DispatchJob("ep", "x")
    assert job.max_attempts is None
    d.add_job(job)
    assert done.wait(20)
    assert job.attempts == 5 and sink.count() == 5
    d.shutdown(5)


def test_the_default_policy_gives_three_attempts() -> None:
    d = make(Recorder())
    assert d.retry.max_attempts == 3
    assert d.shutdown(5)


@pytest.mark.parametrize(("policy_attempts", "job_attempts"), [(5, 2), (2, 4)])
def test_a_jobs_own_max_attempts_overrides_the_policy(policy_attempts: int, job_attempts: int) -> None:
    """An explicit DispatchJob.max_attempts wins over retry.max_attempts, more or fewer."""
    sink = Recorder(lambda jobs: [False] * len(jobs))
    d = make(sink, batch_timeout=0.01, retry=RetryPolicy(max_attempts=policy_attempts, backoff=Constant(0.0)))
    done = threading.Event()
    d.on("job_exhausted", lambda _p: done.set())
    job = DispatchJob("ep", "x", max_attempts=job_attempts)
    d.add_job(job)
    assert done.wait(20)
    assert job.attempts == job_attempts
    d.shutdown(5)
