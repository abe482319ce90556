"""``result(timeout=)`` on PostgreSQL keeps its own timeout while another session holds a lock on the jobs table.

The store's ``lock_timeout`` bounds every statement's wait for another session's lock; the
read ``result`` polls with used to wait up to it, so the call ended at max(timeout,
lock_timeout). ``Store.get_within`` gives that read the caller's remaining time instead
(``SET LOCAL lock_timeout``). Here ``lock_timeout`` is 60 s and the call's timeout 1 s: it
must end long before the store's own bound would. The blocked call runs on a thread of the
test; the lock is released at the end.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import PG_SCHEMA

from threaddispatch import JobEngine
from threaddispatch.errors import DispatchTimeoutError, StoreUnavailableError

psycopg = pytest.importorskip("psycopg")

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]

LOCK_TIMEOUT = 60.0  # the store's own bound: far past the call's timeout plus GRACE
GRACE = 15.0  # how long past its timeout a call may take before the test calls it blocked


@pytest.fixture
def engine(pg_url: str) -> Iterator[JobEngine]:
    from threaddispatch.stores.postgres import PostgresStore

    store = PostgresStore(pg_url, lock_timeout=LOCK_TIMEOUT)
    engine = JobEngine(store)
    engine.register("noop", lambda _ctx, _payload: None)
    yield engine
    store.close()


class _Call(threading.Thread):
    """Runs ``fn()`` and keeps what it raised or returned."""

    def __init__(self, fn: Any) -> None:
        super().__init__(name="locks-held-result", daemon=True)
        self.fn = fn
        self.raised: BaseException | None = None
        self.returned: Any = None
        self.finished = threading.Event()

    def run(self) -> None:
        try:
            self.returned = self.fn()
        except BaseException as error:
            self.raised = error
        finally:
            self.finished.set()


def _locked_table(pg_server: Any) -> Any:
    locker = psycopg.connect(pg_server.dsn)  # another session, as an operator's psql
    locker.execute(f'LOCK TABLE "{PG_SCHEMA}".dispatch_jobs IN ACCESS EXCLUSIVE MODE')
    return locker


def test_result_ends_at_its_timeout_not_at_the_stores_lock_timeout(engine: JobEngine, pg_server: Any) -> None:
    job_id = engine.enqueue("noop")  # pending: no worker runs it
    call = _Call(lambda: engine.result(job_id, timeout=1.0))
    locker = _locked_table(pg_server)
    try:
        call.start()
        finished = call.finished.wait(1.0 + GRACE)
    finally:
        locker.rollback()
        locker.close()
        call.join(LOCK_TIMEOUT + 10)
    assert finished, f"result(timeout=1) still blocked after {1.0 + GRACE}s (lock_timeout={LOCK_TIMEOUT}s)"
    assert isinstance(call.raised, DispatchTimeoutError)


def test_get_within_gives_up_behind_the_lock_and_reads_once_it_is_gone(engine: JobEngine, pg_server: Any) -> None:
    job_id = engine.enqueue("noop")
    store = engine.store
    call = _Call(lambda: store.get_within(job_id, timeout=0.5))
    locker = _locked_table(pg_server)
    try:
        call.start()
        finished = call.finished.wait(0.5 + GRACE)
    finally:
        locker.rollback()
        locker.close()
        call.join(LOCK_TIMEOUT + 10)
    assert finished
    assert isinstance(call.raised, StoreUnavailableError)
    found = store.get_within(job_id, timeout=0.5)
    assert found is not None and found.id == job_id
    assert store.get_within(job_id, timeout=LOCK_TIMEOUT + 1) == store.get(job_id)  # at or past its bound: get
