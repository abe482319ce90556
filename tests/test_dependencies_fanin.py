"""Dependency fan-in and fan-out: what each finished dependency writes stays the same whatever N is.

SQLite rewrites a row whole on every UPDATE, and a dependent's row holds the JSON list of all
its dependencies: a count kept on it made each completion of a fan-in of N cost O(N) (N²
overall: 70k dependencies took 293 s). SQLiteStore now leaves the dependent's row alone until
its release and counts its ``dispatch_job_deps`` rows left when a job is read; PostgreSQL keeps
its decrement (a TOASTed list is copied as a pointer). What the stores show is unchanged, on
every store: ``waiting_on`` exact at each step, the release in the last dependency's
transaction, the cancel policy, the upkeep's sweep. The sweep, the release and the read find a
waiting job's rows through the index by waiting job (SQLite migration 12, PostgreSQL 15): one
probe per job, never a scan of every row (a sweep over 10k jobs waiting on one took 7 s).
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_stores import job

from threaddispatch.stores import JobState, SQLiteStore, Store
from threaddispatch.stores._sqlite_sql import STATEMENTS


def _deps(store: Store, count: int) -> list[str]:
    """``count`` jobs due now in queue ``deps`` (claimed in their order)."""
    records = [job(queue="deps", run_at=time.time() - 1) for _ in range(count)]
    store.enqueue(records)
    return [record.id for record in records]


def _dependent(store: Store, depends_on: list[str], **fields: object) -> str:
    record = job(queue="sink", run_at=time.time() - 1, depends_on=tuple(depends_on), **fields)
    store.enqueue([record])
    return record.id


def _finish_next(store: Store, *, fail: bool = False) -> str:
    """Claim the next job of queue ``deps`` and complete it (or fail it for good); its id."""
    (claimed,) = store.claim(["deps"], 1, worker_id="w", now=time.time())
    if fail:
        assert store.fail(claimed.id, worker_id="w", attempts=claimed.attempts, error="no", now=time.time())
    else:
        assert store.complete(claimed.id, worker_id="w", attempts=claimed.attempts, result="1", now=time.time())
    return claimed.id


def _seen(store: Store, job_id: str) -> tuple[JobState, int]:
    """The job's (state, waiting_on) by get(), checked equal to what list_jobs() shows of it."""
    record = store.get(job_id)
    assert record is not None
    (listed,) = [found for found in store.list_jobs(queue=record.queue, limit=1000) if found.id == job_id]
    assert (listed.state, listed.waiting_on) == (record.state, record.waiting_on)
    return record.state, record.waiting_on


def test_waiting_on_counts_down_one_per_finished_dependency_and_the_last_releases(store: Store) -> None:
    deps = _deps(store, 40)
    sink = _dependent(store, deps)
    assert _seen(store, sink) == (JobState.WAITING, 40)
    for left in range(39, 0, -1):
        _finish_next(store)
        assert _seen(store, sink) == (JobState.WAITING, left)
    _finish_next(store)  # the last: released by its completion, no sweep needed
    assert _seen(store, sink) == (JobState.PENDING, 0)
    assert [claimed.id for claimed in store.claim(["sink"], 5, worker_id="w", now=time.time())] == [sink]


def test_a_repeated_dependency_counts_once(store: Store) -> None:
    deps = _deps(store, 2)
    sink = _dependent(store, [deps[0], deps[1], deps[0]])
    assert _seen(store, sink) == (JobState.WAITING, 2)
    _finish_next(store)
    assert _seen(store, sink) == (JobState.WAITING, 1)
    _finish_next(store)
    assert _seen(store, sink) == (JobState.PENDING, 0)


def test_a_failed_dependency_cancels_a_waiting_fan_in_and_its_own_dependents(store: Store) -> None:
    deps = _deps(store, 3)
    sink = _dependent(store, deps)
    after = _dependent(store, [sink])
    _finish_next(store)
    assert _seen(store, sink) == (JobState.WAITING, 2)
    failed = _finish_next(store, fail=True)
    assert _seen(store, sink) == (JobState.CANCELLED, 0)
    assert store.get(sink).error == f"dependency {failed} failed"  # type: ignore[union-attr]
    assert _seen(store, after) == (JobState.CANCELLED, 0)
    _finish_next(store)  # the third finishing later changes nothing
    assert _seen(store, sink) == (JobState.CANCELLED, 0)
    assert store.release_waiting(now=time.time()) == 0


