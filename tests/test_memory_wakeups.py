"""MemoryStore's wake-ups: engines sharing one MemoryStore in one process see each other's jobs at once.

Each engine test polls every 30 s (``poll_interval=max_poll_interval=30``) and waits at most
``PICKUP`` seconds for the job, so only the store's wake-up can make it pass. The store
tests check which writes announce what, and the book (unsubscribe, a failing callback, fork).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from threaddispatch import JobEngine
from threaddispatch.errors import ConfigurationError, StoreError
from threaddispatch.stores import JobRecord, JobState, MemoryStore
from threaddispatch.testing import wait_for

pytestmark = pytest.mark.timeout(60)

POLL = 30.0  # the idle engine's poll: far beyond every wait below
PICKUP = 5.0  # how long a woken engine may take to run the job


@pytest.fixture
def no_thread_left() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    wait_for(lambda: set(threading.enumerate()) <= before, 10, message="threads left running")


def _engine(store: MemoryStore) -> JobEngine:
    return JobEngine(store, poll_interval=POLL, max_poll_interval=POLL)


class _Runner:
    """B: an engine idle on ``work``, recording when its handler ran each job."""

    def __init__(self, store: MemoryStore) -> None:
        self.engine = _engine(store)
        self.ran: dict[str, float] = {}
        self.event = threading.Event()
        self.engine.register("f", self._run)

    def _run(self, ctx: object, payload: object) -> None:
        self.ran[ctx.job.id] = time.time()  # type: ignore[attr-defined]
        self.event.set()

    def start(self) -> None:
        self.engine.start(queues=["work"])
        wait_for(lambda: self.engine.stats()["idle_polls"] >= 1, 10, message="B idles")


@pytest.fixture
def pair(no_thread_left: None) -> Iterator[tuple[MemoryStore, JobEngine, _Runner]]:
    """A (not started unless a test starts it) and B (started, idle), on one MemoryStore."""
    store = MemoryStore()
    a = _engine(store)
    a.register("f", lambda ctx, payload: None)
    b = _Runner(store)
    yield store, a, b
    assert b.engine.stop(10)
    assert a.stop(10)
    store.close()


def test_an_idle_engine_runs_a_job_another_engine_enqueued_without_waiting_for_its_poll(
    pair: tuple[MemoryStore, JobEngine, _Runner],
) -> None:
    _, a, b = pair
    b.start()
    job_id = a.enqueue("f", queue="work")
    assert b.event.wait(PICKUP), "B did not run A's job before its poll"
    assert job_id in b.ran


def test_an_idle_engine_runs_another_engines_delayed_job_at_its_run_at(
    pair: tuple[MemoryStore, JobEngine, _Runner],
) -> None:
    _, a, b = pair
    b.start()
    due = time.time() + 1.0
    job_id = a.enqueue("f", queue="work", run_at=due)
    assert b.event.wait(1.0 + PICKUP), "B did not run A's delayed job at its run_at"
    assert b.ran[job_id] >= due


def test_an_idle_engine_runs_a_retry_another_engine_made_at_its_time(
    pair: tuple[MemoryStore, JobEngine, _Runner],
) -> None:
    """A runs attempt 1 (it fails, retry in 2 s) and stops; B, idle since before the retry, runs attempt 2."""
    store, _, b = pair
    a = _engine(store)  # A with a failing handler, gated so that B is idle when the retry is written
    entered, gate = threading.Event(), threading.Event()

    def fail(ctx: object, payload: object) -> None:
        entered.set()
        gate.wait(10)
        raise RuntimeError("attempt 1 fails")

    a.register("f", fail, max_retries=3, backoff=lambda attempt: 2.0)
    a.start(queues=["work"])
    try:
        job_id = a.enqueue("f", queue="work")
        assert entered.wait(10)
        b.start()
        gate.set()
        wait_for(lambda: (job := store.get(job_id)) is not None and job.state is JobState.RETRYING, 10)
    finally:
        assert a.stop(10)
    retry = store.get(job_id)
    assert retry is not None and retry.attempts == 1
    assert b.event.wait(2.0 + PICKUP), "B did not run A's retry at its time"
    assert b.ran[job_id] >= retry.run_at


def test_an_idle_engine_runs_a_dependent_released_by_another_engines_completion(
    pair: tuple[MemoryStore, JobEngine, _Runner],
) -> None:
    _, a, b = pair
    a.register("prep", lambda ctx, payload: None)
    b.start()
    a.start(queues=["prep"])
    first = a.enqueue("prep", queue="prep")
    dependent = a.enqueue("f", queue="work", depends_on=[first])
    assert b.event.wait(PICKUP), "B did not run the dependent A's completion released"
    assert dependent in b.ran


def test_an_idle_engine_runs_the_jobs_of_a_queue_another_engine_resumed(
    pair: tuple[MemoryStore, JobEngine, _Runner],
) -> None:
    _, a, b = pair
    a.pause_queue("work")
    b.start()  # reads "work" paused
    job_id = a.enqueue("f", queue="work")
    wait_for(lambda: b.engine.stats()["idle_polls"] >= 2, 10, message="B's wake-up claim skipped the paused queue")
    assert not b.event.is_set()
    a.resume_queue("work")
    assert b.event.wait(PICKUP), "B did not run the job of the queue A resumed"
    assert job_id in b.ran


# -- the store ---------------------------------------------------------------------------------


def _job(queue: str = "work", **fields: object) -> JobRecord:
    now = time.time()
    values: dict[str, object] = {"run_at": now, "created_at": now, "updated_at": now, **fields}
    return JobRecord(id=uuid.uuid4().hex, name="f", payload="null", queue=queue, **values)  # type: ignore[arg-type]


class _Recorder:
    """A subscriber that records its calls, and checks the store's lock is free during each."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store
        self.calls: list[tuple[str | None, float | None]] = []
        self.lock_was_held = False

    def __call__(self, queue: str | None, run_at: float | None) -> None:
        free = self.store._lock.acquire(blocking=False)
        if free:
            self.store._lock.release()
        else:
            self.lock_was_held = True
        self.calls.append((queue, run_at))

    def take(self) -> list[tuple[str | None, float | None]]:
        calls, self.calls = self.calls, []
        return calls


