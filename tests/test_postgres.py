"""PostgresStore: what only a server shared by sessions and processes can show.

The store contract runs on PostgreSQL in tests/test_stores.py (conftest's ``store``
params); here are the rest, on conftest's session server and its shared schema (emptied
after each test): worker processes sharing jobs, a SIGKILLed worker, a restarted or
stopped server, cron across processes, LISTEN/NOTIFY wake-ups, fork safety, query plans,
and migrations (those on a schema of their own, ``new_schema``).

Without PostgreSQL binaries (or psycopg) these tests skip with a message; with ``CI``
set they fail instead (conftest's ``missing_postgres``).
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import test_stores
from conftest import PG_SCHEMA, missing_postgres
from pg_server import PostgresServer

from threaddispatch.errors import ConfigurationError, JobNotFoundError, StoreError, StoreUnavailableError
from threaddispatch.jobs import JobContext, JobEngine
from threaddispatch.stores import CronEntry, JobRecord, JobState, open_store
from threaddispatch.stores.base import Completion
from threaddispatch.testing import live_dispatch_threads, wait_for

try:
    import psycopg

    from threaddispatch.stores._pg_pool import Conn
    from threaddispatch.stores.postgres import PostgresStore, migrate
except ImportError:  # the 'postgres' extra is not installed
    psycopg = None  # type: ignore[assignment]

pytestmark = [pytest.mark.postgres]

T0 = test_stores.T0
WORKER = Path(__file__).with_name("pg_worker.py")
CLAIM_FAILED = "claiming jobs failed; retrying after %.3gs"  # JobEngine's log line for a failed claim


def _admin_execute(pg_server: PostgresServer, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run one statement on a fresh connection (survives server restarts); returns its rows."""
    with psycopg.connect(pg_server.dsn, autocommit=True, options="-c lock_timeout=10000") as conn:
        cursor = conn.execute(query, params)
        return cursor.fetchall() if cursor.description else []


@pytest.fixture
def schema(pg_url: str) -> str:
    """The schema of the test's stores: conftest's shared one (``pg_url`` empties it after the test)."""
    return PG_SCHEMA


@pytest.fixture
def make_store(pg_server: PostgresServer, schema: str) -> Iterator[Callable[..., PostgresStore]]:
    """Build PostgresStores (on the test's schema unless ``schema=`` says otherwise); all closed at the end."""
    made: list[PostgresStore] = []

    def make(**options: Any) -> PostgresStore:
        store = PostgresStore(options.pop("dsn", pg_server.dsn), schema=options.pop("schema", schema), **options)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


# -- worker processes -----------------------------------------------------------------------------------


