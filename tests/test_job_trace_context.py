"""The job record's ``trace_context``: the enqueuing span's W3C traceparent, stored in every store.

Filled at enqueue (``enqueue``, ``enqueue_many``, typed handles, cron ticks), shown by
``to_dict()``, kept by retry and replay (the dead letter carries it), and added by a migration
to SQLite files and PostgreSQL schemas made before it.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace import TracerProvider

from threaddispatch._trace import parse_traceparent
from threaddispatch.jobs import JobContext, JobEngine
from threaddispatch.stores import SQLiteStore, Store, _sql
from threaddispatch.stores._sqlite_sql import TYPES as SQLITE_TYPES
from threaddispatch.stores.base import CronEntry, JobState

_OLD_ROW = (
    "INSERT INTO dispatch_jobs (id, name, payload, queue, state, priority, attempts, max_retries, run_at, "
    "created_at, updated_at) VALUES ('old', 'work', '1', 'default', 'pending', 0, 0, 3, 0, 0, 0)"
)


@pytest.fixture
def tracer() -> Iterator[Any]:
    yield TracerProvider().get_tracer("test")


def _engine(store: Store) -> JobEngine:
    engine = JobEngine(store)
    engine.register("work", lambda ctx, payload: payload)
    return engine


def _span_parent(span: Any) -> str:
    context = span.get_span_context()
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def test_enqueue_stores_the_current_span(store: Store, tracer: Any) -> None:
    """enqueue and enqueue_many inside a span store its traceparent; outside one, None; to_dict shows it."""
    engine = _engine(store)
    plain = engine.enqueue("work", 0)
    with tracer.start_as_current_span("request") as span:
        one = engine.enqueue("work", 1)
        many = engine.enqueue_many("work", [2, 3])
    expected = _span_parent(span)
    assert parse_traceparent(expected) is not None
    assert engine.get_job(plain).trace_context is None
    assert [engine.get_job(job_id).trace_context for job_id in (one, *many)] == [expected] * 3
    assert engine.get_job(one).to_dict()["trace_context"] == expected
    assert engine.get_job(plain).to_dict()["trace_context"] is None
    claimed = store.claim(["default"], 10, worker_id="w", now=engine.get_job(one).run_at + 1)
    assert {job.id: job.trace_context for job in claimed} == {
        plain: None,
        one: expected,
        **dict.fromkeys(many, expected),
    }


def test_typed_handle_stores_the_current_span(store: Store, tracer: Any) -> None:
    engine = JobEngine(store)

    @engine.job("typed")
    def typed(ctx: JobContext, payload: int) -> int:
        return payload

    with tracer.start_as_current_span("request") as span:
        one = typed.enqueue(1)
        (two,) = typed.enqueue_many([2])
    assert engine.get_job(one).trace_context == engine.get_job(two).trace_context == _span_parent(span)


def test_retry_and_replay_keep_the_trace_context(store: Store, tracer: Any) -> None:
    """A failed job's dead letter carries the traceparent; replay's new job and retry's requeue keep it."""
    engine = JobEngine(store)

    def boom(ctx: JobContext, payload: object) -> None:
        raise RuntimeError("boom")

    engine.register("boom", boom, max_retries=0)
    with tracer.start_as_current_span("request") as span:
        job_id = engine.enqueue("boom")
    expected = _span_parent(span)
    assert engine.run_pending() == 1
    assert engine.get_job(job_id).state is JobState.FAILED
    (letter,) = engine.dlq()
    assert letter.trace_context == expected and letter.to_dict()["trace_context"] == expected
    replayed = engine.replay(letter.id)
    assert replayed != job_id and engine.get_job(replayed).trace_context == expected
    engine.retry(job_id)
    assert engine.get_job(job_id).state is JobState.PENDING
    assert engine.get_job(job_id).trace_context == expected


def test_stale_job_dead_letter_keeps_the_trace_context(store: Store, tracer: Any) -> None:
    """reap_stale's dead letter (a worker lost on the last attempt) carries the traceparent too."""
    engine = _engine(store)
    with tracer.start_as_current_span("request") as span:
        job_id = engine.enqueue("work", 1, max_retries=0)
    run_at = engine.get_job(job_id).run_at
    assert [job.id for job in store.claim(["default"], 1, worker_id="w", now=run_at)] == [job_id]
    assert store.reap_stale(older_than=run_at + 1, now=run_at + 2) == [job_id]
    (letter,) = store.list_dead_letters()
    assert letter.trace_context == _span_parent(span)


