"""EndpointBatchDispatcher on the shared contract: async send_batch, send_timeout, Retry/Cancel, BaseException."""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import os
import threading
import weakref
from collections.abc import Hashable
from typing import Any

import pytest

from threaddispatch import Cancel, ConfigurationError, Constant, DispatchTimeoutError, Retry, RetryPolicy
from threaddispatch.endpoint import DispatchJob, EndpointBatchDispatcher
from threaddispatch.testing import live_dispatch_threads, wait_for

pytestmark = pytest.mark.timeout(60)


def fast_retry(max_attempts: int = 1000) -> RetryPolicy:
    return RetryPolicy(max_attempts=max_attempts, backoff=Constant(0.0))


def make(send: Any, **kwargs: Any) -> EndpointBatchDispatcher:
    kwargs.setdefault("batch_timeout", 60.0)  # only process_* and shutdown take batches
    kwargs.setdefault("retry", fast_retry())
    return EndpointBatchDispatcher(send, **kwargs)


def status(job: DispatchJob) -> str:
    return job.status


# -- async send_batch --------------------------------------------------------------------------


def test_an_async_send_batch_is_awaited_on_the_sending_thread() -> None:
    """An ``async def`` send_batch is awaited; None means every job delivered, on process_* and in the background."""
    sent: list[Any] = []
    threads: set[str] = set()

    async def send(endpoint_id: Hashable, jobs: list[DispatchJob]) -> None:
        await asyncio.sleep(0)
        threads.add(threading.current_thread().name)
        sent.extend(job.payload for job in jobs)

    d = make(send)
    first = DispatchJob("ep", 1)
    d.add_job(first)
    batch = d.process_batch_for_endpoint("ep")
    assert batch is not None and batch.status == "completed" and batch.error is None
    assert status(first) == "delivered"
    d.add_job(DispatchJob("ep", 2))
    assert d.shutdown(5)  # the drain sends the second job on a sending thread
    assert sent == [1, 2]
    assert threading.current_thread().name in threads


def test_an_async_send_batch_may_return_per_job_outcomes_and_raise() -> None:
    """Its per-job outcomes count like a plain function's; its exception fails the batch and retries."""
    calls = {"n": 0}

    async def send(endpoint_id: Hashable, jobs: list[DispatchJob]) -> list[object]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("down")
        return [job.payload == "good" or job.attempts > 2 for job in jobs]

    d = make(send)
    good, bad = DispatchJob("ep", "good"), DispatchJob("ep", "bad")
    d.add_job(good)
    d.add_job(bad)
    batch = d.process_batch_for_endpoint("ep")
    assert batch is not None and isinstance(batch.error, ConnectionError)
    wait_for(lambda: d.get_pending_job_count("ep") == 2, message="both jobs queued again")
    batch = d.process_batch_for_endpoint("ep")
    assert batch is not None and (batch.successful, batch.failed) == (1, 1)
    assert status(good) == "delivered"
    wait_for(lambda: d.get_pending_job_count("ep") == 1, message="the failed job queued again")
    d.process_batch_for_endpoint("ep")
    assert status(bad) == "delivered" and bad.attempts == 3
    assert d.shutdown(5)


def test_async_listeners_are_awaited() -> None:
    """An ``async def`` listener of a dispatcher event is awaited on the emitting thread."""
    seen: list[str] = []

    async def listener(payload: dict[str, Any]) -> None:
        await asyncio.sleep(0)
        seen.append(payload["job_id"])

    d = make(lambda ep, jobs: None)
    d.on("job_added", listener)
    job = DispatchJob("ep", 1)
    d.add_job(job)
    assert seen == [job.id]
    assert d.shutdown(5)


# -- send_timeout ------------------------------------------------------------------------------


def test_send_timeout_is_checked() -> None:
    bad: Any
    for bad in (0, -1.0, math.nan, "1", True):
        with pytest.raises(ConfigurationError, match="send_timeout"):
            EndpointBatchDispatcher(lambda ep, jobs: None, send_timeout=bad)


