"""Job dependencies and chains: ``enqueue(..., depends_on=[...])``, the waiting state, ``chain(...)``.

A dependent is stored ``waiting`` (never claimed) until every dependency completed; a failed
or cancelled dependency cancels it (or it runs, with ``on_dependency_failure="run"``). The
release happens in the completion's own transaction; on every store kind.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from threaddispatch.backoff import Constant
from threaddispatch.errors import ConfigurationError, JobNotFoundError
from threaddispatch.jobs import JobContext, JobEngine, JobSpec
from threaddispatch.stores import Store
from threaddispatch.stores.base import JobState

FAST: dict[str, Any] = {"poll_interval": 0.01, "max_poll_interval": 0.05, "heartbeat_interval": 0.05,
                        "shutdown_timeout": 5.0, "backoff": Constant(0.01)}  # fmt: skip


@pytest.fixture
def make_engine() -> Iterator[Callable[..., JobEngine]]:
    """Engines with short intervals and the jobs ``add`` (payload + the dependencies' results) and ``boom``."""
    engines: list[JobEngine] = []

    def make(store: Store, **options: Any) -> JobEngine:
        engine = JobEngine(store, **{**FAST, **options})
        ran: list[object] = []
        lock = threading.Lock()

        def add(ctx: JobContext, payload: int) -> int:
            results = ctx.engine.dependency_results(ctx)
            with lock:
                ran.append(payload)
            return payload + sum(r for r in results if isinstance(r, int))

        def boom(ctx: JobContext, payload: object) -> None:
            with lock:
                ran.append(payload)
            raise RuntimeError("boom")

        engine.register("add", add)
        engine.register("boom", boom, max_retries=0)
        engine.ran = ran  # type: ignore[attr-defined]  # what the handlers ran, in order
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop(5)


def _state(engine: JobEngine, job_id: str) -> JobState:
    return engine.get_job(job_id).state


def test_a_dependent_waits_then_runs_after_its_dependency(store: Store, make_engine: Callable[..., JobEngine]) -> None:
    """Waiting (never claimed) until the dependency completed; its handler reads the dependency's result."""
    engine = make_engine(store)
    first = engine.enqueue("add", 1, delay=3600)  # not due: the dependent must not run meanwhile
    second = engine.enqueue("add", 10, depends_on=[first])
    job = engine.get_job(second)
    assert (job.state, job.depends_on, job.waiting_on) == (JobState.WAITING, (first,), 1)
    assert job.to_dict()["depends_on"] == [first] and job.to_dict()["state"] == "waiting"
    assert engine.counts()["waiting"] == 1
    assert engine.run_pending() == 0
    assert store.claim(["default"], 10, worker_id="w", now=job.run_at + 1) == []
    engine.cancel(first)  # then enqueue an equal chain that can run
    assert _state(engine, second) is JobState.CANCELLED
    assert "dependency" in (engine.get_job(second).error or "")
    first = engine.enqueue("add", 1)
    second = engine.enqueue("add", 10, depends_on=[first])
    assert engine.run_pending() == 2
    assert engine.ran == [1, 10]  # type: ignore[attr-defined]
    assert engine.result(second, timeout=5) == 11
    assert engine.dependency_results(engine.get_job(second)) == [1]


def test_a_failed_dependency_cancels_the_chain_or_runs_with_policy_run(
    store: Store, make_engine: Callable[..., JobEngine]
) -> None:
    """A dependency that fails cancels its dependents, and theirs in turn; policy "run" runs anyway."""
    engine = make_engine(store)
    failing = engine.enqueue("boom", "x")
    cancelled = engine.enqueue("add", 1, depends_on=[failing])
    grandchild = engine.enqueue("add", 2, depends_on=[cancelled])
    runs_anyway = engine.enqueue("add", 3, depends_on=[failing], on_dependency_failure="run")
    assert engine.run_pending() == 2
    assert engine.ran == ["x", 3]  # type: ignore[attr-defined]
    assert _state(engine, failing) is JobState.FAILED
    assert (_state(engine, cancelled), _state(engine, grandchild)) == (JobState.CANCELLED, JobState.CANCELLED)
    assert engine.get_job(cancelled).error == f"dependency {failing} failed"
    assert engine.get_job(grandchild).error == f"dependency {cancelled} cancelled"
    assert engine.result(runs_anyway, timeout=5) == 3
    assert engine.dependency_results(engine.get_job(runs_anyway)) == [None]
    # A dependency already failed at enqueue: cancelled at once (or pending, with "run").
    late = engine.enqueue("add", 4, depends_on=[failing])
    assert _state(engine, late) is JobState.CANCELLED
    assert _state(engine, engine.enqueue("add", 5, depends_on=[failing], on_dependency_failure="run")) is (
        JobState.PENDING
    )


def test_a_completed_dependency_leaves_the_job_pending(store: Store, make_engine: Callable[..., JobEngine]) -> None:
    engine = make_engine(store)
    first = engine.enqueue("add", 1)
    assert engine.run_pending() == 1
    second = engine.enqueue("add", 2, depends_on=[first, first])
    assert (_state(engine, second), engine.get_job(second).waiting_on) == (JobState.PENDING, 0)
    assert engine.run_pending() == 1
    assert engine.result(second, timeout=5) == 3


@pytest.mark.timeout(120)
def test_a_fan_in_of_100_jobs_into_one(store: Store, make_engine: Callable[..., JobEngine]) -> None:
    """One job waits for 100, run by 4 worker threads; it runs once, after all of them, with their results."""
    engine = make_engine(store, concurrency=4)
    parts = engine.enqueue_many("add", list(range(100)))
    total = engine.enqueue("add", 1000, depends_on=parts)
    assert engine.get_job(total).waiting_on == 100
    engine.start()
    assert engine.result(total, timeout=60) == 1000 + sum(range(100))
    ran: list[object] = engine.ran  # type: ignore[attr-defined]
    assert len(ran) == 101 and ran[-1] == 1000
    assert sorted(ran[:-1]) == list(range(100))  # type: ignore[type-var]


@pytest.mark.timeout(60)
def test_chain_passes_each_result_to_the_next(store: Store, make_engine: Callable[..., JobEngine]) -> None:
    """chain(a, b, c): one write, each step depending on the one before, reading its result."""
    engine = make_engine(store)

    @engine.job("double")
    def double(ctx: JobContext, payload: int) -> int:
        (previous,) = ctx.engine.dependency_results(ctx) or [payload]
        return int(previous) * 2

    ids = engine.chain(engine.job_spec("add", 3), double.spec(0), engine.job_spec("double", 0, priority=2))
    assert [engine.get_job(i).depends_on for i in ids] == [(), (ids[0],), (ids[1],)]
    assert [_state(engine, i) for i in ids] == [JobState.PENDING, JobState.WAITING, JobState.WAITING]
    engine.start()
    assert engine.result(ids[-1], timeout=30) == 12
    assert engine.get_job(ids[-1]).priority == 2


def test_chain_stops_at_a_failed_step(store: Store, make_engine: Callable[..., JobEngine]) -> None:
    engine = make_engine(store)
    ids = engine.chain(
        engine.job_spec("add", 1), engine.job_spec("boom", "x"), engine.job_spec("add", 2),
        engine.job_spec("add", 3, on_dependency_failure="run"),
    )  # fmt: skip
    assert engine.run_pending() == 3
    assert [_state(engine, i) for i in ids[:3]] == [JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED]
    assert engine.result(ids[3], timeout=5) == 3  # policy "run": its dependency (step 3) was cancelled


def test_cancelling_a_waiting_job_and_its_dependency(store: Store, make_engine: Callable[..., JobEngine]) -> None:
    engine = make_engine(store)
    first = engine.enqueue("add", 1, delay=3600)
    waiting = engine.enqueue("add", 2, depends_on=[first])
    engine.cancel(waiting, running=False)
    assert _state(engine, waiting) is JobState.CANCELLED
    engine.cancel(first)
    assert _state(engine, waiting) is JobState.CANCELLED


def test_unknown_dependency_refuses_the_enqueue(store: Store, make_engine: Callable[..., JobEngine]) -> None:
    engine = make_engine(store)
    known = engine.enqueue("add", 1)
    with pytest.raises(JobNotFoundError, match="nope"):
        engine.enqueue("add", 2, depends_on=[known, "nope"])
    with pytest.raises(JobNotFoundError, match="nope"):
        engine.enqueue_many("add", [3, 4], depends_on=["nope"])
    with pytest.raises(JobNotFoundError, match="nope"):
        engine.chain(engine.job_spec("add", 5), engine.job_spec("add", 6, depends_on=["nope"]))
    assert sum(engine.counts().values()) == 1


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"depends_on": "abc"}, "'abc'"),
        ({"depends_on": [1]}, "[1]"),
        ({"depends_on": [""]}, "['']"),
        ({"on_dependency_failure": "skip"}, "'skip'"),
    ],
)
def test_bad_dependency_options_raise_naming_the_value(
    store: Store, make_engine: Callable[..., JobEngine], options: dict[str, Any], named: str
) -> None:
    engine = make_engine(store)
    with pytest.raises(ConfigurationError) as raised:
        engine.enqueue("add", 1, **options)
    assert named in str(raised.value)
    with pytest.raises(ConfigurationError):
        engine.chain(engine.job_spec("add", 1, **options))