def test_under_policy_run_a_failed_dependency_counts_as_finished(store: Store) -> None:
    deps = _deps(store, 2)
    sink = _dependent(store, deps, on_dependency_failure="run")
    _finish_next(store, fail=True)
    assert _seen(store, sink) == (JobState.WAITING, 1)
    _finish_next(store)
    assert _seen(store, sink) == (JobState.PENDING, 0)


def test_a_fan_out_is_released_whole_by_the_one_completion(store: Store) -> None:
    (root,) = _deps(store, 1)
    dependents = [job(queue="sink", run_at=time.time() - 1, depends_on=(root,)) for _ in range(300)]
    store.enqueue(dependents)
    assert {_seen(store, record.id) for record in dependents[:3]} == {(JobState.WAITING, 1)}
    assert store.release_waiting(now=time.time()) == 0
    _finish_next(store)
    assert store.counts()[JobState.PENDING] == 300 and store.counts()[JobState.WAITING] == 0
    assert {_seen(store, record.id) for record in dependents[:3]} == {(JobState.PENDING, 0)}


def test_a_fan_out_cancelled_and_requeued_waits_again_once_each(store: Store) -> None:
    """Each dependent requeued is listed once under the dependency (MemoryStore: an ordered set, not a list
    searched per requeue; the SQL stores: their rows deleted by the index by waiting job)."""
    (root,) = _deps(store, 1)
    dependents = [job(queue="sink", run_at=time.time() - 1, depends_on=(root,)) for _ in range(200)]
    store.enqueue(dependents)
    for record in dependents:
        assert store.cancel(record.id, now=time.time())
    for record in dependents:
        store.requeue(record.id, now=time.time())
    assert store.counts()[JobState.WAITING] == 200
    assert {_seen(store, record.id) for record in dependents[:3]} == {(JobState.WAITING, 1)}
    _finish_next(store)
    assert store.counts()[JobState.PENDING] == 200 and store.counts()[JobState.WAITING] == 0


def test_a_cancelled_fan_in_retried_waits_for_what_is_left(store: Store) -> None:
    deps = _deps(store, 3)
    sink = _dependent(store, deps)
    _finish_next(store)
    assert store.cancel(sink, now=time.time())
    assert _seen(store, sink) == (JobState.CANCELLED, 0)
    store.requeue(sink, now=time.time())
    assert _seen(store, sink) == (JobState.WAITING, 2)
    _finish_next(store)
    _finish_next(store)
    assert _seen(store, sink) == (JobState.PENDING, 0)


# -- SQLite: the dependent's row is not written per completion, and every lookup is indexed ------------


@contextlib.contextmanager
def _raw(store: SQLiteStore) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(store.path)
    try:
        yield conn
    finally:
        conn.close()


@pytest.mark.parametrize("store_kind", ["sqlite"])
def test_sqlite_writes_the_dependents_row_only_at_its_release(store: SQLiteStore) -> None:
    """The stored row (waiting_on and updated_at as inserted) stays as it was until the last dependency
    finishes: reads count the rows left (the decrement rewrote the whole row, its JSON list of N ids,
    per completion)."""
    deps = _deps(store, 30)
    sink = _dependent(store, deps)
    with _raw(store) as raw:
        stored = raw.execute("SELECT waiting_on, updated_at, state FROM dispatch_jobs WHERE id = ?", (sink,)).fetchone()
        assert stored[0] == 30 and stored[2] == "waiting"
        for left in range(29, 0, -1):
            _finish_next(store)
            assert _seen(store, sink) == (JobState.WAITING, left)
            assert raw.execute(
                "SELECT waiting_on, updated_at, state FROM dispatch_jobs WHERE id = ?", (sink,)
            ).fetchone() == tuple(stored)
        _finish_next(store)
        assert raw.execute("SELECT waiting_on, state FROM dispatch_jobs WHERE id = ?", (sink,)).fetchone() == (
            0,
            "pending",
        )