def test_cron_job_stores_the_current_span(store: Store, tracer: Any) -> None:
    """A cron tick's job is built with the traceparent current where it is built."""
    engine = _engine(store)
    entry = CronEntry("every", "@every 1s", "work", "1")
    with tracer.start_as_current_span("tick") as span:
        job = engine._cron_job(entry, engine.definitions()["work"], tick=10.0, now=10.0)
    assert job.trace_context == _span_parent(span)
    assert engine._cron_job(entry, engine.definitions()["work"], tick=11.0, now=11.0).trace_context is None


def _old_sqlite_file(path: Path) -> None:
    """A SQLite file made by the schema before the trace context (migrations 1-2), with one job."""
    conn = sqlite3.connect(path)
    conn.execute(_sql.version_table(SQLITE_TYPES))
    for version, description, statements in SQLiteStore.MIGRATIONS[:2]:
        for statement in statements:
            conn.execute(statement)
        conn.execute("INSERT INTO dispatch_schema_version VALUES (?, ?, 0)", (version, description))
    conn.execute(_OLD_ROW)
    conn.commit()
    conn.close()


def test_an_old_sqlite_file_gains_the_column(tmp_path: Path, tracer: Any) -> None:
    """Migration 3 adds trace_context to a file made by the old schema: its job keeps working, with None."""
    path = tmp_path / "old.db"
    _old_sqlite_file(path)
    with sqlite3.connect(path) as conn:
        assert "trace_context" not in {row[1] for row in conn.execute("PRAGMA table_info(dispatch_jobs)")}
    assert SQLiteStore.MIGRATIONS[2][:2] == (3, "trace context")
    with SQLiteStore(path) as store:
        assert store.migrate() == SQLiteStore.MIGRATIONS[-1][0]
        _check_upgraded(store, tracer)


def _check_upgraded(store: Store, tracer: Any) -> None:
    """The old job (no trace context) and a new one (with its span's) both run on the upgraded store."""
    old = store.get("old")
    assert old is not None and old.trace_context is None
    engine = _engine(store)
    with tracer.start_as_current_span("request") as span:
        new = engine.enqueue("work", 2)
    assert engine.get_job(new).trace_context == _span_parent(span)
    assert engine.run_pending() == 2
    assert engine.result("old", timeout=5) == 1


@pytest.mark.postgres
def test_an_old_postgres_schema_gains_the_column(pg_server: Any, tracer: Any) -> None:
    """Migration 4 adds trace_context to a schema made by migrations 1-3, with a job in it."""
    import psycopg

    from threaddispatch.stores.postgres import PostgresStore

    class Version3Store(PostgresStore):
        MIGRATIONS = PostgresStore.MIGRATIONS[:3]

    schema = f"t_{uuid.uuid4().hex[:12]}"
    try:
        with Version3Store(pg_server.dsn, schema=schema) as old:
            assert old.migrate() == 3
        with psycopg.connect(pg_server.dsn, autocommit=True) as conn:
            conn.execute(_OLD_ROW.replace("dispatch_jobs", f'"{schema}".dispatch_jobs'))
        assert PostgresStore.MIGRATIONS[3][:2] == (4, "trace context")
        with PostgresStore(pg_server.dsn, schema=schema) as store:
            assert store.migrate() == PostgresStore.MIGRATIONS[-1][0]
            _check_upgraded(store, tracer)
    finally:
        with psycopg.connect(pg_server.dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


_UNUSED_OTEL = """
import sys
from threaddispatch.jobs import JobEngine
from threaddispatch.stores import MemoryStore
engine = JobEngine(MemoryStore())
engine.register("work", lambda ctx, payload: payload)
first = engine.enqueue("work", 1)
imported = sorted(name for name in sys.modules if name.startswith("opentelemetry"))
assert imported == [], imported
assert engine.get_job(first).trace_context is None
from opentelemetry.sdk.trace import TracerProvider  # the application sets up tracing later
with TracerProvider().get_tracer("late").start_as_current_span("request") as span:
    later = engine.enqueue("work", 2)
context = span.get_span_context()
assert engine.get_job(later).trace_context == (
    f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"
)
print("ok")
"""


@pytest.mark.timeout(60)
def test_an_enqueue_imports_no_opentelemetry_until_the_application_does() -> None:
    """With the package installed but unused, no span can be current: the first enqueue imported the
    API anyway (44 ms, in the request that made it). Once the application imports it, enqueues read
    the current span again."""
    command = [sys.executable, "-c", _UNUSED_OTEL]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=50)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
