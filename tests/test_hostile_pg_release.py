"""A dependent of two jobs whose first dependency's completion commits while the dependent is stored,
and whose second is still running at the enqueue's second look (PostgresStore._settle_missed).

The interleaving, forced with hooks on the enqueue's steps and a completion held open on a
connection of its own:

1. the enqueue marks both dependencies ``has_dependents`` (committed);
2. the completion of dependency 1 updates its row: the release trigger runs and finds no
   dependent yet; the transaction stays open;
3. the enqueue's transaction reads dependency 1 as running (the completion is not committed),
   stores the dependent waiting on 2, and commits;
4. the completion commits; the second look waits for the row, finds dependency 2 unfinished
   and leaves the dependent alone;
5. dependency 2 completes: its trigger counts one dependency off.

The dependent must then be pending: both its dependencies completed.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import test_stores
from conftest import PG_SCHEMA

from threaddispatch.stores import JobState
from threaddispatch.stores.base import Completion

try:
    import psycopg

    from threaddispatch.stores._pg_sql import COMPLETE_MANY, outcome_params
    from threaddispatch.stores.postgres import PostgresStore
except ImportError:  # the 'postgres' extra is not installed
    psycopg = None  # type: ignore[assignment]

pytestmark = [pytest.mark.postgres]

T0 = test_stores.T0


@pytest.fixture
def store(pg_server: Any, pg_url: str) -> Iterator[PostgresStore]:
    made = PostgresStore(pg_server.dsn, schema=PG_SCHEMA)
    yield made
    made.close()


def _state(store: PostgresStore, job_id: str) -> JobState:
    job = store.get(job_id)
    assert job is not None
    return job.state


@pytest.mark.timeout(60)
def test_a_dependent_missed_by_one_completion_is_released_when_its_last_dependency_completes(
    pg_server: Any, store: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = test_stores.job(), test_stores.job()
    store.enqueue([first, second])
    claimed = {job.id: job for job in store.claim(["default"], 2, worker_id="w", now=T0)}
    assert set(claimed) == {first.id, second.id}

    completion = psycopg.connect(pg_server.dsn, options=f"-c search_path={PG_SCHEMA}")  # not autocommit
    completed = threading.Event()
    original_mark = PostgresStore._mark_depended_on
    original_second_look = PostgresStore._settle_missed

    def mark_then_complete_first(conn: Any, ids: Any) -> None:
        original_mark(conn, ids)  # 1: committed marks
        # 2: dependency 1's completion (complete_many's statement), its trigger fired, not committed.
        completion.execute(COMPLETE_MANY, outcome_params([Completion(first.id, "w", 1, "null", None)], T0 + 1))
        completed.set()

    def commit_then_look(self: PostgresStore, jobs: Any) -> None:
        completion.commit()  # 4: the completion commits before the enqueue's second look
        original_second_look(self, jobs)

    monkeypatch.setattr(PostgresStore, "_mark_depended_on", staticmethod(mark_then_complete_first))
    monkeypatch.setattr(PostgresStore, "_settle_missed", commit_then_look)
    try:
        dependent = test_stores.job(depends_on=(first.id, second.id), created_at=T0 + 1, updated_at=T0 + 1)
        store.enqueue([dependent])  # 3 inside
    finally:
        completion.rollback()  # nothing left open if a step failed
        completion.close()
    assert completed.is_set()
    monkeypatch.undo()
    assert _state(store, first.id) is JobState.COMPLETED
    assert _state(store, dependent.id) is JobState.WAITING  # dependency 2 still running

    # 5: dependency 2 completes through the store.
    done = store.complete_many([Completion(second.id, "w", 1, "null", None)], now=T0 + 2)
    assert done == {second.id}
    job = store.get(dependent.id)
    assert job is not None
    assert job.state is JobState.PENDING, (
        f"both dependencies completed, the dependent is still {job.state.value} "
        f"(waiting_on={job.waiting_on}): only the upkeep's sweep would release it"
    )