@pytest.mark.timeout(30)
def test_a_hung_send_times_out_is_retried_and_later_batches_go() -> None:
    """A send past send_timeout fails its batch with DispatchTimeoutError; the retry and later batches go."""
    release = threading.Event()
    hung = threading.Event()
    sent: list[Any] = []
    failed: list[dict[str, Any]] = []

    def send(endpoint_id: Hashable, jobs: list[DispatchJob]) -> None:
        if jobs[0].payload == "hang" and jobs[0].attempts == 1:
            hung.set()
            assert release.wait(20), "the test never released the hung send"
            sent.append("late")
            return
        sent.extend(job.payload for job in jobs)

    d = make(send, send_timeout=0.2)
    d.on("batch_failed", failed.append)
    try:
        job = DispatchJob("ep", "hang")
        d.add_job(job)
        batch = d.process_batch_for_endpoint("ep")
        assert hung.is_set()
        assert batch is not None and batch.status == "failed"
        assert isinstance(batch.error, DispatchTimeoutError)
        assert isinstance(job.last_error, DispatchTimeoutError)
        assert failed and failed[0]["retrying"] == 1
        stats = d.stats()
        assert stats["abandoned_calls"] == 1 and stats["call_timeouts"] == 1
        wait_for(lambda: d.get_pending_job_count("ep") == 1, message="the timed-out job queued again")
        d.process_batch_for_endpoint("ep")
        assert status(job) == "delivered" and job.attempts == 2
        d.add_job(DispatchJob("ep", "next"))
        d.process_batch_for_endpoint("ep")
        assert sent == ["hang", "next"]
    finally:
        release.set()
    wait_for(lambda: d.stats()["abandoned_calls"] == 0, message="the abandoned send ended")
    assert d.stats()["call_timeouts"] == 1
    assert d.shutdown(5)


def test_without_send_timeout_the_stats_still_have_the_call_counters() -> None:
    d = make(lambda ep, jobs: None)
    d.add_job(DispatchJob("ep", 1))
    d.process_batch_for_endpoint("ep")
    stats = d.stats()
    assert stats["abandoned_calls"] == 0 and stats["call_timeouts"] == 0
    assert d.shutdown(5)


# -- Retry and Cancel --------------------------------------------------------------------------


def test_retry_with_a_delay_overrides_the_backoff() -> None:
    """``Retry(delay)`` from send_batch: every job of the batch waits that delay (not the backoff), then goes."""
    d = make(
        lambda ep, jobs: (_ for _ in ()).throw(Retry(delay=0.3)) if jobs[0].attempts == 1 else None,
        retry=RetryPolicy(max_attempts=5, backoff=Constant(30.0)),
    )
    jobs = [DispatchJob("ep", i) for i in range(2)]
    for job in jobs:
        d.add_job(job)
    d.process_batch_for_endpoint("ep")
    for job in jobs:
        assert status(job) == "retrying"
        assert job.next_retry_at is not None and job.last_attempt_at is not None
        assert job.next_retry_at - job.last_attempt_at == pytest.approx(0.3, abs=0.05)
    wait_for(lambda: d.get_pending_job_count("ep") == 2, message="the retries came due")
    d.process_batch_for_endpoint("ep")
    assert [status(job) for job in jobs] == ["delivered", "delivered"]
    assert d.shutdown(5)


def test_retry_as_a_per_job_outcome_is_honoured_for_that_job() -> None:
    d = make(
        lambda ep, jobs: [Retry(delay=0.25) if job.attempts == 1 else None for job in jobs],
        retry=RetryPolicy(max_attempts=5, backoff=Constant(30.0)),
    )
    job = DispatchJob("ep", 1)
    d.add_job(job)
    d.process_batch_for_endpoint("ep")
    assert job.next_retry_at is not None and job.last_attempt_at is not None
    assert job.next_retry_at - job.last_attempt_at == pytest.approx(0.25, abs=0.05)
    wait_for(lambda: d.get_pending_job_count("ep") == 1, message="the retry came due")
    d.process_batch_for_endpoint("ep")
    assert status(job) == "delivered"
    assert d.shutdown(5)


def test_retry_still_counts_against_max_attempts() -> None:
    def send(ep: Hashable, jobs: list[DispatchJob]) -> None:
        raise Retry(delay=0.0)

    d = make(send)
    job = DispatchJob("ep", 1, max_attempts=2)
    d.add_job(job)
    d.process_batch_for_endpoint("ep")
    wait_for(lambda: d.get_pending_job_count("ep") == 1, message="the retry came due")
    d.process_batch_for_endpoint("ep")
    assert status(job) == "exhausted" and job.attempts == 2
    assert d.shutdown(5)


