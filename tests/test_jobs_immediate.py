"""JobEngine(immediate=True): enqueue runs the job on the caller's thread, with the store, retries and hooks."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from threaddispatch.backoff import Constant
from threaddispatch.errors import Cancel, CancelledError, InvalidStateError, Retry
from threaddispatch.jobs import Config, JobContext, JobEngine
from threaddispatch.middleware import Middleware
from threaddispatch.stores import Store
from threaddispatch.stores.base import JobState

pytestmark = pytest.mark.timeout(30)


class Hooks:
    """An extension recording every hook call: (hook, job id, detail)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, object]] = []

    def on_job_enqueued(self, job: Any) -> None:
        self.calls.append(("enqueued", job.id, None))

    def on_job_started(self, job: Any) -> None:
        self.calls.append(("started", job.id, job.attempts))

    def on_job_completed(self, job: Any, result: object) -> None:
        self.calls.append(("completed", job.id, result))

    def on_job_retrying(self, job: Any, error: BaseException, delay: float) -> None:
        self.calls.append(("retrying", job.id, delay))

    def on_job_failed(self, job: Any, error: BaseException) -> None:
        self.calls.append(("failed", job.id, str(error)))

    def on_job_dlq(self, job: Any, letter: Any) -> None:
        self.calls.append(("dlq", job.id, letter.id))

    def on_job_cancelled(self, job: Any, error: BaseException | None) -> None:
        self.calls.append(("cancelled", job.id, None))

    def names(self) -> list[str]:
        return [hook for hook, _, _ in self.calls]


@pytest.fixture
def hooks() -> Hooks:
    return Hooks()


@pytest.fixture
def engine(store: Store, hooks: Hooks) -> JobEngine:
    """An immediate engine whose backoff would wait an hour (immediate mode does not)."""
    return JobEngine(store, immediate=True, backoff=Constant(3600.0), extensions=[hooks])


def test_enqueue_runs_the_job_on_the_callers_thread_and_stores_its_result(engine: JobEngine, hooks: Hooks) -> None:
    threads: list[threading.Thread] = []

    def double(ctx: JobContext, payload: int) -> int:
        threads.append(threading.current_thread())
        return payload * 2

    engine.register("double", double)
    job_id = engine.enqueue("double", 21)
    assert threads == [threading.current_thread()]
    assert engine.result(job_id, timeout=0) == 42
    job = engine.get_job(job_id)
    assert (job.state, job.attempts, job.result) == (JobState.COMPLETED, 1, "42")
    assert hooks.calls == [("enqueued", job_id, None), ("started", job_id, 1), ("completed", job_id, 42)]
    assert not [t for t in threading.enumerate() if t.name.startswith("threaddispatch-")]


def test_retries_run_at_once_without_the_backoff(engine: JobEngine, hooks: Hooks) -> None:
    """A failing attempt with retries left is retried at once (the hook gets delay 0.0), until one succeeds."""
    attempts: list[int] = []

    def flaky(ctx: JobContext, payload: object) -> str:
        attempts.append(ctx.attempt)
        if ctx.attempt < 3:
            raise RuntimeError(f"attempt {ctx.attempt} failed")
        return "done"

    engine.register("flaky", flaky, max_retries=5)
    job_id = engine.enqueue("flaky")
    assert attempts == [1, 2, 3]
    assert engine.result(job_id, timeout=0) == "done"
    assert engine.get_job(job_id).attempts == 3
    assert [c for c in hooks.calls if c[0] == "retrying"] == [("retrying", job_id, 0.0)] * 2


def test_a_retry_request_with_a_delay_runs_at_once(engine: JobEngine) -> None:
    def once_more(ctx: JobContext, payload: object) -> int:
        if ctx.attempt == 1:
            raise Retry(delay=600)
        return ctx.attempt

    engine.register("once_more", once_more, max_retries=1)
    assert engine.result(engine.enqueue("once_more"), timeout=0) == 2


def test_cancel_stops_for_good(engine: JobEngine, hooks: Hooks) -> None:
    calls: list[int] = []

    def give_up(ctx: JobContext, payload: object) -> None:
        calls.append(ctx.attempt)
        raise Cancel("not needed")

    engine.register("give_up", give_up, max_retries=5)
    job_id = engine.enqueue("give_up")
    assert calls == [1]
    assert engine.get_job(job_id).state is JobState.CANCELLED
    with pytest.raises(CancelledError):
        engine.result(job_id, timeout=0)
    assert hooks.names()[-1] == "cancelled"


def test_the_last_failure_is_dead_lettered(engine: JobEngine, hooks: Hooks) -> None:
    def boom(ctx: JobContext, payload: object) -> None:
        raise RuntimeError(f"boom {ctx.attempt}")

    engine.register("boom", boom, max_retries=2)
    job_id = engine.enqueue("boom", {"x": 1})
    job = engine.get_job(job_id)
    assert (job.state, job.attempts) == (JobState.FAILED, 3)
    with pytest.raises(InvalidStateError, match="boom 3"):
        engine.result(job_id, timeout=0)
    [letter] = engine.dlq()
    assert (letter.job_id, letter.attempts) == (job_id, 3)
    assert hooks.names() == [
        "enqueued", "started", "retrying", "started", "retrying", "started", "failed", "dlq",
    ]  # fmt: skip
    assert hooks.calls[-1] == ("dlq", job_id, letter.id)
    assert engine.dlq_count() == 1