@pytest.fixture
def watched(no_thread_left: None) -> Iterator[tuple[MemoryStore, _Recorder]]:
    store = MemoryStore()
    recorder = _Recorder(store)
    unsubscribe = store.subscribe_wakeups(recorder)
    yield store, recorder
    assert not recorder.lock_was_held, "a callback ran with the store's lock held"
    unsubscribe()
    store.close()


def test_every_write_that_makes_a_job_claimable_announces_its_queue_and_time(
    watched: tuple[MemoryStore, _Recorder],
) -> None:
    store, recorder = watched
    now = time.time()
    # A batch: one call per queue, its earliest due time. A waiting job is not announced.
    first, later, other = _job(run_at=now + 5), _job(run_at=now), _job("other", run_at=now + 9)
    waiting = _job(depends_on=(first.id,))
    store.enqueue([first, later, other, waiting])
    assert sorted(recorder.take()) == [("other", now + 9), ("work", now)]
    # A retry: at its time.
    (claim,) = store.claim(["work"], 1, worker_id="w", now=now)
    assert claim.id == later.id
    assert store.retry_later(later.id, worker_id="w", attempts=1, run_at=now + 7, error="x", now=now)
    assert recorder.take() == [("work", now + 7)]
    # A completion releasing its dependent.
    (claim,) = store.claim(["work"], 1, worker_id="w", now=now + 6)
    assert claim.id == first.id and recorder.take() == []
    assert store.complete(first.id, worker_id="w", attempts=1, result=None, now=now + 6)
    assert recorder.take() == [("work", waiting.run_at)]
    # A hand-back at stop, a reap, a requeue: due now.
    (claim,) = store.claim(["work"], 1, worker_id="w", now=now + 8)
    assert store.release([claim.id], worker_id="w", now=now + 8) == 1
    assert recorder.take() == [("work", now + 8)]
    (claim,) = store.claim(["work"], 1, worker_id="w", now=now + 8)
    assert store.reap_stale(older_than=now + 100, now=now + 9) == [claim.id]
    assert recorder.take() == [("work", now + 9)]
    letter = store.fail(claim.id, worker_id=None, attempts=None, error="x", now=now + 9)
    assert letter is not None and recorder.take() == []
    store.requeue(claim.id, now=now + 10)
    assert recorder.take() == [("work", now + 10)]
    # A replayed dead letter.
    (claim,) = store.claim(["other"], 1, worker_id="w", now=now + 10)
    letter = store.fail(claim.id, worker_id="w", attempts=1, error="x", now=now + 10)
    assert letter is not None and recorder.take() == []
    store.replay_dead_letter(letter.id, job=_job("other", run_at=now + 11))
    assert recorder.take() == [("other", now + 11)]
    # A resume (every one, as PostgreSQL's); a pause announces nothing.
    store.set_queue_paused("work", True, now=now + 12)
    assert recorder.take() == []
    store.set_queue_paused("work", False, now=now + 12)
    assert recorder.take() == [("work", now + 12)]


