"""EndpointBatchDispatcher's sending threads: one for sends that return at once, up to the limit for sends that wait.

Sends that return at once gain nothing from more threads (the GIL runs one), and each thread
more on the GIL makes ``add_job`` wait longer (issue 14), so one thread sends them; sends that
wait on I/O still run ``max_concurrent_batches`` at once: the Barrier tests pass only if that
many sends run side by side. No timings are asserted; the thresholds are patched where a test
needs every send to count as quick.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable
from typing import Any

import pytest

from threaddispatch import _endpoint_core
from threaddispatch.endpoint import DispatchJob, EndpointBatchDispatcher
from threaddispatch.testing import wait_for

pytestmark = pytest.mark.timeout(60)


class _Concurrency:
    """Counts the sends running at once, and the threads that ran them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.most = 0
        self.threads: set[int] = set()
        self.delivered: list[Any] = []

    def enter(self) -> None:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.threads.add(threading.get_ident())

    def leave(self, jobs: list[DispatchJob]) -> None:
        with self.lock:
            self.running -= 1
            self.delivered.extend(job.payload for job in jobs)


@pytest.mark.parametrize("limit", [2, 4, 10])
def test_sends_that_wait_run_up_to_the_limit_at_once(limit: int) -> None:
    """``limit`` sends waiting on a Barrier of ``limit`` parties all pass it: that many ran side by side."""
    barrier = threading.Barrier(limit, timeout=30)
    seen = _Concurrency()

    def send(_endpoint_id: Hashable, jobs: list[DispatchJob]) -> None:
        seen.enter()
        try:
            barrier.wait()  # BrokenBarrierError (the batch fails) unless limit sends wait here at once
        finally:
            seen.leave(jobs)

    d = EndpointBatchDispatcher(send, max_batch_size=1, batch_timeout=60, max_concurrent_batches=limit)
    try:
        jobs = [DispatchJob(f"e{i}", i, max_attempts=1) for i in range(3 * limit)]
        for job in jobs:
            d.add_job(job)  # each a full batch of one: due at once
        wait_for(lambda: all(job.status in ("delivered", "exhausted") for job in jobs), timeout=40, message="settled")
        assert [job.status for job in jobs] == ["delivered"] * len(jobs)
        assert not barrier.broken
        assert seen.most == limit  # never more than the limit
    finally:
        assert d.shutdown(10)


def test_sends_that_start_to_wait_after_quick_ones_still_run_up_to_the_limit() -> None:
    """Quick sends leave one sending thread; when sends then wait on I/O, the others start again."""
    limit = 4
    barrier = threading.Barrier(limit, timeout=30)
    quick_done = threading.Event()
    seen = _Concurrency()

    def send(endpoint_id: Hashable, jobs: list[DispatchJob]) -> None:
        seen.enter()
        try:
            if str(endpoint_id).startswith("slow"):
                barrier.wait()
        finally:
            seen.leave(jobs)
            if len(seen.delivered) == 200:
                quick_done.set()

    d = EndpointBatchDispatcher(send, max_batch_size=1, batch_timeout=60, max_concurrent_batches=limit)
    try:
        for i in range(200):
            d.add_job(DispatchJob(f"quick{i}", i))
        assert quick_done.wait(30)
        slow = [DispatchJob(f"slow{i}", i, max_attempts=1) for i in range(2 * limit)]
        for job in slow:
            d.add_job(job)
        wait_for(lambda: all(job.status in ("delivered", "exhausted") for job in slow), timeout=40, message="settled")
        assert [job.status for job in slow] == ["delivered"] * len(slow)
        assert not barrier.broken
    finally:
        assert d.shutdown(10)


