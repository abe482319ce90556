"""The worker registry: every running JobEngine is listed in its store, and stale ones expire.

The store methods on every store; an engine's row from start to stop; two worker processes
on one SQLite file and on PostgreSQL, one of them SIGKILLed; migrations of older databases.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import test_stores
from conftest import SHARED_STORE_PARAMS

from threaddispatch._job_workers import list_workers
from threaddispatch.errors import ConfigurationError
from threaddispatch.jobs import JobEngine
from threaddispatch.stores import SQLiteStore, Store
from threaddispatch.stores.base import WorkerInfo
from threaddispatch.testing import wait_for

ROOT = Path(__file__).resolve().parents[1]
T0 = 1_700_000_000.0


def info(worker_id: str = "w1", *, started: float = T0, beat: float = T0, running: int = 0) -> WorkerInfo:
    return WorkerInfo(worker_id, "host-a", 4242, ("default", "mail"), 4, started, beat, running)


# -- the store methods, on every store -------------------------------------------------------------


def test_register_heartbeat_list_and_remove(store: Store) -> None:
    """A registered row is listed as stored; a heartbeat moves it; remove deletes it once."""
    store.register_worker(info("w2", started=T0 + 1))
    store.register_worker(info("w1"))
    assert store.list_workers(now=T0 + 5, stale_after=30) == [info("w1"), info("w2", started=T0 + 1)]
    assert store.heartbeat_worker("w1", running=3, now=T0 + 20)
    assert not store.heartbeat_worker("nobody", running=0, now=T0 + 20)
    assert store.list_workers(now=T0 + 40, stale_after=30) == [info("w1", beat=T0 + 20, running=3)]
    assert store.remove_worker("w1") and not store.remove_worker("w1")
    assert store.list_workers(now=T0 + 40, stale_after=30) == []


def test_register_again_replaces_the_row(store: Store) -> None:
    """Registering an id that has a row replaces it (a worker re-registering after being reaped)."""
    store.register_worker(info("w1"))
    store.register_worker(info("w1", beat=T0 + 9, running=2))
    assert store.list_workers(now=T0 + 10, stale_after=30) == [info("w1", beat=T0 + 9, running=2)]


def test_reap_workers_deletes_only_stale_rows(store: Store) -> None:
    """reap_workers deletes rows whose heartbeat is before older_than, and counts them."""
    store.register_worker(info("old", beat=T0))
    store.register_worker(info("new", beat=T0 + 100))
    assert store.reap_workers(older_than=T0 + 50) == 1
    assert store.reap_workers(older_than=T0 + 50) == 0
    assert [w.id for w in store.list_workers(now=T0 + 100, stale_after=1e9)] == ["new"]


def test_worker_info_to_dict_is_json_ready() -> None:
    """to_dict gives every field, queues as a list."""
    assert info(running=1).to_dict() == {
        "id": "w1", "host": "host-a", "pid": 4242, "queues": ["default", "mail"], "concurrency": 4,
        "started_at": T0, "heartbeat_at": T0, "running": 1,
    }  # fmt: skip


@pytest.mark.parametrize("bad", [0, -1.0, "30", True, float("nan")])
def test_list_workers_refuses_a_bad_stale_after(bad: Any) -> None:
    """A stale_after that is not a positive number of seconds is a ConfigurationError naming it."""
    from threaddispatch.stores import MemoryStore

    with MemoryStore() as store, pytest.raises(ConfigurationError, match="stale_after"):
        list_workers(store, stale_after=bad)


# -- an engine's row -------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_started_engine_is_listed_until_it_stops(store: Store) -> None:
    """start() registers the run (its queues, concurrency, pid, worker id); stop() removes it."""
    engine = JobEngine(store, queues=("default", "mail"), concurrency=3, poll_interval=0.02)
    assert list_workers(store) == []
    engine.start()
    try:
        [worker] = list_workers(store)
        assert worker.queues == ("default", "mail") and worker.concurrency == 3
        assert worker.pid == os.getpid() and worker.running == 0
        assert worker.id.startswith(f"{worker.host}:{os.getpid()}:")
    finally:
        assert engine.stop(10)
    assert list_workers(store) == []
    assert store.list_workers(now=time.time(), stale_after=1e9) == []


@pytest.mark.timeout(60)
def test_the_heartbeat_refreshes_the_row_with_the_running_count(store: Store) -> None:
    """While a job runs, a heartbeat writes running=1 and a later heartbeat time; a deleted row comes back."""
    release = threading.Event()
    engine = JobEngine(store, poll_interval=0.02, heartbeat_interval=0.05, stale_job_threshold=5.0)
    engine.register("block", lambda ctx, payload: release.wait(30), timeout=None)
    engine.start()
    try:
        [first] = list_workers(store)
        engine.enqueue("block", None)
        busy = wait_for(lambda: [w for w in list_workers(store) if w.running == 1], 20, message="running=1 listed")
        assert busy[0].id == first.id and busy[0].heartbeat_at > first.heartbeat_at
        assert store.remove_worker(first.id)
        back = wait_for(lambda: list_workers(store), 20, message="the worker registered again")
        assert [w.id for w in back] == [first.id]
    finally:
        release.set()
        assert engine.stop(10)
    assert list_workers(store) == []


@pytest.mark.timeout(60)
def test_an_engine_reaps_stale_rows_of_other_workers(store: Store) -> None:
    """A row whose heartbeat is older than stale_job_threshold is deleted by a running engine's reaper."""
    store.register_worker(info("dead", started=time.time() - 100, beat=time.time() - 100))
    engine = JobEngine(store, poll_interval=0.02, heartbeat_interval=0.05, stale_job_threshold=1.0)
    engine.start()
    try:
        wait_for(lambda: len(store.list_workers(now=time.time(), stale_after=1e9)) == 1, 20, message="dead reaped")
        assert [w.pid for w in store.list_workers(now=time.time(), stale_after=1e9)] == [os.getpid()]
    finally:
        assert engine.stop(10)


