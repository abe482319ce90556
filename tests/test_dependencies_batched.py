"""A new job's dependencies are settled in batches: one lookup of their states and one insert of its
waits for all (PostgreSQL: one statement each, plus one mark and one second look; SQLite: one per
500 ids), and the dependents of one ``enqueue`` call are settled together. Before, each dependency
cost a round trip per step (a PostgreSQL fan-in of 70k took 37.5 s). What the stores show is
unchanged, on every store: the first unknown id in ``depends_on`` order refuses the call (nothing
stored), a dependency that ended failed or cancelled cancels a dependent of policy ``"cancel"`` with
the same error text, the count of unfinished dependencies, a dependent of a job stored earlier in
the same call (settled, not yet inserted, when it is looked at).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from test_stores import job

from threaddispatch.errors import JobNotFoundError
from threaddispatch.stores import JobState, Store
from threaddispatch.testing import wait_for

MANY = 1_234  # more than two SQLite chunks of 500


def _stored(store: Store, count: int, queue: str = "deps") -> list[str]:
    records = [job(queue=queue, run_at=time.time() - 1) for _ in range(count)]
    store.enqueue(records)
    return [record.id for record in records]


def _end(store: Store, job_ids: list[str], *, fail: bool = False) -> None:
    """Claim the jobs ``job_ids`` (queue ``deps``, all of it) and complete them, or fail them."""
    claimed = store.claim(["deps"], len(job_ids), worker_id="w", now=time.time())
    assert sorted(record.id for record in claimed) == sorted(job_ids)
    for record in claimed:
        if fail:
            store.fail(record.id, worker_id="w", attempts=record.attempts, error="no", now=time.time())
        else:
            store.complete(record.id, worker_id="w", attempts=record.attempts, result="1", now=time.time())


def _get(store: Store, job_id: str) -> Any:
    record = store.get(job_id)
    assert record is not None
    return record


def test_a_fan_in_of_many_counts_only_its_unfinished_dependencies(store: Store) -> None:
    """Of 1,234 dependencies, the completed ones are not waited for; each unfinished one is, once."""
    done = _stored(store, 300)
    _end(store, done)
    running = _stored(store, MANY - 300, queue="other")
    dependent = job(depends_on=(*done, *running, running[0]))
    store.enqueue([dependent])
    record = _get(store, dependent.id)
    assert (record.state, record.waiting_on) == (JobState.WAITING, MANY - 300)


def test_a_fan_in_whose_dependencies_all_completed_is_pending(store: Store) -> None:
    deps = _stored(store, MANY)
    _end(store, deps)
    dependent = job(depends_on=tuple(deps))
    store.enqueue([dependent])
    assert (_get(store, dependent.id).state, _get(store, dependent.id).waiting_on) == (JobState.PENDING, 0)


def test_the_first_unknown_dependency_in_depends_on_order_is_named_and_nothing_is_stored(store: Store) -> None:
    """Two unknown ids among 1,234 (the second sorts first): the one first in depends_on is named; the
    call's other jobs (a plain one before it, a dependent after it) are not stored."""
    deps = _stored(store, MANY)
    named = [*deps[:700], "zz-unknown", *deps[700:], "aa-unknown"]
    before, refused, after = job(), job(depends_on=tuple(named)), job(depends_on=(deps[0],))
    with pytest.raises(JobNotFoundError, match=f"job '{refused.id}' depends on 'zz-unknown'"):
        store.enqueue([before, refused, after])
    assert [store.get(record.id) for record in (before, refused, after)] == [None, None, None]


def test_a_failed_dependency_among_many_cancels_with_the_first_failed_named(store: Store) -> None:
    """Policy "cancel": the first failed dependency in depends_on order is in the error; policy "run"
    waits for the unfinished ones only."""
    failed = _stored(store, 2)
    _end(store, failed, fail=True)
    running = _stored(store, MANY, queue="other")
    cancelled = job(depends_on=(*running[:600], failed[1], *running[600:], failed[0]))
    runs = job(depends_on=cancelled.depends_on, on_dependency_failure="run")
    store.enqueue([cancelled, runs])
    record = _get(store, cancelled.id)
    assert (record.state, record.error, record.waiting_on) == (
        JobState.CANCELLED,
        f"dependency {failed[1]} failed",
        0,
    )
    assert (_get(store, runs.id).state, _get(store, runs.id).waiting_on) == (JobState.WAITING, MANY)


