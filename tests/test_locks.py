"""Serial locks (``enqueue(..., lock=...)``), and the claim statement that enforces them.

At most one job holding a given lock runs at a time across every process on the store,
in enqueue order within the lock; enforced inside the one claim statement.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from threaddispatch.errors import ConfigurationError
from threaddispatch.jobs import JobContext, JobEngine
from threaddispatch.stores import Store
from threaddispatch.stores.base import JobRecord, JobState
from threaddispatch.testing import wait_for


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


# -- serial locks ------------------------------------------------------------------------------------

_WORKER = """
import os, sys, time
from threaddispatch.jobs import JobEngine
from threaddispatch.stores import open_store

url, out, stop = sys.argv[1], sys.argv[2], sys.argv[3]
engine = JobEngine(open_store(url), poll_interval=0.005, max_poll_interval=0.02, concurrency=3)

def serial(ctx, payload):
    start = time.monotonic()
    time.sleep(0.002)  # a little work, so that overlapping runs would show
    with open(out, "a") as f:
        f.write(f"{ctx.job.lock} {payload} {start!r} {time.monotonic()!r}\\n")

engine.register("serial", serial)
engine.start()
while not os.path.exists(stop):
    time.sleep(0.01)
engine.stop(10)
"""


def _check_serial(intervals: list[tuple[str, int, float, float]], per_lock: int) -> None:
    """Per lock: every run (start, end) ends before the next starts, in enqueue (payload) order."""
    locks = {lock for lock, *_ in intervals}
    for lock in locks:
        runs = sorted((start, end, payload) for name, payload, start, end in intervals if name == lock)
        assert [payload for _, _, payload in runs] == list(range(per_lock)), lock
        for (_, end, _), (start, _, _) in itertools.pairwise(runs):
            assert end <= start, f"{lock}: runs overlap"


def _jobs(engine: JobEngine, per_lock: int, locks: Sequence[str]) -> list[str]:
    ids = []
    for n in range(per_lock):
        for lock in locks:
            ids.append(engine.enqueue("serial", n, lock=lock))
    ids.extend(engine.enqueue_many("serial", list(range(per_lock))))  # no lock: these run alongside
    return ids


@pytest.mark.timeout(120)
def test_jobs_sharing_a_lock_run_one_at_a_time_in_order(store: Store) -> None:
    """Four worker threads: the runs of each lock never intersect and follow enqueue order."""
    engine = JobEngine(store, poll_interval=0.005, max_poll_interval=0.02, concurrency=4)
    intervals: list[tuple[str, int, float, float]] = []
    guard = threading.Lock()

    def serial(ctx: JobContext, payload: int) -> None:
        start = time.monotonic()
        time.sleep(0.002)  # a little work, so that overlapping runs would show
        if ctx.job.lock is not None:
            with guard:
                intervals.append((ctx.job.lock, payload, start, time.monotonic()))

    engine.register("serial", serial)
    ids = _jobs(engine, 15, ["customer:1", "customer:2"])
    engine.start()
    try:
        for job_id in ids:
            engine.result(job_id, timeout=60)
    finally:
        engine.stop(10)
    _check_serial(intervals, 15)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("store_kind", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_a_lock_holds_across_processes(store: Store, store_url: str, tmp_path: Path) -> None:
    """Three worker processes of three threads each on one store: per lock, runs never intersect, in order."""
    script = tmp_path / "serial_worker.py"
    script.write_text(_WORKER, encoding="utf-8")
    stop = tmp_path / "stop"
    engine = JobEngine(store)
    engine.register("serial", lambda ctx, payload: None)
    ids = _jobs(engine, 12, ["a", "b", "c"])
    outs = [tmp_path / f"runs-{n}.txt" for n in range(3)]
    workers = [subprocess.Popen([sys.executable, str(script), store_url, str(out), str(stop)]) for out in outs]
    try:
        wait_for(lambda: all(store.get(job_id).state is JobState.COMPLETED for job_id in ids), timeout=120,  # type: ignore[union-attr]
                 interval=0.05)  # fmt: skip
    finally:
        stop.touch()
        for worker in workers:
            assert worker.wait(60) == 0
    intervals = []
    for out in outs:
        for line in out.read_text(encoding="utf-8").splitlines() if out.exists() else ():
            lock, payload, start, end = line.split()
            if lock != "None":
                intervals.append((lock, int(payload), float(start), float(end)))
    _check_serial(intervals, 12)
    assert len({out for out in outs if out.exists()}) >= 1


def test_a_claim_takes_only_the_first_job_of_a_lock(store: Store) -> None:
    """The claim statement's rule: one job per lock, the first inserted, none while one runs."""
    store.enqueue([JobRecord(id=f"j{i}", name="w", payload="1", run_at=float(i), lock="L" if i % 2 == 0 else None)
                   for i in range(6)])  # fmt: skip
    assert [job.id for job in store.claim(["default"], 10, worker_id="w", now=100.0)] == ["j0", "j1", "j3", "j5"]
    assert store.claim(["default"], 10, worker_id="w", now=100.0) == []  # j2 waits for the running j0
    assert store.complete("j0", worker_id="w", attempts=1, result=None, now=101.0)
    assert [job.id for job in store.claim(["default"], 10, worker_id="w", now=102.0)] == ["j2"]
    store.retry_later("j2", worker_id="w", attempts=1, run_at=500.0, error="again", now=103.0)
    assert store.claim(["default"], 10, worker_id="w", now=104.0) == []  # j4 waits for the retrying j2
    assert store.cancel("j2", now=105.0)
    assert [job.id for job in store.claim(["other", "default"], 10, worker_id="w", now=106.0)] == ["j4"]
    assert store.get("j4").lock == "L"  # type: ignore[union-attr]


def test_a_lock_from_the_registration_and_bad_locks(store: Store) -> None:
    """@engine.job(lock=fn) derives each job's lock from its payload; a bad lock is refused at the call."""
    engine = JobEngine(store)

    @engine.job("bill", lock=lambda payload: f"customer:{payload['customer']}")
    def bill(ctx: JobContext, payload: dict[str, int]) -> None:
        return None

    engine.register("fixed", lambda ctx, payload: None, lock="one")
    engine.register("free", lambda ctx, payload: None)
    assert engine.get_job(bill.enqueue({"customer": 42})).lock == "customer:42"
    assert engine.get_job(bill.enqueue({"customer": 42}, lock="mine")).lock == "mine"
    assert [engine.get_job(i).lock for i in engine.enqueue_many("fixed", [1, 2])] == ["one", "one"]
    assert engine.get_job(engine.enqueue("free", 1)).lock is None
    assert engine.get_job(engine.chain(engine.job_spec("free", 1, lock="x"))[0]).lock == "x"
    for bad in ("", 42):
        with pytest.raises(ConfigurationError, match="lock") as raised:
            engine.enqueue("free", 1, lock=bad)  # type: ignore[arg-type]
        assert repr(bad) in str(raised.value)
    with pytest.raises(ConfigurationError, match="lock"):
        engine.register("bad", lambda ctx, payload: None, lock="")

    @engine.job("derived_badly", lock=lambda payload: payload)
    def derived_badly(ctx: JobContext, payload: object) -> None:
        return None

    with pytest.raises(ConfigurationError, match="derived_badly"):
        derived_badly.enqueue(7)
    assert sum(engine.counts().values()) == 6
