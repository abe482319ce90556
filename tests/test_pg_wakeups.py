"""PostgresStore: every job that becomes ready without an INSERT wakes the listeners of other processes.

The insert trigger announces new jobs; these tests cover the jobs made ready by an
UPDATE: a waiting dependent released by its dependency's completion (``complete_many``,
the group commit), by its failure or cancellation under ``on_dependency_failure="run"``,
or by the upkeep's sweep; and the next job of a serial lock when the holder finishes.
Each store-level test watches a subscriber on a second store (its own LISTEN session);
the engine-level ones run the dependent on an idle engine polling every 30 s, so only
the NOTIFY can start it within the test's 10 s.

The cross-process tests run an idle worker process (tests/pg_worker.py) polling every 30 s
that writes its ready file only once its LISTEN session is up: a job retried with a delay by
this process's engine, which then stops, runs there at its run_at; a queue resumed here is
claimed there at once.

On conftest's session server and shared schema (emptied after each test); the migration
tests on a schema of their own. Skipped without PostgreSQL binaries or psycopg (failed on CI).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import test_stores
from conftest import PG_SCHEMA
from pg_server import PostgresServer
from test_postgres import Workers

from threaddispatch.errors import Retry
from threaddispatch.jobs import JobContext, JobEngine
from threaddispatch.stores import JobRecord, JobState
from threaddispatch.stores.base import Completion
from threaddispatch.testing import wait_for

try:
    import psycopg

    from threaddispatch.stores.postgres import PostgresStore
except ImportError:  # the 'postgres' extra is not installed
    psycopg = None  # type: ignore[assignment]

pytestmark = [pytest.mark.postgres]

T0 = test_stores.T0
Heard = list[tuple[str | None, float | None]]


@pytest.fixture
def make_store(pg_server: PostgresServer, pg_url: str) -> Iterator[Callable[..., PostgresStore]]:
    """Build PostgresStores on the shared schema (``pg_url`` empties it after the test); all closed at the end."""
    made: list[PostgresStore] = []

    def make(**options: Any) -> PostgresStore:
        store = PostgresStore(pg_server.dsn, schema=options.pop("schema", PG_SCHEMA), **options)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


@pytest.fixture
def heard(make_store: Callable[..., PostgresStore]) -> Iterator[Heard]:
    """The wake-ups a subscriber on a store of its own receives, from the moment its LISTEN is in place."""
    listener = make_store()
    listener.migrate()
    got: Heard = []
    unsubscribe = listener.subscribe_wakeups(lambda queue, run_at: got.append((queue, run_at)))
    wait_for(lambda: (None, None) in got, 10, message="listener connected")  # "look now", on connecting
    got.clear()
    yield got
    unsubscribe()


def _wait_heard(heard: Heard, queue: str) -> None:
    wait_for(lambda: any(name == queue for name, _ in heard), 10, message=f"a wake-up for queue {queue!r}")


def _dependency_and_dependent(
    store: PostgresStore, *, policy: str = "cancel", max_retries: int = 3
) -> tuple[JobRecord, JobRecord]:
    """Job A (queue a, pending) and job B (queue b) depending on A, waiting: both stored."""
    first = test_stores.job(queue="a", max_retries=max_retries)
    second = test_stores.job(queue="b", depends_on=(first.id,), on_dependency_failure=policy)
    store.enqueue([first])
    store.enqueue([second])
    stored = store.get(second.id)
    assert stored is not None and stored.state is JobState.WAITING
    return first, second


def _quiet(store: PostgresStore, heard: Heard) -> None:
    """Wait until the wake-ups of what was stored so far arrived (a marker job's comes after them), then forget them."""
    marker = test_stores.job(queue="marker")
    store.enqueue([marker])
    _wait_heard(heard, "marker")
    heard.clear()
    assert store.cancel(marker.id, now=T0)


def _claim_a(store: PostgresStore, first: JobRecord) -> JobRecord:
    [claimed] = store.claim(["a"], 1, worker_id="w", now=T0 + 1)
    assert claimed.id == first.id
    return claimed


def _assert_ready(store: PostgresStore, job: JobRecord) -> None:
    stored = store.get(job.id)
    assert stored is not None and stored.state is JobState.PENDING


# -- the store: one NOTIFY per queue made ready ---------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["complete_many", "complete_and_claim"])
def test_completion_that_releases_a_dependent_notifies_its_queue(
    make_store: Callable[..., PostgresStore], heard: Heard, how: str
) -> None:
    """The dependent's queue hears a wake-up, due now, from the completion's own statement."""
    store = make_store()
    first, second = _dependency_and_dependent(store)
    claimed = _claim_a(store, first)
    _quiet(store, heard)
    outcome = Completion(claimed.id, "w", claimed.attempts, '"ok"', None)
    if how == "complete_many":
        assert store.complete_many([outcome], now=T0 + 2) == {first.id}
    else:
        assert store.complete_and_claim([outcome], ["a"], 4, worker_id="w", now=T0 + 2) == ({first.id}, [])
    _assert_ready(store, second)
    _wait_heard(heard, "b")
    assert ("b", T0 + 2) in heard


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["fail", "cancel", "reap"])
def test_dependency_that_ends_badly_notifies_the_queue_of_a_dependent_that_runs_anyway(
    make_store: Callable[..., PostgresStore], heard: Heard, how: str
) -> None:
    """``on_dependency_failure="run"``: the dependency failed, cancelled or reaped out of attempts; B is ready."""
    store = make_store()
    first, second = _dependency_and_dependent(store, policy="run", max_retries=0)
    _quiet(store, heard)
    if how == "cancel":
        assert store.cancel(first.id, now=T0 + 2)
    else:
        claimed = _claim_a(store, first)
        if how == "fail":
            assert store.fail(first.id, worker_id="w", attempts=claimed.attempts, error="boom", now=T0 + 2)
        else:  # max_retries 0: the reaper fails the lost job
            assert store.reap_stale(older_than=T0 + 2, now=T0 + 2) == [first.id]
    _assert_ready(store, second)
    _wait_heard(heard, "b")