def test_cancel_makes_the_failure_final_at_once() -> None:
    """``Cancel`` from send_batch exhausts every job of the batch after one attempt, whatever the policy."""
    exhausted: list[dict[str, Any]] = []

    def send(ep: Hashable, jobs: list[DispatchJob]) -> None:
        raise Cancel("the endpoint is gone")

    d = make(send)
    d.on("job_exhausted", exhausted.append)
    jobs = [DispatchJob("ep", i) for i in range(2)]
    for job in jobs:
        d.add_job(job)
    d.process_batch_for_endpoint("ep")
    assert [(status(job), job.attempts) for job in jobs] == [("exhausted", 1), ("exhausted", 1)]
    assert [p["job_id"] for p in exhausted] == [job.id for job in jobs]
    assert all(isinstance(p["error"], Cancel) for p in exhausted)
    assert d.stats()["exhausted"] == 2
    assert d.shutdown(5)  # nothing is left waiting


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf, "soon"])
def test_a_bad_retry_delay_is_final_and_reported(bad: object, caplog: pytest.LogCaptureFixture) -> None:
    """A Retry whose delay is not a finite number >= 0: the job is exhausted (not lost), the delay logged."""
    exhausted: list[dict[str, Any]] = []

    def send(ep: Hashable, jobs: list[DispatchJob]) -> None:
        signal = Retry()
        signal.delay = bad  # type: ignore[assignment]
        raise signal

    d = make(send)
    d.on("job_exhausted", exhausted.append)
    job = DispatchJob("ep", 1)
    d.add_job(job)
    with caplog.at_level(logging.WARNING, logger="threaddispatch"):
        d.process_batch_for_endpoint("ep")
    assert status(job) == "exhausted" and job.attempts == 1
    assert [p["job_id"] for p in exhausted] == [job.id]
    assert isinstance(job.last_error, Retry)
    assert "Retry(delay=" in caplog.text
    assert d.stats()["held"] == 0
    assert d.shutdown(5)


def test_a_backoff_that_raises_makes_the_failure_final(caplog: pytest.LogCaptureFixture) -> None:
    """RetryPolicy.next_delay decides: a broken backoff is logged and the job exhausted, never lost."""

    def broken(attempt: int) -> float:
        raise ZeroDivisionError("backoff bug")

    d = make(lambda ep, jobs: [False] * len(jobs), retry=RetryPolicy(backoff=broken))
    job = DispatchJob("ep", 1)
    d.add_job(job)
    with caplog.at_level(logging.ERROR, logger="threaddispatch"):
        d.process_batch_for_endpoint("ep")
    assert "backoff bug" in caplog.text
    assert status(job) == "exhausted"
    assert d.shutdown(5)


# -- BaseException -----------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_a_base_exception_on_a_sending_thread_fails_the_batch_and_is_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """SystemExit from send_batch on a sending thread: the batch fails, is logged, the job is retried."""
    done = threading.Event()

    def send(ep: Hashable, jobs: list[DispatchJob]) -> None:
        if jobs[0].attempts == 1:
            raise SystemExit(3)
        done.set()

    d = make(send, batch_timeout=0.01)
    errors: list[dict[str, Any]] = []
    d.on("batch_execution_error", errors.append)
    with caplog.at_level(logging.ERROR, logger="threaddispatch"):
        d.add_job(DispatchJob("ep", 1))
        assert done.wait(10)
    assert isinstance(errors[0]["error"], SystemExit)
    assert "SystemExit" in caplog.text
    assert d.shutdown(5)


@pytest.mark.timeout(30)
def test_a_hung_async_send_is_cancelled_at_its_timeout() -> None:
    """An ``async def`` send past send_timeout is cancelled on its loop; the batch fails with DispatchTimeoutError."""
    cancelled = threading.Event()

    async def send(endpoint_id: Hashable, jobs: list[DispatchJob]) -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    d = make(send, send_timeout=0.1, retry=RetryPolicy(max_attempts=1))
    job = DispatchJob("ep", 1)
    d.add_job(job)
    batch = d.process_batch_for_endpoint("ep")
    assert batch is not None and isinstance(batch.error, DispatchTimeoutError)
    assert status(job) == "exhausted"
    assert cancelled.wait(10)
    wait_for(lambda: d.stats()["abandoned_calls"] == 0, message="the cancelled send ended")
    assert d.shutdown(5)  # nothing was pending at shutdown: the job was exhausted before it