_SCANS = (["SCAN", "d"], ["SCAN", "w"], ["SCAN", "dispatch_job_deps"])  # a full read of dispatch_job_deps


def _plan(conn: sqlite3.Connection, sql: str) -> list[str]:
    return [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", ("x",) * sql.count("?")).fetchall()]


@pytest.mark.parametrize("store_kind", ["sqlite"])
def test_sqlite_reads_a_waiting_jobs_rows_by_index(store: SQLiteStore) -> None:
    """The release's probe, the read's count and the upkeep's sweeps search dispatch_job_deps by job_id:
    no statement scans the table (a sweep scanned it once per waiting job)."""
    store.migrate()
    with _raw(store) as raw:
        for sql in (
            STATEMENTS.release_dependent,
            STATEMENTS.get_job,
            STATEMENTS.sweep_release,
            STATEMENTS.sweep_cancel,
        ):
            plan = _plan(raw, sql)
            assert any("dispatch_job_deps_job" in step for step in plan), (sql, plan)
            assert not [step for step in plan if step.split()[:2] in _SCANS], plan


def _upgraded_mid_fan_in(old: Store, new: Store, *, new_version: int) -> None:
    """A dependent of 4 stored and counted by ``old`` (a schema before the index), one of them finished;
    ``new`` upgrades the schema and the count goes on from there, whichever store finishes the rest."""
    deps = _deps(old, 4)
    sink = _dependent(old, deps)
    _finish_next(old)
    assert _seen(old, sink) == (JobState.WAITING, 3)  # counted without the index too
    assert new.migrate() == new_version
    assert _seen(new, sink) == (JobState.WAITING, 3)
    _finish_next(new)
    _finish_next(old)
    assert _seen(new, sink) == _seen(old, sink) == (JobState.WAITING, 1)
    _finish_next(new)
    assert _seen(old, sink) == (JobState.PENDING, 0)


def test_a_sqlite_file_of_schema_11_upgraded_mid_fan_in_counts_on(tmp_path: Path) -> None:
    class OldStore(SQLiteStore):
        MIGRATIONS = SQLiteStore.MIGRATIONS[:11]

    assert SQLiteStore.MIGRATIONS[11][:2] == (12, "dependency rows indexed by waiting job")
    path = tmp_path / "jobs.db"
    with contextlib.closing(OldStore(path)) as old, contextlib.closing(SQLiteStore(path, migrate=False)) as new:
        assert old.schema_version() == 11
        _upgraded_mid_fan_in(old, new, new_version=SQLiteStore.MIGRATIONS[-1][0])
        with _raw(new) as raw:
            names = {row[0] for row in raw.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert "dispatch_job_deps_job" in names


@pytest.mark.postgres
def test_a_postgresql_schema_of_version_14_upgraded_mid_fan_in_counts_on(pg_server: Any, new_schema: str) -> None:
    from threaddispatch.stores.postgres import PostgresStore

    class OldStore(PostgresStore):
        MIGRATIONS = PostgresStore.MIGRATIONS[:14]

    assert PostgresStore.MIGRATIONS[14][:2] == (15, "dependency rows indexed by waiting job")
    old = OldStore(pg_server.dsn, schema=new_schema)
    new = PostgresStore(pg_server.dsn, schema=new_schema, migrate=False)
    try:
        assert old.migrate() == 14
        _upgraded_mid_fan_in(old, new, new_version=PostgresStore.MIGRATIONS[-1][0])
    finally:
        old.close()
        new.close()


@pytest.mark.parametrize("store_kind", [pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_postgres_migration_15_indexes_the_waits_by_waiting_job(store: Store) -> None:
    from threaddispatch.stores.postgres import PostgresStore

    assert isinstance(store, PostgresStore)
    assert PostgresStore.MIGRATIONS[14][0] == 15 and store.migrate() >= 15
    found = store._run(
        "reading the indexes",
        lambda conn: conn.execute(
            "SELECT indexdef FROM pg_indexes WHERE schemaname = current_schema() AND indexname = %s",
            ("dispatch_job_deps_job",),
        ).fetchall(),
        idempotent=True,
    )
    assert len(found) == 1 and "(job_id)" in found[0][0]