@pytest.mark.timeout(30)
def test_upkeep_sweep_that_releases_a_dependent_notifies_its_queue(
    make_store: Callable[..., PostgresStore], heard: Heard, pg_server: PostgresServer
) -> None:
    """A dependent the completion missed (its dependency finished with no release) is announced by the sweep."""
    store = make_store()
    first, second = _dependency_and_dependent(store)
    _quiet(store, heard)
    with psycopg.connect(pg_server.dsn, autocommit=True, options=f"-c search_path={PG_SCHEMA}") as conn:
        conn.execute("UPDATE dispatch_jobs SET state = 'completed', finished_at = %s WHERE id = %s", (T0, first.id))
    assert store.release_waiting(now=T0 + 2) == 1
    _assert_ready(store, second)
    _wait_heard(heard, "b")


@pytest.mark.timeout(30)
def test_finished_lock_holder_notifies_the_queue_of_the_next_job_of_its_lock(
    make_store: Callable[..., PostgresStore], heard: Heard
) -> None:
    """The next job holding the serial lock (here on another queue) is claimable once the holder completed."""
    store = make_store()
    first, second = test_stores.job(queue="a", lock="L"), test_stores.job(queue="b", lock="L")
    store.enqueue([first])
    store.enqueue([second])
    assert store.claim(["b"], 1, worker_id="w", now=T0 + 1) == []  # its turn comes after the first's
    claimed = _claim_a(store, first)
    _quiet(store, heard)
    store.complete_many([Completion(claimed.id, "w", claimed.attempts, None, None)], now=T0 + 2)
    _wait_heard(heard, "b")
    assert [job.id for job in store.claim(["b"], 1, worker_id="w", now=T0 + 3)] == [second.id]


