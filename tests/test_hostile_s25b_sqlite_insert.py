"""Hostile: SQLiteStore's multi-row INSERT of new jobs keeps the Store contract for mixed calls.

Attacks 3171fc8/b44a127 (new plain jobs as one multi-row INSERT per 32; a call's jobs
were stored plain ones first until that was fixed): a call mixing plain jobs with
unique_key/dependency jobs, more than 32 jobs, a bad job mid-call (none inserted), and group
commits from 6 threads (durability full and normal) where one caller's request fails.
MemoryStore is the reference for the contract (``Store.enqueue``: insertion order;
dependencies on jobs inserted earlier in the call).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from threaddispatch.errors import JobNotFoundError, StoreError
from threaddispatch.stores import JobRecord, MemoryStore, SQLiteStore
from threaddispatch.stores.base import JobState, Store

pytestmark = pytest.mark.timeout(60)


def _job(index: int, **fields: object) -> JobRecord:
    return JobRecord(id=f"job-{index:05d}", name="noop", payload="null", run_at=1.0, created_at=1.0, updated_at=1.0,
                     **fields)  # type: ignore[arg-type]  # fmt: skip


@pytest.fixture(params=["memory", "sqlite"])
def ordered_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    store: Store = MemoryStore() if request.param == "memory" else SQLiteStore(tmp_path / "jobs.db")
    try:
        yield store
    finally:
        store.close()


@pytest.fixture(params=["memory", "sqlite", "sqlite-full"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    made: Store
    if request.param == "memory":
        made = MemoryStore()
    else:
        made = SQLiteStore(tmp_path / "jobs.db", durability="full" if request.param == "sqlite-full" else "normal")
    try:
        yield made
    finally:
        made.close()


def _claim_ids(store: Store, limit: int) -> list[str]:
    return [job.id for job in store.claim(["default"], limit, worker_id="w", now=2.0)]


def test_a_mixed_call_is_claimed_in_its_order(ordered_store: Store) -> None:
    """Same priority and run_at: claim order is insertion order, the call's order, whatever kind each job is."""
    jobs = [_job(0, unique_key="k"), *(_job(index) for index in range(1, 40))]
    assert ordered_store.enqueue(jobs) == [job.id for job in jobs]
    assert _claim_ids(ordered_store, 40) == [job.id for job in jobs]


def test_a_locks_jobs_of_one_call_run_in_its_order(ordered_store: Store) -> None:
    """A lock runs its jobs one at a time in insertion order: the first of the call goes first."""
    first, second = _job(0, unique_key="k", lock="x"), _job(1, lock="x")
    ordered_store.enqueue([first, second])
    assert _claim_ids(ordered_store, 2) == [first.id]


def test_a_dependency_on_a_later_job_of_the_call_is_unknown(ordered_store: Store) -> None:
    """Store.enqueue: dependencies may be jobs inserted EARLIER in the call; a later one is unknown
    (JobNotFoundError, nothing inserted), as on MemoryStore."""
    with pytest.raises(JobNotFoundError):
        ordered_store.enqueue([_job(1, depends_on=("job-00002",)), _job(2)])
    assert sum(ordered_store.counts().values()) == 0


@pytest.mark.parametrize("where", [0, 20, 45])
def test_an_unknown_dependency_mid_call_inserts_nothing(store: Store, where: int) -> None:
    """One bad job among 50 (plain ones beside unique_key and dependency ones): the whole call is refused."""
    jobs = [_job(index, unique_key=f"k{index}") if index % 7 == 3 else _job(index) for index in range(50)]
    jobs[where] = _job(where, depends_on=("no-such-job",))
    with pytest.raises(JobNotFoundError):
        store.enqueue(jobs)
    assert sum(store.counts().values()) == 0
    assert store.enqueue([_job(0)]) == ["job-00000"]  # usable: nothing left open


@pytest.mark.parametrize("where", [0, 33, 69])
def test_a_duplicate_id_mid_call_inserts_nothing(store: Store, where: int) -> None:
    store.enqueue([_job(9999)])
    jobs = [_job(index, depends_on=("job-09999",)) if index % 11 == 5 else _job(index) for index in range(70)]
    jobs[where] = _job(9999)
    with pytest.raises(StoreError):
        store.enqueue(jobs)
    assert sum(store.counts().values()) == 1


@pytest.mark.timeout(120)
@pytest.mark.parametrize("durability", ["normal", "full"])
def test_six_threads_mixed_group_commits_one_bad_caller(tmp_path: Path, durability: str) -> None:
    """6 threads enqueue mixed calls (>32 plain jobs, unique keys shared across threads, dependencies on
    their own earlier jobs); one call in each thread repeats an id and fails alone. Every other job is
    stored exactly once with the state its kind gives; unique keys keep one holder each."""
    store = SQLiteStore(tmp_path / "jobs.db", durability=durability)
    results: dict[int, list[list[str]]] = {}
    failures: dict[int, list[int]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def calls(worker: int) -> list[list[JobRecord]]:
        out: list[list[JobRecord]] = []
        for batch in range(8):
            base = worker * 10_000 + batch * 100
            jobs = [_job(base + index) for index in range(1 + (worker * 7 + batch) % 40)]
            jobs.append(_job(base + 50, unique_key=f"shared-{batch}"))  # the same key in every thread
            if batch:
                back = 200 if batch == 6 else 100  # the first job of the last call that was stored
                jobs.append(_job(base + 51, depends_on=(f"job-{base - back:05d}",)))
            if batch == 5:
                jobs.append(_job(base))  # a repeated id: this call fails, only this one
            out.append(jobs)
        return out

    plans = {worker: calls(worker) for worker in range(6)}

    def produce(worker: int) -> None:
        try:
            start.wait(30)
            mine: list[list[str]] = []
            failed: list[int] = []
            for batch, jobs in enumerate(plans[worker]):
                try:
                    mine.append(store.enqueue(jobs))
                except StoreError:
                    failed.append(batch)
                    mine.append([])
            results[worker] = mine
            failures[worker] = failed
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=produce, args=(worker,)) for worker in range(6)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(100)
            assert not thread.is_alive()
        assert errors == []
        assert failures == {worker: [5] for worker in range(6)}
        expected_new: set[str] = set()
        holders: dict[str, str] = {}
        for worker in range(6):
            for batch, jobs in enumerate(plans[worker]):
                if batch == 5:
                    continue
                ids = results[worker][batch]
                assert len(ids) == len(jobs)
                for job, got in zip(jobs, ids, strict=True):
                    if job.unique_key is None:
                        assert got == job.id
                        expected_new.add(job.id)
                    else:
                        holders.setdefault(job.unique_key, got)
                        assert got == holders[job.unique_key], (job.unique_key, got, holders[job.unique_key])
        for key, holder in holders.items():
            assert store.get(holder) is not None and store.get(holder).unique_key == key  # type: ignore[union-attr]
        # The failed calls left nothing: none of their plain jobs exists.
        for worker in range(6):
            for job in plans[worker][5]:
                if job.unique_key is None and job.id not in expected_new:
                    assert store.get(job.id) is None, job.id
        for job_id in expected_new:
            assert store.get(job_id) is not None, job_id
        assert sum(store.counts().values()) == len(expected_new) + len(holders)
        counts = store.counts()
        assert counts[JobState.WAITING] == 6 * 6  # batches 1-4 and 6-7 of each thread: one dependent each
    finally:
        for thread in threads:
            thread.join(60)
        store.close()
