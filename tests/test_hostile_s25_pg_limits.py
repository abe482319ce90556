"""Hostile tests of PostgresStore at PostgreSQL's own limits: NOTIFY payloads under 8,000 bytes.

Every insert or update that makes a job claimable sends ``pg_notify`` from a row trigger
with a JSON payload naming the job's queue. PostgreSQL refuses a payload of 8,000 bytes or
more, so a queue name near that length failed every enqueue into it with a StoreError
("payload string too long") raised by the trigger, while MemoryStore and SQLiteStore took
it; migration 12's triggers name no queue in a payload that would not fit. The promise
attacked: bad input is refused at the call, the same for every store
(README, "Bad input"); a name that is valid must work on every store.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from threaddispatch import JobEngine
from threaddispatch.errors import ConfigurationError

pytest.importorskip("psycopg")

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(60)]


@pytest.fixture
def engine(pg_url: str) -> Iterator[JobEngine]:
    from threaddispatch.stores.postgres import PostgresStore

    store = PostgresStore(pg_url)
    engine = JobEngine(store)
    engine.register("answer", lambda _ctx, _payload: 42)
    yield engine
    store.close()


@pytest.mark.parametrize(
    "queue", [pytest.param("q" * 9_000, id="9000-ascii"), pytest.param("€" * 2_700, id="8100-bytes")]
)
def test_a_queue_name_past_the_notify_limit_is_refused_at_the_call_or_works(engine: JobEngine, queue: str) -> None:
    try:
        job_id = engine.enqueue("answer", queue=queue)
    except ConfigurationError as error:
        assert "queue" in str(error)
        return
    assert engine.run_pending(queues=[queue]) == 1
    assert engine.result(job_id, timeout=10) == 42


def test_a_long_queue_name_under_the_notify_limit_works(engine: JobEngine) -> None:
    queue = "q" * 7_000
    job_id = engine.enqueue("answer", queue=queue)
    engine.pause_queue(queue)
    engine.resume_queue(queue)
    assert engine.run_pending(queues=[queue]) == 1
    assert engine.result(job_id, timeout=10) == 42