@pytest.mark.timeout(30)
def test_a_release_of_many_dependents_sends_one_wake_up_per_queue(
    make_store: Callable[..., PostgresStore], heard: Heard
) -> None:
    """Fifty dependents on two queues: the listener hears each queue once (PostgreSQL folds equal payloads)."""
    store = make_store()
    first = test_stores.job(queue="a")
    store.enqueue([first])
    store.enqueue([test_stores.job(queue=f"q{n % 2}", depends_on=(first.id,)) for n in range(50)])
    claimed = _claim_a(store, first)
    _quiet(store, heard)
    store.complete_many([Completion(claimed.id, "w", claimed.attempts, None, None)], now=T0 + 2)
    wait_for(lambda: {"q0", "q1"} <= {queue for queue, _ in heard}, 10, message="both queues' wake-ups")
    store.enqueue([test_stores.job(queue="marker")])  # delivered after the release's notifications
    _wait_heard(heard, "marker")
    assert sorted(str(queue) for queue, _ in heard if queue != "marker") == ["q0", "q1"]


# -- engines: the idle one starts the job at LISTEN latency, not at its 30 s poll -------------------------


def _idle_engine(store: PostgresStore, ran: dict[str, threading.Event]) -> JobEngine:
    engine = JobEngine(store, concurrency=2, poll_interval=30.0, max_poll_interval=30.0, heartbeat_interval=0.2,
                       stale_job_threshold=5.0, shutdown_timeout=5.0)  # fmt: skip

    @engine.job("second", max_retries=0)
    def second(ctx: JobContext, payload: object) -> str:
        ran.setdefault(ctx.job.id, threading.Event()).set()
        return "second"

    return engine


def _busy_engine(store: PostgresStore, *, fails: bool) -> JobEngine:
    engine = JobEngine(store, concurrency=2, poll_interval=0.05, max_poll_interval=0.2, heartbeat_interval=0.2,
                       stale_job_threshold=5.0, shutdown_timeout=5.0)  # fmt: skip

    @engine.job("first", max_retries=0)
    def first(ctx: JobContext, payload: object) -> str:
        if fails:
            raise RuntimeError("the dependency fails")
        return "first"

    engine.register("second", lambda ctx, payload: None, max_retries=0)
    return engine


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["completes", "fails", "cancelled", "lock"])
def test_idle_engine_of_another_process_starts_the_job_a_dependency_or_lock_released(
    make_store: Callable[..., PostgresStore], how: str
) -> None:
    """Engine 1 (queue a) ends job A; engine 2 (queue b, polling every 30 s, idle) starts B within 10 s.

    B depends on A (policy "run" when A fails or is cancelled), or follows it under a serial lock.
    """
    idle_store, busy_store, producer_store = make_store(), make_store(), make_store()
    ran: dict[str, threading.Event] = {}
    idle = _idle_engine(idle_store, ran)
    busy = _busy_engine(busy_store, fails=how == "fails")
    producer = _busy_engine(producer_store, fails=False)  # never started: only enqueues and cancels
    first_id = producer.enqueue("first", queue="a", lock="L" if how == "lock" else None)
    if how == "lock":
        second_id = producer.enqueue("second", queue="b", lock="L")
    else:
        second_id = producer.enqueue("second", queue="b", depends_on=[first_id], on_dependency_failure="run")
    ran[second_id] = threading.Event()
    # The idle engine's LISTEN session is the one its store already holds for this probe.
    probe: Heard = []
    unsubscribe = idle_store.subscribe_wakeups(lambda queue, run_at: probe.append((queue, run_at)))
    try:
        wait_for(lambda: (None, None) in probe, 10, message="listener connected")
        idle.start(queues=["b"])
        try:
            wait_for(lambda: idle.stats()["idle_polls"] >= 1, 10, message="the idle engine's first claim")
            assert not ran[second_id].is_set()
            if how == "cancelled":
                producer.cancel(first_id)
            else:
                busy.start(queues=["a"])
            try:
                assert ran[second_id].wait(10), f"job B did not start within 10 s of A ({how})"
                assert idle.result(second_id, timeout=10) == "second"
            finally:
                busy.stop(10)
        finally:
            idle.stop(10)
    finally:
        unsubscribe()


