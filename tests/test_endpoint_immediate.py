"""EndpointBatchDispatcher in immediate mode: add_job sends on the caller's thread, with retries, events, stats."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from threaddispatch import _immediate
from threaddispatch.backoff import Constant, RetryPolicy
from threaddispatch.endpoint import DispatchJob, EndpointBatchDispatcher
from threaddispatch.errors import Cancel, Retry

pytestmark = pytest.mark.timeout(30)


class Sends:
    """send_batch recording (thread, endpoint, job ids); fails the first ``failures`` calls with ``error``."""

    def __init__(self, failures: int = 0, error: BaseException | None = None) -> None:
        self.calls: list[tuple[str, Any, list[str]]] = []
        self.failures = failures
        self.error = error or RuntimeError("endpoint down")

    def __call__(self, endpoint_id: Any, jobs: list[DispatchJob]) -> None:
        self.calls.append((threading.current_thread().name, endpoint_id, [job.id for job in jobs]))
        if len(self.calls) <= self.failures:
            raise self.error


@pytest.fixture
def immediate() -> Iterator[None]:
    _immediate.switch(True)
    try:
        yield
    finally:
        _immediate.switch(False)


# An hour's backoff: immediate mode must not wait for it.
_HOUR = RetryPolicy(max_attempts=3, backoff=Constant(3600.0))


def test_a_dispatcher_made_in_immediate_mode_sends_in_add_job(immediate: None) -> None:
    """add_job returns after the send, which ran on the caller's thread as a batch of one."""
    sends = Sends()
    d = EndpointBatchDispatcher(sends, batch_timeout=60, name="imm-made")
    job = DispatchJob("ep", {"n": 1})
    assert d.add_job(job) == job.id
    assert sends.calls == [(threading.current_thread().name, "ep", [job.id])]
    assert (job.status, job.attempts) == ("delivered", 1)
    assert d.stats()["held"] == 0
    assert d.shutdown(5)


def test_the_switch_reaches_a_live_dispatcher_and_turns_off_again() -> None:
    """switch(True) on a dispatcher made before it; after switch(False) jobs are queued again."""
    sends = Sends()
    d = EndpointBatchDispatcher(sends, batch_timeout=60, name="imm-live")
    _immediate.switch(True)
    try:
        d.add_job(DispatchJob("ep", 1))
        assert len(sends.calls) == 1
    finally:
        _immediate.switch(False)
    later = DispatchJob("ep", 2)
    d.add_job(later)
    assert later.status == "pending"
    assert len(sends.calls) == 1  # queued for the 60 s window, not sent on this thread
    assert d.shutdown(5)
    assert len(sends.calls) == 2


def test_retries_run_at_once_with_their_events_until_delivered(immediate: None) -> None:
    """A failing send is retried inline (the hour's backoff skipped), each attempt a batch with its events."""
    sends = Sends(failures=2)
    d = EndpointBatchDispatcher(sends, batch_timeout=60, retry=_HOUR, name="imm-retry")
    events: list[str] = []
    for name in ("job_added", "batch_started", "batch_failed", "batch_completed"):
        d.on(name, lambda payload, name=name: events.append(name))
    job = DispatchJob("ep", "x")
    d.add_job(job)
    assert (job.status, job.attempts, len(sends.calls)) == ("delivered", 3, 3)
    assert events == ["job_added"] + ["batch_started", "batch_failed"] * 2 + ["batch_started", "batch_completed"]
    assert d.shutdown(5)


def test_exhausted_and_cancelled_jobs_settle_like_the_worker_would(immediate: None) -> None:
    """Past the attempts the job is exhausted (job_exhausted, stats); Cancel is final at once; Retry(delay) skipped."""
    exhausted: list[str] = []
    sends = Sends(failures=3)
    d = EndpointBatchDispatcher(sends, batch_timeout=60, retry=_HOUR, name="imm-exhaust")
    d.on("job_exhausted", lambda payload: exhausted.append(payload["job_id"]))
    job = DispatchJob("ep", "x")
    d.add_job(job)
    assert (job.status, job.attempts) == ("exhausted", 3)
    assert exhausted == [job.id]
    assert d.stats()["exhausted"] == 1

    cancel = Sends(failures=1, error=Cancel("gone"))
    d2 = EndpointBatchDispatcher(cancel, batch_timeout=60, retry=_HOUR, name="imm-cancel")
    final = DispatchJob("ep", "y")
    d2.add_job(final)
    assert (final.status, final.attempts) == ("exhausted", 1)

    later = Sends(failures=1, error=Retry(delay=3600.0))
    d3 = EndpointBatchDispatcher(later, batch_timeout=60, retry=_HOUR, name="imm-retry-delay")
    retried = DispatchJob("ep", "z")
    d3.add_job(retried)
    assert (retried.status, retried.attempts) == ("delivered", 2)
    for dispatcher in (d, d2, d3):
        assert dispatcher.shutdown(5)  # nothing left: the exhausted jobs finished before


def test_a_scheduled_job_is_not_waited_for(immediate: None) -> None:
    """A scheduled_at an hour ahead is sent at once in immediate mode."""
    import time

    sends = Sends()
    d = EndpointBatchDispatcher(sends, batch_timeout=60, name="imm-scheduled")
    job = DispatchJob("ep", "x", scheduled_at=time.time() + 3600)
    d.add_job(job)
    assert job.status == "delivered"
    assert d.shutdown(5)


def test_a_keyboard_interrupt_from_send_reaches_the_caller_after_the_job_settled(immediate: None) -> None:
    """A BaseException from send_batch is re-raised by add_job; the job's retry is queued for the worker."""
    sends = Sends(failures=1, error=KeyboardInterrupt())
    d = EndpointBatchDispatcher(sends, batch_timeout=60, retry=RetryPolicy(max_attempts=2), name="imm-interrupt")
    job = DispatchJob("ep", "x")
    with pytest.raises(KeyboardInterrupt):
        d.add_job(job)
    assert job.status in ("retrying", "pending", "processing", "delivered")
    assert d.shutdown(10)
    assert job.status == "delivered"