def test_a_hung_send_does_not_hold_up_the_batches_waiting_behind_it() -> None:
    """The one sending thread hangs in a send: the watch starts another for the batches waiting in ready."""
    release = threading.Event()
    hung = threading.Event()

    def send(endpoint_id: Hashable, _jobs: list[DispatchJob]) -> None:
        if endpoint_id == "hung":
            hung.set()
            assert release.wait(30)

    d = EndpointBatchDispatcher(send, max_batch_size=1, batch_timeout=60, max_concurrent_batches=3)
    try:
        first = DispatchJob("hung", 0)
        d.add_job(first)
        assert hung.wait(10)
        others = [DispatchJob(f"e{i}", i) for i in range(50)]
        for job in others:
            d.add_job(job)
        wait_for(lambda: all(job.status == "delivered" for job in others), timeout=30, message="the others delivered")
        assert first.status == "processing"  # still hung
    finally:
        release.set()
        assert d.shutdown(10)
    assert d.get_batch_stats().pending_jobs_count == 0 and str(first.status) == "delivered"


def test_quick_sends_go_on_one_sending_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """With every send quick and no stall, one send runs at a time: more senders would only contend for the GIL."""
    monkeypatch.setattr(_endpoint_core, "_QUICK", 3600.0)  # every send counts as quick
    monkeypatch.setattr(_endpoint_core, "_STALL", 3600.0)  # the watch never starts a thread
    seen = _Concurrency()

    def send(_endpoint_id: Hashable, jobs: list[DispatchJob]) -> None:
        seen.enter()
        seen.leave(jobs)

    d = EndpointBatchDispatcher(send, max_batch_size=1, batch_timeout=60, max_concurrent_batches=10)
    try:
        jobs = [DispatchJob(f"e{i}", i) for i in range(500)]
        for job in jobs:
            d.add_job(job)
        wait_for(lambda: all(job.status == "delivered" for job in jobs), timeout=30, message="every job delivered")
        assert sorted(seen.delivered) == list(range(500))
        # One send at a time. (Not one thread ident: a sending thread that finds nothing waiting
        # ends, and a pause between two add_job calls on a busy machine lets the next one start anew.)
        assert seen.most == 1
    finally:
        assert d.shutdown(10)


def test_extra_sending_threads_end_once_sends_are_quick_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """After sends that waited filled the limit, quick sends leave one thread sending (the others end)."""
    limit = 4
    barrier = threading.Barrier(limit, timeout=30)
    through = _Concurrency()
    go = threading.Event()
    runners_seen: list[int] = []
    d: EndpointBatchDispatcher | None = None

    def send(endpoint_id: Hashable, jobs: list[DispatchJob]) -> None:
        if str(endpoint_id).startswith("slow"):
            barrier.wait()
            through.enter()
            assert go.wait(30)
        else:
            assert d is not None
            runners_seen.append(d._core.runners)

    d = EndpointBatchDispatcher(send, max_batch_size=1, batch_timeout=60, max_concurrent_batches=limit)
    try:
        slow = [DispatchJob(f"slow{i}", i, max_attempts=1) for i in range(limit)]
        for job in slow:
            d.add_job(job)
        wait_for(lambda: through.running == limit, timeout=30, message="limit sends past the barrier, waiting")
        quick = [DispatchJob(f"quick{i}", i) for i in range(2000)]
        for job in quick:
            d.add_job(job)  # queued behind the limit
        monkeypatch.setattr(_endpoint_core, "_QUICK", 3600.0)  # from now on every send counts as quick
        monkeypatch.setattr(_endpoint_core, "_STALL", 3600.0)  # and the watch starts no thread
        go.set()
        wait_for(lambda: all(job.status == "delivered" for job in quick + slow), timeout=30, message="all delivered")
        assert len(runners_seen) == 2000
        assert runners_seen[-1] == 1  # the extra threads ended while the backlog was still being sent
    finally:
        go.set()
        assert d.shutdown(10)


