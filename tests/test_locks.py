"""Serial locks (``enqueue(..., lock=...)``), and the claim statement that enforces them.

At most one job holding a given lock runs at a time across every process on the store,
in enqueue order within the lock; enforced inside the one claim statement.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from threaddispatch.stores.base import JobRecord, JobState


@pytest.fixture
def pg_schema(pg_server: Any) -> Iterator[str]:
    """A schema of its own (dropped after the test), for tests that need a table's own statistics."""
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    yield schema
    with psycopg.connect(pg_server.dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.mark.postgres
@pytest.mark.parametrize("queues", [["default"], ["default", "other"]])
def test_a_postgres_claim_takes_no_more_than_its_limit(pg_server: Any, pg_schema: str, queues: list[str]) -> None:
    """On an analysed small table the planner rescans the claim's locking subquery per row (a nested loop
    semi join); with SKIP LOCKED each rescan found another row, so a claim of 1 took every ready job."""
    import psycopg

    from threaddispatch.stores.postgres import PostgresStore

    with PostgresStore(pg_server.dsn, schema=pg_schema) as store:
        store.enqueue([JobRecord(id="j0", name="work", payload="1", run_at=0.0)])
        with psycopg.connect(pg_server.dsn, autocommit=True) as conn:
            conn.execute(f'ANALYZE "{pg_schema}".dispatch_jobs')  # statistics of one row: a nested loop plan
        store.enqueue([JobRecord(id=f"j{i}", name="work", payload="1", run_at=float(i)) for i in (1, 2)])
        claimed = store.claim(queues, 1, worker_id="w", now=10.0)
        assert [job.id for job in claimed] == ["j0"]
        assert store.counts()[JobState.RUNNING] == 1
        _done, more = store.complete_and_claim([], queues, 1, worker_id="w", now=10.0)
        assert [job.id for job in more] == ["j1"] and store.counts()[JobState.RUNNING] == 2
