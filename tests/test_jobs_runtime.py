"""JobEngine's runtime: one completion path for every outcome, and the run objects a start() makes.

A spy store records which thread wrote each outcome, and with which call: while the
engine runs, successes AND failures (retrying, failed, cancelled, timed out) are written
by the fetcher, the group commit; after stop, or in immediate mode, by whoever finished
the job, through the same ``complete_many`` (never the single-job ``complete``).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import pytest

from threaddispatch import JobEngine
from threaddispatch.errors import Cancel, Retry, StoreUnavailableError
from threaddispatch.jobs import JobContext
from threaddispatch.stores import MemoryStore
from threaddispatch.stores.base import Completion, DeadLetter, JobState
from threaddispatch.testing import wait_for

FETCHER = "threaddispatch-jobs-fetcher"


class SpyStore(MemoryStore):
    """A MemoryStore that records (method, thread name) for every outcome write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[tuple[str, str]] = []
        self._spy_lock = threading.Lock()
        self._combined = threading.local()  # inside: this thread is in complete_and_claim

    def _note(self, method: str) -> None:
        with self._spy_lock:
            self.writes.append((method, threading.current_thread().name))

    def written(self) -> list[tuple[str, str]]:
        with self._spy_lock:
            return list(self.writes)

    def complete(self, job_id: str, **kwargs: Any) -> bool:
        self._note("complete")
        return super().complete(job_id, **kwargs)

    def complete_many(self, outcomes: Sequence[Completion], *, now: float) -> set[str]:
        if outcomes and not getattr(self._combined, "inside", False):  # not the one complete_and_claim makes
            self._note("complete_many")
        return super().complete_many(outcomes, now=now)

    def complete_and_claim(
        self, outcomes: Sequence[Completion], queues: Sequence[str], limit: int, *, worker_id: str, now: float
    ) -> tuple[set[str], list[Any]]:
        self._note("complete_and_claim")
        self._combined.inside = True
        try:
            return super().complete_and_claim(outcomes, queues, limit, worker_id=worker_id, now=now)
        finally:
            self._combined.inside = False

    def retry_later(self, job_id: str, **kwargs: Any) -> bool:
        self._note("retry_later")
        return super().retry_later(job_id, **kwargs)

    def fail(self, job_id: str, **kwargs: Any) -> DeadLetter | None:
        self._note("fail")
        return super().fail(job_id, **kwargs)

    def cancel(self, job_id: str, **kwargs: Any) -> bool:
        if kwargs.get("worker_id") is not None:  # a handler's Cancel, not an operator's
            self._note("cancel")
        return super().cancel(job_id, **kwargs)


def _engine(store: SpyStore, **options: Any) -> JobEngine:
    defaults: dict[str, Any] = {"concurrency": 2, "poll_interval": 0.01, "max_poll_interval": 0.05}
    return JobEngine(store, **{**defaults, **options})


@pytest.mark.timeout(30)
def test_every_outcome_while_running_is_written_by_the_fetcher() -> None:
    """Success, retry, final failure and Cancel: all written on the fetcher thread (the group commit)."""
    store = SpyStore()
    engine = _engine(store)
    attempts: dict[str, int] = {}

    @engine.job("ok", max_retries=0)
    def ok(ctx: JobContext, payload: object) -> str:
        return "done"

    @engine.job("flaky", max_retries=1)
    def flaky(ctx: JobContext, payload: object) -> None:
        attempts["flaky"] = attempts.get("flaky", 0) + 1
        if attempts["flaky"] == 1:
            raise Retry(delay=0)

    @engine.job("broken", max_retries=0)
    def broken(ctx: JobContext, payload: object) -> None:
        raise ValueError("broken")

    @engine.job("quits", max_retries=3)
    def quits(ctx: JobContext, payload: object) -> None:
        raise Cancel("not wanted")

    ids = [engine.enqueue(name) for name in ("ok", "flaky", "broken", "quits")]
    with engine:
        wait_for(lambda: all(engine.get_job(job_id).state.value in ("completed", "failed", "cancelled")
                             for job_id in ids), timeout=20)  # fmt: skip
    states = [engine.get_job(job_id).state for job_id in ids]
    assert states == [JobState.COMPLETED, JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED]
    writes = store.written()
    methods = {method for method, _ in writes}
    assert {"retry_later", "fail", "cancel"} <= methods
    assert "complete" not in methods
    assert {thread for method, thread in writes if method != "complete_and_claim"} <= {FETCHER}
    assert {thread for _, thread in writes} == {FETCHER}


