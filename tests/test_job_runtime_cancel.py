"""A job an operator cancels after its claim but before a worker thread starts it frees its slot."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from threaddispatch import JobEngine
from threaddispatch._pool import WorkerPool
from threaddispatch.stores import MemoryStore
from threaddispatch.stores.base import JobState
from threaddispatch.testing import wait_for

pytestmark = pytest.mark.timeout(30)


def test_a_job_cancelled_between_its_claim_and_its_start_leaves_no_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = JobEngine(MemoryStore(), concurrency=2, poll_interval=0.01, max_poll_interval=0.05)
    ran = threading.Event()
    engine.register("work", lambda ctx, payload: ran.set())
    handed, go = threading.Event(), threading.Event()
    run = WorkerPool.run

    def held(self: WorkerPool, fn: Any, /, *args: Any) -> None:
        # The fetcher hands the claimed job to the pool: hold it there until the test cancelled it.
        if getattr(fn, "__name__", "") == "_execute":
            handed.set()
            assert go.wait(20)
        run(self, fn, *args)

    monkeypatch.setattr(WorkerPool, "run", held)
    job_id = engine.enqueue("work")
    engine.start()
    try:
        assert handed.wait(20)
        engine.cancel(job_id)  # claimed (running in the store), its handler not started
        go.set()
        wait_for(lambda: engine.stats()["in_flight"] == 0, 20, message="the cancelled job's slot freed")
    finally:
        go.set()
        clean = engine.stop(10)
    assert clean
    assert not ran.is_set()
    assert engine.get_job(job_id).state is JobState.CANCELLED
