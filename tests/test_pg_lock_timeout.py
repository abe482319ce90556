"""PostgresStore's ``lock_timeout``: no call waits without bound behind another session's lock.

Another session holding a lock on the jobs table (``LOCK TABLE``, ``VACUUM FULL``, an
``ALTER TABLE`` in an operator's psql) made every statement of the store wait for as long
as it was held. Each session of the store now sets ``lock_timeout``: past it the
statement is cancelled and the call raises StoreUnavailableError naming the bound, and
the store works again once the lock is gone. Migrations wait at least 60 s (another
process may be migrating). Each blocked call runs on a thread of the test; the lock is
released at the end of the test whatever happened, which ends a call still waiting.

On conftest's session server and shared schema (emptied after each test); the migration
test on a schema of its own. Skipped without PostgreSQL binaries or psycopg (failed on CI).
"""

from __future__ import annotations

import math
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import test_stores
from conftest import PG_SCHEMA

from threaddispatch.errors import ConfigurationError, StoreUnavailableError
from threaddispatch.testing import wait_for

psycopg = pytest.importorskip("psycopg")

from threaddispatch.stores.postgres import PostgresStore  # noqa: E402 - after the importorskip

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(90)]

T0 = test_stores.T0
#: How long a call may take before the test calls it hung (its bound here is 0.3 s).
HUNG = 20.0


class _Call(threading.Thread):
    """Runs ``call()`` and keeps what it returned or raised."""

    def __init__(self, call: Callable[[], object]) -> None:
        super().__init__(name="pg-lock-timeout-call", daemon=True)
        self.call = call
        self.returned: object = None
        self.raised: BaseException | None = None
        self.finished = threading.Event()

    def run(self) -> None:
        try:
            self.returned = self.call()
        except BaseException as error:
            self.raised = error
        finally:
            self.finished.set()


@pytest.fixture
def store(pg_server: Any, pg_url: str) -> Iterator[PostgresStore]:
    store = PostgresStore(pg_server.dsn, schema=PG_SCHEMA, lock_timeout=0.3)
    store.migrate()
    yield store
    store.close()


def _blocked(pg_server: Any, lock: str, call: Callable[[], object]) -> _Call:
    """Run ``call`` while another session holds ``lock`` (SQL run in its transaction); the finished call."""
    runner = _Call(call)
    locker = psycopg.connect(pg_server.dsn)
    try:
        locker.execute(lock)
        runner.start()
        runner.finished.wait(HUNG)
    finally:
        locker.rollback()
        locker.close()
        runner.join(30)
    assert runner.finished.is_set(), f"the call was still blocked after {HUNG}s"
    return runner


TABLE_LOCK = f'LOCK TABLE "{PG_SCHEMA}".dispatch_jobs IN ACCESS EXCLUSIVE MODE'


@pytest.mark.parametrize(
    "method",
    [
        pytest.param(lambda store, job_id: store.get(job_id), id="get"),
        pytest.param(lambda store, job_id: store.counts(), id="counts"),
        pytest.param(lambda store, job_id: store.enqueue([test_stores.job()]), id="enqueue"),
        pytest.param(lambda store, job_id: store.claim(["default"], 1, worker_id="w", now=T0), id="claim"),
        pytest.param(lambda store, job_id: store.list_jobs(), id="list_jobs"),
    ],
)
def test_a_call_behind_another_sessions_table_lock_raises_store_unavailable(
    store: PostgresStore, pg_server: Any, method: Callable[[PostgresStore, str], object]
) -> None:
    job = test_stores.job()
    store.enqueue([job])
    runner = _blocked(pg_server, TABLE_LOCK, lambda: method(store, job.id))
    assert isinstance(runner.raised, StoreUnavailableError), runner.raised
    assert "lock_timeout=0.3s" in str(runner.raised)
    # The connection stays usable, and the store works once the lock is gone.
    stored = store.get(job.id)
    assert stored is not None and stored.id == job.id


def test_a_row_lock_held_by_another_session_bounds_a_write(store: PostgresStore, pg_server: Any) -> None:
    job = test_stores.job()
    store.enqueue([job])
    row_lock = f"SELECT 1 FROM \"{PG_SCHEMA}\".dispatch_jobs WHERE id = '{job.id}' FOR UPDATE"
    runner = _blocked(pg_server, row_lock, lambda: store.cancel(job.id, now=T0))
    assert isinstance(runner.raised, StoreUnavailableError), runner.raised
    assert store.cancel(job.id, now=T0)  # the rollback of the cancelled statement left the job as it was


def test_a_migration_waits_past_lock_timeout_for_another_migrating_process(pg_server: Any) -> None:
    schema = f"t_{uuid.uuid4().hex[:12]}"
    store = PostgresStore(pg_server.dsn, schema=schema, lock_timeout=0.05)
    locker = psycopg.connect(pg_server.dsn)
    runner = _Call(store.migrate)
    try:
        locker.execute("SELECT pg_advisory_xact_lock(hashtext('threaddispatch.migrate'))")  # "another migrator"
        runner.start()
        wait_for(
            lambda: (
                locker.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted").fetchone()
                == (1,)
            ),
            20,
            message="the migration waiting for the migration lock",
        )
        # Far past lock_timeout (0.05 s), the migration is still waiting, not failed.
        assert not runner.finished.wait(0.5), runner.raised
        locker.rollback()
        assert runner.finished.wait(HUNG)
        assert runner.raised is None
        assert runner.returned == PostgresStore.MIGRATIONS[-1][0]
    finally:
        locker.rollback()
        runner.join(30)
        locker.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        locker.commit()
        locker.close()
        store.close()


@pytest.mark.parametrize("value", [0, -1, 0.0, math.nan, math.inf, True, "5", None, 3_000_000])
def test_lock_timeout_is_checked_at_the_constructor(value: object) -> None:
    with pytest.raises(ConfigurationError, match="lock_timeout"):
        PostgresStore("postgresql://user@127.0.0.1:1/db", lock_timeout=value)  # type: ignore[arg-type]