@pytest.mark.timeout(30)
def test_a_job_finishing_during_stop_is_written_through_complete_many_by_its_worker() -> None:
    """After stop began, the worker writes its own outcome, through the same batch write (not complete())."""
    store = SpyStore()
    engine = _engine(store, concurrency=1)
    started = threading.Event()
    release = threading.Event()

    @engine.job("slow", max_retries=0, timeout=None)
    def slow(ctx: JobContext, payload: object) -> int:
        started.set()
        release.wait(20)
        return 7

    job_id = engine.enqueue("slow")
    engine.start()
    assert started.wait(10)
    stopping = threading.Thread(target=engine.stop, args=(20,), name="test-stopper")
    stopping.start()
    wait_for(lambda: engine.stats()["state"] == "stopping", timeout=10)
    release.set()
    stopping.join(20)
    assert not stopping.is_alive()
    assert engine.result(job_id, timeout=5) == 7
    writes = store.written()
    assert ("complete", "threaddispatch-jobs-worker-1") not in writes
    assert [method for method, _ in writes] == ["complete_many"]
    assert writes[0][1].startswith("threaddispatch-jobs-worker-")


@pytest.mark.timeout(30)
def test_a_timeout_while_running_is_written_by_the_fetcher_and_its_hook_runs_on_a_worker() -> None:
    """A timed-out attempt goes the one path too: written by the fetcher; its hook is not on the heartbeat thread."""
    store = SpyStore()
    engine = _engine(store, heartbeat_interval=0.05, stale_job_threshold=5.0)
    hooked: list[str] = []
    done = threading.Event()
    release = threading.Event()

    class Hooks:
        def on_job_failed(self, job: Any, error: BaseException) -> None:
            hooked.append(threading.current_thread().name)
            done.set()

    engine.add_extension(Hooks())

    @engine.job("hangs", max_retries=0, timeout=0.05)
    def hangs(ctx: JobContext, payload: object) -> None:
        release.wait(20)

    job_id = engine.enqueue("hangs")
    engine.start()
    try:
        assert done.wait(20)
        assert engine.get_job(job_id).state is JobState.FAILED
    finally:
        release.set()
        engine.stop(10)
    assert [method for method, _ in store.written()] == ["fail"]
    assert store.written()[0][1] == FETCHER
    assert hooked and hooked[0].startswith("threaddispatch-jobs-worker-")


@pytest.mark.timeout(30)
def test_immediate_mode_writes_on_the_callers_thread_through_the_same_path() -> None:
    """Immediate mode: the caller writes (complete_many for a success), hooks run there, no thread starts."""
    store = SpyStore()
    engine = _engine(store, immediate=True)
    seen: list[str] = []

    class Hooks:
        def on_job_completed(self, job: Any, result: object) -> None:
            seen.append(threading.current_thread().name)

        def on_job_retrying(self, job: Any, error: BaseException, delay: float) -> None:
            seen.append(threading.current_thread().name)

    engine.add_extension(Hooks())
    calls = []

    @engine.job("twice", max_retries=1)
    def twice(ctx: JobContext, payload: object) -> str:
        calls.append(ctx.attempt)
        if ctx.attempt == 1:
            raise RuntimeError("first")
        return "ok"

    job_id = engine.enqueue("twice")
    assert engine.get_job(job_id).decoded_result() == "ok"
    me = threading.current_thread().name
    assert store.written() == [("retry_later", me), ("complete_many", me)]
    assert seen == [me, me]


@pytest.mark.timeout(30)
def test_each_start_makes_a_new_run_with_its_own_worker_id_and_counters_carry_over() -> None:
    """start() after stop() is a new run (new worker id); stats() counts across runs."""
    store = SpyStore()
    engine = _engine(store)

    @engine.job("ok", max_retries=0)
    def ok(ctx: JobContext, payload: object) -> None:
        return None

    ids = []
    workers = []
    for _ in range(2):
        with engine:
            ids.append(engine.enqueue("ok"))
            wait_for(lambda: engine.get_job(ids[-1]).state is JobState.COMPLETED, timeout=10)
            workers.append(engine.worker_id)
    assert workers[0] != workers[1]
    assert engine.stats()["completed"] == 2
    assert engine.stats()["state"] == "stopped"