# -- migrations 9 and 11 on databases of schema 8 and 10 ------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("version", [8, 10])
def test_migrating_an_old_database_with_a_waiting_job_announces_its_release(
    pg_server: PostgresServer,
    make_store: Callable[..., PostgresStore],
    new_schema: str,
    version: int,
) -> None:
    """A schema made by version 8 (before the release NOTIFY) or 10 (before the release trigger) holding a
    waiting dependent, stored as that version did (no mark on its dependency), upgrades in place; the
    dependency's completion then releases it and NOTIFYs."""

    class OldStore(PostgresStore):
        MIGRATIONS = tuple(migration for migration in PostgresStore.MIGRATIONS if migration[0] <= version)

        @staticmethod
        def _mark_depended_on(conn: object, ids: object) -> None:
            """The old versions stored dependents without marking their dependencies."""

    old = OldStore(pg_server.dsn, schema=new_schema)
    try:
        assert old.migrate() == version
        first, second = _dependency_and_dependent(old)
        claimed = _claim_a(old, first)
    finally:
        old.close()
    store, listener = make_store(schema=new_schema), make_store(schema=new_schema)
    assert store.migrate() == PostgresStore.MIGRATIONS[-1][0] >= 11
    stored = store.get(second.id)
    assert stored is not None and stored.state is JobState.WAITING and stored.waiting_on == 1
    got: Heard = []
    unsubscribe = listener.subscribe_wakeups(lambda queue, run_at: got.append((queue, run_at)))
    try:
        wait_for(lambda: (None, None) in got, 10, message="listener connected")
        store.complete_many([Completion(claimed.id, "w", claimed.attempts, None, None)], now=T0 + 2)
        _wait_heard(got, "b")
    finally:
        unsubscribe()
    _assert_ready(store, second)


# -- a dependent stored while its dependency's completion is under way ---------------------------------


@pytest.mark.timeout(60)
def test_dependent_stored_while_the_completion_of_its_dependency_is_under_way_is_released_at_once(
    make_store: Callable[..., PostgresStore], heard: Heard, pg_server: PostgresServer
) -> None:
    """A completion whose snapshot predates the dependent's commit misses it: the enqueue looks again.

    An operator's row lock on A holds the completion (snapshot taken, waiting for A's row)
    while B is stored waiting on A; once the lock goes the completion commits without
    seeing B. The enqueue waits for A's row and then releases B itself, not leaving it to the
    upkeep's sweep (a heartbeat interval later).
    """
    completer, producer = make_store(), make_store()
    first = test_stores.job(queue="a")
    completer.enqueue([first])
    claimed = _claim_a(completer, first)
    second = test_stores.job(queue="b", depends_on=(first.id,))
    done: list[object] = []
    with psycopg.connect(pg_server.dsn, options=f"-c search_path={PG_SCHEMA}") as holder:
        holder.execute("SELECT 1 FROM dispatch_jobs WHERE id = %s FOR UPDATE", (first.id,))
        outcome = Completion(claimed.id, "w", claimed.attempts, None, None)
        completing = threading.Thread(target=lambda: done.append(completer.complete_many([outcome], now=T0 + 2)))
        storing = threading.Thread(target=lambda: done.append(producer.enqueue([second])))
        completing.start()
        wait_for(lambda: _lock_waits(pg_server) == 1, 10, message="the completion waits for A's row")
        storing.start()
        # Either stored already (it read A running), or waiting for A's row in its second look.
        wait_for(lambda: not storing.is_alive() or _lock_waits(pg_server) == 2, 10, message="B stored")
        holder.rollback()
    completing.join(10)
    storing.join(10)
    assert {first.id} in done and [second.id] in done
    _assert_ready(producer, second)
    _wait_heard(heard, "b")


