"""Hostile tests of serial locks when the holder's handler outlives its job: a timeout, a cancel.

The promise attacked (README, "serial locks"): ``lock="customer:42"`` lets at most one job
holding that lock run at a time. A Python thread cannot be killed, so a handler past its
timeout, or a running job cancelled with ``cancel(id)``, goes on running on its worker
thread until it returns (its ``ctx.cancelled`` set, its outcome discarded). The store freed
the lock when the job's state left ``running``, and the next job of the lock started beside
the old handler (hostile defect 6, fixed: the lock now stays held by a lock hold until the
handler returns; see tests/test_locks_held_*.py). The handler of the holder here waits,
bounded, for the next job to start, so an overlap shows as state, not as a timing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import STORE_FACTORIES, STORE_PARAMS

from threaddispatch import JobEngine
from threaddispatch.jobs import JobContext
from threaddispatch.stores import JobState, Store
from threaddispatch.testing import wait_for

#: How long the holder's handler waits for the next job to start before it returns (the bound, not a timing).
HOLD = 5.0


@pytest.fixture(params=STORE_PARAMS)
def lock_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    kind: str = request.param
    if kind == "postgresql":
        url: str = request.getfixturevalue("pg_url")
    else:
        url = "memory://" if kind == "memory" else f"sqlite:///{tmp_path / 'jobs.db'}"
    store = STORE_FACTORIES[kind](url)
    yield store
    store.close()


class _Holders:
    """Which handlers of the lock run now; every start that found another one running."""

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


def _engine(store: Store, holders: _Holders, timeout: float | None) -> JobEngine:
    engine = JobEngine(store, concurrency=4, poll_interval=0.02, max_poll_interval=0.05)

    def handler(ctx: JobContext, payload: Any) -> str:
        return holders.run(ctx, payload)

    engine.register("serial", handler, lock="customer:42", max_retries=0, timeout=timeout)
    return engine


@pytest.mark.timeout(60)
def test_a_cancelled_holder_still_running_keeps_the_next_job_of_its_lock_waiting(lock_store: Store) -> None:
    holders = _Holders()
    engine = _engine(lock_store, holders, timeout=None)
    engine.start()
    try:
        first = engine.enqueue("serial", "first")
        second = engine.enqueue("serial", "second")
        assert holders.started["first"].wait(10)
        engine.cancel(first)
        assert engine.get_job(first).state is JobState.CANCELLED
        assert engine.result(second, timeout=HOLD + 10) == "second"
        assert holders.overlaps == []
    finally:
        holders.started["second"].set()
        assert engine.stop(10)


@pytest.mark.timeout(60)
def test_a_holder_past_its_timeout_still_running_keeps_the_next_job_of_its_lock_waiting(lock_store: Store) -> None:
    holders = _Holders()
    engine = _engine(lock_store, holders, timeout=0.2)
    engine.start()
    try:
        first = engine.enqueue("serial", "first")
        second = engine.enqueue("serial", "second")
        assert holders.started["first"].wait(10)
        wait_for(lambda: engine.get_job(first).state is JobState.FAILED, timeout=10)
        assert engine.result(second, timeout=HOLD + 10) == "second"
        assert holders.overlaps == []
    finally:
        holders.started["second"].set()
        assert engine.stop(10)