@pytest.mark.timeout(60)
def test_every_delayed_job_of_this_process_wakes_the_idle_fetcher_not_only_the_earliest() -> None:
    """Two delayed jobs enqueued here: the idle fetcher wakes for each due time, so the later job does
    not wait for the next poll (max_poll_interval 60 s here, far past the test's 20 s deadline).
    Before the fix only the earliest due time was kept: the later one was forgotten once it passed."""
    store = MemoryStore()  # no store wake-ups: only the fetcher's own due times can wake it
    engine = JobEngine(store, poll_interval=30, max_poll_interval=60)
    done = threading.Event()
    ran: list[int] = []

    def record(ctx: JobContext, payload: Any) -> None:
        ran.append(payload["n"])
        if len(ran) == 3:
            done.set()

    engine.register("record", record)
    engine.start()
    try:
        # Let the fetcher go idle first (its first claim finds nothing), then enqueue.
        wait_for(lambda: engine.stats()["idle_polls"] >= 1, 20, message="the fetcher went idle")
        for n, delay in enumerate((0.2, 0.4, 0.6)):
            engine.enqueue("record", {"n": n}, delay=delay)
        assert done.wait(20), f"only {ran} ran: a later due time was forgotten"
        assert sorted(ran) == [0, 1, 2]
    finally:
        assert engine.stop(10)


