"""Lock holds on an upgraded database: a schema at the previous version gains ``dispatch_lock_holds``.

SQLite's migration 10 and PostgreSQL's migration 13 add the table (and its release's wake-up
trigger). A store kept below them (a class whose MIGRATIONS stop before, as an older release
is) still claims, cancels, reaps and fires crons without the table; once upgraded, the jobs
stored before keep their locks held past their running state like new ones.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import pytest
from test_stores import job

from threaddispatch.stores import JobState, SQLiteStore, Store
from threaddispatch.stores.base import CronEntry


def _old_and_new(store: Store, old: Store, *, new_version: int) -> None:
    """Jobs stored and claimed by ``old`` (a schema before the holds), then held and released by ``store``."""
    now = time.time()
    first, second, third = (job(queue="q", lock="customer:42", run_at=now) for _ in range(3))
    old.enqueue([first, second, third])
    (claimed,) = old.claim(["q"], 10, worker_id="w", now=now)
    assert claimed.id == first.id
    # The old schema works on without the table: a cancel, a reap, a cron tick.
    assert old.list_holds() == [] and old.hold_locks([(first.id, 1)], worker_id="w", now=now) == set()
    assert old.reap_stale(older_than=now - 60, now=now) == []
    old.upsert_cron(CronEntry("c", "@every 1s", "task", "null", queue="other", last_tick=now), now=now)
    assert old.fire_cron("c", tick=now + 1, job=job(queue="other", lock="cron:c"))

    assert store.migrate() == new_version
    assert store.hold_locks([(first.id, claimed.attempts)], worker_id="w", now=now) == {first.id}
    assert store.fail(first.id, worker_id="w", attempts=claimed.attempts, error="timed out", now=now)
    assert store.claim(["q"], 10, worker_id="w", now=now) == []  # held: the handler still runs
    assert store.release_holds([(first.id, claimed.attempts)], worker_id="w") == 1
    (following,) = store.claim(["q"], 10, worker_id="w", now=now)
    assert following.id == second.id
    assert store.cancel(second.id, now=now)  # running and locked: held by the cancel
    assert [hold.job_id for hold in store.list_holds()] == [second.id]
    assert store.get(third.id).state is JobState.PENDING  # type: ignore[union-attr]
    assert store.claim(["q"], 10, worker_id="w", now=now) == []


def test_a_sqlite_file_of_schema_9_gains_the_lock_holds(tmp_path: Path) -> None:
    path = tmp_path / "old.db"

    class OldStore(SQLiteStore):
        MIGRATIONS = tuple(migration for migration in SQLiteStore.MIGRATIONS if migration[0] <= 9)

    assert SQLiteStore.MIGRATIONS[9][:2] == (10, "lock holds")
    with contextlib.closing(OldStore(path)) as old, contextlib.closing(SQLiteStore(path, migrate=False)) as store:
        assert old.schema_version() == 9
        _old_and_new(store, old, new_version=SQLiteStore.MIGRATIONS[-1][0])
        assert store.schema_version() == SQLiteStore.MIGRATIONS[-1][0] >= 10


@pytest.mark.postgres
def test_a_postgresql_schema_of_version_12_gains_the_lock_holds(pg_server: Any, new_schema: str) -> None:
    from threaddispatch.stores.postgres import PostgresStore

    class OldStore(PostgresStore):
        MIGRATIONS = tuple(migration for migration in PostgresStore.MIGRATIONS if migration[0] <= 12)

    assert PostgresStore.MIGRATIONS[12][:2] == (13, "lock holds")
    old = OldStore(pg_server.dsn, schema=new_schema)
    store = PostgresStore(pg_server.dsn, schema=new_schema, migrate=False)
    try:
        assert old.migrate() == 12
        _old_and_new(store, old, new_version=PostgresStore.MIGRATIONS[-1][0])
        assert store.schema_version() == PostgresStore.MIGRATIONS[-1][0] >= 13
    finally:
        old.close()
        store.close()