@pytest.mark.timeout(60)
def test_dependent_stored_after_the_completion_took_its_snapshot_but_before_it_reached_the_dependency(
    make_store: Callable[..., PostgresStore], heard: Heard, pg_server: PostgresServer
) -> None:
    """The completion of X and A (one statement) took its snapshot and waits for X's row while B is stored
    waiting on A and the enqueue's second look finds A unlocked and running; the completion then reaches A,
    commits second, and releases B (not the upkeep's sweep, a heartbeat interval later).
    """
    completer, producer = make_store(), make_store()
    other, first = test_stores.job(queue="a"), test_stores.job(queue="a")
    completer.enqueue([other])
    completer.enqueue([first])
    claimed = completer.claim(["a"], 2, worker_id="w", now=T0 + 1)
    assert [job.id for job in claimed] == [other.id, first.id]
    second = test_stores.job(queue="b", depends_on=(first.id,))
    done: list[object] = []
    with psycopg.connect(pg_server.dsn, options=f"-c search_path={PG_SCHEMA}") as holder:
        holder.execute("SELECT 1 FROM dispatch_jobs WHERE id = %s FOR UPDATE", (other.id,))
        outcomes = [Completion(job.id, "w", job.attempts, None, None) for job in claimed]
        completing = threading.Thread(target=lambda: done.append(completer.complete_many(outcomes, now=T0 + 2)))
        completing.start()
        wait_for(lambda: _lock_waits(pg_server) == 1, 10, message="the completion waits for X's row")
        assert producer.enqueue([second]) == [second.id]  # A is neither locked nor finished: B waits
        stored = producer.get(second.id)
        assert stored is not None and stored.state is JobState.WAITING
        holder.rollback()
    completing.join(10)
    assert done == [{other.id, first.id}]
    _assert_ready(producer, second)
    _wait_heard(heard, "b")


