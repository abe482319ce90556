"""SQLiteStore's writer lock across processes and stores: writers of every process and store on one file
queue on the file's writer lock (a threading lock per path, a record lock on ``<db>-writer.lock``), not in
SQLite's busy handler; the kernel frees a killed holder's lock; a fork child starts with none held."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest
from sqlite_threads import frame_files, run_threads, wait_exit_code, waits_on_writer_lock

import threaddispatch.stores._sqlite_sql as sqlite_sql_module
import threaddispatch.stores.sqlite as sqlite_module
from threaddispatch.errors import StoreUnavailableError
from threaddispatch.stores import JobRecord, JobState, SQLiteStore, _sqlite_lock
from threaddispatch.testing import wait_for

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not _sqlite_lock.AVAILABLE, reason="needs fcntl record locks"),
]

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _job() -> JobRecord:
    now = time.time()
    return JobRecord(id=uuid.uuid4().hex, name="noop", payload="null", run_at=now, created_at=now, updated_at=now)


def _enqueue_on_thread(store: SQLiteStore, outcome: list[object]) -> threading.Thread:
    def enqueue() -> None:
        try:
            outcome.append(store.enqueue([_job()]))
        except BaseException as error:
            outcome.append(error)

    thread = threading.Thread(target=enqueue, name="producer")
    thread.start()
    return thread


_HOLDER = """
import sys, time, uuid
sys.path.insert(0, {root!r})
from threaddispatch.stores import JobRecord, SQLiteStore
from threaddispatch.stores._sqlite_conn import Write
from threaddispatch.stores._sql import job_params
from threaddispatch.stores._sqlite_sql import STATEMENTS

def job():
    now = time.time()
    return JobRecord(id=uuid.uuid4().hex, name="noop", payload="null", run_at=now, created_at=now, updated_at=now)

store = SQLiteStore({path!r}, busy_timeout=60)
for _ in range({count}):
    store.enqueue([job()])
print("enqueued", flush=True)
sys.stdin.readline()
with store._connections.slot().lock, Write(store._connections) as conn:
    conn.execute(STATEMENTS.insert_job, job_params(job()))
    print("holding", flush=True)
    sys.stdin.readline()
"""


def test_two_processes_writers_both_progress_and_a_killed_holder_frees_the_lock(tmp_path: Path) -> None:
    """Another process and this one enqueue at once: every job of both is kept. Then the other process holds
    the writer lock mid-transaction: this process's enqueue waits on the record lock (outside SQLite), and
    once the holder is SIGKILLed it goes through (the kernel drops a dead process's lock; its uncommitted
    insert is gone)."""
    path = str(tmp_path / "jobs.db")
    store = SQLiteStore(path, busy_timeout=60)
    script = textwrap.dedent(_HOLDER).format(root=_ROOT, path=path, count=200)
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    try:
        for _ in range(200):
            store.enqueue([_job()])
        assert child.stdout.readline().strip() == "enqueued"
        assert store.counts()[JobState.PENDING] == 400
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "holding"
        outcome: list[object] = []
        producer = _enqueue_on_thread(store, outcome)
        try:
            wait_for(lambda: outcome or waits_on_writer_lock(producer), 30, message="the producer to wait")
            assert outcome == [], f"the enqueue did not wait for the other process's lock: {outcome}"
            child.send_signal(signal.SIGKILL)
            child.wait(30)
        finally:
            producer.join(60)
        assert len(outcome) == 1 and isinstance(outcome[0], list), outcome
        assert store.counts()[JobState.PENDING] == 401
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(30)
        store.close()


def test_the_last_store_on_a_file_closes_its_writer_lock(tmp_path: Path) -> None:
    """One descriptor per file per process, kept while a store uses it, closed with the last one."""
    first = SQLiteStore(tmp_path / "jobs.db")
    second = SQLiteStore(tmp_path / "jobs.db")
    lock = first._connections.writer_lock
    assert lock.fd >= 0 and (tmp_path / "jobs.db-writer.lock").exists()
    first.close()
    first.close()  # idempotent: still one user
    assert lock.fd >= 0
    second.enqueue([_job()])
    second.close()
    assert lock.fd == -1
    third = SQLiteStore(tmp_path / "jobs.db")
    try:
        assert third._connections.writer_lock is not lock
        assert third.counts()[JobState.PENDING] == 1
    finally:
        third.close()


def test_a_writer_that_bypasses_the_lock_still_meets_sqlites_locking(tmp_path: Path) -> None:
    """A plain sqlite3 connection (the shell, an older version) writing without the lock: the store's
    write waits for it inside SQLite, and both writes are kept."""
    store = SQLiteStore(tmp_path / "jobs.db", busy_timeout=60)
    outside = sqlite3.connect(tmp_path / "jobs.db", isolation_level=None)
    outcome: list[object] = []
    producer: threading.Thread | None = None
    try:
        outside.execute("BEGIN IMMEDIATE")
        outside.execute("UPDATE dispatch_queues SET paused = paused")
        producer = waiting = _enqueue_on_thread(store, outcome)
        inserting = [[sqlite_module.__file__], [sqlite_sql_module.__file__]]  # the files that run the insert
        wait_for(lambda: outcome or frame_files(waiting)[:1] in inserting, 30, message="SQLite wait")
        assert outcome == []
        outside.execute("COMMIT")
        producer.join(60)
        assert len(outcome) == 1 and isinstance(outcome[0], list), outcome
        assert store.counts()[JobState.PENDING] == 1
    finally:
        if outside.in_transaction:
            outside.execute("ROLLBACK")
        if producer is not None:
            producer.join(60)
        outside.close()
        store.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_fork_child_holds_none_of_the_parents_writer_lock(tmp_path: Path) -> None:
    """The child of a parent holding the writer lock has a fresh threading lock and no record lock: its
    write waits for the parent's record lock like another process's (here past its short busy_timeout)."""
    store = SQLiteStore(tmp_path / "jobs.db", busy_timeout=30)
    lock = store._connections.writer_lock
    try:
        assert lock.acquire(time.monotonic() + 30) is None
        try:
            pid = os.fork()
            if pid == 0:  # the child: exit status 0 if it holds nothing and waits for the parent's lock
                code = 1
                try:
                    child_lock = store._connections.writer_lock
                    fresh = not child_lock.held and not child_lock.thread.locked()
                    short = SQLiteStore(tmp_path / "jobs.db", busy_timeout=0.2, migrate=False)
                    try:
                        short.enqueue([_job()])
                    except StoreUnavailableError as error:
                        code = 0 if fresh and "another process" in str(error) else 2
                finally:
                    os._exit(code)
            code = wait_exit_code(pid, 60)
        finally:
            lock.release()
        assert code == 0
        store.enqueue([_job()])
        assert store.counts()[JobState.PENDING] == 1
    finally:
        store.close()


def test_without_record_locks_the_threading_lock_alone_orders_writers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where fcntl is missing (or the sidecar cannot be opened) a store still writes, its threads queued on
    the threading lock, and makes no sidecar file."""
    monkeypatch.setattr(_sqlite_lock, "fcntl", None)
    store = SQLiteStore(tmp_path / "jobs.db")

    def enqueue() -> None:
        store.enqueue([_job()])

    try:
        assert store._connections.writer_lock.fd == -1
        assert run_threads([enqueue] * 4) == []
        assert len(store.claim(["default"], 10, worker_id="w", now=time.time())) == 4
        assert not (tmp_path / "jobs.db-writer.lock").exists()
    finally:
        store.close()
