"""SQLiteStore's insert of new jobs: one multi-row INSERT per 32 jobs of the columns a new job sets, atomic,
in order, in groups; any other job as given."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from threaddispatch.errors import StoreError
from threaddispatch.stores import JobRecord, SQLiteStore, _sql
from threaddispatch.stores._sql import job_params
from threaddispatch.stores._sqlite_sql import FRESH_COLUMNS, INSERT_ROWS, UNSET_COLUMNS, fresh_params
from threaddispatch.stores.base import JobState


def _job(index: int, **fields: object) -> JobRecord:
    return JobRecord(id=f"job-{index:05d}", name="noop", payload="null", run_at=1.0, created_at=1.0, updated_at=1.0,
                     **fields)  # type: ignore[arg-type]  # fmt: skip


def _seq_order(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return [row[0] for row in conn.execute("SELECT id FROM dispatch_jobs ORDER BY seq")]
    finally:
        conn.close()


@pytest.mark.parametrize("count", [2, INSERT_ROWS, INSERT_ROWS + 1, 2 * INSERT_ROWS + 5])
def test_a_batch_of_plain_jobs_is_kept_whole_and_in_order(tmp_path: Path, count: int) -> None:
    store = SQLiteStore(tmp_path / "jobs.db")
    try:
        jobs = [_job(index) for index in range(count)]
        assert store.enqueue(jobs) == [job.id for job in jobs]
        assert store.counts()[JobState.PENDING] == count
        assert _seq_order(tmp_path / "jobs.db") == [job.id for job in jobs]  # seqs follow the list
        assert store.get(jobs[-1].id) == jobs[-1]
    finally:
        store.close()


@pytest.mark.parametrize("count", [3, 2 * INSERT_ROWS + 5])
def test_a_batch_with_a_duplicate_id_in_its_last_statement_inserts_nothing(tmp_path: Path, count: int) -> None:
    """The batch is one transaction however many statements it takes: a failing row undoes the rows before."""
    store = SQLiteStore(tmp_path / "jobs.db")
    try:
        store.enqueue([_job(0)])
        jobs = [_job(index) for index in range(1, count)] + [_job(0)]
        with pytest.raises(StoreError, match="already exists"):
            store.enqueue(jobs)
        assert store.counts()[JobState.PENDING] == 1
        assert store.enqueue([_job(1)]) == ["job-00001"]  # the store is usable: nothing left open
    finally:
        store.close()


def test_plain_jobs_beside_a_unique_key_share_the_transaction(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "jobs.db")
    try:
        holder = _job(0, unique_key="k")
        store.enqueue([holder])
        ids = store.enqueue([_job(1), _job(2, unique_key="k"), *(_job(index) for index in range(3, 40))])
        assert ids[:2] == ["job-00001", "job-00000"]  # the key's active holder for the duplicate
        assert ids[2:] == [f"job-{index:05d}" for index in range(3, 40)]
        assert store.counts()[JobState.PENDING] == 39
    finally:
        store.close()


@pytest.mark.timeout(60)
def test_a_group_commit_of_many_callers_keeps_each_callers_jobs(tmp_path: Path) -> None:
    """durability='full' groups concurrent enqueues into one INSERT (or one per 32 jobs): each caller gets
    its own ids and every job is stored once."""
    store = SQLiteStore(tmp_path / "jobs.db", durability="full")
    groups: list[int] = []
    inner = store._write_jobs

    def counted(requests: object) -> list[list[str]]:
        groups.append(len(requests))  # type: ignore[arg-type]
        return inner(requests)  # type: ignore[arg-type]

    store._write_jobs = counted  # type: ignore[method-assign]
    results: dict[int, list[str]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def produce(worker: int) -> None:
        try:
            start.wait(30)
            mine: list[str] = []
            for batch in range(10):
                jobs = [_job(worker * 1000 + batch * 100 + index) for index in range(1 + worker * 3)]
                mine.extend(store.enqueue(jobs))
            results[worker] = mine
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=produce, args=(worker,)) for worker in range(6)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert errors == []
        for worker in range(6):
            expected = [
                f"job-{worker * 1000 + batch * 100 + index:05d}"
                for batch in range(10)
                for index in range(1 + worker * 3)
            ]
            assert results[worker] == expected
        total = sum(10 * (1 + worker * 3) for worker in range(6))
        assert store.counts()[JobState.PENDING] == total
        order = {job_id: position for position, job_id in enumerate(_seq_order(tmp_path / "jobs.db"))}
        assert sorted(order) == sorted(job_id for ids in results.values() for job_id in ids)
        for worker in range(6):  # each request's jobs took consecutive seqs, in its order
            for batch in range(10):
                first = order[f"job-{worker * 1000 + batch * 100:05d}"]
                mine = [f"job-{worker * 1000 + batch * 100 + index:05d}" for index in range(1 + worker * 3)]
                assert [order[job_id] for job_id in mine] == list(range(first, first + len(mine)))
        assert sum(groups) == 60  # each request committed once (no group failed)
    finally:
        for thread in threads:
            thread.join(60)
        store.close()


def test_a_new_jobs_insert_names_every_column_but_those_null_in_a_new_job() -> None:
    """FRESH_COLUMNS and UNSET_COLUMNS split the job columns exactly: a column added later must go in one."""
    columns = _sql.JOB_COLUMNS.split(", ")
    assert sorted(FRESH_COLUMNS + UNSET_COLUMNS) == sorted(columns)
    assert not set(FRESH_COLUMNS) & set(UNSET_COLUMNS)
    job = _job(1, lock="serial", trace_context="00-" + "1" * 32 + "-" + "2" * 16 + "-01", timeout=2.5)
    fresh = fresh_params(job)
    assert fresh is not None
    assert dict(zip(FRESH_COLUMNS, fresh, strict=True)) == {
        column: value for column, value in zip(columns, job_params(job), strict=True) if column in FRESH_COLUMNS
    }
    assert all(value is None for column, value in zip(columns, job_params(job), strict=True) if column in UNSET_COLUMNS)


@pytest.mark.parametrize(
    "fields",
    [
        {"error": "boom", "attempts": 2},
        {"result": "7", "state": JobState.COMPLETED, "finished_at": 3.0},
        {"worker_id": "w", "state": JobState.RUNNING, "started_at": 2.0, "heartbeat_at": 2.5},
        {"lock": "serial", "priority": 5, "queue": "other", "max_retries": 0, "timeout": 1.5},
    ],
)
def test_a_job_is_stored_as_given_whether_new_or_not(tmp_path: Path, fields: dict[str, object]) -> None:
    """A job with a value in a column a new job leaves NULL goes in by the full INSERT, alone or in a batch."""
    store = SQLiteStore(tmp_path / "jobs.db")
    try:
        alone = _job(0, **fields)
        batch = [_job(1), _job(2, **fields), _job(3)]
        assert store.enqueue([alone]) == [alone.id]
        assert store.enqueue(batch) == [job.id for job in batch]
        for job in (alone, *batch):
            assert store.get(job.id) == job
    finally:
        store.close()