@pytest.mark.timeout(30)
def test_a_hung_send_does_not_stretch_shutdown_past_its_timeout() -> None:
    """Shutdown with a send hung in the background: the send times out, shutdown returns, the job is reported."""
    release = threading.Event()
    inside = threading.Event()

    def send(endpoint_id: Hashable, jobs: list[DispatchJob]) -> None:
        inside.set()
        assert release.wait(20), "the test never released the hung send"

    d = make(send, send_timeout=0.2, batch_timeout=0.01, retry=RetryPolicy(max_attempts=1))
    try:
        job = DispatchJob("ep", 1)
        d.add_job(job)
        assert inside.wait(10)
        assert d.shutdown(10) is False
        assert status(job) == "exhausted" and isinstance(job.last_error, DispatchTimeoutError)
    finally:
        release.set()
    wait_for(lambda: d.stats()["abandoned_calls"] == 0, message="the abandoned send ended")


@pytest.mark.timeout(30)
def test_an_unreferenced_dispatcher_with_a_send_timeout_is_collected_and_its_threads_leave() -> None:
    sent: list[Any] = []
    d = EndpointBatchDispatcher(
        lambda ep, jobs: sent.extend(j.payload for j in jobs), batch_timeout=60, send_timeout=5, name="timed-orphan"
    )
    d.add_job(DispatchJob("ep", 1))
    d.process_batch_for_endpoint("ep")  # a send_timeout runner thread exists now
    d.add_job(DispatchJob("ep", 2))
    ref = weakref.ref(d)
    del d
    gc.collect()
    assert ref() is None
    wait_for(lambda: sent == [1, 2], message="the drain after collection")
    wait_for(
        lambda: not [t for t in live_dispatch_threads() if t.name.startswith("threaddispatch-timed-orphan")],
        message="every thread of the collected dispatcher left",
    )


# -- fork --------------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.timeout(30)
def test_job_ids_are_reseeded_in_a_forked_child_even_without_a_dispatcher() -> None:
    """The lifecycle registry re-seeds the id prefix in a child: its ids never repeat the parent's."""
    before = DispatchJob("ep", 0).id
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: exit at once, whatever happens
        try:
            os.write(write_end, DispatchJob("ep", 0).id.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        child_id = os.read(read_end, 100).decode()
    finally:
        os.close(read_end)
    _, wait_status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(wait_status) == 0
    after = DispatchJob("ep", 0).id
    assert len(child_id) == len(before) and child_id[:14] != before[:14]
    assert after[:14] == before[:14] and after != before  # the parent's own ids go on


# -- a send on a send_timeout runner thread is still "inside send_batch" ----------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_shutdown_from_inside_a_timed_send_returns_instead_of_waiting_for_itself(is_async: bool) -> None:
    """With send_timeout the send runs on a runner thread: shutdown there still knows it is inside its batch."""
    results: list[bool] = []
    holder: list[EndpointBatchDispatcher] = []

    def plain(ep: Hashable, jobs: list[DispatchJob]) -> None:
        if not results:
            results.append(holder[0].shutdown(None))  # waiting for its own batch would never end

    async def coroutine(ep: Hashable, jobs: list[DispatchJob]) -> None:
        plain(ep, jobs)

    d = make(coroutine if is_async else plain, send_timeout=10)
    holder.append(d)
    d.add_job(DispatchJob("ep", 1))
    d.add_job(DispatchJob("ep2", 2))
    batch = d.process_batch_for_endpoint("ep")
    assert results == [False]
    assert batch is not None and batch.error is None and batch.status == "completed"
    assert d.shutdown(5) is True


@pytest.mark.timeout(30)
def test_block_inside_a_timed_send_raises_at_once_instead_of_waiting() -> None:
    """add_job(overflow="block") from inside a send on a runner thread raises QueueFullError at once."""
    from threaddispatch import QueueFullError

    outcomes: list[str] = []
    box: list[EndpointBatchDispatcher] = []

    def send(_ep: Hashable, jobs: list[DispatchJob]) -> None:
        if jobs[0].payload == 0:
            try:
                box[0].add_job(DispatchJob("ep", "from inside"), timeout=None)
            except QueueFullError:
                outcomes.append("full")

    d = make(send, max_pending_jobs=1, overflow="block", send_timeout=10)
    box.append(d)
    d.add_job(DispatchJob("ep", 0))
    batch = d.process_batch_for_endpoint("ep")
    assert outcomes == ["full"]
    assert batch is not None and batch.error is None
    assert d.shutdown(5)
