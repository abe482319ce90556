"""Hostile: a queue's ``max_concurrency`` while a handler outlives its job (a timeout, a cancel), and limits
held across two engines on one SQLite file.

The promises attacked (README, "Queues"): ``QueueConfig(name, max_concurrency, rate_limit)``;
"Limits hold for the whole cluster: every process on one SQLite file or one PostgreSQL database
(and every engine sharing a MemoryStore) claims within one token bucket and one running count kept
in the store". A Python thread cannot be killed, so a handler past its timeout, or a running job
cancelled with ``cancel(id)``, goes on running on its worker thread until it returns (its
``ctx.cancelled`` set, its outcome discarded). Serial locks keep a hold for such a handler until it
returns (``LockHold``); a queue's slot must be kept the same way, or the queue's next job starts
beside the old handler: two handlers of a ``max_concurrency=1`` queue at once. It holds (pins).
The first handler waits, bounded, for the second to start, so an overlap shows as state, not as
a timing.

The limits across two engines (two SQLiteStore objects of one file, in one process) hold: a
concurrency peak never above the limit, and a rate-limited queue's starts spread at least
``(n - burst) / rate`` apart (a lower bound that load can only widen).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import STORE_FACTORIES, STORE_PARAMS

from threaddispatch import JobEngine, QueueConfig
from threaddispatch.jobs import JobContext
from threaddispatch.stores import JobState, SQLiteStore, Store
from threaddispatch.testing import wait_for

#: How long the first handler waits for the second to start before it returns (the bound, not a timing).
HOLD = 3.0


@pytest.fixture(params=STORE_PARAMS)
def limit_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    kind: str = request.param
    if kind == "postgresql":
        url: str = request.getfixturevalue("pg_url")
    else:
        url = "memory://" if kind == "memory" else f"sqlite:///{tmp_path / 'jobs.db'}"
    store = STORE_FACTORIES[kind](url)
    yield store
    store.close()


class _Runs:
    """Which handlers of the queue run now; every start that found another one running."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # guards inside and overlaps
        self.inside: list[str] = []
        self.overlaps: list[tuple[str, list[str]]] = []
        self.started = {"first": threading.Event(), "second": threading.Event()}

    def run(self, ctx: JobContext, name: str) -> str:
        with self.lock:
            if self.inside:
                self.overlaps.append((name, list(self.inside)))
            self.inside.append(name)
        self.started[name].set()
        try:
            if name == "first":
                # Ignores ctx.cancelled, as blocking code does; ends when the second starts, or at the bound.
                self.started["second"].wait(HOLD)
            return name
        finally:
            with self.lock:
                self.inside.remove(name)


def _engine(store: Store, runs: _Runs, timeout: float | None) -> JobEngine:
    engine = JobEngine(
        store, concurrency=4, queues=["narrow"], poll_interval=0.02, max_poll_interval=0.05,
        queue_configs=[QueueConfig("narrow", max_concurrency=1)],
    )  # fmt: skip

    def handler(ctx: JobContext, payload: Any) -> str:
        return runs.run(ctx, payload)

    engine.register("one_at_a_time", handler, queue="narrow", max_retries=0, timeout=timeout)
    return engine


@pytest.mark.timeout(60)
def test_a_job_past_its_timeout_still_running_keeps_its_queue_slot(limit_store: Store) -> None:
    """max_concurrency=1: the queue's next job waits until the timed-out handler returns."""
    runs = _Runs()
    engine = _engine(limit_store, runs, timeout=0.2)
    engine.start()
    try:
        first = engine.enqueue("one_at_a_time", "first")
        second = engine.enqueue("one_at_a_time", "second")
        assert runs.started["first"].wait(10)
        wait_for(lambda: engine.get_job(first).state is JobState.FAILED, timeout=10)
        assert engine.result(second, timeout=HOLD + 10) == "second"
        assert runs.overlaps == []
    finally:
        runs.started["second"].set()
        engine.stop(10)


@pytest.mark.timeout(60)
def test_a_cancelled_job_still_running_keeps_its_queue_slot(limit_store: Store) -> None:
    """max_concurrency=1: after cancel(first) the next job waits until first's handler returns."""
    runs = _Runs()
    engine = _engine(limit_store, runs, timeout=None)
    engine.start()
    try:
        first = engine.enqueue("one_at_a_time", "first")
        second = engine.enqueue("one_at_a_time", "second")
        assert runs.started["first"].wait(10)
        engine.cancel(first)
        assert engine.get_job(first).state is JobState.CANCELLED
        assert engine.result(second, timeout=HOLD + 10) == "second"
        assert runs.overlaps == []
    finally:
        runs.started["second"].set()
        engine.stop(10)


@pytest.mark.timeout(120)
def test_two_engines_on_one_sqlite_file_hold_max_concurrency_and_rate_limit(tmp_path: Path) -> None:
    """A max_concurrency=2 queue peaks at most at 2; 30 jobs at 20/s (burst 1) span at least 29/20 s; attempts 1."""
    path = tmp_path / "jobs.db"
    SQLiteStore(path).close()
    lock = threading.Lock()  # guards state
    state: dict[str, Any] = {"now": 0, "peak": 0, "starts": []}
    leave = threading.Event()

    def work(ctx: JobContext, payload: Any) -> None:
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
            state["starts"].append(time.monotonic())
        leave.wait(0.005)  # never set: a short stay that lets the other slot's job overlap
        with lock:
            state["now"] -= 1

    engines = []
    for _ in range(2):
        engine = JobEngine(
            SQLiteStore(path), concurrency=8, queues=["narrow", "slow"], poll_interval=0.01, max_poll_interval=0.02,
            queue_configs=[QueueConfig("narrow", max_concurrency=2),
                           QueueConfig("slow", rate_limit=20.0, rate_burst=1)],
        )  # fmt: skip
        engine.register("narrow_job", work, queue="narrow")
        engine.register("slow_job", work, queue="slow")
        engines.append(engine)
    first = engines[0]
    try:
        first.enqueue_many("narrow_job", list(range(120)))
        for engine in engines:
            engine.start()
        wait_for(lambda: first.counts()["completed"] == 120, 90, message="120 narrow jobs completed")
        assert 1 <= state["peak"] <= 2
        with lock:
            state["starts"] = []
        first.enqueue_many("slow_job", list(range(30)))
        wait_for(lambda: first.counts()["completed"] == 150, 90, message="30 slow jobs completed")
        starts = state["starts"]
        assert len(starts) == 30
        assert starts[-1] - starts[0] >= 29 / 20 * 0.98  # the bucket's refill, less float rounding of the clocks
        assert {job.attempts for job in first.list_jobs(limit=500)} == {1}
    finally:
        for engine in engines:
            engine.stop(10)
        for engine in engines:
            engine.store.close()