# -- worker processes ------------------------------------------------------------------------------

WORKER_MODULE = textwrap.dedent(
    """
    import os

    from threaddispatch.jobs import JobEngine
    from threaddispatch.stores import open_store

    engine = JobEngine(
        open_store(os.environ["STORE"]), queues=(os.environ["QUEUE"],), concurrency=2, poll_interval=0.05,
        heartbeat_interval=0.1, stale_job_threshold=1.0, shutdown_timeout=10.0,
    )
    """
)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A directory with the worker module."""
    (tmp_path / "workersmod.py").write_text(WORKER_MODULE)
    return tmp_path


def spawn(workdir: Path, store_url: str, queue: str) -> subprocess.Popen[bytes]:
    """Start `threaddispatch worker workersmod:engine` serving ``queue`` in a subprocess."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{workdir}", "STORE": store_url, "QUEUE": queue}
    return subprocess.Popen(
        [sys.executable, "-m", "threaddispatch._cli_worker", "workersmod:engine", "--log-level", "WARNING"],
        cwd=workdir,
        env=env,
    )


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Worker processes the test starts; any still alive at the end is killed."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def pids(store: Store, stale_after: float) -> set[int]:
    return {w.pid for w in list_workers(store, stale_after=stale_after)}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("store_kind", SHARED_STORE_PARAMS)
def test_two_worker_processes_are_listed_and_a_killed_one_expires(
    workdir: Path, store: Store, store_url: str, processes: list[subprocess.Popen[bytes]]
) -> None:
    """Two processes on one store are both listed; a SIGKILLed one leaves the listing after the stale
    threshold (1 s here) and the survivor's reaper deletes its row; SIGTERM removes the survivor's row."""
    victim, survivor = spawn(workdir, store_url, "a"), spawn(workdir, store_url, "b")
    processes += [victim, survivor]
    wait_for(lambda: pids(store, 1.0) == {victim.pid, survivor.pid}, 60, message="both workers listed")
    assert {w.queues for w in list_workers(store, stale_after=1.0)} == {("a",), ("b",)}
    victim.kill()
    victim.wait(10)
    wait_for(lambda: pids(store, 1.0) == {survivor.pid}, 60, message="the killed worker expired")
    wait_for(lambda: pids(store, 1e9) == {survivor.pid}, 60, message="the killed worker's row reaped")
    survivor.send_signal(signal.SIGTERM)
    assert survivor.wait(30) == 0
    assert pids(store, 1e9) == set()


# -- migrations ------------------------------------------------------------------------------------


def test_a_version_1_sqlite_file_gains_the_registry(tmp_path: Path) -> None:
    """A SQLite file made by migration 1 (with jobs in it) upgrades to the registry's migration in place."""

    class Version1Store(SQLiteStore):
        MIGRATIONS = SQLiteStore.MIGRATIONS[:1]

    path = tmp_path / "old.db"
    with Version1Store(path) as old:
        assert old.migrate() == 1
    job = test_stores.job(name="work")
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:  # the row as version 1 wrote it
        test_stores.insert_version_1_jobs(conn, [job], "?")
    with SQLiteStore(path) as store:
        assert store.migrate() == SQLiteStore.MIGRATIONS[-1][0] >= 2
        assert store.get(job.id) is not None
        store.register_worker(info())
        assert store.list_workers(now=T0, stale_after=30) == [info()]


@pytest.mark.postgres
def test_a_version_2_postgres_schema_gains_the_registry(pg_server: Any) -> None:
    """A PostgreSQL schema made by migrations 1-2 (with jobs in it) upgrades to migration 3 in place."""
    import psycopg

    from threaddispatch.stores.postgres import PostgresStore

    class Version2Store(PostgresStore):
        MIGRATIONS = PostgresStore.MIGRATIONS[:2]

    schema = f"t_{uuid.uuid4().hex[:12]}"
    try:
        with Version2Store(pg_server.dsn, schema=schema) as old:
            assert old.migrate() == 2
        job = test_stores.job(name="work")
        with psycopg.connect(pg_server.dsn, autocommit=True, options=f"-c search_path={schema}") as conn:
            test_stores.insert_version_1_jobs(conn, [job], "%s")  # versions 1 and 2 have the same job columns
        with PostgresStore(pg_server.dsn, schema=schema) as store:
            assert store.migrate() == PostgresStore.MIGRATIONS[-1][0] >= 3
            assert store.get(job.id) is not None
            store.register_worker(info())
            assert store.list_workers(now=T0, stale_after=30) == [info()]
    finally:
        with psycopg.connect(pg_server.dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