def test_middleware_wraps_each_attempt(store: Store) -> None:
    seen: list[str] = []

    class Trace(Middleware):
        def before_job(self, ctx: JobContext) -> None:
            seen.append(f"before {ctx.attempt}")

        def after_job(self, ctx: JobContext, result: object, error: BaseException | None) -> None:
            seen.append(f"after {ctx.attempt} {result!r} {type(error).__name__ if error else None}")

    engine = JobEngine(store, immediate=True, backoff=Constant(3600.0), middleware=[Trace()])

    def second_time(ctx: JobContext, payload: object) -> str:
        if ctx.attempt == 1:
            raise ValueError("first")
        return "ok"

    engine.register("second_time", second_time)
    engine.enqueue("second_time")
    assert seen == ["before 1", "after 1 None ValueError", "before 2", "after 2 'ok' None"]


def test_unique_key_behaves_as_in_normal_mode(engine: JobEngine) -> None:
    """A key held by an active job returns the holder's id and runs nothing; a finished holder frees the key."""
    runs: list[object] = []
    inner: list[str] = []

    def keyed(ctx: JobContext, payload: object) -> None:
        runs.append(payload)
        if payload == "outer":
            inner.append(ctx.engine.enqueue("keyed", "inner", unique_key="k"))  # its own key is held: no run

    engine.register("keyed", keyed)
    first = engine.enqueue("keyed", "outer", unique_key="k")
    assert inner == [first] and runs == ["outer"]
    later = engine.enqueue("keyed", "again", unique_key="k")  # the first finished: the key is free
    assert later != first and runs == ["outer", "again"]
    held = engine.enqueue("keyed", "delayed", unique_key="d", delay=3600)
    assert engine.enqueue("keyed", "now", unique_key="d") == held
    assert runs == ["outer", "again"]


def test_delayed_jobs_wait_for_run_pending(engine: JobEngine, store: Store) -> None:
    """A job with delay/run_at stays pending; run_pending() runs every job that is due by then."""
    runs: list[object] = []
    engine.register("note", lambda ctx, payload: runs.append(payload))
    later = engine.enqueue("note", "later", delay=3600)
    soon = engine.enqueue("note", "soon", run_at=time.time() - 1)  # due already: runs now
    assert runs == ["soon"] and engine.get_job(later).state is JobState.PENDING
    assert engine.run_pending() == 0
    # Make it due through the store, as the passing of time would.
    job = engine.get_job(later)
    assert [claimed.id for claimed in store.claim([job.queue], 1, worker_id="w", now=job.run_at)] == [later]
    assert store.retry_later(later, worker_id="w", attempts=1, run_at=time.time(), error="moved", now=time.time())
    assert engine.run_pending() == 1
    assert runs == ["soon", "later"] and engine.get_job(later).state is JobState.COMPLETED
    assert engine.result(soon, timeout=0) is None


def test_an_immediate_engine_does_not_start(engine: JobEngine) -> None:
    with pytest.raises(InvalidStateError, match="immediate"):
        engine.start()
    with engine as same:  # the context manager starts nothing either
        assert same is engine and not engine.running
    assert engine.stop(1)


def test_immediate_comes_from_config(store: Store) -> None:
    engine = JobEngine.from_config(store, Config(immediate=True))
    engine.register("one", lambda ctx, payload: 1)
    assert engine.result(engine.enqueue("one"), timeout=0) == 1
    assert Config().immediate is False


def test_a_timeout_is_checked_when_the_handler_returns(engine: JobEngine) -> None:
    """Nothing interrupts the caller's thread: an attempt that ran past its timeout then counts as timed out."""

    def slow(ctx: JobContext, payload: object) -> str:
        if ctx.attempt == 1:
            assert ctx.deadline is not None
            while time.monotonic() <= ctx.deadline:
                ctx.wait(0.01)
        return f"attempt {ctx.attempt}"

    engine.register("slow", slow, timeout=0.05, max_retries=1)
    job_id = engine.enqueue("slow")
    assert engine.result(job_id, timeout=0) == "attempt 2"


def test_enqueue_many_runs_each_job(engine: JobEngine) -> None:
    engine.register("square", lambda ctx, payload: payload * payload)
    ids = engine.enqueue_many("square", [1, 2, 3])
    assert [engine.result(job_id, timeout=0) for job_id in ids] == [1, 4, 9]


def test_run_pending_runs_what_another_producer_stored(store: Store) -> None:
    """A non-immediate producer stores jobs; an immediate engine's run_pending() runs them (serverless drain)."""
    producer = JobEngine(store)
    producer.register("add", lambda ctx, payload: payload + 1)
    ids = [producer.enqueue("add", n) for n in range(3)]
    worker = JobEngine(store, immediate=True)
    worker.register("add", lambda ctx, payload: payload + 1)
    assert worker.run_pending() == 3
    assert [worker.result(job_id, timeout=0) for job_id in ids] == [1, 2, 3]


def test_a_backoff_that_raises_makes_the_failure_final(store: Store, hooks: Hooks) -> None:
    """The retry decision is RetryPolicy.next_delay's: a broken backoff fails the job for good, logged, never lost."""

    def broken_backoff(attempt: int) -> float:
        raise ZeroDivisionError("bad backoff")

    engine = JobEngine(store, immediate=True, backoff=broken_backoff, extensions=[hooks])
    engine.register("boom", _raise_runtime_error, max_retries=3)
    job_id = engine.enqueue("boom")
    job = engine.get_job(job_id)
    assert (job.state, job.attempts) == (JobState.FAILED, 1)
    assert "handler failed" in (job.error or "")
    assert hooks.names() == ["enqueued", "started", "failed", "dlq"]


def _raise_runtime_error(ctx: JobContext, payload: object) -> None:
    raise RuntimeError("handler failed")