def test_a_batch_nobody_listens_to_from_the_start_still_gets_a_whole_record_for_its_outcome_events() -> None:
    """No batch_started listener: the record is made after the send, complete, for batch_completed and batch_failed."""
    completed: list[Any] = []
    failed: list[Any] = []

    def send(endpoint_id: Hashable, jobs: list[DispatchJob]) -> object:
        jobs.clear()  # send_batch may change its list: the dispatcher keeps its own
        if endpoint_id == "bad":
            return [False]
        return None

    d = EndpointBatchDispatcher(send, max_batch_size=1, batch_timeout=60, max_concurrent_batches=2)
    d.on("batch_completed", completed.append)
    d.on("batch_failed", failed.append)
    try:
        good, bad = DispatchJob("good", 1), DispatchJob("bad", 2, max_attempts=1)
        d.add_job(good)
        d.add_job(bad)
        wait_for(lambda: completed and failed, timeout=30, message="both batches settled")
        (done,) = completed
        batch = done["batch"]
        assert (batch.id, batch.endpoint_id, batch.jobs, batch.status) == (
            done["batch_id"],
            "good",
            (good,),
            "completed",
        )
        assert batch.successful == 1 and batch.started_at is not None and batch.completed_at is not None
        assert good.status == "delivered" and good.attempts == 1
        (lost,) = failed
        batch = lost["batch"]
        assert (batch.id, batch.jobs, batch.status, batch.failed) == (lost["batch_id"], (bad,), "failed", 1)
        assert lost["failed_job_ids"] == [bad.id] and lost["exhausted"] == 1
        assert bad.status == "exhausted" and bad.attempts == 1
    finally:
        assert d.shutdown(10)


@pytest.mark.parametrize("quick", [True, False])
def test_a_shutdown_that_begins_while_a_sending_thread_takes_its_next_batch_keeps_the_order(
    monkeypatch: pytest.MonkeyPatch, quick: bool
) -> None:
    """The race behind the spool crash test's reordered replay (it failed 2 of 4 loaded suite runs).

    A sending thread takes its next batch as its send ends; a shutdown then lets the engine's
    worker take the following ones (the drain ignores the limit) and queue them in ``ready``
    before the sending thread looks there. The batch the sending thread took is the oldest:
    it goes first. Forced here by pausing that thread until the worker has queued one.
    """
    if quick:
        monkeypatch.setattr(_endpoint_core, "_QUICK", 3600.0)  # the one-thread loop's path
    else:
        monkeypatch.setattr(_endpoint_core, "_QUICK", 0.0)  # the path under send_lock
    monkeypatch.setattr(_endpoint_core, "_STALL", 3600.0)  # no watch thread: one sending thread
    sent: list[int] = []
    all_added = threading.Event()

    def send(_endpoint_id: Hashable, jobs: list[DispatchJob]) -> None:
        # The first send waits for every add, so the other nine batches are due when it ends
        # (on a loaded machine it could end before the adds did, and the shutdown refuse them).
        assert all_added.wait(20)
        sent.extend(job.payload for job in jobs)

    d = EndpointBatchDispatcher(send, max_batch_size=10, batch_timeout=60, max_concurrent_batches=1)
    core, engine = d._core, d._core.engine
    plain_settle_and_take = engine.settle_and_take
    closing: list[threading.Thread] = []
    closed: list[bool] = []

    def settle_and_take(seq: int) -> Any:
        taken = plain_settle_and_take(seq)
        if taken is not None and not closing:  # only the one sending thread comes here
            closer = threading.Thread(target=lambda: closed.append(d.shutdown(30)), name="test-close")
            closer.start()
            closing.append(closer)  # after start: the test thread joins it once it sees it
            wait_for(lambda: len(core.ready) > 0, timeout=20, message="the worker queued a later batch")
        return taken

    monkeypatch.setattr(engine, "settle_and_take", settle_and_take)
    for n in range(100):
        d.add_job(DispatchJob("ep", n))  # ten full batches, due at once
    all_added.set()
    wait_for(lambda: bool(closing), timeout=20, message="a sending thread took its next batch")
    closing[0].join(30)
    assert closed == [True]
    assert sent == list(range(100))