def test_dependents_of_jobs_earlier_in_the_same_call_are_settled_by_their_settled_state(store: Store) -> None:
    """One call: a plain job, a job cancelled by a failed dependency, then jobs depending on those two
    (settled together before any is inserted): each is settled as if the earlier ones were stored."""
    failed = _stored(store, 1)
    _end(store, failed, fail=True)
    plain = job()
    doomed = job(depends_on=(failed[0],))
    on_plain = job(depends_on=(plain.id,))
    on_doomed = job(depends_on=(plain.id, doomed.id))
    on_doomed_runs = job(depends_on=(plain.id, doomed.id), on_dependency_failure="run")
    chained = job(depends_on=(on_plain.id,))
    store.enqueue([plain, doomed, on_plain, on_doomed, on_doomed_runs, chained])
    seen = {record.id: (_get(store, record.id).state, _get(store, record.id).waiting_on)
            for record in (plain, doomed, on_plain, on_doomed, on_doomed_runs, chained)}  # fmt: skip
    assert seen == {
        plain.id: (JobState.PENDING, 0),
        doomed.id: (JobState.CANCELLED, 0),
        on_plain.id: (JobState.WAITING, 1),
        on_doomed.id: (JobState.CANCELLED, 0),
        on_doomed_runs.id: (JobState.WAITING, 1),
        chained.id: (JobState.WAITING, 1),
    }
    assert _get(store, doomed.id).error == f"dependency {failed[0]} failed"
    assert _get(store, on_doomed.id).error == f"dependency {doomed.id} cancelled"
    # Their waits were recorded: the plain job's completion releases the two waiting on it alone.
    claimed = store.claim(["default"], 10, worker_id="w", now=time.time())
    assert [record.id for record in claimed] == [plain.id]
    store.complete(plain.id, worker_id="w", attempts=1, result="1", now=time.time())
    assert _get(store, on_plain.id).state is JobState.PENDING
    assert _get(store, on_doomed_runs.id).state is JobState.PENDING
    assert _get(store, chained.id).state is JobState.WAITING


def test_a_dependency_later_in_the_same_call_is_unknown(store: Store) -> None:
    """A job depends only on jobs stored before it: one named later in the call is refused, as before."""
    later = job()
    early = job(depends_on=(later.id,))
    with pytest.raises(JobNotFoundError, match=f"job '{early.id}' depends on '{later.id}'"):
        store.enqueue([early, later])
    assert store.get(later.id) is None


def test_a_fan_out_in_one_call_is_released_by_its_dependency(store: Store) -> None:
    """1,234 dependents of one job, enqueued in one call: each waits on it, its completion releases all."""
    (root,) = _stored(store, 1)
    dependents = [job(queue="sink", depends_on=(root,)) for _ in range(MANY)]
    store.enqueue(dependents)
    assert store.counts(queue="sink")[JobState.WAITING] == MANY
    _end(store, [root])
    assert store.counts(queue="sink")[JobState.PENDING] == MANY


# -- PostgreSQL: round trips, and the rows another session holds --------------------------------------


@pytest.fixture
def pg_store(pg_server: Any, pg_url: str) -> Iterator[Any]:
    postgres = pytest.importorskip("threaddispatch.stores.postgres")
    from conftest import PG_SCHEMA

    made = postgres.PostgresStore(pg_server.dsn, schema=PG_SCHEMA)
    yield made
    made.close()