def test_bad_chain_steps_raise(store: Store, make_engine: Callable[..., JobEngine]) -> None:
    engine = make_engine(store)
    with pytest.raises(ConfigurationError, match="at least one"):
        engine.chain()
    with pytest.raises(ConfigurationError, match="JobSpec"):
        engine.chain(engine.job_spec("add", 1), ("add", 2))  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="unique_key"):
        engine.chain(engine.job_spec("add", 1, unique_key="k"))
    with pytest.raises(ConfigurationError, match="bogus"):
        engine.chain(JobSpec("add", 1, {"bogus": 1}))
    assert sum(engine.counts().values()) == 0


def test_a_waiting_job_holds_its_unique_key(store: Store, make_engine: Callable[..., JobEngine]) -> None:
    engine = make_engine(store)
    first = engine.enqueue("add", 1, delay=3600)
    waiting = engine.enqueue("add", 2, depends_on=[first], unique_key="k")
    assert engine.enqueue("add", 3, unique_key="k") == waiting


@pytest.mark.parametrize("store_kind", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_release_waiting_settles_a_missed_release(store: Store, make_engine: Callable[..., JobEngine]) -> None:
    """The upkeep's sweep releases a dependent whose dependency finished without releasing it (written by hand)."""
    engine = make_engine(store)
    done = engine.enqueue("add", 1, delay=3600)
    failed = engine.enqueue("add", 2, delay=3600)
    released = engine.enqueue("add", 3, depends_on=[done])
    cancelled = engine.enqueue("add", 4, depends_on=[failed])
    assert store.release_waiting(now=1.0) == 0
    _write(store, "UPDATE dispatch_jobs SET state = 'completed' WHERE id = {m}", done)
    _write(store, "UPDATE dispatch_jobs SET state = 'failed' WHERE id = {m}", failed)
    assert store.release_waiting(now=1.0) == 2
    assert (_state(engine, released), _state(engine, cancelled)) == (JobState.PENDING, JobState.CANCELLED)


def _write(store: Store, sql: str, job_id: str) -> None:
    """Change a job behind the store's back (no release of its dependents)."""
    from threaddispatch.stores import SQLiteStore

    if isinstance(store, SQLiteStore):
        import sqlite3

        with sqlite3.connect(store.path) as conn:
            conn.execute(sql.format(m="?"), (job_id,))
        return
    query = sql.format(m="%s")
    store._run("writing by hand", lambda conn: conn.execute(query, (job_id,)), idempotent=True)  # type: ignore[attr-defined]