class Workers:
    """Worker subprocesses (tests/pg_worker.py) on one schema; all killed at teardown."""

    def __init__(self, server: PostgresServer, schema: str, outdir: Path) -> None:
        self.server = server
        self.schema = schema
        self.outdir = outdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, mode: str, *options: str) -> subprocess.Popen[bytes]:
        index = len(self.procs)
        with open(self.outdir / f"stderr-{index}", "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, str(WORKER), self.server.dsn, self.schema, str(self.outdir), mode, *options],
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        self.procs.append(proc)
        return proc

    def wait_ready(self, *procs: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
        def ready() -> bool:
            for proc in procs:
                if proc.poll() is not None:
                    raise AssertionError(f"worker {proc.pid} exited early ({proc.returncode}):\n{self.stderr()}")
            return all((self.outdir / f"ready-{proc.pid}").exists() for proc in procs)

        wait_for(ready, timeout, message="workers ready")

    def lines(self, proc: subprocess.Popen[bytes] | None = None) -> list[str]:
        """Lines written by one worker (or all of them)."""
        paths = [self.outdir / f"runs-{proc.pid}"] if proc else sorted(self.outdir.glob("runs-*"))
        return [line for path in paths if path.exists() for line in path.read_text().splitlines()]

    def stop(self, *procs: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
        """SIGTERM, then wait for a clean exit (code 0)."""
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in procs:
            proc.wait(max(0.1, deadline - time.monotonic()))
            assert proc.returncode == 0, f"worker {proc.pid} exited with {proc.returncode}:\n{self.stderr()}"

    def stderr(self) -> str:
        return "\n".join(path.read_text(errors="replace")[-3000:] for path in sorted(self.outdir.glob("stderr-*")))

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


@pytest.fixture
def workers(pg_server: PostgresServer, schema: str, tmp_path: Path) -> Iterator[Workers]:
    """Spawns worker processes on the test's schema; kills any left at the end."""
    group = Workers(pg_server, schema, tmp_path)
    yield group
    group.kill_all()


def _producer(store: PostgresStore) -> JobEngine:
    """An engine that is never started: it only enqueues (so nothing in-process wakes a consumer)."""
    engine = JobEngine(store)
    engine.register("record", lambda ctx, payload: payload, max_retries=3)
    engine.register("tick", lambda ctx, payload: None, max_retries=0)
    return engine


def _completed(store: PostgresStore) -> int:
    return store.counts()[JobState.COMPLETED]


@pytest.mark.timeout(90)
def test_three_worker_processes_share_300_jobs_each_run_exactly_once(
    make_store: Callable[..., PostgresStore], workers: Workers
) -> None:
    """Three processes claim from one table with SKIP LOCKED; every one of 300 jobs runs once, none twice."""
    store = make_store()
    store.migrate()
    procs = [workers.spawn("run", "--concurrency", "4", "--work", "0.005") for _ in range(3)]
    workers.wait_ready(*procs)
    _producer(store).enqueue_many("record", [{"n": n} for n in range(300)])
    wait_for(lambda: _completed(store) == 300, 60, message=f"300 jobs completed; stderr:\n{workers.stderr()}")
    workers.stop(*procs)
    runs = Counter(line for line in workers.lines())
    assert runs == Counter({f"run {n}": 1 for n in range(300)})
    busy = [proc.pid for proc in procs if workers.lines(proc)]
    assert len(busy) >= 2, f"only {busy} ran jobs: the test did not exercise concurrent claims"
    assert all(job.attempts == 1 for job in store.list_jobs(limit=300))


@pytest.mark.timeout(90)
def test_sigkilled_worker_loses_nothing_and_only_its_inflight_jobs_run_again(
    make_store: Callable[..., PostgresStore], workers: Workers
) -> None:
    """A worker killed mid-job: its 3 claimed jobs are reaped and run by another; the other 9 run once."""
    store = make_store()
    store.migrate()
    ids = _producer(store).enqueue_many("record", [{"n": n} for n in range(12)])
    doomed = workers.spawn("hang", "--concurrency", "3")
    wait_for(lambda: len(workers.lines(doomed)) == 3, 30, message=f"3 jobs started; stderr:\n{workers.stderr()}")
    doomed.send_signal(signal.SIGKILL)
    doomed.wait(10)
    started = {line.split()[1] for line in workers.lines(doomed)}
    survivor = workers.spawn("run", "--concurrency", "4", "--stale", "1.0")
    wait_for(lambda: _completed(store) == 12, 60, message=f"12 jobs completed; stderr:\n{workers.stderr()}")
    workers.stop(survivor)
    assert Counter(workers.lines(survivor)) == Counter({f"run {n}": 1 for n in range(12)})
    again = {str(job.decoded_payload()["n"]) for job in map(store.get, ids) if job is not None and job.attempts == 2}
    assert again == started, "exactly the killed worker's in-flight jobs ran a second time"
    assert len(started) == 3


@pytest.mark.timeout(90)
def test_cron_tick_fires_once_across_three_processes(
    make_store: Callable[..., PostgresStore], workers: Workers
) -> None:
    """Three engines declare the same '@every 300ms' entry; each tick becomes one job that runs once."""
    store = make_store()
    store.migrate()
    procs = [workers.spawn("cron", "--stale", "2.0") for _ in range(3)]
    workers.wait_ready(*procs)

    def ticks_done() -> bool:
        return len([j for j in store.list_jobs(state=JobState.COMPLETED, limit=1000) if j.name == "tick"]) >= 5

    wait_for(ticks_done, 30, message=f"5 cron ticks completed; stderr:\n{workers.stderr()}")
    workers.stop(*procs)
    jobs = [j for j in store.list_jobs(limit=1000) if j.name == "tick"]
    keys = Counter(j.unique_key for j in jobs)
    assert keys and max(keys.values()) == 1, f"a tick fired more than once: {keys}"
    runs = Counter(line for line in workers.lines() if line.startswith("tick "))
    assert max(runs.values()) == 1, f"a tick's job ran more than once: {runs}"
    assert {line.split()[1] for line in runs} <= set(keys)


@pytest.mark.timeout(60)
def test_fire_cron_from_many_sessions_at_once_fires_each_tick_once(make_store: Callable[..., PostgresStore]) -> None:
    """Six stores (six sessions) race fire_cron on the same ticks: the row lock lets exactly one win each."""
    stores = [make_store() for _ in range(6)]
    stores[0].upsert_cron(CronEntry("race", "@every 1s", "tick", "null", last_tick=T0), now=T0)
    barrier = threading.Barrier(len(stores))
    wins: list[float] = []
    lock = threading.Lock()

    def racer(store: PostgresStore) -> None:
        barrier.wait()
        for tick in range(1, 21):
            job = test_stores.job(name="tick", unique_key=f"cron:race:{tick}")
            if store.fire_cron("race", tick=T0 + tick, job=job):
                with lock:
                    wins.append(T0 + tick)

    threads = [threading.Thread(target=racer, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(wins) == [T0 + tick for tick in range(1, 21)]
    assert stores[0].counts()[JobState.PENDING] == 20


@pytest.mark.timeout(60)
def test_concurrent_reapers_recover_each_stale_job_once(make_store: Callable[..., PostgresStore]) -> None:
    """Four sessions reaping at once split the stale jobs between them; none is reaped twice."""
    stores = [make_store() for _ in range(4)]
    jobs = [test_stores.job(max_retries=1) for _ in range(200)]
    stores[0].enqueue(jobs)
    assert len(stores[0].claim(["default"], 200, worker_id="dead", now=T0)) == 200
    barrier = threading.Barrier(len(stores))
    reaped: list[list[str]] = [[] for _ in stores]

    def reaper(index: int) -> None:
        barrier.wait()
        reaped[index] = stores[index].reap_stale(older_than=T0 + 10, now=T0 + 30)

    threads = [threading.Thread(target=reaper, args=(i,)) for i in range(len(stores))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    everything = [job_id for ids in reaped for job_id in ids]
    assert sorted(everything) == sorted(j.id for j in jobs)
    assert stores[0].counts()[JobState.PENDING] == 200


# -- server restarts, outages, lost connections ---------------------------------------------------------


def _engine(store: PostgresStore, **options: Any) -> tuple[JobEngine, set[int]]:
    """A started-later engine whose 'record' job adds its payload's n to the returned set."""
    ran: set[int] = set()
    lock = threading.Lock()
    settings: dict[str, Any] = dict(concurrency=4, poll_interval=0.05, max_poll_interval=0.4,
                                    heartbeat_interval=0.2, stale_job_threshold=3.0, shutdown_timeout=5.0)  # fmt: skip
    settings.update(options)
    engine = JobEngine(store, **settings)

    @engine.job("record", max_retries=5)
    def record(ctx: JobContext, payload: dict[str, int]) -> int:
        with lock:
            ran.add(payload["n"])
        return payload["n"]

    return engine, ran


@pytest.mark.timeout(90)
def test_running_engine_survives_server_restart(
    pg_server: PostgresServer, make_store: Callable[..., PostgresStore]
) -> None:
    """pg_ctl restart ends every session; the engine reconnects and runs jobs enqueued before and after."""
    store = make_store()
    engine, ran = _engine(store)
    engine.start()
    try:
        engine.enqueue_many("record", [{"n": n} for n in range(20)])
        wait_for(lambda: _completed(store) == 20, 30, message="first 20 jobs")
        pg_server.restart()
        engine.enqueue_many("record", [{"n": n} for n in range(20, 40)])  # stale pooled connections are replaced
        wait_for(lambda: _completed(store) == 40, 45, message="40 jobs after the restart")
        assert engine.running
        assert ran == set(range(40))
    finally:
        assert engine.stop(10)


@pytest.mark.timeout(90)
def test_server_down_raises_unavailable_and_worker_backs_off_then_resumes(
    pg_server: PostgresServer, make_store: Callable[..., PostgresStore]
) -> None:
    """While the server is down calls raise StoreUnavailableError (host, no password) and the worker backs off.

    Only the fetcher's claim failures are counted (the heartbeat, the reaper and the
    paused-queue refresh log their own failures too): each names the delay before the
    next claim, which doubles from one failure to the next up to ``max_poll_interval``.
    """
    secret = "s3cret-Passw0rd"
    store = make_store(dsn=pg_server.dsn.replace("postgres@", f"postgres:{secret}@"))  # trust auth ignores it
    engine, ran = _engine(store)
    cap = engine.config.max_poll_interval
    warnings: list[logging.LogRecord] = []  # every warning, to check none shows the password
    claim_delays: list[float] = []  # the delay named by each failed claim, in order

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            warnings.append(record)
            unavailable = record.exc_info is not None and isinstance(record.exc_info[1], StoreUnavailableError)
            if unavailable and record.msg == CLAIM_FAILED:
                assert isinstance(record.args, tuple)  # CLAIM_FAILED is formatted with positional arguments
                claim_delays.append(cast(float, record.args[0]))

    handler = Collect(level=logging.WARNING)
    logging.getLogger("threaddispatch.jobs").addHandler(handler)
    engine.start()
    try:
        assert engine.result(engine.enqueue("record", {"n": 1}), timeout=20) == 1
        pg_server.stop_server()
        try:
            with pytest.raises(StoreUnavailableError) as info:
                store.get("anything")
            chain: list[BaseException] = []
            error: BaseException | None = info.value
            while error is not None and len(chain) < 10:
                chain.append(error)
                error = error.__cause__ or error.__context__
            assert f"127.0.0.1:{pg_server.port}" in str(info.value)
            assert not [e for e in chain if secret in str(e) or secret in repr(e)]
            assert secret not in repr(store) and secret not in str(store.describe())
            wait_for(
                lambda: len(claim_delays) >= 3 and claim_delays[-1] >= cap,
                30,
                message="the fetcher failed 3 claims, backing off up to max_poll_interval, and kept going",
            )
            assert engine.running
            delays = list(claim_delays)
            doubled = [later == pytest.approx(min(2 * earlier, cap)) for earlier, later in itertools.pairwise(delays)]
            assert all(doubled), f"no backoff between claims: {delays}"
            assert not [r for r in warnings if secret in r.getMessage() or secret in str(r.exc_info)]
        finally:
            pg_server.start_again()
        assert engine.result(engine.enqueue("record", {"n": 2}), timeout=30) == 2
        assert ran == {1, 2}
    finally:
        logging.getLogger("threaddispatch.jobs").removeHandler(handler)
        engine.stop(10)


@pytest.mark.timeout(30)
def test_unreachable_server_error_names_host_and_port_but_never_the_password() -> None:
    """Nothing listening: StoreUnavailableError at once, naming host:port; the password appears nowhere."""
    if psycopg is None:
        missing_postgres("psycopg is not installed: pip install 'threaddispatch[postgres]'")
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    secret = "hunter2-Secret"
    store = PostgresStore(f"postgresql://alice:{secret}@127.0.0.1:{port}/jobs", connect_timeout=2)
    try:
        with pytest.raises(StoreUnavailableError) as info:
            store.claim(["default"], 1, worker_id="w", now=T0)
        message = str(info.value)
        assert f"127.0.0.1:{port}" in message and secret not in message
        assert info.value.__cause__ is None or secret not in str(info.value.__cause__)
        assert secret not in repr(store) and secret not in str(store.describe())
    finally:
        store.close()


def test_invalid_dsn_is_refused_without_repeating_it() -> None:
    """A DSN libpq cannot parse raises ConfigurationError that does not quote it (it may hold a password)."""
    if psycopg is None:
        missing_postgres("psycopg is not installed: pip install 'threaddispatch[postgres]'")
    with pytest.raises(ConfigurationError) as info:
        PostgresStore("host=localhost password=topsecret nonsense_option=1")
    assert "topsecret" not in str(info.value)
    with pytest.raises(ConfigurationError):
        PostgresStore("postgresql://localhost/db", min_size=5, max_size=2)


@pytest.mark.timeout(30)
def test_terminated_session_is_replaced_without_an_error(
    pg_server: PostgresServer, make_store: Callable[..., PostgresStore]
) -> None:
    """A pooled connection killed by the server (pg_terminate_backend) is dropped and a new one used."""
    store = make_store(max_size=1)
    store.migrate()
    store.enqueue([test_stores.job()])
    pids = _admin_execute(pg_server, "SELECT pid FROM pg_stat_activity WHERE application_name = 'threaddispatch'")
    for (pid,) in pids:
        _admin_execute(pg_server, "SELECT pg_terminate_backend(%s)", (pid,))
    wait_for(lambda: not _admin_execute(pg_server, "SELECT 1 FROM pg_stat_activity WHERE pid = ANY(%s)",
                                        ([pid for (pid,) in pids],)), 10)  # fmt: skip
    fresh = test_stores.job()
    assert store.enqueue([fresh]) == [fresh.id]  # not retried: a dead idle connection is never used
    assert store.counts()[JobState.PENDING] == 2


# -- wake-ups -------------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_enqueue_in_one_session_notifies_subscribers_of_another(make_store: Callable[..., PostgresStore]) -> None:
    """NOTIFY from the insert trigger reaches a subscriber on another store with the queue and run_at."""
    listener, producer = make_store(), make_store()
    listener.migrate()
    got: list[tuple[str | None, float | None]] = []
    arrived = threading.Event()

    def on_wakeup(queue: str | None, run_at: float | None) -> None:
        got.append((queue, run_at))
        if queue == "mail":
            arrived.set()

    unsubscribe = listener.subscribe_wakeups(on_wakeup)
    try:
        wait_for(lambda: (None, None) in got, 10, message="listener connected")  # it says "look now" on connect
        producer.enqueue([test_stores.job(queue="mail", run_at=T0 + 5), test_stores.job(queue="mail", run_at=T0)])
        assert arrived.wait(10)
        assert ("mail", T0) in got
    finally:
        unsubscribe()
        unsubscribe()
    wait_for(lambda: not [t for t in live_dispatch_threads() if t.name == "threaddispatch-pg-listener"], 10)


@pytest.mark.timeout(30)
def test_idle_engine_is_woken_by_an_enqueue_elsewhere_long_before_its_next_poll(
    make_store: Callable[..., PostgresStore],
) -> None:
    """An engine polling every 30 s runs a job enqueued through another store within seconds (LISTEN/NOTIFY)."""
    consumer_store, producer_store = make_store(), make_store()
    engine, ran = _engine(consumer_store, poll_interval=30.0, max_poll_interval=30.0)
    engine.start()
    try:
        producer = _producer(producer_store)
        job_id = producer.enqueue("record", {"n": 7})
        assert engine.result(job_id, timeout=10) == 7
        assert ran == {7}
    finally:
        engine.stop(10)


# -- fork, migrations, URLs -------------------------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_opens_its_own_connections_and_leaves_the_parents_alone(
    make_store: Callable[..., PostgresStore],
) -> None:
    """After fork the child gets new sessions; the parent's pooled session survives the child's exit."""
    store = make_store(max_size=1)

    def read_pid(conn: Conn) -> int:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None  # a SELECT without FROM returns exactly one row
        return int(row[0])

    def backend_pid() -> int:
        return store._run("reading the backend pid", read_pid, idempotent=True)

    parent_session = backend_pid()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            code = 0 if backend_pid() != parent_session and store.get("none") is None else 1
            gc.collect()  # finalise whatever of the parent's the child dropped
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert backend_pid() == parent_session


@pytest.mark.timeout(60)
def test_migrations_are_versioned_and_safe_from_many_sessions_at_once(
    pg_server: PostgresServer, make_store: Callable[..., PostgresStore], new_schema: str
) -> None:
    """Six stores migrating one new schema at once: one applies every version, the others find it done."""
    stores = [make_store(schema=new_schema, migrate=False) for _ in range(6)]
    assert stores[0].schema_version() == 0
    barrier = threading.Barrier(len(stores))
    versions: list[int] = []

    def run(store: PostgresStore) -> None:
        barrier.wait()
        versions.append(store.migrate())

    threads = [threading.Thread(target=run, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    latest = PostgresStore.MIGRATIONS[-1][0]
    assert versions == [latest] * len(stores)
    rows = _admin_execute(pg_server, f'SELECT version FROM "{new_schema}".dispatch_schema_version ORDER BY version')
    assert rows == [(version,) for version in range(1, latest + 1)]
    assert migrate(pg_server.url(schema=new_schema)) == latest
    # Each backend numbers its own migrations 1, 2, ... (a version may change one backend only).
    assert [m[0] for m in PostgresStore.MIGRATIONS] == list(range(1, latest + 1))


@pytest.mark.timeout(30)
def test_open_store_builds_postgres_stores_from_urls(pg_server: PostgresServer, schema: str) -> None:
    """postgresql:// and postgres:// URLs build PostgresStores; ?schema= picks the schema."""
    for url in (pg_server.url(schema=schema), pg_server.url(schema=schema).replace("postgresql://", "postgres://")):
        store = open_store(url)
        try:
            assert isinstance(store, PostgresStore) and store.schema == schema
            job = test_stores.job()
            store.enqueue([job])
            assert store.get(job.id) == job
        finally:
            store.close()
    with pytest.raises(StoreError):
        store.get("x")


@pytest.mark.timeout(30)
def test_unique_key_holds_across_sessions_racing_to_insert(make_store: Callable[..., PostgresStore]) -> None:
    """Six sessions enqueue the same unique_key at once: one job exists and every caller gets its id."""
    stores = [make_store() for _ in range(6)]
    stores[0].migrate()
    barrier = threading.Barrier(len(stores))
    ids: list[str] = []

    def enqueue(store: PostgresStore) -> None:
        barrier.wait()
        ids.extend(store.enqueue([test_stores.job(unique_key="only-one")]))

    threads = [threading.Thread(target=enqueue, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert len(ids) == 6 and len(set(ids)) == 1
    assert stores[0].counts()[JobState.PENDING] == 1


def test_job_record_fields_survive_postgres_types(make_store: Callable[..., PostgresStore]) -> None:
    """Large priorities, fractional times, None and unicode come back exactly."""
    store = make_store()
    original = JobRecord(id="ü-1", name="naïve", payload='{"s": "ß✓"}', priority=(1 << 62), max_retries=10**12,
                         timeout=0.125, run_at=T0 + 0.000123, created_at=T0, updated_at=T0)  # fmt: skip
    store.enqueue([original])
    assert store.get(original.id) == original


def test_set_cron_enabled_is_one_idempotent_update(make_store: Callable[..., PostgresStore]) -> None:
    """Disable stores last_tick = Infinity (fire_cron refuses every tick); enable sets it to now; unknown raises."""
    store = make_store()
    store.upsert_cron(CronEntry("c", "@hourly", "tick", "null", last_tick=T0), now=T0)
    disabled = store.set_cron_enabled("c", False, now=T0 + 1)
    assert not disabled.enabled and disabled.updated_at == T0 + 1
    assert store.set_cron_enabled("c", False, now=T0 + 2) == disabled  # already disabled: unchanged
    assert not store.fire_cron("c", tick=T0 + 10**9, job=test_stores.job())
    store.upsert_cron(CronEntry("c", "@daily", "tick", "null", last_tick=None), now=T0 + 3)
    assert not store.list_crons()[0].enabled  # a re-declaration keeps it disabled
    enabled = store.set_cron_enabled("c", True, now=T0 + 4)
    assert enabled.enabled and enabled.last_tick == T0 + 4 and enabled.expression == "@daily"
    assert store.set_cron_enabled("c", True, now=T0 + 5) == enabled
    assert store.fire_cron("c", tick=T0 + 3600, job=test_stores.job())
    with pytest.raises(JobNotFoundError):
        store.set_cron_enabled("missing", True, now=T0)


def test_complete_and_claim_over_several_queues_in_one_statement(make_store: Callable[..., PostgresStore]) -> None:
    """The group commit completes what applies and claims across queues in priority order."""
    store = make_store()
    first = [test_stores.job(queue="a"), test_stores.job(queue="b")]
    store.enqueue(first)
    claimed = store.claim(["a", "b"], 2, worker_id="w", now=T0)
    later = [test_stores.job(queue="b", priority=2), test_stores.job(queue="a", priority=1), test_stores.job(queue="c")]
    store.enqueue(later)
    outcomes = [Completion(j.id, "w", j.attempts, '"ok"', None) for j in claimed]
    outcomes.append(Completion(later[2].id, "w", 1, None, None))
    done, next_jobs = store.complete_and_claim(outcomes, ["a", "b"], 5, worker_id="w", now=T0 + 1)
    assert done == {j.id for j in first}
    assert [j.id for j in next_jobs] == [later[0].id, later[1].id]
    assert store.get(first[0].id).decoded_result() == "ok"  # type: ignore[union-attr]
    assert store.complete_and_claim([], ["c"], 1, worker_id="w", now=T0 + 2)[1][0].id == later[2].id


# -- claims over several queues, and the schema's upgrade path ---------------------------------------------


def _claim_scan_rows(store: PostgresStore, queues: list[str], limit: int) -> int:
    """The most rows any scan of dispatch_jobs produced in the store's claim over ``queues`` (rolled back)."""
    from threaddispatch.stores import _pg_sql

    params = {"worker": "w", "now": T0 + 10, "limit": limit, "queues": queues}
    with psycopg.connect(store._dsn.conninfo, autocommit=True, options=f"-c search_path={store.schema}") as conn:
        conn.execute("ANALYZE dispatch_jobs")
        with conn.transaction(force_rollback=True):
            plan = conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + _pg_sql.CLAIM_ANY, params).fetchone()[0]  # type: ignore[index]

    def scans(node: dict[str, Any]) -> Iterator[int]:
        if "Scan" in node["Node Type"] and node.get("Relation Name") == "dispatch_jobs":
            yield int(node["Actual Rows"] * node["Actual Loops"])
        for child in node.get("Plans", ()):
            yield from scans(child)

    return max(scans(plan[0]["Plan"]))


@pytest.mark.timeout(60)
def test_claim_over_several_queues_reads_only_the_head_of_each_queue(make_store: Callable[..., PostgresStore]) -> None:
    """3,000 ready jobs over three queues: claiming 4 reads at most 4 ready rows per queue, not the whole set."""
    store = make_store()
    store.enqueue([test_stores.job(queue=f"q{n % 3}", priority=n % 5, run_at=T0 + n % 7) for n in range(3000)])
    assert _claim_scan_rows(store, ["q0", "q1", "q2"], 4) <= 3 * 4


@pytest.mark.timeout(60)
def test_claim_over_several_queues_gives_the_single_queue_claims_merged_in_claim_order(
    make_store: Callable[..., PostgresStore],
) -> None:
    """Jobs of mixed priorities and run_at over three queues (some not due, one other queue) come out
    of multi-queue claims in the order of the three single-queue orders merged: priority, run_at, seq."""
    store = make_store()
    jobs = [test_stores.job(queue=f"q{n % 3}" if n % 11 else "other", priority=(n * 7) % 4,
                            run_at=T0 + (n * 13) % 9) for n in range(90)]  # fmt: skip
    store.enqueue(jobs)
    now = T0 + 6
    due = [(j, n) for n, j in enumerate(jobs) if j.queue != "other" and j.run_at <= now]
    expected = [j.id for j, n in sorted(due, key=lambda pair: (-pair[0].priority, pair[0].run_at, pair[1]))]
    got: list[str] = []
    while batch := store.claim(["q2", "q0", "q1", "q0"], 7, worker_id="w", now=now):
        got.extend(job.id for job in batch)
    assert got == expected
    assert store.counts(queue="other")[JobState.PENDING] == sum(j.queue == "other" for j in jobs)


@pytest.mark.timeout(60)
def test_claim_over_several_queues_skips_rows_another_session_holds_and_never_double_claims(
    pg_server: PostgresServer, make_store: Callable[..., PostgresStore], schema: str
) -> None:
    """Rows locked by another session are skipped, not waited for; two sessions claiming the same
    queues at once hand out every job exactly once."""
    store, other = make_store(), make_store()
    jobs = [test_stores.job(queue=f"q{n % 3}", priority=n % 3) for n in range(300)]
    store.enqueue(jobs)
    with psycopg.connect(pg_server.dsn, options=f"-c search_path={schema}") as holder:
        held = {row[0] for row in holder.execute(
            "SELECT id FROM dispatch_jobs WHERE queue = 'q0' ORDER BY priority DESC, run_at, seq LIMIT 3 FOR UPDATE"
        ).fetchall()}  # fmt: skip
        first = store.claim(["q0", "q1", "q2"], 5, worker_id="w1", now=T0)
        assert len(first) == 5 and not held & {job.id for job in first}
        holder.rollback()
    barrier = threading.Barrier(2)
    claims: dict[str, list[str]] = {"w1": [job.id for job in first], "w2": []}

    def drain(claimer: PostgresStore, worker: str) -> None:
        barrier.wait()
        while batch := claimer.claim(["q0", "q1", "q2"], 4, worker_id=worker, now=T0):
            claims[worker].extend(job.id for job in batch)

    threads = [threading.Thread(target=drain, args=pair) for pair in ((store, "w1"), (other, "w2"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(40)
    every = claims["w1"] + claims["w2"]
    assert len(every) == len(set(every)) == len(jobs)
    assert store.counts()[JobState.RUNNING] == len(jobs)


@pytest.mark.timeout(60)
def test_engine_on_several_queues_leaves_a_paused_queue_alone(make_store: Callable[..., PostgresStore]) -> None:
    """A JobEngine serving three queues, one paused in the store, runs the other two queues' jobs only."""
    store = make_store()
    store.set_queue_paused("b", True, now=time.time())
    engine, ran = _engine(store, queues=["a", "b", "c"])
    producer = _producer(store)
    ids = {queue: [producer.enqueue("record", {"n": n}, queue=queue) for n in range(base, base + 5)]
           for queue, base in (("a", 0), ("b", 100), ("c", 200))}  # fmt: skip
    engine.start()
    try:
        for job_id in ids["a"] + ids["c"]:
            assert engine.result(job_id, timeout=20) is not None
        assert ran == set(range(5)) | set(range(200, 205))
        assert store.counts(queue="b")[JobState.PENDING] == 5
    finally:
        engine.stop(10)


def test_claims_and_completions_are_prepared_statements_from_their_first_use(
    make_store: Callable[..., PostgresStore],
) -> None:
    """The claim (one queue, several), the group commit and complete_many are planned once per connection."""
    store = make_store(max_size=1)
    store.enqueue([test_stores.job(queue=queue) for queue in ("a", "a", "b", "b")])
    first = store.claim(["a"], 1, worker_id="w", now=T0)
    second = store.claim(["a", "b"], 1, worker_id="w", now=T0)
    store.complete_and_claim([Completion(first[0].id, "w", 1, None, None)], ["b"], 1, worker_id="w", now=T0)
    store.complete_many([Completion(second[0].id, "w", 1, None, None)], now=T0)

    def prepared(conn: Any) -> list[str]:
        return [row[0] for row in conn.execute("SELECT statement FROM pg_prepared_statements").fetchall()]

    statements = store._run("listing prepared statements", prepared, idempotent=True)
    completing = [text for text in statements if "SET state = 'completed'" in text]
    assert sum(text.startswith("UPDATE dispatch_jobs SET state = 'running'") for text in statements) == 2
    assert sum("claimed AS" in text for text in completing) == 1  # the group commit
    assert sum("claimed AS" not in text for text in completing) == 1  # complete_many


@pytest.mark.timeout(60)
def test_migrating_a_version_1_database_with_jobs_keeps_them_and_tunes_autovacuum(
    pg_server: PostgresServer, make_store: Callable[..., PostgresStore], new_schema: str
) -> None:
    """A schema made by version 1 (rows pending, running and completed, as version 1 wrote them) upgrades in place."""

    class Version1Store(PostgresStore):
        MIGRATIONS = PostgresStore.MIGRATIONS[:1]

    old = Version1Store(pg_server.dsn, schema=new_schema)
    try:
        assert old.migrate() == 1
    finally:
        old.close()
    jobs = [test_stores.job(queue=queue, priority=n) for n, queue in enumerate("ababa")]
    jobs[3] = dataclasses.replace(jobs[3], state=JobState.RUNNING, attempts=1, worker_id="w", started_at=T0,
                                  heartbeat_at=T0)  # fmt: skip
    jobs[4] = dataclasses.replace(jobs[4], state=JobState.COMPLETED, attempts=1, worker_id="w", started_at=T0,
                                  finished_at=T0, result='"ok"')  # fmt: skip
    with psycopg.connect(pg_server.dsn, autocommit=True, options=f"-c search_path={new_schema}") as conn:
        test_stores.insert_version_1_jobs(conn, jobs, "%s")  # the rows as version 1 wrote them
    store = make_store(schema=new_schema)
    latest = PostgresStore.MIGRATIONS[-1][0]
    assert store.migrate() == latest >= 2
    assert {job.id: store.get(job.id) for job in jobs} == {job.id: job for job in jobs}
    assert [job.id for job in store.claim(["a", "b"], 5, worker_id="w2", now=T0)] == [j.id for j in jobs[2::-1]]
    options = _admin_execute(pg_server, "SELECT reloptions FROM pg_class WHERE oid = %s::regclass",
                             (f'"{new_schema}".dispatch_jobs',))[0][0]  # fmt: skip
    assert "autovacuum_vacuum_scale_factor=0.01" in options and "vacuum_index_cleanup=on" in options
    rows = _admin_execute(pg_server, f'SELECT version FROM "{new_schema}".dispatch_schema_version ORDER BY version')
    assert rows == [(version,) for version in range(1, latest + 1)]
