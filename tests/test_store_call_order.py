"""Every store keeps a call's jobs in the call's order, whatever kind each job is.

``Store.enqueue`` inserts in order: a job's seq is its place in the claim order (same priority
and run_at) and in a serial lock's queue, and a job may depend only on jobs inserted before it
in the call. SQLite and PostgreSQL stored a call's plain jobs first and its unique_key or
dependency jobs after them.
"""

from __future__ import annotations

import pytest

from threaddispatch.errors import JobNotFoundError
from threaddispatch.stores import JobRecord
from threaddispatch.stores.base import Store

pytestmark = pytest.mark.timeout(60)


def _job(index: int, **fields: object) -> JobRecord:
    return JobRecord(id=f"job-{index:05d}", name="noop", payload="null", run_at=1.0, created_at=1.0, updated_at=1.0,
                     **fields)  # type: ignore[arg-type]  # fmt: skip


def _claim_ids(store: Store, limit: int) -> list[str]:
    return [job.id for job in store.claim(["default"], limit, worker_id="w", now=2.0)]


@pytest.mark.parametrize("plain", [3, 40])  # below and above the COPY/multi-row thresholds
def test_a_mixed_call_is_claimed_in_its_order(store: Store, plain: int) -> None:
    jobs = [_job(0), _job(1, unique_key="k"), *(_job(index) for index in range(2, plain + 2)), _job(99, unique_key="j")]
    assert store.enqueue(jobs) == [job.id for job in jobs]
    assert _claim_ids(store, len(jobs)) == [job.id for job in jobs]


def test_a_dependent_in_the_middle_of_a_call_keeps_its_place(store: Store) -> None:
    first = _job(0)
    jobs = [first, _job(1), _job(2, depends_on=(first.id,)), _job(3)]
    store.enqueue(jobs)
    assert _claim_ids(store, 4) == [first.id, jobs[1].id, jobs[3].id]  # the dependent waits for job 0


def test_a_locks_jobs_of_one_call_run_in_its_order(store: Store) -> None:
    first, second = _job(0, unique_key="k", lock="x"), _job(1, lock="x")
    store.enqueue([first, second])
    assert _claim_ids(store, 2) == [first.id]


def test_a_dependency_on_a_later_job_of_the_call_is_unknown(store: Store) -> None:
    later = _job(1)
    with pytest.raises(JobNotFoundError):
        store.enqueue([_job(0, depends_on=(later.id,)), later])
    assert not any(store.counts().values())  # nothing of the call stored
