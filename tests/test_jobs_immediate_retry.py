"""In immediate mode ``retry()`` and ``replay()`` run the job before they return, as ``enqueue()`` runs a new one.

Before, both left the job pending until a ``run_pending()``: an immediate engine has no
worker, so the job waited for nothing.
"""

from __future__ import annotations

import pytest

from threaddispatch import JobEngine
from threaddispatch.jobs import JobContext
from threaddispatch.stores import JobState, Store

pytestmark = pytest.mark.timeout(60)


def _flaky_engine(store: Store, fails: list[bool]) -> JobEngine:
    engine = JobEngine(store, immediate=True)

    def flaky(_ctx: JobContext, _payload: object) -> str:
        if fails[0]:
            raise ValueError("down")
        return "up"

    engine.register("flaky", flaky, max_retries=0)
    return engine


def test_retry_runs_the_job_in_immediate_mode(store: Store) -> None:
    fails = [True]
    engine = _flaky_engine(store, fails)
    job_id = engine.enqueue("flaky")
    assert engine.get_job(job_id).state is JobState.FAILED
    fails[0] = False
    engine.retry(job_id)
    job = engine.get_job(job_id)
    assert (job.state, job.attempts) == (JobState.COMPLETED, 1)
    assert engine.result(job_id, timeout=10) == "up"


def test_replay_runs_the_new_job_in_immediate_mode(store: Store) -> None:
    fails = [True]
    engine = _flaky_engine(store, fails)
    engine.enqueue("flaky")
    (letter,) = engine.dlq()
    fails[0] = False
    new_id = engine.replay(letter.id)
    assert engine.get_job(new_id).state is JobState.COMPLETED
    assert engine.dlq_count() == 0