class _BeatOrderStore(MemoryStore):
    """Records the order of one heartbeat turn's writes (jobs, serial lock holds, worker row)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def heartbeat(self, job_ids: Sequence[str], *, worker_id: str, now: float) -> set[str]:
        self.calls.append("jobs")
        return super().heartbeat(job_ids, worker_id=worker_id, now=now)

    def heartbeat_holds(self, job_ids: Sequence[str], *, worker_id: str, now: float) -> set[str]:
        self.calls.append("holds")
        return super().heartbeat_holds(job_ids, worker_id=worker_id, now=now)

    def heartbeat_worker(self, worker_id: str, *, running: int, now: float) -> bool:
        self.calls.append("worker" if running == 0 else "worker-busy")
        return super().heartbeat_worker(worker_id, running=running, now=now)


@pytest.mark.timeout(30)
def test_a_heartbeat_turn_writes_the_running_jobs_heartbeat_before_anything_else() -> None:
    """A late job heartbeat gets a running job reaped and run twice; a late worker row does not. So each
    turn writes the jobs' first: measured on PostgreSQL under load, the two writes that came before it
    delayed it by up to 135 ms."""
    store = _BeatOrderStore()
    release = threading.Event()
    engine = JobEngine(store, concurrency=1, poll_interval=0.01, heartbeat_interval=0.02, stale_job_threshold=30)

    @engine.job("hold")
    def hold(ctx: JobContext, payload: Any) -> None:
        assert release.wait(20)

    engine.enqueue("hold", {})
    engine.start()
    try:
        wait_for(lambda: store.calls.count("jobs") >= 3, timeout=20, message="three heartbeats of the running job")
    finally:
        release.set()
        engine.stop(10)
    calls = list(store.calls)
    # In every turn with the job running the jobs' write came first: each worker-row write that
    # counted a running job follows one more jobs' write than the worker-row writes before it.
    busy = [index for index, call in enumerate(calls) if call == "worker-busy"]
    assert busy, calls
    for turn, index in enumerate(busy, 1):
        assert calls[:index].count("jobs") >= turn, calls


class _SlowUpkeepStore(MemoryStore):
    """Counts job heartbeats; its ``reap_stale`` blocks (a slow store, a long recovery) until ``unblock``."""

    def __init__(self) -> None:
        super().__init__()
        self.beats = 0
        self.reaping = threading.Event()
        self.unblock = threading.Event()

    def heartbeat(self, job_ids: Sequence[str], *, worker_id: str, now: float) -> set[str]:
        if job_ids:
            self.beats += 1
        return super().heartbeat(job_ids, worker_id=worker_id, now=now)

    def reap_stale(self, *, older_than: float, now: float) -> list[str]:
        self.reaping.set()
        assert self.unblock.wait(20)
        return super().reap_stale(older_than=older_than, now=now)


@pytest.mark.timeout(30)
def test_a_slow_reap_delays_neither_the_heartbeats_nor_a_job_timeout() -> None:
    """Recovering stale jobs, deleting stale worker rows and purging run beside the heartbeats, not
    between two of them: a reap (or a purge of a million rows) longer than ``stale_job_threshold``
    minus one interval got this worker's running jobs taken for a dead worker's and run twice."""
    store = _SlowUpkeepStore()
    release = threading.Event()
    engine = JobEngine(store, concurrency=2, poll_interval=0.01, heartbeat_interval=0.02, stale_job_threshold=30)

    @engine.job("hold")
    def hold(ctx: JobContext, payload: Any) -> None:
        assert release.wait(20)

    @engine.job("hang", max_retries=0, timeout=0.05)
    def hang(ctx: JobContext, payload: Any) -> None:
        ctx.wait(20)

    engine.enqueue("hold", {})
    engine.start()
    try:
        assert store.reaping.wait(20)
        beats = store.beats
        wait_for(lambda: store.beats >= beats + 3, timeout=20, message="heartbeats while a reap is under way")
        timed_out = engine.enqueue("hang", {})
        wait_for(
            lambda: engine.get_job(timed_out).state is JobState.FAILED,
            timeout=20,
            message="the job's timeout while a reap is under way",
        )
        assert not store.unblock.is_set()
    finally:
        store.unblock.set()
        release.set()
        engine.stop(10)


@pytest.mark.timeout(30)
def test_run_pending_writes_each_outcome_with_the_next_claim() -> None:
    """One store call per job, not two: a success goes in the next claim's ``complete_and_claim`` (the
    group commit the fetcher uses), a failure in its own write before that claim; every outcome is
    written, and its hook has run, when run_pending returns."""
    store = SpyStore()
    engine = _engine(store)
    completed: list[str] = []

    class Hooks:
        def on_job_completed(self, job: Any, result: object) -> None:
            completed.append(job.id)

    engine.add_extension(Hooks())
    engine.register("ok", lambda ctx, payload: payload)
    engine.register("boom", _raise, max_retries=0)
    ids = [engine.enqueue("ok", n) for n in range(3)]
    failing = engine.enqueue("boom")
    assert engine.run_pending() == 4
    assert [engine.get_job(job_id).state for job_id in ids] == [JobState.COMPLETED] * 3
    assert [engine.result(job_id, timeout=0) for job_id in ids] == [0, 1, 2]
    assert engine.get_job(failing).state is JobState.FAILED
    assert completed == ids
    assert [method for method, _ in store.written()] == ["complete_and_claim"] * 3 + ["fail"]
    assert engine.run_pending() == 0


def _raise(ctx: JobContext, payload: object) -> None:
    raise RuntimeError("boom")


@pytest.mark.timeout(30)
def test_run_pending_raises_a_store_error_of_its_claim_and_writes_later_outcomes_at_once() -> None:
    """The claim that carries a success fails: run_pending raises it (that job, its completion not
    stored, is left to the reaper and logged, as the fetcher leaves it); the caller's thread defers
    no outcome after that: an immediate enqueue on it is settled when enqueue returns."""
    store = SpyStore()
    engine = _engine(store)
    engine.register("ok", lambda ctx, payload: payload)
    first = engine.enqueue("ok", 1)
    engine.enqueue("ok", 2)
    original = store.complete_and_claim

    def broken(*args: Any, **kwargs: Any) -> Any:
        store.complete_and_claim = original  # type: ignore[method-assign]  # once
        raise StoreUnavailableError("the store went away")

    store.complete_and_claim = broken  # type: ignore[method-assign]
    with pytest.raises(StoreUnavailableError, match="went away"):
        engine.run_pending()
    assert engine.get_job(first).state is JobState.RUNNING  # claimed by this run, completion not stored
    immediate = JobEngine(store, immediate=True)
    immediate.register("ok", lambda ctx, payload: payload)
    assert immediate.get_job(immediate.enqueue("ok", 3)).state is JobState.COMPLETED


@pytest.mark.timeout(30)
def test_a_job_an_immediate_enqueue_runs_inside_run_pending_retries_at_once() -> None:
    """Only run_pending's own jobs wait for its next claim: a job enqueued by one of them on an
    immediate engine is run (with its retries, at once) by that enqueue, as anywhere else."""
    store = SpyStore()
    engine = JobEngine(store, immediate=True)
    tries: list[int] = []
    children: list[str] = []

    @engine.job("flaky", max_retries=5)
    def flaky(ctx: JobContext, payload: object) -> str:
        tries.append(ctx.attempt)
        if len(tries) < 3:
            raise Retry(delay=0)
        return "ok"

    @engine.job("parent")
    def parent(ctx: JobContext, payload: object) -> None:
        children.append(engine.enqueue("flaky", 1))

    producer = JobEngine(store)
    producer.register("parent", lambda ctx, payload: None)
    parent_id = producer.enqueue("parent", 0)
    assert engine.run_pending() == 1  # the parent; the child's three attempts were its enqueue's
    assert tries == [1, 2, 3]
    assert engine.get_job(parent_id).state is JobState.COMPLETED
    assert engine.get_job(children[0]).state is JobState.COMPLETED