def test_a_serial_locks_next_job_is_announced_when_its_holder_finishes_or_its_hold_goes(
    watched: tuple[MemoryStore, _Recorder],
) -> None:
    store, recorder = watched
    now = time.time()
    holder, successor = _job(lock="L", run_at=now), _job(lock="L", run_at=now + 1)
    store.enqueue([holder, successor])
    recorder.take()
    (claim,) = store.claim(["work"], 5, worker_id="w", now=now + 2)
    assert claim.id == holder.id
    assert store.complete(holder.id, worker_id="w", attempts=1, result=None, now=now + 2)
    assert recorder.take() == [("work", now + 1)]
    # Cancelled while running: the hold keeps the lock (nothing announced) until it is released.
    third = _job(lock="L", run_at=now + 3)
    store.enqueue([third])
    recorder.take()
    (claim,) = store.claim(["work"], 5, worker_id="w", now=now + 4)
    assert claim.id == successor.id
    assert store.cancel(successor.id, now=now + 4)
    assert recorder.take() == []
    assert store.release_holds([(successor.id, 1)], worker_id="w") == 1
    assert recorder.take() == [("work", now + 3)]


def test_unsubscribe_is_idempotent_and_a_store_without_subscribers_notes_nothing(no_thread_left: None) -> None:
    store = MemoryStore()
    recorder = _Recorder(store)
    unsubscribe = store.subscribe_wakeups(recorder)
    store.enqueue([_job()])
    assert len(recorder.take()) == 1
    unsubscribe()
    unsubscribe()
    store.enqueue([_job()])
    assert recorder.take() == [] and store._due == {}
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.subscribe_wakeups(recorder)


def test_a_callback_must_be_callable() -> None:
    with pytest.raises(ConfigurationError, match="'nope'"):
        MemoryStore().subscribe_wakeups("nope")  # type: ignore[arg-type]


def test_a_raising_callback_is_logged_and_neither_breaks_the_enqueue_nor_the_other_subscribers(
    watched: tuple[MemoryStore, _Recorder], caplog: pytest.LogCaptureFixture
) -> None:
    store, recorder = watched

    def broken(queue: str | None, run_at: float | None) -> None:
        raise RuntimeError("broken subscriber")

    unsubscribe = store.subscribe_wakeups(broken)
    try:
        with caplog.at_level(logging.ERROR, logger="threaddispatch.stores.memory"):
            job = _job()
            assert store.enqueue([job]) == [job.id]
        assert len(recorder.take()) == 1
        assert "broken subscriber" in caplog.text
        stored = store.get(job.id)
        assert stored is not None and stored.state is JobState.PENDING
    finally:
        unsubscribe()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX fork")
def test_a_forked_child_starts_without_the_parents_subscribers(watched: tuple[MemoryStore, _Recorder]) -> None:
    store, recorder = watched
    pid = os.fork()
    if pid == 0:  # the child: its store is empty, and nobody is subscribed
        code = 1
        try:
            store.enqueue([_job()])
            code = 0 if not recorder.calls and not store._wakeups.active else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    store.enqueue([_job()])
    assert len(recorder.take()) == 1  # the parent's subscriber still hears the parent