def _statements(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every statement the PostgreSQL store sends from now on (Connection.execute and Cursor.execute)."""
    import psycopg

    sent: list[str] = []
    for cls in (psycopg.Connection, psycopg.Cursor):
        original = cls.execute

        def counted(self: Any, query: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            sent.append(str(query))
            return _original(self, query, *args, **kwargs)

        monkeypatch.setattr(cls, "execute", counted)
    return sent


@pytest.mark.postgres
def test_postgres_a_fan_in_costs_the_same_statements_whatever_its_size(
    pg_store: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The statements of one dependent's enqueue do not grow with its number of dependencies (they
    were four per dependency: mark, state, wait, second look)."""
    counts = []
    for size in (10, MANY):
        deps = _stored(pg_store, size)
        sent = _statements(monkeypatch)
        pg_store.enqueue([job(depends_on=tuple(deps))])
        counts.append(len(sent))
        monkeypatch.undo()
    assert counts[0] == counts[1], counts


@pytest.mark.postgres
def test_postgres_a_fan_out_in_one_call_costs_the_same_statements_whatever_its_size(
    pg_store: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    counts = []
    for size in (20, MANY):
        (root,) = _stored(pg_store, 1)
        sent = _statements(monkeypatch)
        pg_store.enqueue([job(depends_on=(root,)) for _ in range(size)])
        counts.append(len(sent))
        monkeypatch.undo()
    assert counts[0] == counts[1], counts


@pytest.mark.postgres
@pytest.mark.timeout(60)
def test_postgres_a_dependency_row_another_session_holds_is_still_marked(pg_server: Any, pg_store: Any) -> None:
    """The batched mark skips the rows another session holds (it waits for no lock); each is then marked
    alone once let go, so its completion's trigger releases the dependent (not only the upkeep)."""
    import psycopg
    from conftest import PG_SCHEMA

    deps = _stored(pg_store, 3)
    holder = psycopg.connect(pg_server.dsn, options=f"-c search_path={PG_SCHEMA}")  # not autocommit
    errors: list[BaseException] = []
    dependent = job(depends_on=tuple(deps))

    def enqueue() -> None:
        try:
            pg_store.enqueue([dependent])
        except BaseException as error:  # reported by the test thread
            errors.append(error)

    try:
        holder.execute("SELECT 1 FROM dispatch_jobs WHERE id = %s FOR UPDATE", (deps[1],))
        thread = threading.Thread(target=enqueue, name="test-enqueue")
        thread.start()
        watch = psycopg.connect(pg_server.dsn, autocommit=True)
        try:

            def blocked() -> bool:
                row = watch.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s",
                    ("%has_dependents%",),
                ).fetchone()
                return row is not None and row[0] > 0

            wait_for(blocked, 20, message="the enqueue waiting for the held row's mark")
        finally:
            watch.close()
        holder.rollback()
        thread.join(20)
        assert not thread.is_alive() and not errors, errors
    finally:
        holder.rollback()
        holder.close()
    with _conn(pg_server) as conn:
        marked = conn.execute("SELECT count(*) FROM dispatch_jobs WHERE id = ANY(%s) AND has_dependents", (deps,))
        assert marked.fetchone()[0] == 3
    _end(pg_store, deps)
    assert _get(pg_store, dependent.id).state is JobState.PENDING


def _conn(pg_server: Any) -> Any:
    import psycopg
    from conftest import PG_SCHEMA

    return psycopg.connect(pg_server.dsn, autocommit=True, options=f"-c search_path={PG_SCHEMA}")


# -- SQLite: statements per call ---------------------------------------------------------------------


def test_sqlite_a_fan_out_in_one_call_costs_the_same_statements_whatever_its_size(tmp_path: Any) -> None:
    """The dependents of one ``enqueue`` are settled together on SQLite too: one lookup of their
    dependencies, one executemany of their rows, their waits in one INSERT per 250 (each dependent cost a
    lookup and an insert of its waits of its own)."""
    from threaddispatch.stores.sqlite import SQLiteStore

    store = SQLiteStore(str(tmp_path / "fan-out.db"))
    try:
        counts = []
        for size in (2, 200):  # both within one INSERT of waits
            (root,) = _stored(store, 1)
            sent: list[str] = []
            conn = store._conn()
            conn.set_trace_callback(sent.append)
            dependents = [job(depends_on=(root,)) for _ in range(size)]
            try:
                store.enqueue(dependents)
            finally:
                conn.set_trace_callback(None)
            # sqlite3 traces each row of an executemany: those are the rows' inserts, not round trips.
            counts.append(len([sql for sql in sent if not sql.startswith("INSERT INTO dispatch_jobs ")]))
            placed = [_get(store, dependent.id) for dependent in dependents]
            assert {(record.state, record.waiting_on) for record in placed} == {(JobState.WAITING, 1)}
        assert counts[0] == counts[1], counts
    finally:
        store.close()
