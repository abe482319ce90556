"""Hostile tests of a timeout kept while PostgreSQL blocks: a table lock held by another session.

``JobEngine.result(job_id, timeout=...)`` promises DispatchTimeoutError when time runs out.
Another session holding a lock on the jobs table (a migration, ``VACUUM FULL``, an
``ALTER TABLE``, a ``LOCK TABLE`` in an operator's psql) made every statement of the
store wait for it: PostgresStore set no ``lock_timeout`` and ``result`` waited inside
``store.get`` for as long as the lock was held, far past its timeout. The store's
``lock_timeout`` (default 5 s) now ends that wait with StoreUnavailableError
(tests/test_pg_lock_timeout.py); ``result`` has yet to turn it into DispatchTimeoutError
once its own deadline passed. The blocked call runs on a thread of the test; the lock is released at the end,
which ends the call.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import PG_SCHEMA

from threaddispatch import JobEngine
from threaddispatch.errors import DispatchTimeoutError

psycopg = pytest.importorskip("psycopg")

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(90)]

#: How long past its own timeout a call may take before the test calls it hung.
GRACE = 10.0


@pytest.fixture
def engine(pg_url: str) -> Iterator[JobEngine]:
    from threaddispatch.stores.postgres import PostgresStore

    store = PostgresStore(pg_url)
    engine = JobEngine(store)
    engine.register("noop", lambda _ctx, _payload: None)
    yield engine
    store.close()


class _Call(threading.Thread):
    """Runs ``engine.result(job_id, timeout)`` and keeps what it raised."""

    def __init__(self, engine: JobEngine, job_id: str, timeout: float) -> None:
        super().__init__(name="hostile-s25-result", daemon=True)
        self.engine, self.job_id, self.timeout = engine, job_id, timeout
        self.raised: BaseException | None = None
        self.finished = threading.Event()

    def run(self) -> None:
        try:
            self.engine.result(self.job_id, timeout=self.timeout)
        except BaseException as error:
            self.raised = error
        finally:
            self.finished.set()


def test_result_keeps_its_timeout_while_another_session_locks_the_jobs_table(engine: JobEngine, pg_server: Any) -> None:
    job_id = engine.enqueue("noop")  # pending: no worker runs it (and the tables exist)
    call = _Call(engine, job_id, timeout=1.0)
    locker = psycopg.connect(pg_server.dsn)  # another session, as an operator's psql
    try:
        locker.execute(f'LOCK TABLE "{PG_SCHEMA}".dispatch_jobs IN ACCESS EXCLUSIVE MODE')
        call.start()
        finished = call.finished.wait(1.0 + GRACE)
    finally:
        locker.rollback()  # ends the blocked call
        locker.close()
        call.join(30)
    assert finished, f"result(timeout=1) still blocked after {1.0 + GRACE}s"
    assert isinstance(call.raised, DispatchTimeoutError)


def test_result_keeps_its_timeout_on_a_pending_job_when_nothing_blocks(engine: JobEngine) -> None:
    """The baseline: the same call without the lock raises DispatchTimeoutError in time."""
    job_id = engine.enqueue("noop")
    call = _Call(engine, job_id, timeout=0.5)
    call.start()
    assert call.finished.wait(0.5 + GRACE)
    call.join(10)
    assert isinstance(call.raised, DispatchTimeoutError)