def _lock_waits(pg_server: PostgresServer) -> int:
    """How many sessions wait for a row of dispatch_jobs (a tuple or transaction lock not granted)."""
    with psycopg.connect(pg_server.dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_locks WHERE NOT granted").fetchone()
    return int(row[0]) if row else 0


# -- migration 10: jobs an update hands back to the queue, now or later -------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["retry_later", "release", "reap", "requeue"])
def test_job_handed_back_to_its_queue_notifies_it_with_its_run_at(
    make_store: Callable[..., PostgresStore], heard: Heard, how: str
) -> None:
    """A retry announces its later run_at (every process wakes then); a release, reap or requeue announces now."""
    store = make_store()
    first = test_stores.job(queue="a")
    store.enqueue([first])
    claimed = _claim_a(store, first)
    _quiet(store, heard)
    if how == "retry_later":
        assert store.retry_later(first.id, worker_id="w", attempts=claimed.attempts, run_at=T0 + 60, error="e",
                                 now=T0 + 2)  # fmt: skip
        _wait_heard(heard, "a")
        assert heard == [("a", T0 + 60)]
        return
    if how == "release":
        assert store.release([first.id], worker_id="w", now=T0 + 2) == 1
    elif how == "reap":
        assert store.reap_stale(older_than=T0 + 10, now=T0 + 2) == [first.id]
    else:
        assert store.fail(first.id, worker_id="w", attempts=claimed.attempts, error="e", now=T0 + 2) is not None
        _quiet(store, heard)
        store.requeue(first.id, now=T0 + 3)
    _wait_heard(heard, "a")
    assert heard == [("a", T0 + (3 if how == "requeue" else 2))]


@pytest.mark.timeout(60)
def test_migrating_a_version_9_database_with_a_running_job_announces_its_retry(
    pg_server: PostgresServer, make_store: Callable[..., PostgresStore], new_schema: str
) -> None:
    """A schema made by version 9 holding a running job upgrades in place; the job's retry then NOTIFYs its run_at."""

    class Version9Store(PostgresStore):
        MIGRATIONS = tuple(migration for migration in PostgresStore.MIGRATIONS if migration[0] <= 9)

    old = Version9Store(pg_server.dsn, schema=new_schema)
    try:
        assert old.migrate() == 9
        first = test_stores.job(queue="a")
        old.enqueue([first])
        claimed = _claim_a(old, first)
    finally:
        old.close()
    store, listener = make_store(schema=new_schema), make_store(schema=new_schema)
    assert store.migrate() == PostgresStore.MIGRATIONS[-1][0] >= 10
    got: Heard = []
    unsubscribe = listener.subscribe_wakeups(lambda queue, run_at: got.append((queue, run_at)))
    try:
        wait_for(lambda: (None, None) in got, 10, message="listener connected")
        got.clear()
        assert store.retry_later(first.id, worker_id="w", attempts=claimed.attempts, run_at=T0 + 60, error="e",
                                 now=T0 + 2)  # fmt: skip
        _wait_heard(got, "a")
        assert got == [("a", T0 + 60)]
    finally:
        unsubscribe()


# -- across processes: a retry and a resume start an idle worker process -----------------------------

# The idle worker's polls: far beyond the test's waits, so the poll cannot pass a test.
IDLE = ("--wait-listener", "--poll", "30", "--max-poll", "60")


@pytest.fixture
def workers(pg_server: PostgresServer, pg_url: str, tmp_path: Path) -> Iterator[Workers]:
    group = Workers(pg_server, PG_SCHEMA, tmp_path)
    yield group
    group.kill_all()


def _retrying_engine(store: PostgresStore, delay: float, started: threading.Event, go: threading.Event) -> JobEngine:
    """An engine whose ``record`` sets ``started``, waits for ``go``, then asks for a retry after ``delay`` seconds."""
    engine = JobEngine(store, poll_interval=0.05, shutdown_timeout=5.0)

    @engine.job("record", max_retries=3)
    def record(ctx: JobContext, payload: object) -> None:
        started.set()
        assert go.wait(30)
        raise Retry(delay=delay)

    return engine


@pytest.mark.timeout(90)
def test_retry_made_by_a_process_that_then_stops_runs_on_an_idle_process_at_its_run_at(
    make_store: Callable[..., PostgresStore], workers: Workers
) -> None:
    """Process A's attempt asks for a retry in 2 s and A stops; idle process B runs the retry (not at its 30 s poll).

    A holds its attempt until B is up (B's first claim finds the job running), then retries.
    """
    store = make_store()
    started, go = threading.Event(), threading.Event()
    engine = _retrying_engine(store, 2.0, started, go)
    job_id = engine.enqueue("record", {"n": 7})
    engine.start()
    try:
        assert started.wait(20), "A's attempt did not start"
        idle = workers.spawn("run", *IDLE)
        workers.wait_ready(idle)
        go.set()
        wait_for(lambda: _state(store, job_id) is JobState.RETRYING, 20, message="the retry recorded by A")
    finally:
        assert engine.stop(10)
    wait_for(lambda: "run 7" in workers.lines(idle), 20, message="B ran the retry")
    wait_for(lambda: _state(store, job_id) is JobState.COMPLETED, 20, message="B's completion written")
    workers.stop(idle)


@pytest.mark.timeout(90)
def test_queue_resumed_by_another_process_is_claimed_at_once_by_an_idle_process(
    make_store: Callable[..., PostgresStore], workers: Workers
) -> None:
    """The queue is paused before B starts; a resume made here starts B's claim of its job (not B's 30 s refresh)."""
    store = make_store()
    store.set_queue_paused("default", True, now=time.time())
    idle = workers.spawn("run", *IDLE)
    workers.wait_ready(idle)
    producer = JobEngine(store)  # never started: it only enqueues and resumes
    producer.register("record", lambda ctx, payload: payload, max_retries=3)
    job_id = producer.enqueue("record", {"n": 3})
    producer.resume_queue("default")
    wait_for(lambda: "run 3" in workers.lines(idle), 20, message="B ran the job of the resumed queue")
    wait_for(lambda: _state(store, job_id) is JobState.COMPLETED, 20, message="B's completion written")
    workers.stop(idle)


def _state(store: PostgresStore, job_id: str) -> JobState | None:
    job = store.get(job_id)
    return None if job is None else job.state
