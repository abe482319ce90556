"""Dead letters on an upgraded database: a schema at the previous version gains the letters' job fields.

SQLite's migration 11 and PostgreSQL's 14 add the failed job's lock, unique key, dependencies
and timeout to ``dispatch_dead_letters``, so a replay keeps them after the job's record is
purged. A store kept below them (a class whose MIGRATIONS stop before, as an older release is)
still fails and reaps jobs, lists and replays dead letters; a letter it stored (before or after
the upgrade) keeps none of the fields (``on_dependency_failure`` None), and its replay takes them
from the job's record while it is stored, else the registration's lock.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from test_stores import job

from threaddispatch import JobEngine
from threaddispatch.stores import JobState, SQLiteStore, Store
from threaddispatch.stores.base import DeadLetter


def _fail(store: Store, **fields: Any) -> DeadLetter:
    """Store one job of ``fields`` in a queue of its own, claim it and fail it for good through ``store``; its
    dead letter."""
    queue = f"q-{uuid.uuid4().hex[:8]}"  # its own: the replayed jobs of the test wait in theirs
    failed = job(queue=queue, max_retries=0, run_at=time.time(), **fields)
    store.enqueue([failed])
    (claimed,) = store.claim([queue], 1, worker_id="w", now=time.time())
    assert claimed.id == failed.id
    letter = store.fail(failed.id, worker_id="w", attempts=claimed.attempts, error="boom", now=time.time())
    assert letter is not None and letter.job_id == failed.id
    return letter


def _old_and_new(store: Store, old: Store, *, new_version: int) -> None:
    """Dead letters stored by ``old`` (a schema before the fields), then by ``store`` after its upgrade."""
    before = _fail(old, payload='{"c": 1}', lock="explicit:1", unique_key="k1")
    purged = _fail(old, payload='{"c": 2}', lock="explicit:2", unique_key="k2")
    stale = job(queue="stale", max_retries=0, run_at=time.time(), payload='{"c": 3}', lock="explicit:3")
    old.enqueue([stale])
    old.claim(["stale"], 1, worker_id="w", now=time.time())
    assert old.reap_stale(older_than=time.time() + 60, now=time.time()) == [stale.id]  # its dead letter too
    assert len(old.list_dead_letters()) == 3 and old.get_dead_letter(before.id) == before
    assert before.on_dependency_failure is None and before.lock is None

    assert store.migrate() == new_version
    engine = JobEngine(store)
    engine.register("task", lambda ctx, payload: None, lock=lambda payload: f"customer:{payload['c']}")
    try:
        letters = {letter.job_id: letter for letter in store.list_dead_letters()}
        assert {letter.on_dependency_failure for letter in letters.values()} == {None}  # stored before: not kept
        # The job's record is stored: the replay takes its fields from it.
        record = engine.get_job(engine.replay(before.id))
        assert (record.lock, record.unique_key, record.state) == ("explicit:1", "k1", JobState.PENDING)
        assert store.purge_finished(older_than=time.time() + 60) >= 2  # purged, and the reaped one's
        # Purged, stored before the upgrade: the registration's lock, no key.
        record = engine.get_job(engine.replay(purged.id))
        assert (record.lock, record.unique_key) == ("customer:2", None)
        record = engine.get_job(engine.replay(letters[stale.id].id))
        assert record.lock == "customer:3"

        # Stored after the upgrade: the letter keeps them; the replay after a purge still has them.
        kept = _fail(store, payload='{"c": 4}', lock="explicit:4", unique_key="k4", timeout=9.0)
        assert (kept.lock, kept.unique_key, kept.on_dependency_failure, kept.timeout) == (
            "explicit:4", "k4", "cancel", 9.0,
        )  # fmt: skip
        assert store.get_dead_letter(kept.id) == kept
        # The older release beside the upgraded schema: its letters keep none (it names no such column).
        beside = _fail(old, payload='{"c": 5}', lock="explicit:5")
        assert store.get_dead_letter(beside.id).on_dependency_failure is None  # type: ignore[union-attr]
        assert store.purge_finished(older_than=time.time() + 60) >= 2
        record = engine.get_job(engine.replay(kept.id))
        assert (record.lock, record.unique_key) == ("explicit:4", "k4")
        assert engine.get_job(engine.replay(beside.id)).lock == "customer:5"
        assert store.list_dead_letters() == [] and old.list_dead_letters() == []
    finally:
        engine.stop()


def test_a_sqlite_file_of_schema_10_gains_the_dead_letters_job_fields(tmp_path: Path) -> None:
    path = tmp_path / "old.db"

    class OldStore(SQLiteStore):
        MIGRATIONS = tuple(migration for migration in SQLiteStore.MIGRATIONS if migration[0] <= 10)

    assert SQLiteStore.MIGRATIONS[10][0] == 11 and "dead letters" in SQLiteStore.MIGRATIONS[10][1]
    with contextlib.closing(OldStore(path)) as old, contextlib.closing(SQLiteStore(path, migrate=False)) as store:
        assert old.schema_version() == 10
        _old_and_new(store, old, new_version=SQLiteStore.MIGRATIONS[-1][0])
        assert store.schema_version() == SQLiteStore.MIGRATIONS[-1][0] >= 11


@pytest.mark.postgres
def test_a_postgresql_schema_of_version_13_gains_the_dead_letters_job_fields(pg_server: Any, new_schema: str) -> None:
    from threaddispatch.stores.postgres import PostgresStore

    class OldStore(PostgresStore):
        MIGRATIONS = tuple(migration for migration in PostgresStore.MIGRATIONS if migration[0] <= 13)

    assert PostgresStore.MIGRATIONS[13][0] == 14 and "dead letters" in PostgresStore.MIGRATIONS[13][1]
    old = OldStore(pg_server.dsn, schema=new_schema)
    store = PostgresStore(pg_server.dsn, schema=new_schema, migrate=False)
    try:
        assert old.migrate() == 13
        _old_and_new(store, old, new_version=PostgresStore.MIGRATIONS[-1][0])
        assert store.schema_version() == PostgresStore.MIGRATIONS[-1][0] >= 14
    finally:
        old.close()
        store.close()
